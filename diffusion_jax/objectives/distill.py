"""Few-step students: the maths of progressive distillation and consistency models, and config.distill.

Progressive distillation (Salimans & Ho 2022, Algorithm 2). A student of N steps on levels t_0 > ... > t_N is trained
where its one DDIM step t -> t'' lands where two of the teacher's DDIM steps t -> t' -> t'' land. Its x0 target is the
x0 of that DDIM step (sec. 3, with alpha, sigma of any Gaussian process):

    x_tilde = (z_t'' - (sigma_t''/sigma_t) z_t) / (alpha_t'' - (sigma_t''/sigma_t) alpha_t)     (z_t'' at sigma_t'' = 0)

and the loss is the truncated-SNR weighted x0 error max(SNR_t, 1) ||x_tilde - x0_hat||^2 (sec. 4, "truncated SNR").

Consistency models (Song et al. 2023). The consistency function f(x, t) maps every point of an ODE trajectory to its
start. It is built from the network's x0 estimate so that the boundary condition holds exactly (eq. 3, with the
skip / out coefficients of their appendix C in EDM coordinates y = x / alpha, s = sigma / alpha):

    f(x, t) = c_skip(s) y + c_out(s) x0_hat(x, t)
    c_skip(s) = sigma_d^2 / ((s - s_min)^2 + sigma_d^2)       c_out(s) = (s - s_min) / sqrt((s - s_min)^2 + sigma_d^2)

so c_skip(s_min) = 1, c_out(s_min) = 0 and f(x, t_min) = y: the identity at the boundary level, whatever the
network. x0_hat is the network's own estimate in data units (from v, eps, x0 or EDM's D), so c_out -> 1 at high noise
where Song et al.'s sigma_d (s - s_min) / sqrt(sigma_d^2 + s^2) multiplies a unit-variance raw output; a student
initialised from a teacher starts from the teacher's denoiser away from the boundary, as latent consistency models
do (Luo et al. 2023, whose c_skip / c_out are these in a scaled timestep). sigma_d sets how fast f leaves the
identity above s_min.

Improved consistency training (Song & Dhariwal 2023, "iCT"): Karras levels s_1 < ... < s_N (rho = 7) between s_min
and s_max, N(k) = min(s0 2^floor(k / K'), s1) + 1 with K' = floor(K / (log2 floor(s1 / s0) + 1)) at step k of K
(sec. 3.4); the pair index i drawn with p(i) proportional to erf((ln s_{i+1} - P_mean) / (sqrt 2 P_std)) -
erf((ln s_i - P_mean) / (sqrt 2 P_std)) (sec. 3.5, P_mean = -1.1, P_std = 2); weight lambda(s_i) = 1 / (s_{i+1} - s_i)
(sec. 3.1) and the pseudo-Huber metric d(x, y) = sqrt(||x - y||^2 + c^2) - c, c = 0.00054 sqrt(dim) (sec. 3.3).
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

METHODS = ("none", "guidance", "progressive", "consistency_distillation", "consistency_training")
TEACHER_METHODS = ("guidance", "progressive", "consistency_distillation")
GUIDED_METHODS = TEACHER_METHODS   # a student that takes w as input (model.guidance_embed_dim) learns by one of these
CONSISTENCY_METHODS = ("consistency_distillation", "consistency_training")


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """config.distill: how a few-step student is trained (method "none": an ordinary diffusion run).

    method:         "guidance" (Meng et al. 2023, stage one): a student that takes the guidance weight w as input
                    (model.guidance_embed_dim) learns its teacher's classifier-free guided prediction in one call;
                    "progressive", "consistency_distillation", "consistency_training" (module doc)
    teacher:        the teacher's workdir (guidance, progressive, consistency_distillation); the student starts from
                    its EMA weights and must share its model, schedule and loss sections
    student_steps:  progressive: N, the student's DDIM steps (the teacher takes 2N on the levels of `spacing`)
    spacing:        the levels the student is trained on: progressive's 2N-step grid, consistency distillation's
                    num_scales-step grid (`samplers.grid` spacings); sample the student on the same spacing
    num_scales:     consistency distillation's N: adjacent levels n -> n + 1 of an N-step grid
    solver:         consistency distillation's one-step teacher ODE solver (a deterministic `samplers` name)
    sigma_data:     sigma_d of the skip / out coefficients: how far above the boundary f stops being the identity
    s0, s1:         iCT's curriculum: N(k) grows from s0 + 1 to s1 + 1 levels, doubling in equal stages
    p_mean, p_std:  iCT's log-normal choice of the level pair
    huber_c:        the pseudo-Huber c (None: 0.00054 sqrt(dim), iCT); 0 gives the L2 distance
    w_min, w_max:   a student that takes w (model.guidance_embed_dim) learns the guided teacher for w ~ U[w_min, w_max]
                    per example (1 = no guidance): the teacher's guided prediction uncond + w (cond - uncond) in
                    "guidance" and in the one-step ODE solver of consistency distillation (LCM, Luo et al. 2023);
                    progressive rounds of a w-student pass w to both (Meng et al.'s stage two)
    """

    method: str = "none"
    teacher: str | None = None
    student_steps: int = 0
    spacing: str = "trailing"
    num_scales: int = 18
    solver: str = "heun"
    sigma_data: float = 0.5
    s0: int = 10
    s1: int = 1280
    p_mean: float = -1.1
    p_std: float = 2.0
    huber_c: float | None = None
    w_min: float = 1.0
    w_max: float = 5.0

    @property
    def consistency(self) -> bool:
        return self.method in CONSISTENCY_METHODS

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"distill.method={self.method!r} is unknown; choose from {METHODS}")
        if self.method in TEACHER_METHODS and not self.teacher:
            raise ValueError(f"distill.method={self.method!r} needs distill.teacher, the workdir of a trained run")
        if self.method not in TEACHER_METHODS and self.teacher is not None:
            raise ValueError(f"distill.teacher is given but distill.method={self.method!r} takes no teacher")
        if self.method == "progressive":
            n = self.student_steps
            if not (isinstance(n, int) and n >= 1 and n & (n - 1) == 0):
                raise ValueError(f"distill.student_steps={n!r}: progressive distillation halves the teacher's steps, "
                                 "so the student's must be a power of two >= 1 (the teacher then takes 2N)")
        if self.num_scales < 1 or self.s0 < 1 or self.s1 < self.s0:
            raise ValueError(f"distill.num_scales >= 1 and 1 <= distill.s0 <= distill.s1 are needed, got "
                             f"{self.num_scales}, {self.s0}, {self.s1}")
        if not (self.sigma_data > 0 and self.p_std > 0):
            raise ValueError(f"distill.sigma_data and distill.p_std must be > 0, got {self.sigma_data}, {self.p_std}")
        if self.huber_c is not None and not self.huber_c >= 0:
            raise ValueError(f"distill.huber_c must be None or >= 0, got {self.huber_c}")
        if not (math.isfinite(self.w_min) and math.isfinite(self.w_max) and 0 <= self.w_min <= self.w_max):
            raise ValueError(f"distill.w_min, distill.w_max must satisfy 0 <= w_min <= w_max (guidance weights, 1 = "
                             f"none), got {self.w_min}, {self.w_max}")


def check_distill(cfg: DistillConfig, kind: str, prediction: str, *, gamma: str = "linear", adapter: str | None = None,
                  init_from: str | None = None, guidance_embed_dim: int | None = None,
                  conditional: bool = False) -> None:
    """config.distill against the rest of the run (ValueError naming the key): the schedule's kind and VDM gamma,
    loss.prediction, the backbone (`adapter`: model.name of one that adapts a base run, else None),
    train.init_from, and a student taking w (model.guidance_embed_dim) of a `conditional` model (labels or text)."""
    cfg.validate()
    if guidance_embed_dim is not None and cfg.method not in GUIDED_METHODS:
        raise ValueError(f"model.guidance_embed_dim={guidance_embed_dim}: a network that takes the guidance weight w "
                         f"is a distilled student; set distill.method to one of {GUIDED_METHODS} (got "
                         f"{cfg.method!r})")
    if cfg.method == "guidance" and guidance_embed_dim is None:
        raise ValueError("distill.method='guidance' trains a student that takes the guidance weight w as input: set "
                         "model.guidance_embed_dim (e.g. 256; the unet and unet_cond backbones take it)")
    if guidance_embed_dim is not None and not conditional:
        raise ValueError(f"model.guidance_embed_dim={guidance_embed_dim}: classifier-free guidance needs a "
                         "conditional model (model.num_classes or model.context_dim)")
    if cfg.method == "none":
        return
    if kind == "vdm" and gamma == "learned":
        raise ValueError("distill.method: a learned VDM gamma (schedule.gamma='learned') trains with the network; "
                         "distil a run with a fixed schedule")
    if adapter is not None:
        raise ValueError(f"distill.method={cfg.method!r} with model.name={adapter!r}, an adapter of a base run: "
                         "distil the base run itself")
    if init_from is not None:
        raise ValueError(f"train.init_from={init_from!r}: a distillation run starts from its teacher "
                         "(distill.teacher) or, for consistency training, from scratch; leave train.init_from=None")
    if cfg.method == "consistency_training" and kind != "edm":
        raise ValueError(f"distill.method='consistency_training' runs on Karras et al.'s VE levels (iCT): set "
                         f"schedule.kind='edm' and loss.prediction='edm', got schedule.kind={kind!r}")
    if cfg.method == "progressive" and prediction in ("eps", "score"):
        raise ValueError(f"distill.method='progressive' with loss.prediction={prediction!r}: an eps-prediction "
                         "student cannot take the big first step (x0 = (x - sigma eps) / alpha with alpha ~ 0); "
                         "Salimans & Ho distil v- or x0-prediction teachers: set loss.prediction='v' or 'x0'")


@dataclasses.dataclass(frozen=True)
class ConsistencyParam:
    """The skip / out parameterization of a consistency model (module doc), in s = sigma / alpha."""

    sigma_min: float
    sigma_data: float = 0.5

    def coefficients(self, s):
        d = self.sigma_data
        c_skip = d ** 2 / ((s - self.sigma_min) ** 2 + d ** 2)
        c_out = (s - self.sigma_min) * jax.lax.rsqrt((s - self.sigma_min) ** 2 + d ** 2)
        return c_skip, c_out

    def __call__(self, x0_hat, x, alpha, sigma):
        """f(x, t) from the network's x0_hat at the level (alpha, sigma) of x; alpha, sigma broadcast against x."""
        c_skip, c_out = self.coefficients(sigma / alpha)
        return c_skip * (x / alpha) + c_out * x0_hat


def pd_target(z_t, z_tpp, alpha_t, sigma_t, alpha_tpp, sigma_tpp):
    """Salimans & Ho's x_tilde: the x0 whose DDIM step t -> t'' goes from z_t to z_t'' (z_t'' itself at sigma_t''
    = 0). Levels broadcast against z."""
    ratio = sigma_tpp / sigma_t
    return (z_tpp - ratio * z_t) / (alpha_tpp - ratio * alpha_t)


def truncated_snr_weight(alpha, sigma):
    """max(alpha^2 / sigma^2, 1) (Salimans & Ho 2022, sec. 4)."""
    return jnp.maximum((alpha / sigma) ** 2, 1.0)


def pseudo_huber(a, b, c: float):
    """sqrt(||a - b||^2 + c^2) - c per example (norm over all non-batch axes); c = 0: ||a - b||."""
    sq = jnp.sum(jnp.square(a - b).reshape(a.shape[0], -1), axis=1)
    return jnp.sqrt(sq + c ** 2) - c


def huber_c_for(cfg: DistillConfig, dim: int) -> float:
    return 0.00054 * math.sqrt(dim) if cfg.huber_c is None else float(cfg.huber_c)


def ict_num_levels(step, total_steps: int, s0: int, s1: int):
    """N(k) = min(s0 2^floor(k / K'), s1) + 1, K' = floor(K / (log2 floor(s1 / s0) + 1)) (iCT sec. 3.4); int32."""
    stages = int(math.log2(s1 // s0)) + 1          # s0 2^stages > s1: the last stage is capped at s1
    stage = jnp.minimum(jnp.asarray(step, jnp.int32) // max(total_steps // stages, 1), stages)
    return (jnp.minimum(s0 * 2 ** stage, s1) + 1).astype(jnp.int32)


def karras_levels(i, n, s_min: float, s_max: float, rho: float = 7.0):
    """s_i = (s_min^(1/rho) + (i - 1) / (n - 1) (s_max^(1/rho) - s_min^(1/rho)))^rho for i = 1..n (iCT's indexing:
    s_1 = s_min, s_n = s_max); i and n may be traced."""
    frac = (jnp.asarray(i, jnp.float32) - 1.0) / (jnp.asarray(n, jnp.float32) - 1.0)
    lo, hi = s_min ** (1.0 / rho), s_max ** (1.0 / rho)
    return (lo + frac * (hi - lo)) ** rho


def ict_pair_index(key, shape, n, max_levels: int, s_min: float, s_max: float, p_mean: float, p_std: float):
    """i in 1..n-1 with iCT's log-normal pair probabilities (module doc); n traced, <= max_levels (static)."""
    i = jnp.arange(1, max_levels, dtype=jnp.float32)
    cdf = lambda s: jax.scipy.special.erf((jnp.log(s) - p_mean) / (math.sqrt(2.0) * p_std))   # noqa: E731
    p = cdf(karras_levels(i + 1, n, s_min, s_max)) - cdf(karras_levels(i, n, s_min, s_max))
    logits = jnp.where(i <= n - 1, jnp.log(jnp.maximum(p, 1e-30)), -jnp.inf)
    return jax.random.categorical(key, logits, shape=shape) + 1
