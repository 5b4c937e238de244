"""Exact log-likelihoods: the probability-flow ODE (continuous or discrete schedules) and the DDPM variational bound.

PF-ODE (Song et al. 2021, "Score-Based Generative Modeling through SDEs", appendix D.2). Every schedule's
probability-flow ODE, in the coordinates y = x / alpha, s = sigma / alpha of `samplers.adaptive`, reads
dy/ds = eps_hat(alpha y; t). We integrate it *forward*, from the data at the smallest level s_0 = s(t_min) to
s_1 = s(t_max), in u = log s:

    dy/du = f(u, y) = s eps_hat(alpha y; t, alpha, sigma),       d delta / du = div_y f(u, y)     (delta(u_0) = 0)

(FFJORD's instantaneous change of variables, Chen et al. 2018 / Grathwohl et al. 2019: d log p_u(y(u)) / du =
-div f), so with the prior N(0, (alpha_1^2 + sigma_1^2) I) on x_1 = alpha_1 y(u_1) (VP: N(0, I) as score_sde;
VE / EDM: N(0, (1 + sigma_max^2) I), within O(1 / sigma_max^2) per dim of score_sde's N(0, sigma_max^2 I)) and
the Jacobians of x = alpha y at both ends

    log p_0(x) = log N(x_1; 0, (alpha_1^2 + sigma_1^2) I) + delta(u_1) + d log(alpha_1 / alpha_0)     [nats].

This is the density of the model's marginal at t_min (data convolved with N(0, s_0^2)), as in score_sde, which
integrates from eps = 1e-5. The prior is not the exact marginal at t_max: for data of mean m the mismatch is about
x_1 . alpha_1 m / (alpha_1^2 + sigma_1^2) nats per example (zero on average over examples; per dimension of order
alpha_1 |m_i| / sigma_1: 0.007 |m_i| for VP at t = 1, |m_i| / 50 for VE), the method's own error besides the
solver's. The divergence is exact (d Jacobian-vector products, one per basis vector; small d only) or Hutchinson's
estimate (Hutchinson 1989; FFJORD) v^T (df/dy) v with K probes v drawn once per example and solve (Rademacher or
standard normal, E[v v^T] = I), each probe carried as its own integral, so delta is unbiased and the spread over
probes gives its standard error. A discrete DDPM schedule is mapped to continuous levels by
`samplers.adaptive.level_fn` on a grid of all T timesteps (t and log alpha linear in log s between them; the
network gets fractional timesteps).

Bits per dimension of 8-bit data (uniform dequantization; Theis et al. 2016, score_sde's `offset = 7 -
inverse_scaler(-1)`): data on the grid x = 2 k / 255 - 1 are dequantized to x' = 2 (k + u) / 256 - 1, u ~ U[0, 1)^D,
i.e. z = (k + u) / 256 in [0, 1] and x' = 2 z - 1, so p_z(z) = 2^D p(x') and
log P(k) >= E_u log p_z(z) - D log 256 = E_u log p(x') - D log(256 / 2); hence

    bits/dim = -log p(x') / (D ln 2) + log2(L / 2)       (L = 256 levels: + 7),   an upper bound in expectation.

DDPM VLB (Ho et al. 2020, eq. 5; Nichol & Dhariwal 2021, sec. 2): L = L_T + sum_{t>=1} L_{t-1} + L_0 with the
prior term L_T = KL(q(x_T | x_0) || N(0, I)), the KL terms of `objectives.discrete.vlb_term` and the decoder
-log p(x_0 | x_1):
discretized Gaussian (8-bit images, a bound on -log P(k) directly in bits) or a continuous Gaussian density (a bound
on -log p(x_0) for continuous data). Every term is a one-sample Monte-Carlo estimate (x_t ~ q(x_t | x_0)).
"""
from __future__ import annotations

import math

import diffrax
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.objectives import param
from diffusion_jax.objectives.discrete import model_log_variance, normal_kl, vlb_term
from diffusion_jax.process import check_process
from diffusion_jax.process.discrete import (
    DiscreteSchedule,
    _bcast,
    q_posterior,
    q_sample,
)
from diffusion_jax.samplers.adaptive import EVALS_PER_STEP, ODE_SOLVERS, level_fn
from diffusion_jax.samplers.grid import Grid, concrete_or_none, start_time
from diffusion_jax.samplers.wrapper import make_denoiser

TRACES = ("exact", "rademacher", "gaussian")
EXACT_TRACE_MAX_DIM = 256        # exact trace costs d JVPs per evaluation; above this use Hutchinson
VLB_VARIANCES = ("fixed_small", "fixed_large", "learned")
DECODERS = ("discretized", "gaussian")


def _choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"likelihood.{name}={value!r} is unknown; choose from {tuple(choices)}")


def _positive(name, value, *, integer=False):
    ok = isinstance(value, (int, np.integer) if integer else (int, float, np.integer, np.floating))
    if not (ok and not isinstance(value, bool) and value > 0 and math.isfinite(value)):
        raise ValueError(f"likelihood.{name} must be a positive {'int' if integer else 'finite number'}, got {value!r}")


def _sum_flat(a):
    return jnp.sum(a, axis=tuple(range(1, a.ndim)))


def _ode_levels(schedule, t_min, t_max):
    """(level: s -> (network t, alpha, sigma), log s_0, log s_1) for the integration range [t_min, t_max]."""
    check_process(schedule)
    if schedule.discrete:
        T = schedule.num_timesteps
        lo, hi = (0 if t_min is None else t_min), (T - 1 if t_max is None else t_max)
        for name, v in (("t_min", lo), ("t_max", hi)):
            if not (isinstance(v, (int, np.integer)) and not isinstance(v, bool) and 0 <= v < T):
                raise ValueError(f"likelihood.{name} must be a timestep index in [0, {T - 1}], got {v!r}")
        if not lo < hi:
            raise ValueError(f"likelihood.t_min={lo} must be < likelihood.t_max={hi}")
        abar = concrete_or_none(schedule.alphas_cumprod)
        if abar is not None and abar[hi] <= 0:
            raise ValueError(f"timestep {hi} has alpha_bar = 0 (zero terminal SNR): no finite end for the ODE; pass "
                             f"likelihood.t_max={hi - 1}")
        alpha, sigma = schedule.sqrt_alphas_cumprod, schedule.sqrt_one_minus_alphas_cumprod
        grid = Grid(t=jnp.arange(T - 1, -1, -1, dtype=jnp.float32), alpha=alpha[::-1], sigma=sigma[::-1])
        return level_fn(grid), jnp.log(sigma[lo] / alpha[lo]), jnp.log(sigma[hi] / alpha[hi])
    needed = ("t_of_log_snr", "network_time")   # the continuous part of the protocol (check_process: the rest)
    if not all(hasattr(schedule, m) for m in needed):
        raise ValueError(f"schedule must be a DiscreteSchedule or a schedule of diffusion_jax.process.sde, got "
                         f"{type(schedule).__name__}")
    lo = schedule.t_min if t_min is None else t_min
    hi = start_time(schedule) if t_max is None else t_max     # a flow: from alpha^2 = 2^-24, as its grids
    if not 0 <= lo < hi:
        raise ValueError(f"likelihood.t_min={lo} and likelihood.t_max={hi} need 0 <= t_min < t_max")
    log_s = lambda t: -0.5 * schedule.log_snr(jnp.asarray(t, jnp.float32))
    with jax.ensure_compile_time_eval():   # the ODE runs in log(sigma / alpha): both ends must be finite
        ends = concrete_or_none(jnp.stack([log_s(lo), log_s(hi)]))
    if ends is not None and not np.isfinite(ends).all():
        raise ValueError(f"likelihood.t_min={lo}, t_max={hi}: log(sigma / alpha) = {ends.tolist()} is not finite "
                         "there (sigma = 0 or alpha = 0); pass a t_min > 0 / a t_max < the schedule's end")
    return level_fn(None, schedule), log_s(lo), log_s(hi)


def _probes(trace, key, num_probes, shape, dtype):
    if key is None:
        raise ValueError(f"likelihood.key: trace={trace!r} draws Hutchinson probes and needs a jax.random key")
    draw = jax.random.rademacher if trace == "rademacher" else jax.random.normal
    return draw(key, (num_probes,) + tuple(shape), dtype)


def ode_log_likelihood(denoise_fn, schedule, x, *, prediction: str, key=None, trace: str = "exact",
                       num_probes: int = 1, rtol: float = 1e-5, atol: float = 1e-5, t_min=None, t_max=None,
                       solver: str = "tsit5", max_steps: int = 8192, max_exact_dim: int = EXACT_TRACE_MAX_DIM):
    """log p(x) in nats, (B,), by the PF-ODE (module doc); x (B, ...) float, D = prod(x.shape[1:]).

    denoise_fn(x, t) -> prediction of kind `prediction` (`samplers.wrapper`: eps, x0, v, score, edm); schedule: a
    `diffusion_jax.process.sde` schedule (t_min, t_max in its time; default its own range) or a DiscreteSchedule
    (integer timestep indices; default 0 and T - 1). The batch is one ODE state (one adaptive step size, as
    adaptive_ode); vmap over a leading axis for independent solves. Returns (logp, info): info["prior"] (B,)
    log N(x_1) and info["delta"] (B,) = logp - prior (nats), "latent" x_1 (B, ...), "nfe" (network evaluations,
    each with K or D Jacobian-vector products: "jvps_per_eval"), "num_steps", "success" (False where max_steps was
    reached) and, for Hutchinson with num_probes > 1, "delta_stderr" (B,): the standard error of delta over the
    probes.
    """
    _choice("trace", trace, TRACES)
    _choice("solver", solver, ODE_SOLVERS)
    for name, v in (("rtol", rtol), ("atol", atol)):
        _positive(name, v)
    for name, v in (("num_probes", num_probes), ("max_steps", max_steps), ("max_exact_dim", max_exact_dim)):
        _positive(name, v, integer=True)
    x = jnp.asarray(x)
    x = x if jnp.issubdtype(x.dtype, jnp.floating) else x.astype(jnp.float32)
    if x.ndim < 2:
        raise ValueError(f"x must be an array (B, ...) with at least one data axis, got shape {x.shape}")
    B, D, dtype = x.shape[0], math.prod(x.shape[1:]), x.dtype
    if trace == "exact" and D > max_exact_dim:
        raise ValueError(f"likelihood.trace='exact' needs D = {D} Jacobian-vector products per evaluation, above the "
                         f"limit max_exact_dim={max_exact_dim}; use trace='rademacher' or 'gaussian' (Hutchinson)")
    den = make_denoiser(denoise_fn, prediction)
    level, u0, u1 = _ode_levels(schedule, t_min, t_max)
    if trace == "exact":                                     # e_i for every example at once: (D, B, ...)
        tangents = jnp.broadcast_to(jnp.eye(D, dtype=dtype).reshape((D, 1) + x.shape[1:]), (D,) + x.shape)
    else:
        tangents = _probes(trace, key, num_probes, x.shape, dtype)

    def field(u, state, args):
        y, _ = state
        s = jnp.exp(u)
        t, alpha, sigma = level(s)
        dy, jvp = jax.linearize(lambda z: s * den((alpha * z).astype(dtype), t, alpha, sigma)[1], y)
        jv = jax.vmap(jvp)(tangents).reshape(tangents.shape[0], B, D)
        if trace == "exact":
            div = jnp.einsum("ibi->b", jv)[:, None]          # (B, 1)
        else:
            div = jnp.sum(tangents.reshape(jv.shape) * jv, axis=-1).T     # (B, K): one estimate per probe
        return dy, div.astype(dtype)

    _, alpha0, _ = level(jnp.exp(u0))
    k = 1 if trace == "exact" else num_probes
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(field), ODE_SOLVERS[solver](), t0=u0, t1=u1, dt0=None,
        y0=(x / alpha0, jnp.zeros((B, k), dtype)), stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
        max_steps=max_steps, throw=False, saveat=diffrax.SaveAt(t1=True))
    _, alpha1, sigma1 = level(jnp.exp(u1))
    x1 = alpha1 * sol.ys[0][-1]
    var1 = alpha1 ** 2 + sigma1 ** 2
    prior = -0.5 * (_sum_flat(x1 ** 2) / var1 + D * jnp.log(2 * math.pi * var1))
    deltas = sol.ys[1][-1] + D * (jnp.log(alpha1) - jnp.log(alpha0))      # (B, K)
    delta = jnp.mean(deltas, axis=1)
    n = sol.stats["num_steps"]
    info = {"prior": prior, "delta": delta, "latent": x1, "nfe": EVALS_PER_STEP[solver] * n + 1, "num_steps": n,
            "jvps_per_eval": tangents.shape[0], "success": sol.result == diffrax.RESULTS.successful}
    if k > 1:
        info["delta_stderr"] = jnp.std(deltas, axis=1, ddof=1) / math.sqrt(k)
    return prior + delta, info


def dequantize(x, key, num_levels: int = 256):
    """Uniform dequantization of data on the grid x = 2 k / (L - 1) - 1 (k = 0..L-1; L = 256: the project's
    images): x' = 2 (k + u) / L - 1, u ~ U[0, 1), shape and dtype of x (k is x rounded to the grid)."""
    _positive("num_levels", num_levels, integer=True)
    x = jnp.asarray(x)
    dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32
    k = jnp.clip(jnp.round((x.astype(dtype) + 1.0) * (num_levels - 1) / 2.0), 0, num_levels - 1)
    return 2.0 * (k + jax.random.uniform(key, x.shape, dtype)) / num_levels - 1.0


def bits_per_dim(log_p, num_dims: int, num_levels: int = 256):
    """Bits/dim of L-level data from the log-density log p(x') (nats, any shape) of its dequantized values x' in
    [-1, 1]^D (`dequantize`): -log p(x') / (D ln 2) + log2(L / 2) (module doc; 7 for 8-bit data)."""
    _positive("num_dims", num_dims, integer=True)
    _positive("num_levels", num_levels, integer=True)
    return -jnp.asarray(log_p) / (num_dims * math.log(2.0)) + math.log2(num_levels / 2.0)


def ode_bits_per_dim(denoise_fn, schedule, x, key, *, prediction: str, num_levels: int = 256, **options):
    """Bits/dim (B,) of 8-bit data x (B, ...) in [-1, 1]: dequantize with one key, PF-ODE log-likelihood (options of
    `ode_log_likelihood`; Hutchinson probes from another), then `bits_per_dim`. Returns (bpd, info) with info of
    ode_log_likelihood plus "log_p" (B,) nats of the dequantized data."""
    k_deq, k_probe = jax.random.split(key)
    log_p, info = ode_log_likelihood(denoise_fn, schedule, dequantize(x, k_deq, num_levels), prediction=prediction,
                                     key=k_probe, **options)
    return bits_per_dim(log_p, math.prod(x.shape[1:]), num_levels), dict(info, log_p=log_p)


def ddpm_vlb(denoise_fn, schedule: DiscreteSchedule, x0, key, *, prediction: str = "eps",
             variance: str = "fixed_small", decoder: str = "discretized", clip_denoised: float | None = None):
    """The DDPM variational bound -log p(x0) <= L (module doc), one forward sample per timestep.

    denoise_fn(x_t, t) with t (B,) int32 timesteps returns the prediction (eps | x0 | v | score), and with
    variance="learned" 2 C channels [prediction, v], log Sigma = v' log beta + (1 - v') log beta~, v' = (v + 1) / 2.
    fixed_small: Sigma = beta~_t; fixed_large: beta_t (beta~ at t = 0, as Ho et al.'s code). decoder: "discretized"
    (x0 on the 256-level grid in [-1, 1]) or "gaussian" (density of continuous x0). clip_denoised clips x0_hat.
    x0 (B, ...). Returns (nats (B,), info) with info["bpd"] = nats / (D ln 2), "prior" (B,) = L_T and "terms"
    (B, T) = L_{t-1} for t = 1..T (index 0: the decoder), all in nats, and "nfe" = T.
    """
    _choice("variance", variance, VLB_VARIANCES)
    _choice("decoder", decoder, DECODERS)
    if clip_denoised is not None:
        _positive("clip_denoised", clip_denoised)
    check_process(schedule)
    if not schedule.discrete:
        raise ValueError(f"ddpm_vlb needs a discrete (DDPM) schedule, got schedule.kind={schedule.kind!r}")
    x0 = jnp.asarray(x0, jnp.float32)
    B, D, T = x0.shape[0], math.prod(x0.shape[1:]), schedule.num_timesteps
    logvar_large = jnp.log(schedule.betas).at[0].set(schedule.posterior_log_variance_clipped[0])

    def term(t):
        tt = jnp.full((B,), t, jnp.int32)
        xt = q_sample(schedule, x0, tt, jax.random.normal(jax.random.fold_in(key, t), x0.shape, x0.dtype))
        out = denoise_fn(xt, tt)
        if variance == "learned":
            if out.shape[-1] != 2 * x0.shape[-1]:
                raise ValueError(f"variance='learned' needs 2*{x0.shape[-1]} output channels, got {out.shape[-1]}")
            out, v = jnp.split(out, 2, axis=-1)
            logvar = model_log_variance(schedule, tt, v, xt)
        else:
            table = schedule.posterior_log_variance_clipped if variance == "fixed_small" else logvar_large
            logvar = _bcast(table[tt], xt)
        x0_hat, _ = param.to_x0_eps(prediction, out, xt, _bcast(schedule.alpha(tt), xt), _bcast(schedule.sigma(tt), xt))
        if clip_denoised is not None:
            x0_hat = jnp.clip(x0_hat, -clip_denoised, clip_denoised)
        nats = vlb_term(schedule, x0, xt, tt, x0_hat, logvar) * (D * math.log(2.0))
        if decoder == "gaussian":                            # -log N(x0; mu(x_1, x0_hat), Sigma_1) at t = 0
            mean = q_posterior(schedule, x0_hat, xt, tt)[0]
            nll = 0.5 * _sum_flat(math.log(2 * math.pi) + logvar + (x0 - mean) ** 2 * jnp.exp(-logvar))
            nats = jnp.where(t == 0, nll, nats)
        return nats

    terms = jax.lax.map(term, jnp.arange(T)).T                                    # (B, T)
    a_T, s_T = schedule.alpha(T - 1), schedule.sigma(T - 1)
    prior = _sum_flat(normal_kl(a_T * x0, 2.0 * jnp.log(s_T), 0.0, 0.0))
    nats = prior + jnp.sum(terms, axis=1)
    return nats, {"bpd": nats / (D * math.log(2.0)), "prior": prior, "terms": terms, "nfe": T}
