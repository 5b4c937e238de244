"""Reverse-SDE solvers: Euler-Maruyama and score_sde's predictor-corrector (Song et al. 2021, "Score-Based
Generative Modeling through Stochastic Differential Equations", sec. 4 and appendix G).

The forward SDE dx = f(t) x dt + g(t) dW has the reverse-time SDE (eq. 6)

    dx = [f(t) x - g(t)^2 score(x, t)] dt + g(t) dW-bar,        score = -eps_hat / sigma,

run from the grid's noisiest level to its last one. Step i (level i -> i + 1, x = alpha x0 + sigma eps) uses

    a_i = alpha_i / alpha_{i+1},   b_i = sigma_i^2 - a_i^2 sigma_{i+1}^2                 (discretized forward step
                                   x_i = a_i x_{i+1} + sqrt(b_i) z: DDPM's sqrt(1 - beta), beta; SMLD's 1, sigma^2 diff)
    euler_maruyama     x <- x - (F_i x - G_i^2 score) + G_i z                            (eq. 6, EM)
                       F_i = f(t_i) dt_i, G_i^2 = g^2(t_i) dt_i with `sde` (t_i = sde.t_of_log_snr(log_snr_i), 0 at
                       sigma = 0); without `sde` the SDE with f, g constant on each step whose marginals match the
                       grid's levels exactly (d sigma^2 = 2 f sigma^2 + g^2):  F_i = log a_i,
                       G_i^2 = b_i 2F_i / (exp(2F_i) - 1)   (-> b_i as F_i -> 0; VP: -log(1 - beta_i)). For a
                       discrete DDPM grid this is the only f, g available and it is first-order consistent.
    reverse_diffusion  x <- (2 - a_i) x + b_i score + sqrt(b_i) z                (appendix E, score_sde's
                       ReverseDiffusionPredictor: x - f_i + G_i^2 score with f_i = (a_i - 1) x, G_i^2 = b_i)
    ancestral          x <- (x + b_i score) / a_i + sqrt(b_i sigma_{i+1}^2 / sigma_i^2) z   (appendix F;
                       Ho et al. Alg. 2: the posterior mean and variance of the discretized chain; score_sde's VP
                       code uses variance b_i instead, DDPM's "fixed_large")
    none               x unchanged (with the Langevin corrector: annealed Langevin dynamics, Song & Ermon 2019)

Langevin corrector (Alg. 4 VE / Alg. 5 VP), n_corrector_steps times at level i before its predictor step:

    eps_L = 2 a_i^2 (snr ||z|| / ||score||)^2,   x <- x + eps_L score + sqrt(2 eps_L) z

(a_i^2 is the discretized chain's alpha_i = 1 - beta_i, 1 for VE; norms per example, where score_sde's code
averages them over the batch). denoise_final (the role of score_sde's noise_removal, which returns the last step's
mean without its noise): at a clean last level (sigma = 0) the last step returns the Tweedie estimate
x0_hat = E[x0 | x] of its own evaluation instead of a noisy step; when the
grid ends at sigma > 0 one more evaluation there gives x0_hat (nfe + 1). With predictor="none" x stays at level
K - 1, so the final x0_hat is taken there. Noise: see `brownian` (noise="independent" | "brownian"); the
Brownian path drives the predictor; corrector noise is always independent (fold_in(key, 1), level, step).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.samplers.brownian import step_normals
from diffusion_jax.samplers.checks import check_bool, check_choice, check_int, check_key, check_number
from diffusion_jax.samplers.grid import check_levels, concrete_or_none, transitions

PREDICTORS = ("reverse_diffusion", "ancestral", "euler_maruyama", "none")
CORRECTORS = ("langevin", "none")


def _check(grid, x_T, key, predictor, corrector, snr, n_corrector_steps, denoise_final, return_trajectory, sde):
    check_choice("predictor", predictor, PREDICTORS)
    check_choice("corrector", corrector, CORRECTORS)
    check_number("snr", snr, strict=True)
    check_int("n_corrector_steps", n_corrector_steps)
    check_bool(denoise_final=denoise_final, return_trajectory=return_trajectory)
    check_levels(grid, x_T, 2, sde, ("f", "g2", "t_of_log_snr"))
    sigma = concrete_or_none(grid.sigma)
    if sigma is not None and not np.all(sigma[:-1] > 0):
        raise ValueError("grid: only the last level may have sigma = 0 (the score is needed at every other level)")
    stochastic = predictor != "none" or (corrector == "langevin" and n_corrector_steps > 0)
    if stochastic:
        check_key(key, f"predictor={predictor!r} / corrector={corrector!r}")


def sde_options(process, grid) -> dict:
    """The registry's `from_process` for 'euler_maruyama' and 'pc': a continuous process is the reverse SDE's
    drift and diffusion (`sde`); a discrete one gives none, and the steps come from the grid's levels alone."""
    return {} if process.discrete else {"sde": process}


def step_coefficients(grid, predictor: str, sde=None):
    """Per-step (K,) arrays (c_x, c_s, std, a^2) with the predictor x_mean = c_x x + c_s score, + std z (module doc)."""
    al, sg = grid.alpha, grid.sigma
    a, b, _ = transitions(grid)
    if predictor == "euler_maruyama":
        if sde is None:
            F = jnp.log(a)
            u = 2.0 * F
            safe = jnp.where(jnp.abs(u) < 1e-6, 1.0, u)
            G2 = b * jnp.where(jnp.abs(u) < 1e-6, 1.0 - 0.5 * u, safe / jnp.expm1(safe))   # b 2F / (e^{2F} - 1)
        else:
            clean = sg <= 0
            log_snr = jnp.where(clean, 0.0, 2.0 * (jnp.log(al) - jnp.log(jnp.where(clean, 1.0, sg))))
            t = jnp.where(clean, 0.0, sde.t_of_log_snr(log_snr)).astype(al.dtype)
            dt = t[:-1] - t[1:]
            F, G2 = sde.f(t[:-1]) * dt, sde.g2(t[:-1]) * dt
        c_x, c_s, std = 1.0 - F, G2, jnp.sqrt(G2)
    elif predictor == "reverse_diffusion":
        c_x, c_s, std = 2.0 - a, b, jnp.sqrt(b)
    elif predictor == "ancestral":
        c_x, c_s, std = 1.0 / a, b / a, jnp.sqrt(b) * sg[1:] / sg[:-1]
    else:
        c_x, c_s, std = jnp.ones_like(a), jnp.zeros_like(a), jnp.zeros_like(a)
    cast = lambda v: jnp.asarray(v, al.dtype)
    return cast(c_x), cast(c_s), cast(std), cast(a ** 2)


def _norm(v):
    """Per-example L2 norm over the non-batch axes, shaped to broadcast against v."""
    return jnp.sqrt(jnp.sum(v * v, axis=tuple(range(1, v.ndim)), keepdims=True))


def predictor_corrector(denoiser, grid, x_T, key=None, *, predictor: str = "reverse_diffusion",
                        corrector: str = "langevin", snr: float = 0.16, n_corrector_steps: int = 1,
                        denoise_final: bool = True, sde=None, noise: str = "independent", brownian_span=None,
                        brownian_tol=None, return_trajectory: bool = False):
    """score_sde's PC sampler on a Grid (module doc). Returns (x_0, info) with info["nfe"] (Python int when the
    grid is concrete) and, if asked, info["trajectory"] (K + 1, B, ...): x_T and x after every step."""
    _check(grid, x_T, key, predictor, corrector, snr, n_corrector_steps, denoise_final, return_trajectory, sde)
    K = grid.num_steps
    x_T = jnp.asarray(x_T)
    shape, dtype = x_T.shape, x_T.dtype
    c_x, c_s, std, a2 = step_coefficients(grid, predictor, sde)
    n_corr = n_corrector_steps if corrector == "langevin" else 0
    use_pred = predictor != "none"
    key = jax.random.key(0) if key is None else key          # deterministic runs (nothing stochastic) only
    k_pred, k_corr = jax.random.fold_in(key, 0), jax.random.fold_in(key, 1)
    w0, draw = step_normals(noise, k_pred, grid, shape, dtype, span=brownian_span, tol=brownian_tol)
    clean_end = grid.sigma[-1] <= 0
    jump = denoise_final & use_pred & (jnp.arange(K) == K - 1) & clean_end      # Tweedie instead of the last step

    def score(x, t, alpha, sigma):
        return -denoiser(x, t, alpha, sigma)[1] / sigma

    def langevin(x, i, t, alpha, sigma, a2_i):                  # Alg. 4 / 5
        def body(j, x):
            z = jax.random.normal(jax.random.fold_in(jax.random.fold_in(k_corr, i), j), shape, dtype)
            s = score(x, t, alpha, sigma)
            eps_l = 2.0 * a2_i * (snr * _norm(z) / jnp.maximum(_norm(s), 1e-20)) ** 2
            return (x + eps_l * s + jnp.sqrt(2.0 * eps_l) * z).astype(dtype)
        return jax.lax.fori_loop(0, n_corr, body, x)

    def step(carry, inp):
        x, w = carry
        i, t, alpha, sigma, cx, cs, sd, a2_i, jump_i = inp
        if n_corr:
            x = langevin(x, i, t, alpha, sigma, a2_i)
        if use_pred:
            x0, eps = denoiser(x, t, alpha, sigma)
            z, w = draw(w, i)
            x_next = cx * x - cs * eps / sigma + sd * z
            x = jnp.where(jump_i, x0, x_next).astype(dtype)
        return (x, w), (x if return_trajectory else None)

    lv = slice(0, K)
    xs = (jnp.arange(K), grid.t[lv], grid.alpha[lv], grid.sigma[lv], c_x, c_s, std, a2, jump)
    (x, _), traj = jax.lax.scan(step, (x_T, w0), xs)

    nfe = K * (n_corr + use_pred)
    if denoise_final:
        if use_pred:       # grid ending at sigma > 0: one more evaluation at the last level
            last = (grid.t[K], grid.alpha[K], grid.sigma[K])
            x = jax.lax.cond(clean_end, lambda x: x, lambda x: denoiser(x, *last)[0].astype(dtype), x)
            extra = concrete_or_none(grid.sigma[K])
            nfe = nfe + (int(extra > 0) if extra is not None else jnp.where(clean_end, 0, 1))
        else:              # x is still at level K - 1
            x = denoiser(x, grid.t[K - 1], grid.alpha[K - 1], grid.sigma[K - 1])[0].astype(dtype)
            nfe += 1
    info = {"nfe": nfe}
    if return_trajectory:
        info["trajectory"] = jnp.concatenate([x_T[None], traj])
    return x, info


def euler_maruyama(denoiser, grid, x_T, key=None, *, sde=None, denoise_final: bool = True,
                   noise: str = "independent", brownian_span=None, brownian_tol=None,
                   return_trajectory: bool = False):
    """Euler-Maruyama on the reverse SDE (eq. 6): `predictor_corrector` with predictor="euler_maruyama" and no
    corrector. sde: the `diffusion_jax.process.sde` schedule the grid came from (its f, g), or None for the grid's own f, g."""
    return predictor_corrector(denoiser, grid, x_T, key, predictor="euler_maruyama", corrector="none",
                               denoise_final=denoise_final, sde=sde, noise=noise, brownian_span=brownian_span,
                               brownian_tol=brownian_tol, return_trajectory=return_trajectory)
