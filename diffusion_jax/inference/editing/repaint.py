"""RePaint: inpainting with resampling (Lugmayr et al. 2022, "RePaint: Inpainting using Denoising Diffusion
Probabilistic Models", Alg. 1 and sec. 4.2).

Each reverse step replaces the known part of x_t by a fresh sample of q(x_t | x_0 = y) (`Known.substitute`, as the
projection method) and takes the ancestral step on the respaced K-step schedule, written as DDIM's eq. 12

    x_{t-1} = alpha_{t-1} x0_hat + sqrt(sigma_{t-1}^2 - s_t^2) eps_hat + s_t z,    s_t = eta sqrt(beta~_t)

(eta = 1: DDPM with Sigma_t = beta~_t, Ho et al. eq. 7; eta = 0: deterministic DDIM). ddpm.py / ddim.py inline
their step in their scans, so it is written here once more on the same `respace` tables. To harmonize the fill
with the known part, RePaint goes back up: from level t it re-noises with the forward process

    x_{t+j} ~ q(x_{t+j} | x_t) = N( sqrt(abar_{t+j} / abar_t) x_t, (1 - abar_{t+j} / abar_t) I )      (sec. 4.2)

(one jump of j steps; the same law as j single steps) and descends again, r - 1 times at every j-th level:
the official get_schedule_jump(t_T=K, n_sample=1, jump_length=j, jump_n_sample=r). Cost:

    NFE = K + (r - 1) j |{0, j, 2j, ... < K - j}|.

After the last step the known pixels are set to y (Alg. 1 line 8 at t = 1, where q(x_0 | y) is y itself).
The whole walk is one `lax.scan` over a precomputed list of moves; the network runs only on down moves (`lax.cond`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.inference.editing.known import Known
from diffusion_jax.samplers.checks import check_key
from diffusion_jax.samplers.spacing import check_prediction, respace, select_timesteps
from diffusion_jax.samplers.wrapper import predict_x0_eps
from diffusion_jax.validate import check_int


def repaint_levels(steps: int, jump_length: int, resamplings: int) -> np.ndarray:
    """The levels visited, 0 (noisiest kept timestep) .. K (clean), as RePaint's get_schedule_jump with
    n_sample = 1: down one level at a time; at timestep t = K - 1 - level in {0, j, 2j, ...} below K - j, back up
    j levels, r - 1 times."""
    K = check_int(steps, "sampler.steps")
    j = check_int(jump_length, "jump_length")
    r = check_int(resamplings, "resamplings")
    left = {K - 1 - t: r - 1 for t in range(0, K - j, j)}
    level, out = 0, [0]
    while level < K:
        level += 1
        out.append(level)
        if left.get(level, 0) > 0:
            left[level] -= 1
            level -= j
            out.append(level)
    return np.asarray(out, np.int32)


def repaint_nfe(steps: int, jump_length: int, resamplings: int) -> int:
    """K + (r - 1) j |range(0, K - j, j)|: the down moves of `repaint_levels`."""
    return steps + (resamplings - 1) * jump_length * len(range(0, steps - jump_length, jump_length))


def repaint(denoise_fn, schedule, key, known: Known, *, steps: int, jump_length: int = 10, resamplings: int = 10,
            eta: float = 1.0, prediction: str = "eps", spacing: str = "leading", clip_denoised: float | None = 1.0):
    """Inpaint `known` with RePaint on a DiscreteSchedule (module doc). denoise_fn(x, t) gets t as (N,) int32
    timesteps. Noise: x_T from fold_in(key, 0); move n draws its step / jump noise from fold_in(key, 2 n + 1) and
    the known part's z from fold_in(key, 2 n + 2). Returns (x (N, H, W, C), {"nfe", "timesteps", "levels"})."""
    check_key(key, "repaint")
    check_prediction(prediction, clip_denoised)
    if not (isinstance(eta, (int, float)) and eta >= 0):
        raise ValueError(f"sampler.eta must be a number >= 0, got {eta!r}")
    if not schedule.discrete:
        raise ValueError(f"RePaint runs on a discrete (DDPM) schedule, got schedule.kind={schedule.kind!r}")
    timesteps = select_timesteps(schedule.num_timesteps, steps, spacing)
    levels = repaint_levels(steps, jump_length, resamplings)
    tab = respace(schedule, timesteps)
    s_eta = eta * jnp.sqrt(tab.posterior_variance)
    c_dir = jnp.sqrt(jnp.maximum(tab.sigma_prev ** 2 - s_eta ** 2, 0.0))
    abar = jnp.concatenate([tab.alpha ** 2, jnp.ones((1,), jnp.float32)])       # level K: clean
    src, dst = levels[:-1], levels[1:]
    down = dst > src
    keep = jnp.sqrt(abar[dst] / abar[src])                                       # forward jump coefficients
    add = jnp.sqrt(jnp.maximum(1.0 - abar[dst] / abar[src], 0.0))
    shape = known.shape

    def step_down(x, n, a):
        x_in = known.substitute(x, tab.alpha[a], tab.sigma[a], jax.random.normal(jax.random.fold_in(key, 2 * n + 2),
                                                                               shape, x.dtype))
        out = denoise_fn(x_in, jnp.full((shape[0],), tab.t[a], jnp.int32))
        x0, eps = predict_x0_eps(out, x_in, tab.alpha[a], tab.sigma[a], prediction, clip_denoised)
        z = jax.random.normal(jax.random.fold_in(key, 2 * n + 1), shape, x.dtype)
        return tab.alpha_prev[a] * x0 + c_dir[a] * eps + s_eta[a] * z                # DDIM eq. 12

    def step_up(x, n, k, c):
        return k * x + c * jax.random.normal(jax.random.fold_in(key, 2 * n + 1), shape, x.dtype)

    def move(x, inp):
        n, a, is_down, k, c = inp
        x = jax.lax.cond(is_down, lambda x: step_down(x, n, a), lambda x: step_up(x, n, k, c), x)
        return x.astype(jnp.float32), None

    x_T = jax.random.normal(jax.random.fold_in(key, 0), shape, jnp.float32)
    xs = (jnp.arange(len(src)), jnp.asarray(src), jnp.asarray(down), keep, add)
    x, _ = jax.lax.scan(move, x_T, xs)
    nfe = int(down.sum())
    return known.project(x), {"nfe": nfe, "timesteps": timesteps, "levels": levels}
