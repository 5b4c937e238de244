"""A diffusers ControlNetModel (random weights, built locally) converted by models/convert_controlnet.py gives the same
residuals as diffusers (<= 1e-4 relative): plain, at a conditioning_scale, in guess mode, and with class labels; a
folder round trip through load_controlnet; and the options it cannot express are refused by name."""
import json
import os

import jax
import numpy as np
import pytest
from flax import nnx
from harness import assert_rel_close, need, random_torch_model, to_torch

from diffusion_jax.models.convert_controlnet import (
    controlnet_config_from_diffusers,
    controlnet_graphdef,
    convert_controlnet,
    load_controlnet,
)

# SD 1.x-shaped, tiny: cross-attention in the first block, a plain second block; class labels in the second model
TINY = dict(in_channels=4, block_out_channels=(16, 32), layers_per_block=1, cross_attention_dim=12,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), attention_head_dim=2, norm_num_groups=4,
            conditioning_channels=3, conditioning_embedding_out_channels=(4, 8))
TINY_CLASSES = dict(TINY, num_class_embeds=5, conditioning_channels=1, conditioning_embedding_out_channels=(8,),
                    transformer_layers_per_block=2, downsample_padding=1, norm_eps=1e-5)
RTOL = 1e-4


def _reference(cfg, seed):
    diffusers = need("diffusers")
    return random_torch_model(diffusers.ControlNetModel, seed, perturb=0.1, **cfg)


def _residuals_of_diffusers(ref, x, t, context, control, labels, scale, guess_mode):
    torch = need("torch")
    with torch.no_grad():
        down, mid = ref(to_torch(x, nchw_from_nhwc=True), to_torch(t), encoder_hidden_states=to_torch(context),
                        controlnet_cond=to_torch(control, nchw_from_nhwc=True), conditioning_scale=scale,
                        class_labels=None if labels is None else torch.as_tensor(labels), guess_mode=guess_mode,
                        return_dict=False)
    return [d.numpy().transpose(0, 2, 3, 1) for d in down], mid.numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize("cfg", [TINY, TINY_CLASSES], ids=["sd_like", "classes"])
def test_controlnet_residuals_match_diffusers(cfg):
    ref = _reference(cfg, seed=0)
    config = controlnet_config_from_diffusers(ref.config, sample_size=8)
    params = convert_controlnet(ref.state_dict(), config)
    graphdef = controlnet_graphdef(config)
    rng = np.random.default_rng(0)
    size = config.control_size
    x = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    t = np.array([10.0, 700.0], np.float32)
    context = rng.standard_normal((2, 5, 12)).astype(np.float32)
    control = rng.random((2, size, size, cfg["conditioning_channels"])).astype(np.float32)
    labels = None if "num_class_embeds" not in cfg else np.array([1, 4], np.int32)

    @jax.jit
    def ours(params, scale):
        net = nnx.merge(graphdef, params)
        return net(x, t, labels, context, control, scale), net(x, t, labels, context, control, scale, guess_mode=True)

    (down, mid), (gdown, gmid) = ours(params, 0.7)
    for guess, (d_ours, m_ours) in ((False, (down, mid)), (True, (gdown, gmid))):
        d_ref, m_ref = _residuals_of_diffusers(ref, x, t, context, control, labels, 0.7, guess)
        assert len(d_ours) == len(d_ref)
        for i, (a, b) in enumerate(zip(d_ours, d_ref)):
            assert_rel_close(np.asarray(a), b, RTOL, f"down residual {i} (guess mode {guess})")
        assert_rel_close(np.asarray(m_ours), m_ref, RTOL, f"mid residual (guess mode {guess})")


def test_load_controlnet_folder_and_refusals(tmp_path):
    ref = _reference(TINY, seed=1)
    ref.save_pretrained(str(tmp_path / "cn"))
    config, params = load_controlnet(str(tmp_path / "cn"), sample_size=8)
    assert config.condition is None and config.conditioning_channels == 3 and config.control_size == 16
    assert config.base.channel_mult == (1, 2) and config.base.attention_resolutions == (8,)
    direct = convert_controlnet(ref.state_dict(), config)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(direct)):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    raw = json.load(open(os.path.join(tmp_path, "cn", "config.json")))
    for key, value, message in [
        ("controlnet_conditioning_channel_order", "bgr", "controlnet_conditioning_channel_order='bgr' is not supported"),
        ("global_pool_conditions", True, "global_pool_conditions=True is not supported"),
        ("block_out_channels", [16, 24], "not multiples of the first"),
        ("layers_per_block", [1, 2], "per-block values cannot be expressed"),
        ("use_linear_projection", True, "use_linear_projection=True cannot be expressed"),
        ("flip_sin_to_cos", False, "flip_sin_to_cos=False cannot be expressed"),
    ]:
        with pytest.raises(ValueError, match=message):
            controlnet_config_from_diffusers({**raw, key: value}, sample_size=8)
    with pytest.raises(ValueError, match="missing keys"):
        convert_controlnet({k: v for k, v in ref.state_dict().items() if "mid_block" not in k}, config)


def test_exported_controlnet_loads_in_diffusers_with_our_residuals(tmp_path):
    from conftest import numpy_fill

    from diffusion_jax.models.controlnet import ControlNet, ControlNetConfig
    from diffusion_jax.models.export_diffusers import (
        controlnet_diffusers_config,
        controlnet_state_dict,
        save_model_folder,
    )
    from diffusion_jax.models.unet_cond_backbone import UNetCondBackboneConfig

    diffusers = need("diffusers")
    base = UNetCondBackboneConfig(image_size=8, in_channels=4, channels=8, channel_mult=(1, 2), num_res_blocks=1,
                                  attention_resolutions=(8,), num_heads=2, num_groups=4, num_classes=3, context_dim=12)
    config = ControlNetConfig(base=base, condition="canny", conditioning_channels=1, embedding_channels=(4, 8))
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: ControlNet(config, rngs=nnx.Rngs(0))), nnx.Param)
    params = numpy_fill(nnx.to_pure_dict(abstract), seed=3)
    save_model_folder(str(tmp_path / "cn"), controlnet_diffusers_config(config), controlnet_state_dict(params))
    ref = diffusers.ControlNetModel.from_pretrained(str(tmp_path / "cn")).eval()
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    t = np.array([3.0, 500.0], np.float32)
    context = rng.standard_normal((2, 5, 12)).astype(np.float32)
    control = rng.random((2, 16, 16, 1)).astype(np.float32)
    labels = np.array([0, 3], np.int32)   # 3: the null class of classifier-free guidance
    down, mid = jax.jit(lambda p: nnx.merge(graphdef, p)(x, t, labels, context, control, 1.0))(params)
    d_ref, m_ref = _residuals_of_diffusers(ref, x, t, context, control, labels, 1.0, False)
    for i, (a, b) in enumerate(zip(down, d_ref)):
        assert_rel_close(np.asarray(a), b, RTOL, f"exported ControlNet down residual {i}")
    assert_rel_close(np.asarray(mid), m_ref, RTOL, "exported ControlNet mid residual")
    # and back: the importer reads the folder to the same params
    config_back, params_back = load_controlnet(str(tmp_path / "cn"), sample_size=8)
    assert config_back.base == base and config_back.embedding_channels == (4, 8)
    for a, b in zip(jax.tree.leaves(params_back), jax.tree.leaves(params)):
        assert np.array_equal(np.asarray(a), np.asarray(b))
