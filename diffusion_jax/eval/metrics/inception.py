"""The FID InceptionV3 (pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`) in Flax NNX, inference only.

This is the network of the TF FID graph as ported by pytorch-fid: torchvision's InceptionV3 with
pytorch-fid's `FIDInceptionA/C/E_1/E_2` blocks (3x3 average pools exclude the padding; Mixed_7c's pool
branch is a 3x3 max pool), BasicConv2d = conv (no bias) + BatchNorm(eps=1e-3, running statistics) + ReLU,
and a 2048 -> 1008 `fc` layer. Images (N, H, W, C) float in [-1, 1] (uint8 [0, 255] is rescaled),
C in {1, 3} (grayscale is repeated), any H, W: resized to 299x299 with bilinear interpolation,
half-pixel centres, no antialiasing (= `F.interpolate(mode='bilinear', align_corners=False)`).
Outputs: pool3 features (N, 2048) for FID/KID, softmax over the 1008 logits for the Inception Score.

Weights: the PyTorch state_dict released with pytorch-fid (torch is needed only to read it):

    wget https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth
    export DIFFUSION_JAX_INCEPTION=/path/to/pt_inception-2015-12-05-6726825d.pth
    net = load_inception()              # or load_inception("/path/to/file.pth")
    feats = net.features(images)        # (N, 2048) float64 numpy

The path is `path`, else $DIFFUSION_JAX_INCEPTION, else torch hub's cache
($TORCH_HOME or ~/.cache/torch)/hub/checkpoints/<file>, where pytorch-fid downloads it.
The file is 95,628,359 bytes with SHA-256 `FID_WEIGHTS_SHA256`; its name carries the first 8 hex
digits (torch.hub's convention). By default a file named `*inception-2015-12-05-<hex>.pth` is hashed and
checked (the full digest for the released name), so a truncated or wrong download fails loudly; files
under other names are not checked.
"""
from __future__ import annotations

import hashlib
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from diffusion_jax.validate import check_images

FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + FID_WEIGHTS_NAME
FID_WEIGHTS_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
ENV_VAR = "DIFFUSION_JAX_INCEPTION"
INPUT_SIZE = 299
_HIGHEST = lax.Precision.HIGHEST  # no TF32 / bf16 passes on GPU: FID is sensitive to feature precision


class _Weight(nnx.Module):  # the `conv` of a BasicConv2d: weight stored HWIO (kh, kw, in, out)
    def __init__(self, cin: int, cout: int, kh: int, kw: int):
        self.weight = nnx.Param(jnp.zeros((kh, kw, cin, cout), jnp.float32))


class _BatchNorm(nnx.Module):  # inference BatchNorm: torch names, running statistics as Params
    def __init__(self, c: int):
        self.weight, self.bias = nnx.Param(jnp.ones((c,))), nnx.Param(jnp.zeros((c,)))
        self.running_mean, self.running_var = nnx.Param(jnp.zeros((c,))), nnx.Param(jnp.ones((c,)))


class BasicConv2d(nnx.Module):
    """conv(kernel, stride, padding; no bias) -> BatchNorm(eps=1e-3) -> ReLU; (N, H, W, cin) -> (N, H', W', cout)."""

    def __init__(self, cin: int, cout: int, kernel, stride: int = 1, padding=0):
        kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
        ph, pw = (padding, padding) if isinstance(padding, int) else padding
        self.conv, self.bn = _Weight(cin, cout, kh, kw), _BatchNorm(cout)
        self.stride, self.padding = stride, ((ph, ph), (pw, pw))

    def __call__(self, x):
        y = lax.conv_general_dilated(x, self.conv.weight[...], (self.stride,) * 2, self.padding,
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=_HIGHEST)
        scale = self.bn.weight[...] * lax.rsqrt(self.bn.running_var[...] + 1e-3)
        return jax.nn.relu(y * scale + (self.bn.bias[...] - self.bn.running_mean[...] * scale))


def _max_pool(x, stride: int, pad: int = 0):  # 3x3 max pool, padding counts as -inf (as torch)
    p = ((0, 0), (pad, pad), (pad, pad), (0, 0))
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, 3, 3, 1), (1, stride, stride, 1), p)


def _avg_pool(x):  # 3x3, stride 1, padding 1, count_include_pad=False
    p, win, one = ((0, 0), (1, 1), (1, 1), (0, 0)), (1, 3, 3, 1), (1, 1, 1, 1)
    count = lax.reduce_window(jnp.ones((1, *x.shape[1:3], 1), x.dtype), 0.0, lax.add, win, one, p)
    return lax.reduce_window(x, 0.0, lax.add, win, one, p) / count


class InceptionA(nnx.Module):  # FIDInceptionA: out 224 + pool_features channels
    def __init__(self, cin: int, pool_features: int):
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1, self.branch5x5_2 = BasicConv2d(cin, 48, 1), BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def __call__(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return jnp.concatenate([self.branch1x1(x), b5, b3, self.branch_pool(_avg_pool(x))], -1)


class InceptionB(nnx.Module):  # grid reduction 35 -> 17: out 480 + cin channels
    def __init__(self, cin: int):
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def __call__(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return jnp.concatenate([self.branch3x3(x), b3, _max_pool(x, 2)], -1)


class InceptionC(nnx.Module):  # FIDInceptionC: 7x7 factorised into 1x7 / 7x1; out 768 channels
    def __init__(self, cin: int, c7: int):
        row, col = {"kernel": (1, 7), "padding": (0, 3)}, {"kernel": (7, 1), "padding": (3, 0)}
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2, self.branch7x7_3 = BasicConv2d(c7, c7, **row), BasicConv2d(c7, 192, **col)
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2, self.branch7x7dbl_3 = BasicConv2d(c7, c7, **col), BasicConv2d(c7, c7, **row)
        self.branch7x7dbl_4, self.branch7x7dbl_5 = BasicConv2d(c7, c7, **col), BasicConv2d(c7, 192, **row)
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def __call__(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for i in range(1, 6):
            d = getattr(self, f"branch7x7dbl_{i}")(d)
        return jnp.concatenate([self.branch1x1(x), b7, d, self.branch_pool(_avg_pool(x))], -1)


class InceptionD(nnx.Module):  # grid reduction 17 -> 8: out 512 + cin channels
    def __init__(self, cin: int):
        self.branch3x3_1, self.branch3x3_2 = BasicConv2d(cin, 192, 1), BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def __call__(self, x):
        b7 = x
        for i in range(1, 5):
            b7 = getattr(self, f"branch7x7x3_{i}")(b7)
        return jnp.concatenate([self.branch3x3_2(self.branch3x3_1(x)), b7, _max_pool(x, 2)], -1)


class InceptionE(nnx.Module):  # FIDInceptionE_1 (pool="avg") / FIDInceptionE_2 (pool="max"): out 2048
    def __init__(self, cin: int, pool: str):
        self.pool = pool
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)  # 3x3 factorised into parallel 1x3 and 3x1
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def __call__(self, x):
        b = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = _avg_pool(x) if self.pool == "avg" else _max_pool(x, 1, pad=1)
        return jnp.concatenate([self.branch1x1(x), self.branch3x3_2a(b), self.branch3x3_2b(b),
                                self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d), self.branch_pool(pooled)], -1)


class _Linear(nnx.Module):  # torch names; weight stored (in, out)
    def __init__(self, cin: int, cout: int):
        self.weight, self.bias = nnx.Param(jnp.zeros((cin, cout))), nnx.Param(jnp.zeros((cout,)))


class InceptionV3(nnx.Module):
    """(N, 299, 299, 3) in [-1, 1] -> (pool3 (N, 2048), logits (N, 1008)). Attribute names = torch keys."""

    def __init__(self):
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = InceptionA(192, 32), InceptionA(256, 64), InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b, self.Mixed_6c = InceptionC(768, 128), InceptionC(768, 160)
        self.Mixed_6d, self.Mixed_6e = InceptionC(768, 160), InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b, self.Mixed_7c = InceptionE(1280, "avg"), InceptionE(2048, "max")
        self.fc = _Linear(2048, 1008)

    def __call__(self, x):
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))           # 147x147x64
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(_max_pool(x, 2)))                 # 71x71x192
        x = _max_pool(x, 2)                                                         # 35x35x192
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)                                   # ... 8x8x2048
        pool3 = jnp.mean(x, axis=(1, 2))
        return pool3, jnp.dot(pool3, self.fc.weight[...], precision=_HIGHEST) + self.fc.bias[...]


def preprocess(images):
    """(N, H, W, C) float in [-1, 1], C in {1, 3} -> (N, 299, 299, 3) float32 (bilinear, no antialias)."""
    x = jnp.asarray(images, jnp.float32)
    if x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)
    if x.shape[1:3] != (INPUT_SIZE, INPUT_SIZE):
        x = jax.image.resize(x, (x.shape[0], INPUT_SIZE, INPUT_SIZE, 3), "linear", antialias=False)
    return x


def _torch_key(path) -> str:
    return ".".join(str(p) for p in path)


def convert_state_dict(state_dict) -> dict:
    """pytorch-fid state_dict (torch tensors or numpy; conv (O, I, kh, kw), fc (1008, 2048)) -> params pure dict.

    Raises ValueError naming missing / unexpected keys or a key whose shape does not match.
    `*.num_batches_tracked` entries are ignored.
    """
    _, abstract = nnx.split(nnx.eval_shape(InceptionV3), nnx.Param)
    sd = {k: v for k, v in state_dict.items() if not k.endswith(".num_batches_tracked")}
    flat, wanted = [], set()
    for path, var in nnx.to_flat_state(abstract):
        key = _torch_key(path)
        wanted.add(key)
        if key not in sd:
            continue
        v = sd[key]
        v = np.asarray(v.detach().cpu().float().numpy() if hasattr(v, "detach") else v, np.float32)
        torch_shape = var.shape[::-1] if len(var.shape) == 2 else (
            (var.shape[3], var.shape[2], var.shape[0], var.shape[1]) if len(var.shape) == 4 else var.shape)
        if v.shape != tuple(torch_shape):
            raise ValueError(f"Inception state_dict {key!r} has shape {v.shape}, expected {tuple(torch_shape)}")
        v = v.transpose(2, 3, 1, 0) if v.ndim == 4 else (v.T if v.ndim == 2 else v)
        flat.append((path, var.replace(jnp.asarray(v))))
    missing, unexpected = sorted(wanted - set(sd)), sorted(set(sd) - wanted)
    if missing or unexpected:
        raise ValueError(f"Inception state_dict does not match the FID InceptionV3: missing keys {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''}, unexpected keys {unexpected[:8]}"
                         f"{' ...' if len(unexpected) > 8 else ''}")
    return nnx.to_pure_dict(nnx.from_flat_state(flat))


class InceptionFeatures:
    """FeatureExtractor over the FID InceptionV3. features: (N, 2048) float64; probs: (N, 1008) float64."""

    name = "inception-v3-fid"
    num_classes = 1008
    test_accuracy = None
    feature_dim = 2048

    def __init__(self, params: dict, batch_size: int = 50):
        graphdef = nnx.split(nnx.eval_shape(InceptionV3), nnx.Param)[0]  # no arrays allocated
        self.params, self.batch_size = params, batch_size

        @jax.jit
        def forward(params, x):  # (B, 299, 299, 3) -> ((B, 2048), (B, 1008))
            pool3, logits = nnx.merge(graphdef, params)(x)
            return pool3, jax.nn.softmax(logits, axis=-1)

        self._forward, self._preprocess = forward, jax.jit(preprocess)

    def _run(self, images, which: int) -> np.ndarray:
        images = np.asarray(check_images(images, "images", channels=(1, 3), uint8=True, min_count=0))
        if images.dtype == np.uint8:
            images = images.astype(np.float32) / 127.5 - 1.0
        n = len(images)
        # batch size: `batch_size`, or the next power of two for a smaller input (few distinct compiles)
        bs = min(self.batch_size, 1 << max(n - 1, 0).bit_length())
        out = []
        for i in range(0, n, bs):
            chunk = images[i:i + bs]
            pad = bs - len(chunk)
            if pad:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
            out.append(np.asarray(self._forward(self.params, self._preprocess(chunk))[which])[:bs - pad])
        dim = self.feature_dim if which == 0 else self.num_classes
        return np.concatenate(out).astype(np.float64) if out else np.zeros((0, dim))

    def features(self, images) -> np.ndarray:
        """(N, H, W, C) in [-1, 1] (or uint8) -> pool3 features (N, 2048) float64."""
        return self._run(images, 0)

    def probs(self, images) -> np.ndarray:
        """(N, H, W, C) in [-1, 1] (or uint8) -> softmax over the 1008 logits (N, 1008) float64 (Inception Score)."""
        return self._run(images, 1)


def _check_hash(path: str) -> None:
    # torch.hub's convention: "<name>-<SHA-256 prefix>.pth"; only names of this release are checked
    name = os.path.basename(path)
    m = re.search(r"inception-2015-12-05-([a-f0-9]{8,64})\.pth$", name)
    if not m:
        return
    want = FID_WEIGHTS_SHA256 if name == FID_WEIGHTS_NAME else m.group(1)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    if not h.hexdigest().startswith(want):
        raise ValueError(f"{path}: SHA-256 {h.hexdigest()} does not start with {want!r} as the file name says; "
                         f"the download is corrupt or not {FID_WEIGHTS_NAME} (re-download from {FID_WEIGHTS_URL}, "
                         "or pass check_hash=False)")


def default_weights_path() -> str:
    """$DIFFUSION_JAX_INCEPTION, else torch hub's checkpoint cache path for the pytorch-fid file."""
    if os.environ.get(ENV_VAR):
        return os.environ[ENV_VAR]
    torch_home = os.environ.get("TORCH_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "torch")
    return os.path.join(torch_home, "hub", "checkpoints", FID_WEIGHTS_NAME)


def load_inception(path: str | None = None, *, batch_size: int = 50, check_hash: bool = True) -> InceptionFeatures:
    """Read pytorch-fid's InceptionV3 state_dict (.pth) into an `InceptionFeatures` extractor.

    path: the .pth file; default `default_weights_path()`. check_hash: verify the SHA-256 given by the
    file name (see the module docstring). Raises FileNotFoundError (with download instructions),
    ImportError without torch, ValueError for a wrong hash or a state_dict that does not fit.
    """
    path = os.path.expanduser(path or default_weights_path())
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"FID Inception weights not found at {path!r}. Download {FID_WEIGHTS_NAME} "
            f"(SHA-256 {FID_WEIGHTS_SHA256}) from {FID_WEIGHTS_URL} and pass its path or set ${ENV_VAR}.")
    if check_hash:
        _check_hash(path)
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"reading {path} (a PyTorch .pth file) needs torch: pip install torch") from e
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    return InceptionFeatures(convert_state_dict(state_dict), batch_size=batch_size)
