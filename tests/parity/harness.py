"""The one harness of the parity tests: our JAX code against its references (diffusers, transformers, PyTorch).

Import it as `from harness import ...` (pytest puts tests/parity on sys.path; this folder has no conftest.py of its
own on purpose: tests/conftest.py is imported as `conftest` by the tests). torch, diffusers and transformers are
imported only inside the functions that use them, so the tests that do not need them run without them.

Layouts: our images and latents are NHWC (N, H, W, C), diffusers' and torch's are NCHW (N, C, H, W); our kernels
are HWIO (H, W, in, out) for convolutions and (in, out) for dense layers, torch's OIHW and (out, in). Time is a
float32 vector t (N,) on our side, a scalar timestep on diffusers' side.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.process.discrete import beta_schedule
from diffusion_jax.samplers.grid import Grid
from diffusion_jax.samplers.wrapper import make_denoiser
from diffusion_jax.testbed import discrete_denoise_fn


# ------------------------------------------------------------------------------------- references, compilation
def need(*names):
    """pytest.importorskip each module name (skips the test, or at module level the whole file, when one is
    missing); returns the module, or a tuple of them for several names."""
    modules = tuple(pytest.importorskip(name) for name in names)
    return modules[0] if len(modules) == 1 else modules


# XLA's CPU backend at optimisation level 0 compiles the tiny test models several times faster; they run as fast.
FAST_COMPILE = {"xla_backend_optimization_level": 0}
# ... and without its expensive LLVM passes: faster still for the larger pipelines (sampling loops, CLI runs).
CHEAP_COMPILE = {**FAST_COMPILE, "xla_llvm_disable_expensive_passes": True}
fast_jit = functools.partial(jax.jit, compiler_options=FAST_COMPILE)


# ---------------------------------------------------------------------------------------- layouts, conversion
def nchw(a) -> np.ndarray:
    """NHWC (N, H, W, C) -> NCHW (N, C, H, W), a numpy view (numpy or JAX in)."""
    return np.asarray(a).transpose(0, 3, 1, 2)


def nhwc(a) -> np.ndarray:
    """NCHW (N, C, H, W) -> NHWC (N, H, W, C), a numpy view (numpy, JAX or a torch tensor in)."""
    return to_numpy(a).transpose(0, 2, 3, 1)


def to_torch(a, *, nchw_from_nhwc: bool = False, dtype=None):
    """numpy / JAX array -> torch tensor (a copy, same dtype unless `dtype`); nchw_from_nhwc: NHWC in, NCHW out."""
    torch = need("torch")
    a = np.array(a, dtype=dtype)
    return torch.from_numpy(a.transpose(0, 3, 1, 2) if nchw_from_nhwc else a)


def to_numpy(t) -> np.ndarray:
    """torch tensor (detached) or numpy / JAX array -> numpy array, same layout and dtype."""
    return t.detach().cpu().numpy() if hasattr(t, "detach") else np.asarray(t)


def to_jax(t) -> jax.Array:
    """torch tensor or numpy array -> JAX array, same layout and dtype."""
    return jnp.asarray(to_numpy(t))


def torch_shape(shape) -> tuple:
    """Our parameter shape -> torch's: HWIO (H, W, in, out) -> OIHW (out, in, H, W), otherwise the axes reversed
    (dense (in, out) -> (out, in); vectors unchanged)."""
    s = tuple(shape)
    return (s[3], s[2], s[0], s[1]) if len(s) == 4 else s[::-1]


def torch_layout(a) -> np.ndarray:
    """Our parameter values in torch's layout (see torch_shape), a contiguous numpy array."""
    a = np.asarray(a)
    return np.ascontiguousarray(a.transpose(3, 2, 0, 1) if a.ndim == 4 else a.T)


def keyed_leaves(tree) -> list:
    """[(keys, leaf)] of a pytree, keys the tuple of dict keys / sequence indices from the root to the leaf."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [(tuple(getattr(p, "key", getattr(p, "idx", None)) for p in path), leaf) for path, leaf in leaves]


def is_kernel(keys) -> bool:
    """A leaf named "kernel": the weights that torch stores transposed (the default of torch_state_dict)."""
    return keys[-1] == "kernel"


def torch_state_dict(tree, name, *, transposed=is_kernel, make=None) -> dict:
    """Our params (a pytree of arrays, or of shapes such as ShapeDtypeStruct with `make`) as a torch-named
    state_dict: {name(keys): value}. transposed(keys): whether the leaf is stored in torch's layout (torch_shape);
    make(torch shape) -> the value (e.g. zeros); without it, the leaf's own values re-laid as contiguous numpy."""
    sd = {}
    for keys, leaf in keyed_leaves(tree):
        t = transposed(keys)
        if make is None:
            v = np.asarray(leaf)
            sd[name(keys)] = torch_layout(v) if t else np.ascontiguousarray(v)
        else:
            sd[name(keys)] = make(torch_shape(leaf.shape) if t else tuple(leaf.shape))
    return sd


# -------------------------------------------------------------------------------------------------- comparison
def rel_err(ours, ref) -> float:
    """max |ours - ref| / max |ref| in float64 (numpy, JAX or torch in, any equal shapes)."""
    ours, ref = np.asarray(to_numpy(ours), np.float64), np.asarray(to_numpy(ref), np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def assert_rel_close(ours, ref, rtol: float, what: str = "") -> float:
    """max |ours - ref| <= rtol * max |ref| (float64), shapes equal; returns the relative error."""
    ours, ref = np.asarray(to_numpy(ours), np.float64), np.asarray(to_numpy(ref), np.float64)
    assert ours.shape == ref.shape, (what, ours.shape, ref.shape)
    err, scale = float(np.abs(ours - ref).max()), float(np.abs(ref).max())
    assert err <= rtol * scale, f"{what}: max abs err {err:.3g}, max |ref| {scale:.3g}"
    return err / scale


def assert_levels_close(ours, ref, rtol: float, what: str = "", strict: bool = False):
    """Trajectories (levels, ...) in float64: at every level max |ours - ref| / max |ref| <= rtol (< rtol with
    strict), the maxima over the rest (the batch): a relative trajectory error. Returns the per-level errors."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (what, ours.shape, ref.shape)
    scale = np.abs(ref).reshape(len(ref), -1).max(1)
    err = np.abs(ours - ref).reshape(len(ref), -1).max(1) / scale
    ok = err.max() < rtol if strict else err.max() <= rtol
    assert ok, f"{what}: max relative error {err.max():.2e} at level {err.argmax()} > {rtol:.0e}; {err}"
    return err


def assert_trees_equal(a, b):
    """Two pytrees of the same structure hold equal arrays: same shapes, same values (np.array_equal: NaN != NaN)."""
    def equal(path, x, y):
        x, y = np.asarray(x), np.asarray(y)
        assert x.shape == y.shape and np.array_equal(x, y), (jax.tree_util.keystr(path), x.shape, y.shape)
    jax.tree_util.tree_map_with_path(equal, a, b)


def assert_tokenizer_matches(ours, hf, texts, max_length: int) -> dict:
    """Our tokenizer ours(texts, max_length=...) gives a transformers tokenizer's input_ids and attention_mask
    (padding="max_length", truncation=True), both (len(texts), max_length); returns our batch."""
    ref = hf(texts, padding="max_length", max_length=max_length, truncation=True, return_tensors="np")
    batch = ours(texts, max_length=max_length)
    np.testing.assert_array_equal(batch["input_ids"], ref["input_ids"])
    np.testing.assert_array_equal(batch["attention_mask"], ref["attention_mask"])
    return batch


def convergence_slope(steps, errs) -> float:
    """The order p of errs ~ steps^-p: minus the slope of the least-squares line through (log steps, log errs)."""
    return -np.polyfit(np.log(steps), np.log(errs), 1)[0]


# ------------------------------------------------------------------------------------------ diffusers schedulers
DIFFUSERS_PREDICTION = {"eps": "epsilon", "v": "v_prediction"}   # our prediction name -> diffusers' prediction_type


def float64_alphas_cumprod(scheduler, name: str, num_timesteps: int = 1000):
    """Replace a diffusers scheduler's float32 alphas_cumprod by the float64 product of our betas (before
    set_timesteps), so that only the algorithms are compared, not diffusers' float32 1 - abar."""
    torch = need("torch")
    scheduler.alphas_cumprod = torch.from_numpy(np.cumprod(1 - beta_schedule(name, num_timesteps)))
    return scheduler


def diffusers_scheduler(cls, name: str, prediction: str | None = None, *, num_timesteps: int = 1000,
                        float64_alphas: bool = False, steps: int | None = None, **config):
    """A diffusers scheduler `cls` on our beta schedule `name` (trained_betas = beta_schedule(name, T)), its
    prediction_type from ours ("eps" / "v"; diffusers' default when None), other options as `config`; optionally
    with float64 alphas_cumprod (float64_alphas_cumprod) and set_timesteps(steps)."""
    if prediction is not None:
        config["prediction_type"] = DIFFUSERS_PREDICTION[prediction]
    scheduler = cls(trained_betas=beta_schedule(name, num_timesteps), **config)
    if float64_alphas:
        float64_alphas_cumprod(scheduler, name, num_timesteps)
    if steps is not None:
        scheduler.set_timesteps(steps)
    return scheduler


def _f32(v):
    return jnp.asarray(np.asarray(v, np.float64), jnp.float32)


def ve_grid(sigmas, timesteps, *, torch_float32: bool = False) -> Grid:
    """Our Grid for a diffusers sigma-scheduler (Euler, Heun, DPM-Solver, UniPC, ...), which carries x_ve = x / alpha:
    its levels sigma_ve = s (K + 1,), the last 0, and timesteps (K,), plus the clean placeholder t = -1. alpha =
    1 / sqrt(1 + s^2) and sigma = s alpha are computed in numpy float64, or with torch_float32 in torch float32 as
    diffusers computes them (torch's float32 sqrt is not numpy's to the last bit); stored float32."""
    if torch_float32:
        torch = need("torch")
        s = torch.as_tensor(sigmas).to(torch.float32)
    else:
        s = np.asarray(to_numpy(sigmas), np.float64)
    a = 1 / (s ** 2 + 1) ** 0.5
    t = np.append(to_numpy(timesteps), -1.0)
    return Grid(t=_f32(t), alpha=_f32(to_numpy(a)), sigma=_f32(to_numpy(s * a)))


def vp_grid(abar, ts, abar_final) -> Grid:
    """Our Grid for a diffusers VP scheduler (PNDM, DDIM inversion): alpha = sqrt(abar[ts]) then sqrt(abar_final) at
    the end (t = -1), sigma = sqrt(1 - alpha^2); abar (T,) float64 alphas_cumprod, ts (K,) integer timesteps."""
    a = np.append(np.sqrt(abar[ts]), np.sqrt(abar_final))
    return Grid(t=_f32(np.append(ts, -1)), alpha=_f32(a), sigma=_f32(np.sqrt(1.0 - a ** 2)))


# --------------------------------------------------------------------------------------- diffusers sampling loops
def torch_model(fn):
    """A JAX network fn(x (N, ...), t (N,) float32) -> (N, ...) as a torch model(x, t) for diffusers_loop: x a torch
    tensor (float32), t a scalar timestep (tensor or number) broadcast over the batch; returns a torch tensor."""
    torch = need("torch")

    def model(x, t):
        out = fn(to_jax(x), jnp.full((x.shape[0],), float(t), jnp.float32))
        return torch.from_numpy(np.array(out))
    return model


def step_noise(key, i: int, shape, dtype=np.float32):
    """Our solvers' noise of step i, jax.random.normal(fold_in(key, i), shape), as a torch tensor of `dtype`."""
    return to_torch(jax.random.normal(jax.random.fold_in(key, i), tuple(shape)), dtype=dtype)


def brownian_noise_sampler(key, shape):
    """A stand-in for diffusers' BrownianTreeNoiseSampler (DPMSolverSDEScheduler.noise_sampler) that gives our
    dpm_sde noise (samplers/dpm_sde.py): its calls come in pairs per step i, (s, s_mid) then (s, s_next); the first
    returns z_1 = step_noise(key, 2 i), the second (sqrt(s - s_mid) z_1 + sqrt(s_mid - s_next) w) / sqrt(s - s_next)
    with w = step_noise(key, 2 i + 1): the normalised increments of one Brownian motion, as the tree's are."""
    calls = []

    def sampler(sigma, sigma_next):
        c = len(calls)
        calls.append((float(sigma), float(sigma_next)))
        z1 = step_noise(key, 2 * (c // 2), shape, np.float64)
        if c % 2 == 0:
            return z1
        (s, s_mid), s_next = calls[-2], float(sigma_next)
        w = step_noise(key, 2 * (c // 2) + 1, shape, np.float64)
        return ((s - s_mid) ** 0.5 * z1 + (s_mid - s_next) ** 0.5 * w) / (s - s_next) ** 0.5

    return sampler


def patch_randn(monkeypatch, module, key, max_calls: int | None = None, first: int = 0) -> list:
    """Make `module.randn_tensor` (a diffusers scheduler module) return our noise: its i-th call gives
    step_noise(key, first + i, shape) (float32), as our stochastic solvers draw step i's noise from fold_in(key, i)
    (multistep consistency sampling's first noise is step 1's: first=1). More than max_calls calls fail. Returns the
    list of call indices (clear it to restart the count)."""
    calls = []

    def randn_tensor(shape, *args, **kwargs):
        i = len(calls)
        assert max_calls is None or i < max_calls, f"diffusers drew noise {i + 1} times, expected at most {max_calls}"
        calls.append(i)
        return step_noise(key, first + i, shape)

    monkeypatch.setattr(module, "randn_tensor", randn_tensor)
    return calls


def diffusers_loop(scheduler, model, x, *, scale_input: bool = False, step_kwargs=None, keep=None) -> list:
    """Run a diffusers scheduler (set_timesteps already called) from x (a torch tensor, the scheduler's own
    coordinates and layout) under torch.no_grad: for each (i, t) in scheduler.timesteps,
    x = step(model(x or scale_model_input(x, t) with scale_input, t), t, x, **step_kwargs(i, t)).prev_sample.
    Returns the numpy states [x, after step 0, after step 1, ...], after step i only where keep(i) (all by default)."""
    torch = need("torch")
    states = [to_numpy(x)]
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            out = model(scheduler.scale_model_input(x, t) if scale_input else x, t)
            x = scheduler.step(out, t, x, **(step_kwargs(i, t) if step_kwargs else {})).prev_sample
            if keep is None or keep(i):
                states.append(to_numpy(x))
    return states


# ------------------------------------------------------------------------------ random-weight reference models
def random_torch_model(cls, seed: int = 0, perturb: float | None = 0.1, **config):
    """cls(**config) in eval mode after torch.manual_seed(seed), every parameter then moved by perturb * N(0, 1)
    (so that zero biases and unit norm scales are exercised too; None: the initialisation as it is)."""
    torch = need("torch")
    torch.manual_seed(seed)
    model = cls(**config).eval()
    if perturb:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(perturb * torch.randn_like(p))
    return model


def meta_model(cls, **config):
    """cls(**config) on torch's meta device: shapes and config only, no memory, no initialisation."""
    torch = need("torch")
    with torch.device("meta"):
        return cls(**config)


def torch_param_count(model) -> int:
    """The number of parameters of a torch module."""
    return sum(p.numel() for p in model.parameters())


def run_nhwc(model, x, *args, **kwargs) -> np.ndarray:
    """A diffusers image model on our NHWC input: model(x as NCHW, *args, **kwargs).sample under torch.no_grad, back
    as NHWC numpy; numpy arguments become tensors, None stays None. x (N, H, W, C) -> (N, H, W, C_out)."""
    torch = need("torch")
    tensor = lambda a: None if a is None else to_torch(a)
    with torch.no_grad():
        out = model(to_torch(x, nchw_from_nhwc=True), *map(tensor, args),
                    **{k: tensor(v) for k, v in kwargs.items()}).sample
    return nhwc(out)


# ------------------------------------------------------------------------------------------------ test problems
# Gaussian data x0 ~ N(MU, S^2 I): its exact denoiser is known in closed form at every level (alpha, sigma).
MU, S = 0.3, 0.5


def gaussian_x0_eps(x, alpha, sigma):
    """E[x0 | x] = MU + alpha S^2 / v (x - alpha MU) and E[eps | x] = sigma (x - alpha MU) / v, v = alpha^2 S^2 +
    sigma^2, for x = alpha x0 + sigma eps (any shapes that broadcast; JAX, numpy or torch)."""
    var = alpha ** 2 * S ** 2 + sigma ** 2
    return MU + alpha * S ** 2 / var * (x - alpha * MU), sigma * (x - alpha * MU) / var


@functools.lru_cache(maxsize=None)
def mixture_network(pred: str):
    """jit((mix, sched, x (N, D), t (N,) float32) -> (N, D)): testbed.discrete_denoise_fn(mix, sched, pred), the
    exact network of a GaussianMixture on a discrete schedule; mixture and schedule are arguments, so one
    compilation per pred (and shapes) serves every test file."""
    return jax.jit(lambda mix, sched, x, t: discrete_denoise_fn(mix, sched, pred)(x, t))


@functools.lru_cache(maxsize=None)
def mixture_trajectory(solver, pred: str, **options):
    """jit((mix, sched, grid, x_T (N, D), key, extra) -> trajectory (K + 1, N, D)): `solver` (a grid solver of
    samplers/) with return_trajectory=True and `options` on the exact mixture network as its denoiser; extra: a
    dict of further (pytree) solver arguments, such as PNDM's half_grid. One compilation per solver and options."""
    def run(mix, sched, grid, x_T, key, extra):
        den = make_denoiser(lambda x, t: discrete_denoise_fn(mix, sched, pred)(x, t), pred)
        return solver(den, grid, x_T, key, return_trajectory=True, **options, **extra)[1]["trajectory"]
    return jax.jit(run)
