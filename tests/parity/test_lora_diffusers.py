"""A LoRA saved by the project (models/lora_io.py) and loaded by diffusers / peft gives the project's output
(<= 1e-4 relative): a unet_cond base exported as a UNet2DConditionModel with `load_lora_adapter` (what
`load_lora_weights` calls for the U-Net), and a unet base exported as a UNet2DModel with peft's
`inject_adapter_in_model` + `set_peft_model_state_dict` (UNet2DModel has no LoRA loader of its own)."""
import json
import os

import jax
import numpy as np
from conftest import numpy_fill
from flax import nnx
from harness import assert_rel_close, need, run_nhwc

from diffusion_jax.models.export_diffusers import (
    save_model_folder,
    unet2d_config,
    unet2d_state_dict,
    unet_cond_diffusers_config,
    unet_cond_state_dict,
)
from diffusion_jax.models.functional import abstract_params
from diffusion_jax.models.lora import LoRAConfig, LoRAUNet, merge
from diffusion_jax.models.lora_io import METADATA_KEY, WEIGHT_NAME, save_lora
from diffusion_jax.models.unet import UNetConfig
from diffusion_jax.models.unet_cond_backbone import UNetCondBackboneConfig

RTOL = 1e-4


def _lora(config, seed):
    graphdef, abstract = abstract_params(lambda r: LoRAUNet(config, rngs=r))
    params = numpy_fill(abstract, seed=seed)
    return graphdef, params, nnx.merge(graphdef, params).paths


def test_unet_cond_lora_loads_in_diffusers(tmp_path):
    diffusers = need("diffusers")
    need("peft")
    base = UNetCondBackboneConfig(image_size=8, in_channels=4, channels=8, channel_mult=(1, 2), num_res_blocks=1,
                                  attention_resolutions=(8,), num_heads=2, num_groups=4, context_dim=12)
    config = LoRAConfig(base=base, rank=3, alpha=6.0, targets=("to_q", "to_k", "to_v", "to_out", "conv1"))
    graphdef, params, paths = _lora(config, seed=2)
    save_model_folder(str(tmp_path / "unet"), unet_cond_diffusers_config(base.diffusers_config()),
                      unet_cond_state_dict(params["base"]["net"]))
    save_lora(str(tmp_path / "lora"), config, params["adapters"], paths)
    model = diffusers.UNet2DConditionModel.from_pretrained(str(tmp_path / "unet")).eval()
    model.load_lora_adapter(str(tmp_path / "lora"), prefix="unet", adapter_name="ours",
                            weight_name=WEIGHT_NAME)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    t = np.array([7, 800])
    context = rng.standard_normal((2, 5, 12)).astype(np.float32)
    ours = np.asarray(jax.jit(lambda p: nnx.merge(graphdef, p)(x, t, None, context))(params))
    ref = run_nhwc(model, x, t, encoder_hidden_states=context)
    assert_rel_close(ours, ref, RTOL, "LoRA in diffusers vs ours")
    # the project's merged model (a plain base network) gives the same output
    merged = merge(params["base"], params["adapters"], paths, config.scale)
    base_graph = nnx.graphdef(nnx.merge(graphdef, params).base)
    plain = np.asarray(jax.jit(lambda p: nnx.merge(base_graph, p)(x, t, None, context))(merged))
    assert_rel_close(plain, ref, RTOL, "merged LoRA vs diffusers")


def test_unet_lora_loads_with_peft(tmp_path):
    diffusers = need("diffusers")
    peft = need("peft")
    torch = need("torch")
    from safetensors import safe_open

    base = UNetConfig(image_size=8, in_channels=1, channels=8, channel_mult=(1, 2), num_res_blocks=1,
                      attention_resolutions=(4,), num_heads=1, num_groups=4, num_classes=3, dropout=0.0)
    config = LoRAConfig(base=base, rank=2, alpha=2.0)
    graphdef, params, paths = _lora(config, seed=3)
    save_model_folder(str(tmp_path / "unet"), unet2d_config(base), unet2d_state_dict(params["base"], base))
    file = save_lora(str(tmp_path / "lora"), config, params["adapters"], paths)
    with safe_open(file, framework="pt") as f:
        meta = {k.removeprefix("unet."): v for k, v in json.loads(f.metadata()[METADATA_KEY]).items()}
        sd = {k.removeprefix("unet."): f.get_tensor(k) for k in f.keys()}
    model = diffusers.UNet2DModel.from_pretrained(str(tmp_path / "unet")).eval()
    model = peft.inject_adapter_in_model(peft.LoraConfig(**meta), model)
    result = peft.set_peft_model_state_dict(model, sd)
    assert not [k for k in result.unexpected_keys if "lora" in k]
    with torch.no_grad():
        rng = np.random.default_rng(1)
        x = rng.standard_normal((2, 8, 8, 1)).astype(np.float32)
        t, y = np.array([3, 600]), np.array([0, 3])
        ref = run_nhwc(model, x, t, class_labels=y)
    ours = np.asarray(jax.jit(lambda p: nnx.merge(graphdef, p)(x, t, y))(params))
    assert_rel_close(ours, ref, RTOL, "LoRA through peft on UNet2DModel vs ours")
    assert os.path.basename(file) == WEIGHT_NAME
