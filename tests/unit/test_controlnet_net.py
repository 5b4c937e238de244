"""ControlNet (models/controlnet.py): zero-initialised, it leaves the base model's samples bit-identical; its
residuals enter the locked U-Net with conditioning_scale, guess-mode weights and several ControlNets summed; the
train step moves only the ControlNet (the base params and their EMA stay bit-identical, with no optimizer state);
the conditions (data/conditions.py) and the edge metrics (eval/metrics/edges.py) are right on known images."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import numpy_fill
from flax import nnx

from diffusion_jax.data import Batches
from diffusion_jax.data.conditions import ControlSource, canny_edges, low_resolution, make_condition, sobel_edges
from diffusion_jax.data.sources import ArraySource
from diffusion_jax.eval.metrics.edges import chamfer_distance, edge_iou, paired_cluster_difference
from diffusion_jax.inference.sampling import SamplerSpec, make_sample_fn
from diffusion_jax.models.controlnet import ControlledUNet, ControlNetConfig, guess_mode_scales
from diffusion_jax.models.functional import abstract_params
from diffusion_jax.models.unet import UNet, UNetConfig
from diffusion_jax.models.unet_cond_backbone import UNetCondBackbone, UNetCondBackboneConfig
from diffusion_jax.process.discrete import make_schedule

BASE = UNetConfig(image_size=8, in_channels=1, channels=8, channel_mult=(1, 2), num_res_blocks=1,
                  attention_resolutions=(), num_heads=1, num_groups=4, num_classes=10, dropout=0.0)
CONFIG = ControlNetConfig(base=BASE, condition="sobel", conditioning_channels=1, embedding_channels=(8,))
RNG = np.random.default_rng(0)
X = RNG.standard_normal((4, 8, 8, 1)).astype(np.float32)
T = np.array([10, 300, 600, 999], np.int32)
Y = np.array([0, 3, 7, 10], np.int32)
C = (RNG.random((4, 8, 8, 1)) > 0.5).astype(np.float32)


def _with_zero_convs(params):
    """params with every ControlNet's zero convolutions (and the conditioning encoder's conv_out) at zero."""
    nets = {}
    for i, net in params["controlnets"].items():
        zero = lambda tree: jax.tree.map(jnp.zeros_like, tree)   # noqa: E731
        nets[i] = dict(net, controlnet_down_blocks=zero(net["controlnet_down_blocks"]),
                       controlnet_mid_block=zero(net["controlnet_mid_block"]),
                       controlnet_cond_embedding=dict(net["controlnet_cond_embedding"],
                                                      conv_out=zero(net["controlnet_cond_embedding"]["conv_out"])))
    return dict(params, controlnets=nets)


@pytest.fixture(scope="module")
def nets():
    """(base graphdef, base params, controlled graphdef, controlled params with the base's params and zero convs)."""
    graph_b, abstract = abstract_params(lambda r: UNet(BASE, rngs=r))
    params_b = numpy_fill(abstract, seed=1)
    graph_c, abstract_c = abstract_params(lambda r: ControlledUNet(CONFIG, rngs=r))
    net = numpy_fill(abstract_c["controlnets"][0], seed=2)
    return graph_b, params_b, graph_c, _with_zero_convs({"base": params_b, "controlnets": {0: net}})


def _randomise_zero_convs(params, seed=3):
    net = dict(params["controlnets"][0])
    rng = np.random.default_rng(seed)
    fill = lambda a: jnp.asarray(0.1 * rng.standard_normal(a.shape, np.float32))   # noqa: E731
    for name in ("controlnet_down_blocks", "controlnet_mid_block"):
        net[name] = jax.tree.map(fill, net[name])
    net["controlnet_cond_embedding"] = dict(net["controlnet_cond_embedding"],
                                            conv_out=jax.tree.map(fill, net["controlnet_cond_embedding"]["conv_out"]))
    return {"base": params["base"], "controlnets": {0: net}}


def test_zero_initialised_controlnet_leaves_the_base_samples_bit_identical(nets):
    graph_b, params_b, graph_c, params_c = nets
    spec = SamplerSpec("ddim", steps=4, spacing="trailing")
    schedule = make_schedule("cosine", 1000)
    kw = dict(prediction="v", num_classes=10)
    base = make_sample_fn(graph_b, schedule, spec, X.shape, **kw)(params_b, jax.random.PRNGKey(0), Y)[0]
    fn = make_sample_fn(graph_c, schedule, spec, X.shape, **kw)
    for scale in (1.0, 3.0):
        with_control = fn(params_c, jax.random.PRNGKey(0), Y, control={"control": C, "conditioning_scale": scale})[0]
        assert np.array_equal(np.asarray(with_control), np.asarray(base))
    cfg = make_sample_fn(graph_b, schedule, dataclasses.replace(spec, guidance_scale=2.0), X.shape, **kw)
    cfg_c = make_sample_fn(graph_c, schedule, dataclasses.replace(spec, guidance_scale=2.0), X.shape, **kw)
    assert np.array_equal(np.asarray(cfg(params_b, jax.random.PRNGKey(1), Y)[0]),
                          np.asarray(cfg_c(params_c, jax.random.PRNGKey(1), Y, control={"control": C})[0]))


def test_residuals_follow_conditioning_scale_and_guess_mode(nets):
    _, params_b, graph_c, params_c = nets
    params = _randomise_zero_convs(params_c)
    model = nnx.merge(graph_c, params)
    base = np.asarray(nnx.merge(graph_c, params_c).base(X, T, Y))
    out = np.asarray(model(X, T, Y, control=C))
    assert np.abs(out - base).max() > 1e-3                                   # the control reaches the output
    assert np.array_equal(np.asarray(model(X, T, Y, control=C, conditioning_scale=0.0)), base)
    assert np.array_equal(np.asarray(model(X, T, Y)), base)                  # no control: the base model
    net = model.controlnets[0]
    down, mid = net(X, T, Y, None, C, 1.0)
    down2, mid2 = net(X, T, Y, None, C, 0.5)
    np.testing.assert_allclose(np.asarray(mid2), 0.5 * np.asarray(mid), rtol=1e-6)
    gdown, gmid = net(X, T, Y, None, C, 1.0, guess_mode=True)
    weights = np.asarray(guess_mode_scales(len(down) + 1))
    np.testing.assert_allclose(weights[[0, -1]], [0.1, 1.0], rtol=1e-6)
    for i, (g, r) in enumerate(zip(gdown, down)):
        np.testing.assert_allclose(np.asarray(g), weights[i] * np.asarray(r), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(gmid), np.asarray(mid), rtol=1e-6)


def test_two_controlnets_sum_their_residuals(nets):
    _, _, graph_c, params_c = nets
    one = _randomise_zero_convs(params_c, seed=3)
    other = _randomise_zero_convs(params_c, seed=4)
    graph2, _ = abstract_params(lambda r: ControlledUNet(CONFIG, rngs=r, num_controlnets=2))
    params2 = {"base": one["base"], "controlnets": {0: one["controlnets"][0], 1: other["controlnets"][0]}}
    C2 = 1.0 - C

    @jax.jit
    def run(one, params2):
        model, multi = nnx.merge(graph_c, one), nnx.merge(graph2, params2)
        d1, m1 = multi.controlnets[0](X, T, Y, None, C, 1.0)
        d2, m2 = multi.controlnets[1](X, T, Y, None, C2, 1.0)
        return (model(X, T, Y, control=C), multi(X, T, Y, control=(C, C2), conditioning_scale=(1.0, 0.0)),
                multi(X, T, Y, control=(C, C2)), multi.base(X, T, Y, residuals=([a + b for a, b in zip(d1, d2)],
                                                                                 m1 + m2)))

    alone, second_at_zero, both, summed = run(one, params2)
    # the second ControlNet at scale 0 adds exact zeros: the first one alone
    np.testing.assert_array_equal(np.asarray(second_at_zero), np.asarray(alone))
    np.testing.assert_allclose(np.asarray(both), np.asarray(summed), atol=1e-6)
    with pytest.raises(ValueError, match="1 control image"):
        jax.eval_shape(lambda p: nnx.merge(graph2, p)(X, T, Y, control=C), params2)


def test_control_image_and_config_errors_name_the_problem(nets):
    _, _, graph_c, params_c = nets
    model = nnx.merge(graph_c, params_c)
    with pytest.raises(ValueError, match=r"control image must be \(4, 8, 8, 1\).*got \(4, 8, 8, 3\)"):
        model(X, T, Y, control=np.zeros((4, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="control image must be .* got \\(4, 16, 16, 1\\)"):
        model(X, T, Y, control=np.zeros((4, 16, 16, 1), np.float32))
    with pytest.raises(ValueError, match="model.base_workdir is not set"):
        ControlNetConfig().validate()
    with pytest.raises(ValueError, match="model.condition='edges' is unknown"):
        dataclasses.replace(CONFIG, condition="edges").validate()
    with pytest.raises(ValueError, match="model.base.chanels"):
        ControlNetConfig(base={"name": "unet", "chanels": 8})
    with pytest.raises(ValueError, match="a ControlNet wraps one of"):
        ControlNetConfig(base={"name": "vae"})
    assert dataclasses.replace(CONFIG, embedding_channels=(8, 16, 16)).control_size == 32


def test_unet_cond_base_gets_the_same_construction():
    base = UNetCondBackboneConfig(image_size=8, in_channels=4, channels=8, channel_mult=(1, 2), num_res_blocks=1,
                                  attention_resolutions=(4,), num_heads=2, num_groups=4, context_dim=16)
    cfg = ControlNetConfig(base=base, conditioning_channels=3, embedding_channels=(4, 8))   # control at 16x16
    graphdef, abstract = abstract_params(lambda r: ControlledUNet(cfg, rngs=r))
    params = numpy_fill(abstract)
    net = params["controlnets"][0]
    assert len(net["controlnet_down_blocks"]) == 4   # conv_in, 1 res, downsample, 1 res
    params_zero = _with_zero_convs(params)
    x = RNG.standard_normal((2, 8, 8, 4)).astype(np.float32)
    ctx = RNG.standard_normal((2, 5, 16)).astype(np.float32)
    control = RNG.random((2, 16, 16, 3)).astype(np.float32)

    @jax.jit
    def run(p, control):
        model = nnx.merge(graphdef, p)
        return model(x, T[:2], None, ctx, control=control), model.base(x, T[:2], None, ctx)

    with_control, base = run(params_zero, control)
    assert isinstance(nnx.merge(graphdef, params).base, UNetCondBackbone)
    np.testing.assert_array_equal(np.asarray(with_control), np.asarray(base))
    with_control, base = run(params, control)
    assert np.abs(np.asarray(with_control) - np.asarray(base)).max() > 1e-3


def test_train_step_moves_only_the_controlnet(tmp_path):
    from diffusion_jax.objectives.discrete import LossConfig
    from diffusion_jax.parallel import make_mesh
    from diffusion_jax.train.state import StepOptions, create_train_state, make_optimizer, make_train_step
    from diffusion_jax.config import OptimConfig

    mesh = make_mesh(1)
    # one level, no attention: the smallest U-Net with skips, a middle block and a decoder (compiles fast)
    config = dataclasses.replace(CONFIG, base=dataclasses.replace(BASE, channel_mult=(1,)))
    tx, lr = make_optimizer(OptimConfig(warmup_steps=0, learning_rate=1e-2), 10, config)
    graphdef, state, shardings = create_train_state(config, tx, jax.random.PRNGKey(0), mesh)
    net0 = jax.device_get(state.params["controlnets"])
    zeros = jax.tree.leaves((net0[0]["controlnet_down_blocks"], net0[0]["controlnet_mid_block"],
                             net0[0]["controlnet_cond_embedding"]["conv_out"]))
    assert zeros and all(not np.any(z) for z in zeros)   # a fresh ControlNet's zero convolutions
    # a trained base (a fresh one's conv_out is zero, so nothing would reach the loss)
    base0 = numpy_fill(jax.eval_shape(lambda: state.params["base"]), seed=5)
    state = state.replace(params=dict(state.params, base=base0), ema_params=dict(state.ema_params, base=base0))
    base0 = jax.device_get(base0)   # the step donates the state's arrays
    # no optimizer moments for the locked base: the state holds as many numbers as the ControlNet has, twice
    opt_numbers = sum(x.size for x in jax.tree.leaves(state.opt_state) if np.ndim(x) > 0)
    assert opt_numbers == 2 * sum(x.size for x in jax.tree.leaves(net0))
    opts = StepOptions(0.9, False, False, 10, trainable=lambda path: path[0] == "controlnets")
    step = make_train_step(graphdef, make_schedule("cosine", 1000), LossConfig(prediction="v", cond_drop_prob=0.5),
                           tx, lr, opts, mesh, shardings)
    batch = {"image": X, "label": Y.clip(0, 9), "control": C}
    for _ in range(2):
        state, metrics = step(state, batch)
    assert np.isfinite(float(metrics["loss"]))
    for got, want in zip(jax.tree.leaves(jax.device_get(state.params["base"])), jax.tree.leaves(base0)):
        assert np.array_equal(got, want)
    for got, want in zip(jax.tree.leaves(jax.device_get(state.ema_params["base"])), jax.tree.leaves(base0)):
        assert np.array_equal(got, want)
    moved = jax.device_get(state.params["controlnets"][0]["controlnet_mid_block"]["kernel"])
    assert np.abs(moved).max() > 0   # the zero convolution left zero
    assert not np.array_equal(jax.device_get(state.params["controlnets"][0]["encoder"]["conv_in"]["kernel"]),
                              net0[0]["encoder"]["conv_in"]["kernel"])


def test_conditions_on_known_images():
    step = -np.ones((1, 8, 8, 1), np.float32)
    step[..., 4:, :] = 1.0                                   # a vertical unit step edge between columns 3 and 4
    edges = sobel_edges(step)[0, ..., 0]
    assert edges.shape == (8, 8) and set(np.unique(edges)) == {0.0, 1.0}
    assert edges[:, 3:5].all() and not edges[:, :3].any() and not edges[:, 5:].any()
    assert not sobel_edges(np.zeros((2, 8, 8, 1), np.float32)).any()
    square = -np.ones((1, 16, 16, 1), np.float32)
    square[:, 4:12, 4:12] = 1.0
    canny = canny_edges(square)[0, ..., 0]
    assert canny.any() and not canny[7:9, 7:9].any() and not canny[0].any()   # the outline, not the inside
    low = low_resolution(np.arange(16, dtype=np.float32).reshape(1, 4, 4, 1) / 8 - 1)
    np.testing.assert_allclose(low[0, :2, :2, 0], ((0 + 1 + 4 + 5) / 4 / 8) / 2)
    assert low.shape == (1, 4, 4, 1) and make_condition("lowres", np.zeros((1, 4, 4, 3))).shape == (1, 4, 4, 3)
    with pytest.raises(ValueError, match="condition 'depth' is unknown"):
        make_condition("depth", step)
    with pytest.raises(ValueError, match=r"images must be \(N, H, W, 1 or 3\)"):
        sobel_edges(np.zeros((8, 8)))


def test_control_source_flips_the_control_with_its_image():
    images = np.zeros((4, 8, 8, 1), np.float32) - 1
    images[:, :, :2] = 1.0                                   # a bar on the left of every image
    source = ControlSource(ArraySource(images, np.arange(4) % 2, 2), "sobel")
    batches = Batches(source, 4, seed=0, random_flip=True)
    for s in range(4):
        b = batches.batch_at(s)
        np.testing.assert_array_equal(b["control"], sobel_edges(b["image"]))


def test_edge_metrics():
    a = np.zeros((3, 8, 8), np.float32)
    a[:, 2, 2] = 1
    b = a.copy()
    b[1] = 0
    b[1, 2, 3] = 1                                           # moved by one pixel
    b[2] = 0                                                 # empty
    np.testing.assert_allclose(edge_iou(a, b), [1.0, 0.0, 0.0])
    np.testing.assert_allclose(chamfer_distance(a, b), [0.0, 1.0, np.hypot(8, 8)])
    assert edge_iou(np.zeros((1, 4, 4)), np.zeros((1, 4, 4)))[0] == 1.0
    clusters = np.repeat(np.arange(50), 3)
    rng = np.random.default_rng(0)
    better = rng.random(150)
    d = paired_cluster_difference(better + 0.5, better, clusters)
    assert d["verdict"] == "worse" and abs(d["diff"] - 0.5) < 1e-12 and d["clusters"] == 50
    same = paired_cluster_difference(better, better + rng.normal(0, 0.1, 150), clusters)
    assert same["verdict"] == "not separable"
