"""LoRA (models/lora.py, models/lora_io.py): B = 0 leaves the base bit-identical; the adapted network equals the
base with the updates merged, and unmerging gives the base back; the default targets train well under 5% of the
digits model; the safetensors file round-trips and a LoRA of another architecture is refused by key and shape."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import numpy_fill
from flax import nnx, traverse_util

from diffusion_jax.models.functional import abstract_params, count_params
from diffusion_jax.models.lora import LoRAConfig, LoRAUNet, merge, target_paths, unmerge
from diffusion_jax.models.lora_io import load_lora, module_key, save_lora
from diffusion_jax.models.unet import UNetConfig

BASE = UNetConfig(image_size=8, in_channels=1, channels=8, channel_mult=(1, 2), num_res_blocks=1,
                  attention_resolutions=(4,), num_heads=1, num_groups=4, num_classes=10, dropout=0.0)
CONFIG = LoRAConfig(base=BASE, rank=2, alpha=3.0, targets=("q", "v", "proj_out", "conv1"))
RNG = np.random.default_rng(0)
X = RNG.standard_normal((3, 8, 8, 1)).astype(np.float32)
T = np.array([10, 400, 900], np.int32)
Y = np.array([1, 5, 10], np.int32)


@pytest.fixture(scope="module")
def lora_net():
    graphdef, abstract = abstract_params(lambda r: LoRAUNet(CONFIG, rngs=r))
    params = numpy_fill(abstract, seed=1)
    zero_b = dict(params, adapters={i: dict(a, lora_B=jnp.zeros_like(a["lora_B"]))
                                    for i, a in params["adapters"].items()})
    run = jax.jit(lambda p: nnx.merge(graphdef, p)(X, T, Y))
    return graphdef, params, zero_b, run


def test_zero_b_is_the_base_and_the_adapted_net_is_the_merged_base(lora_net):
    graphdef, params, zero_b, run = lora_net
    model = nnx.merge(graphdef, params)
    base_graph, _ = nnx.split(model.base, nnx.Param)
    run_base = jax.jit(lambda p: nnx.merge(base_graph, p)(X, T, Y))
    np.testing.assert_array_equal(np.asarray(run(zero_b)), np.asarray(run_base(params["base"])))
    merged = merge(params["base"], params["adapters"], model.paths, CONFIG.scale)
    out = np.asarray(run(params))
    assert np.abs(out - np.asarray(run_base(params["base"]))).max() > 1e-3       # the adapters change the output
    np.testing.assert_allclose(np.asarray(run_base(merged)), out, rtol=0, atol=1e-5)
    back = unmerge(merged, params["adapters"], model.paths, CONFIG.scale)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params["base"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6)
    # conv targets adapt the 3x3 kernels: A (3, 3, I, r), B (r, O)
    conv = [i for i, p in enumerate(model.paths) if p[-2] == "conv1"]
    assert conv and params["adapters"][conv[0]]["lora_A"].shape[:2] == (3, 3)


def test_default_targets_train_under_five_percent_of_the_digits_model():
    from diffusion_jax.config import load_experiment
    from conftest import DIGITS

    base = load_experiment(DIGITS)[0].model
    _, abstract = abstract_params(lambda r: LoRAUNet(LoRAConfig(base=base, rank=4), rngs=r))
    trained, locked = count_params(abstract["adapters"]), count_params(abstract["base"])
    assert 0 < trained < 0.05 * locked, (trained, locked)


def test_config_and_target_errors_name_the_key():
    with pytest.raises(ValueError, match="model.rank=0 must be a positive int"):
        dataclasses.replace(CONFIG, rank=0).validate()
    with pytest.raises(ValueError, match="model.alpha=-1"):
        dataclasses.replace(CONFIG, alpha=-1.0).validate()
    with pytest.raises(ValueError, match=r"model.targets \['to_q'\] match no Linear or conv layer of the 'unet' base"):
        nnx.eval_shape(lambda: LoRAUNet(dataclasses.replace(CONFIG, targets=("to_q",)), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="model.base_workdir is not set"):
        LoRAConfig().validate()


def test_safetensors_round_trip_and_other_architectures_are_refused(lora_net, tmp_path):
    graphdef, params, _, _ = lora_net
    paths = nnx.merge(graphdef, params).paths
    save_lora(str(tmp_path), CONFIG, params["adapters"], paths)
    shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params["base"])
    adapters, paths_back, rank, alpha = load_lora(str(tmp_path), BASE, shapes)
    assert paths_back == paths and rank == 2 and alpha == 3.0
    for i in range(len(paths)):
        for k in ("lora_A", "lora_B"):
            np.testing.assert_array_equal(adapters[i][k], np.asarray(params["adapters"][i][k]))
    assert module_key("unet", ("mid_attn", "q", "kernel")) == "mid_block.attentions.0.to_q"
    wider = dataclasses.replace(BASE, channels=16)
    _, wider_abstract = abstract_params(lambda r: LoRAUNet(dataclasses.replace(CONFIG, base=wider), rngs=r))
    with pytest.raises(ValueError, match="a LoRA of another architecture"):
        load_lora(str(tmp_path), wider, wider_abstract["base"])
    one_level = dataclasses.replace(BASE, channel_mult=(1,), attention_resolutions=())
    _, small = abstract_params(lambda r: LoRAUNet(LoRAConfig(base=one_level, targets=("q",)), rngs=r))
    with pytest.raises(ValueError, match="is not a Linear or conv layer of this 'unet' base"):
        load_lora(str(tmp_path), one_level, small["base"])


def test_target_paths_follow_the_module_names():
    flat = {("down", 0, "attn", 0, "q", "kernel"): jnp.zeros((4, 4)), ("down", 0, "attn", 0, "q", "bias"): jnp.zeros(4),
            ("up", 1, "to_out", 0, "kernel"): jnp.zeros((4, 4)), ("emb", "embedding"): jnp.zeros((3, 4))}
    params = traverse_util.unflatten_dict(flat)
    assert target_paths(params, ("q", "to_out")) == (("down", 0, "attn", 0, "q", "kernel"),
                                                     ("up", 1, "to_out", 0, "kernel"))
