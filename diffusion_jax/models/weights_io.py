"""Reading diffusers checkpoints from a local folder, shared by the converters (convert_vae, convert_unet_cond).

A diffusers model folder holds config.json and diffusion_pytorch_model.safetensors (or .bin, a PyTorch pickle);
a pipeline folder holds one such folder per component (unet/, vae/, text_encoder/). Nothing here imports torch
except to read a .bin file when no safetensors file is there.
"""
from __future__ import annotations

import json
import os

import numpy as np

WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def to_numpy(x) -> np.ndarray:
    """A torch tensor (without importing torch) or array -> float32 numpy."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().float().numpy()
    return np.asarray(x, dtype=np.float32)


def torch_to_nhwc(value: np.ndarray, is_kernel: bool, target_ndim: int) -> np.ndarray:
    """A PyTorch weight in our layout: conv (O, I, kh, kw) -> (kh, kw, I, O), Linear (O, I) -> (I, O), and a 1x1
    conv given for a Linear (target_ndim 2) squeezed first. Biases and norm scales pass unchanged."""
    if not is_kernel:
        return value
    if value.ndim == 4 and target_ndim == 2 and value.shape[2:] == (1, 1):
        value = value[:, :, 0, 0]
    return value.transpose(2, 3, 1, 0) if value.ndim == 4 else value.T


def listing(keys) -> str:
    """The first 8 of sorted keys and their count, for error messages."""
    keys = sorted(keys)
    return f"{keys[:8]}{' ...' if len(keys) > 8 else ''} ({len(keys)} in all)"


def read_model_folder(folder, component: str, what: str) -> tuple[dict, dict]:
    """(config.json as a dict, state_dict) of a diffusers model in `folder`, or in its `component` subfolder when
    `folder` is a pipeline. FileNotFoundError naming the folder or the file that is missing."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{what} folder {folder} does not exist")
    if not os.path.isfile(os.path.join(folder, "config.json")) and os.path.isfile(
            os.path.join(folder, component, "config.json")):
        folder = os.path.join(folder, component)
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"no config.json in {folder}")
    with open(config_path) as f:
        config = json.load(f)
    safetensors_path, bin_path = (os.path.join(folder, w) for w in WEIGHTS)
    if os.path.isfile(safetensors_path):
        from safetensors.numpy import load_file

        return config, load_file(safetensors_path)
    if os.path.isfile(bin_path):
        try:
            import torch
        except ImportError as err:
            raise ImportError(f"{bin_path} is a PyTorch pickle and needs torch to read; install torch or convert "
                              f"it to {WEIGHTS[0]}") from err
        return config, torch.load(bin_path, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"no {WEIGHTS[0]} or {WEIGHTS[1]} in {folder}")
