"""Controllable generation (diffusion_jax.inference.editing) on Gaussian data, whose denoiser, conditionals and even the
editing samplers' output laws are closed form.

Data: x0 ~ N(mu, Sigma) on 4x4 one-channel "images" with an exponential correlation kernel. The exact denoiser is
E[x0 | x_t] = mu + A_t (x_t - alpha mu), A_t = alpha Sigma (alpha^2 Sigma + sigma^2 I)^-1. Every step of DDIM /
DDPM (DDIM eq. 12) and RePaint is then linear in the state, the known pixels and fresh normals, so the law of the
hole after the projection method or RePaint is Gaussian with a mean and covariance computed here in float64 by
recursion, independently of the package: the samples must match it within Monte Carlo error. The same numbers
measure each method's distance to the exact conditional N(m_u|k, S_u|k) (which neither reaches: both are
approximations; RePaint gets closer).
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from diffusion_jax import validate
from diffusion_jax.inference.editing import (
    border_hole,
    center_hole,
    edit,
    gray_transform,
    half_hole,
    img2img,
    known,
    load_image,
    load_mask,
    random_hole,
    repaint,
    repaint_levels,
    repaint_nfe,
    sample_known,
    truncate_schedule,
)
from diffusion_jax.inference.editing.color import gray_known
from diffusion_jax.inference.editing.levels import noise_level
from diffusion_jax.inference.sampling import SamplerSpec
from diffusion_jax.models.functional import split_params
from diffusion_jax.process.discrete import make_schedule
from diffusion_jax.process.sde import VESDE, VPSDE, EDMSchedule
from diffusion_jax.samplers import run_sampler
from diffusion_jax.samplers.grid import continuous_grid, discrete_grid

S = 4                   # 4 x 4 images
N = 4000                # Monte Carlo samples
Z = 4.5                 # tolerance in standard errors


@pytest.fixture(scope="module")
def sched():
    return make_schedule("linear", 1000)


def _kernel(scale=2.0, var=0.25):
    ij = np.stack(np.meshgrid(np.arange(S), np.arange(S), indexing="ij"), -1).reshape(-1, 2)
    dist = np.sqrt(((ij[:, None] - ij[None]) ** 2).sum(-1))
    return var * np.exp(-dist / scale)


class Gaussian:
    """x0 ~ N(mu, Sigma) in R^d; images (B, 4, 4, d // 16) flattened row-major."""

    def __init__(self, sigma, mu):
        self.sigma, self.mu = np.asarray(sigma, np.float64), np.asarray(mu, np.float64)
        lam, u = np.linalg.eigh(self.sigma)
        self._lam, self._u, self._mu = (jnp.asarray(v, jnp.float32) for v in (lam, u, self.mu))

    def x0(self, x, alpha, sigma):
        """E[x0 | x] for x (B, ...) at (alpha, sigma) (B,)."""
        xf, a, s = x.reshape(x.shape[0], -1), alpha[:, None], sigma[:, None]
        z = (xf - a * self._mu) @ self._u
        return (self._mu + (z * (a * self._lam / (a ** 2 * self._lam + s ** 2))) @ self._u.T).reshape(x.shape)

    def eps_fn(self, schedule):
        def fn(x, t):
            a, s = schedule.interpolated_level(t)
            return (x - a[:, None, None, None] * self.x0(x, a, s)) / s[:, None, None, None]
        return fn

    def A(self, alpha, sigma):
        return alpha * self.sigma @ np.linalg.inv(alpha ** 2 * self.sigma + sigma ** 2 * np.eye(len(self.mu)))

    def conditional(self, y, k):
        """Exact N(mean, cov) of x0[~k] given x0[k] = y[k]."""
        u, s = ~k, self.sigma
        gain = s[np.ix_(u, k)] @ np.linalg.inv(s[np.ix_(k, k)])
        return self.mu[u] + gain @ (y[k] - self.mu[k]), s[np.ix_(u, u)] - gain @ s[np.ix_(k, u)]


class HoleLaw:
    """Mean and covariance of the hole x[~k] through linear steps, in float64."""

    def __init__(self, g: Gaussian, y, k):
        self.g, self.y, self.k, self.u = g, y, k, ~k
        self.m, self.c = np.zeros(self.u.sum()), np.eye(self.u.sum())         # x_T ~ N(0, I)

    def step(self, a, s, a_next, s_next, eta):
        """DDIM eq. 12 from (a, s) to (a_next, s_next), known part of the input = a y + s z (fresh z)."""
        g, u, k = self.g, self.u, self.k
        var = eta ** 2 * (1 - a ** 2 / a_next ** 2) * s_next ** 2 / s ** 2        # eta^2 beta~ (respaced)
        c = math.sqrt(max(s_next ** 2 - var, 0.0))
        gx, h = a_next - c * a / s, c / s               # x_next = gx x0_hat(x_in) + h x_in + sqrt(var) xi
        A = g.A(a, s)
        B = gx * A[np.ix_(u, u)] + h * np.eye(u.sum())
        b = gx * (g.mu[u] - a * A[np.ix_(u, u)] @ g.mu[u] + a * A[np.ix_(u, k)] @ (self.y[k] - g.mu[k]))
        self.m = B @ self.m + b
        self.c = B @ self.c @ B.T + (gx * s) ** 2 * A[np.ix_(u, k)] @ A[np.ix_(u, k)].T + var * np.eye(u.sum())

    def jump(self, abar_from, abar_to):
        r = abar_to / abar_from
        self.m, self.c = math.sqrt(r) * self.m, r * self.c + (1 - r) * np.eye(self.u.sum())


def _levels(schedule, steps):
    """(alpha, sigma) of DDIM's leading timesteps arange(K) * (T // K), noisiest first, then the clean end."""
    abar = np.asarray(schedule.alphas_cumprod, np.float64)
    ts = (np.arange(steps) * (1000 // steps))[::-1]
    return np.append(np.sqrt(abar[ts]), 1.0), np.append(np.sqrt(1 - abar[ts]), 0.0)


def _setup(seed=0):
    g = Gaussian(_kernel(), np.linspace(-0.3, 0.3, S * S))
    y = g.mu + np.linalg.cholesky(g.sigma) @ np.random.default_rng(seed).standard_normal(S * S)
    mask = half_hole(S, "right")                                   # left half known
    return g, y, mask, mask.reshape(-1) > 0


def _moments_ok(x, mean, cov, what):
    x = np.asarray(x, np.float64)
    se_m = np.sqrt(np.diag(cov) / len(x))
    se_v = np.diag(cov) * math.sqrt(2 / (len(x) - 1))
    dm, dv = np.abs(x.mean(0) - mean) / se_m, np.abs(x.var(0, ddof=1) - np.diag(cov)) / se_v
    print(f"{what}: largest deviation from the predicted law: mean {dm.max():.1f} se, variance {dv.max():.1f} se")
    assert dm.max() < Z and dv.max() < Z, f"{what}: mean off by {dm.max():.1f} se, variance by {dv.max():.1f} se"


# -------------------------------------------------------------------------------- the projection method
@pytest.mark.parametrize("name,eta", [("ddim", 0.0), ("ddpm", 1.0)])
def test_projection_law_and_distance_to_the_exact_conditional(sched, name, eta):
    g, y, mask, k = _setup()
    kn = known(y.reshape(1, S, S, 1), mask[None], num=N)
    steps = 25
    x, info = jax.jit(lambda key: sample_known(name, g.eps_fn(sched), sched, key, kn, steps=steps,
                                                clip_denoised=None))(jax.random.PRNGKey(1))
    x = np.asarray(x).reshape(N, -1)
    assert info["nfe"] == steps
    assert np.array_equal(x[:, k], np.broadcast_to(y[k].astype(np.float32), (N, k.sum())))   # bit for bit
    law = HoleLaw(g, y, k)
    al, sg = _levels(sched, steps)
    for i in range(steps):
        law.step(al[i], sg[i], al[i + 1], sg[i + 1], eta)
    _moments_ok(x[:, ~k], law.m, law.c, f"projection + {name}")
    cm, cc = g.conditional(y, k)
    shift = (law.m - g.mu[~k]) @ (cm - g.mu[~k]) / np.sum((cm - g.mu[~k]) ** 2)
    print(f"{name}: projection's mean moves {shift:.2f} of the way to the exact conditional mean; "
          f"variance ratio to the exact conditional {np.round(np.diag(law.c) / np.diag(cc), 2)}")
    assert 0.3 < shift < 1.0                       # conditioned, but not exactly (score_sde's approximation)


@pytest.mark.parametrize("name,steps", [("dpmpp_2m", 25), ("heun", 13)])
def test_projection_is_exact_where_the_hole_is_independent(sched, name, steps):
    """Known pixels independent of the hole (block-diagonal Sigma, the hole correlated within): there the exact
    conditional of the hole is its prior N(mu_u, Sigma_uu) and the projection method must give the unconditional
    sampler's fill itself (same x_T and noise: to float32 rounding), its mean the exact one within MC error."""
    _, y, mask, k = _setup()
    g = Gaussian(_kernel() * (k[:, None] == k[None, :]), np.linspace(-0.3, 0.3, S * S))
    kn = known(y.reshape(1, S, S, 1), mask[None], num=N)
    run = dict(steps=steps, spacing="karras", clip_denoised=None)
    key = jax.random.PRNGKey(2)
    x, _ = jax.jit(lambda key: sample_known(name, g.eps_fn(sched), sched, key, kn, **run))(key)
    ref, _ = jax.jit(lambda key: run_sampler(name, g.eps_fn(sched), sched, key, kn.shape, **run))(
        jax.random.split(key)[0])
    x, ref = np.asarray(x).reshape(N, -1), np.asarray(ref).reshape(N, -1)
    assert np.array_equal(x[:, k], np.broadcast_to(y[k].astype(np.float32), (N, k.sum())))
    np.testing.assert_allclose(x[:, ~k], ref[:, ~k], atol=2e-5)
    cm, cc = g.conditional(y, k)
    se = np.sqrt(np.diag(cc) / N)
    assert np.abs(x[:, ~k].mean(0) - cm).max() < Z * se.max()
    print(f"{name}: fill variance / exact {np.round(x[:, ~k].var(0) / np.diag(cc), 2)} "
          f"(the sampler's own discretization error at {steps} steps)")


def test_noise_level_is_the_grid_level_for_every_schedule(sched):
    """The (alpha, sigma) read back from the network time is the level the sampler's grid built."""
    for spacing in ("leading", "karras"):
        grid = discrete_grid(sched, 20, spacing)
        a, s = noise_level(sched, grid.t[:-1])
        np.testing.assert_allclose(a, grid.alpha[:-1], rtol=2e-5, atol=1e-6)
        np.testing.assert_allclose(s, grid.sigma[:-1], rtol=2e-5)
    a, s = noise_level(sched, jnp.arange(0, 1000, 37, dtype=jnp.int32))
    assert np.array_equal(a, sched.sqrt_alphas_cumprod[::37])
    assert np.array_equal(s, sched.sqrt_one_minus_alphas_cumprod[::37])
    for sde in (VPSDE(), VESDE(), EDMSchedule()):
        grid = continuous_grid(sde, 10, "uniform")
        a, s = noise_level(sde, grid.t[:-1])
        np.testing.assert_allclose(a, grid.alpha[:-1], rtol=1e-5)
        np.testing.assert_allclose(s, grid.sigma[:-1], rtol=1e-5)
    a, s = noise_level(sched, jnp.asarray([3.5]), "edm")      # EDM networks get (x / alpha, sigma / alpha)
    assert float(a[0]) == 1.0 and float(s[0]) == 3.5


# ------------------------------------------------------------------------------------------------- RePaint
def test_repaint_schedule_and_nfe():
    levels = repaint_levels(10, 3, 2)
    assert levels.tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6, 3, 4, 5, 6, 7, 8, 9, 6, 7, 8, 9, 10]
    assert repaint_nfe(10, 3, 2) == int(np.sum(np.diff(levels) == 1)) == 19
    assert repaint_nfe(250, 10, 10) == 250 + 9 * 10 * 24                   # RePaint's default setting: 2410


def test_repaint_law_keeps_known_and_beats_projection(sched):
    g, y, mask, k = _setup()
    kn = known(y.reshape(1, S, S, 1), mask[None], num=N)
    steps, j, r = 20, 2, 4
    x, info = jax.jit(lambda key: repaint(g.eps_fn(sched), sched, key, kn, steps=steps, jump_length=j,
                                          resamplings=r, eta=1.0, clip_denoised=None))(jax.random.PRNGKey(3))
    x = np.asarray(x).reshape(N, -1)
    assert info["nfe"] == repaint_nfe(steps, j, r) == steps + (r - 1) * j * len(range(0, steps - j, j))
    assert np.array_equal(x[:, k], np.broadcast_to(y[k].astype(np.float32), (N, k.sum())))
    al, sg = _levels(sched, steps)
    law, plain = HoleLaw(g, y, k), HoleLaw(g, y, k)
    for i in range(steps):
        plain.step(al[i], sg[i], al[i + 1], sg[i + 1], 1.0)
    levels = repaint_levels(steps, j, r)
    for a, b in zip(levels[:-1], levels[1:]):
        if b == a + 1:
            law.step(al[a], sg[a], al[b], sg[b], 1.0)
        else:
            law.jump(al[a] ** 2, al[b] ** 2)
    _moments_ok(x[:, ~k], law.m, law.c, "repaint")
    cm, _ = g.conditional(y, k)
    gap, gap_plain = np.abs(law.m - cm).max(), np.abs(plain.m - cm).max()
    print(f"largest mean gap to the exact conditional: repaint {gap:.3f}, projection (same DDPM steps) {gap_plain:.3f}")
    assert gap < 0.6 * gap_plain


# ----------------------------------------------------------------------------------------------- colorize
def test_colour_transform_is_orthogonal_with_the_gray_first():
    for c in (2, 3, 4):
        m = gray_transform(c)
        np.testing.assert_allclose(m.T @ m, np.eye(c), atol=1e-14)
        np.testing.assert_allclose(m[:, 0], 1 / math.sqrt(c))
    m3 = np.array([[1, 1, 1], [1, -1, 0], [1, 1, -2]]).T / np.sqrt([3, 2, 6])     # Helmert, closed form
    np.testing.assert_allclose(gray_transform(3), m3, atol=1e-15)


@pytest.mark.parametrize("name", ["ddim", "heun"])
def test_colorize_keeps_the_gray_exactly(sched, name):
    d = 2 * 2 * 3                                   # 2x2 RGB images, channels strongly correlated
    pix = np.stack(np.meshgrid(np.arange(2), np.arange(2), np.arange(3), indexing="ij"), -1).reshape(-1, 3)
    cov = 0.2 * np.exp(-np.abs(pix[:, None, :2] - pix[None, :, :2]).sum(-1) / 2) * (
        0.5 + 0.5 * (pix[:, None, 2] == pix[None, :, 2]))
    g = Gaussian(cov, np.tile([0.2, -0.1, 0.0], 4))
    rgb = (g.mu + np.linalg.cholesky(g.sigma) @ np.random.default_rng(4).standard_normal(d)).reshape(1, 2, 2, 3)
    kn = gray_known(jnp.asarray(rgb, jnp.float32), num=64)
    x, _ = jax.jit(lambda key: sample_known(name, g.eps_fn(sched), sched, key, kn, steps=10,
                                            clip_denoised=None))(jax.random.PRNGKey(5))
    x = np.asarray(x)
    u0 = np.asarray(kn.to_space(jnp.asarray(x)))[..., 0]
    gray_in = rgb.astype(np.float32).mean(-1)
    np.testing.assert_allclose(x.mean(-1), np.broadcast_to(gray_in, x.shape[:-1]), atol=1e-6, rtol=0)
    np.testing.assert_allclose(u0, np.sqrt(3) * np.broadcast_to(gray_in, u0.shape), atol=2e-6, rtol=0)
    assert np.std(x - x.mean(-1, keepdims=True), axis=0).mean() > 0.05     # colours differ between samples


# ------------------------------------------------------------------------------------------------ SDEdit
def test_img2img_strength_limits_and_the_posterior_mean(sched):
    g, y, _, _ = _setup()
    image = jnp.asarray(np.broadcast_to(y.reshape(1, S, S, 1), (N, S, S, 1)), jnp.float32)
    fn = g.eps_fn(sched)
    run = lambda strength, name="ddim", key=jax.random.PRNGKey(6): jax.jit(
        lambda k: img2img(name, fn, sched, k, image, strength=strength, steps=20, clip_denoised=None))(key)
    x, info = run(1e-3)                                   # one timestep: barely noised, then denoised
    assert info["steps"] == 1 and np.abs(np.asarray(x) - np.asarray(image)).max() < 0.05
    x1, _ = run(1.0)                                      # strength 1 is plain sampling: the image is ignored
    ref, _ = jax.jit(lambda k: run_sampler("ddim", fn, sched, k, image.shape, steps=20, clip_denoised=None))(
        jax.random.PRNGKey(6))
    assert np.array_equal(np.asarray(x1), np.asarray(ref))
    # strength 0.5, DDPM: T_0 = 500, leading 20 steps start at t = 19 * 25 = 475; the ancestral chain with the exact
    # denoiser keeps the exact conditional mean, so E[x] = E[x0 | x_475] averaged over x_475 = a y + s z.
    x, info = run(0.5, "ddpm")
    abar = float(np.asarray(sched.alphas_cumprod, np.float64)[475])
    a, s = math.sqrt(abar), math.sqrt(1 - abar)
    mean = g.mu + g.A(a, s) @ (a * y - a * g.mu)
    x = np.asarray(x).reshape(N, -1)
    se = x.std(0) / math.sqrt(N)
    assert info["nfe"] == 20 and np.abs(x.mean(0) - mean).max() < Z * se.max()
    assert truncate_schedule(sched, 0.5).num_timesteps == 500
    assert truncate_schedule(VPSDE(), 0.5).t_max == pytest.approx(0.5005)
    assert truncate_schedule(EDMSchedule(), 0.25).sigma_max == pytest.approx(0.002 * (80 / 0.002) ** 0.25)


# ---------------------------------------------------------------------------------------- masks, validation
def test_mask_helpers():
    for m in (center_hole(8), border_hole(8, 2), half_hole((6, 8), "left"), random_hole(8, 0.5, seed=1)):
        assert m.shape[-1] == 1 and m.dtype == np.float32 and set(np.unique(m)) == {0.0, 1.0}
        validate.check_mask(m, "mask")
    assert center_hole(8)[2:6, 2:6].sum() == 0 and center_hole(8).sum() == 48
    assert border_hole(8, 2)[2:6, 2:6].all() and border_hole(8, 2).sum() == 16
    assert half_hole((6, 8), "left")[:, :4].sum() == 0 and half_hole((6, 8), "left")[:, 4:].all()
    with pytest.raises(ValueError, match="width=4 leaves no known centre"):
        border_hole(8, 4)


@pytest.mark.parametrize("mask,match", [
    (np.ones((8, 8, 3)), "must be"),                              # channels
    (np.ones((8, 7)), "must be"),                                 # size
    (np.ones((2, 8, 8, 1)), "must be"),                           # N not in (1, num=3)
    (np.full((8, 8), 0.5), "binary"),
    (np.ones((8, 8)), "no hole"),
    (np.zeros((8, 8)), "no known pixel"),
    ("mask.png", "array"),
])
def test_check_mask_errors_name_the_argument(mask, match):
    with pytest.raises((ValueError, TypeError), match=match) as info:
        validate.check_mask(mask, "mask", size=8, num=3)
    assert "mask" in str(info.value)


def test_check_mask_forms():
    assert validate.check_mask(center_hole(8)[..., 0] > 0, "m", size=8).shape == (1, 8, 8, 1)
    assert validate.check_mask(np.ones((3, 8, 8, 1)) * center_hole(8), "m", num=3).shape == (3, 8, 8, 1)
    assert validate.check_mask(np.zeros((8, 8)), "m", need_known=False).sum() == 0


class TinyNet(nnx.Module):
    """A stand-in model with the U-Net's call signature: eps_hat = a 1x1 linear map of x, shifted by the label."""

    def __init__(self, channels, rngs):
        self.lin = nnx.Linear(channels, channels, rngs=rngs)
        self.emb = nnx.Embed(11, channels, rngs=rngs)

    def __call__(self, x, t, y=None, context=None, train=False, dropout_key=None):
        out = 0.1 * self.lin(x)
        return out if y is None else out + 0.01 * self.emb(y)[:, None, None, :]


@pytest.fixture(scope="module")
def tiny_rgb():
    return split_params(TinyNet(3, nnx.Rngs(0)))


def test_edit_end_to_end_tasks(sched, tiny_rgb):
    graphdef, params = tiny_rgb
    image = np.random.default_rng(0).uniform(-1, 1, (8, 8, 3)).astype(np.float32)
    spec = SamplerSpec("ddim", steps=4)
    kw = dict(image_shape=(8, 8, 3), num_samples=2, num_classes=10)
    out, nfe = edit(graphdef, params, sched, spec, "inpaint", image, mask=center_hole(8), **kw)
    keep = center_hole(8)[..., 0] > 0
    assert out.shape == (2, 8, 8, 3) and nfe == 4 and np.abs(out).max() <= 1
    assert np.array_equal(out[:, keep], np.broadcast_to(image[keep], out[:, keep].shape))
    out, nfe = edit(graphdef, params, sched, SamplerSpec("ddpm", steps=4), "outpaint", image, method="repaint",
                    jump_length=1, resamplings=2, labels=np.array([1, 2]), **kw)
    assert nfe == repaint_nfe(4, 1, 2) and np.array_equal(out[:, 2:6, 2:6], np.broadcast_to(image[2:6, 2:6],
                                                                                          (2, 4, 4, 3)))
    gray_image = image.mean(-1, keepdims=True) * 0.5
    out, _ = edit(graphdef, params, sched, SamplerSpec("dpmpp_2m", steps=4, spacing="karras"), "colorize",
                  gray_image, **kw)
    inside = (np.abs(out) < 1).all(-1, keepdims=True)          # where clipping to [-1, 1] moved no channel
    assert inside.sum() >= 8
    np.testing.assert_allclose(np.where(inside, out.mean(-1, keepdims=True), 0),
                               np.where(inside, gray_image, 0), atol=1e-6)
    out, nfe = edit(graphdef, params, sched, SamplerSpec("ddim", steps=10), "img2img", image, strength=0.3, **kw)
    assert out.shape == (2, 8, 8, 3) and nfe == 10


@pytest.mark.parametrize("change,match", [
    (dict(task="paint"), "task='paint' is unknown"),
    (dict(image=np.zeros((8, 8, 1), np.float32)), r"image must be \(N, 8, 8, 3\)"),       # channel count
    (dict(image=np.zeros((8, 6, 3), np.float32)), r"image must be \(N, 8, 8, 3\)"),       # size
    (dict(image=np.full((8, 8, 3), 200.0, np.float32)), r"\[0, 255\] floats"),             # range
    (dict(image=np.zeros((8, 8, 3), np.uint8)), "dtype uint8"),
    (dict(image=np.zeros((3, 8, 8, 3), np.float32)), "give 1 .shared. or num_samples=2"),
    (dict(mask=np.full((8, 8), 0.3)), "binary"),
    (dict(mask=np.ones((8, 8))), "no hole"),
    (dict(mask=np.ones((8, 8, 3))), "mask must be"),
    (dict(strength=0.5), "strength is for task 'img2img' only"),
    (dict(task="img2img", mask=None), "task .img2img. needs a strength in"),
    (dict(task="colorize"), "task 'colorize' takes no mask"),
    (dict(method="repaint", spec=SamplerSpec("heun", steps=4)), "use sampler 'ddpm' or 'ddim'"),
    (dict(spec=SamplerSpec("adaptive", steps=4, spacing="karras")), "use noise='fixed'"),
])
def test_edit_rejects_malformed_inputs(sched, tiny_rgb, change, match):
    graphdef, params = tiny_rgb
    args = dict(spec=SamplerSpec("ddim", steps=4), task="inpaint", image=np.zeros((8, 8, 3), np.float32),
                mask=center_hole(8), strength=None)
    args.update(change)
    with pytest.raises((ValueError, TypeError), match=match):
        edit(graphdef, params, sched, args.pop("spec"), args.pop("task"), args.pop("image"), image_shape=(8, 8, 3),
             num_samples=2, **args)


def test_png_loading(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (6, 8, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "img.png")
    x = load_image(str(tmp_path / "img.png"), size=(6, 8), channels=3)
    assert x.shape == (1, 6, 8, 3) and np.array_equal(np.round((x[0] + 1) * 127.5).astype(np.uint8), rgb)
    with pytest.raises(ValueError, match=r"img.png' is 6x8 \(HxW\) but the model takes 8x8"):
        load_image(str(tmp_path / "img.png"), size=8, channels=3)
    m = (center_hole((6, 8))[..., 0] * 255).astype(np.uint8)
    Image.fromarray(m).save(tmp_path / "mask.png")
    assert np.array_equal(load_mask(str(tmp_path / "mask.png"), size=(6, 8))[0], center_hole((6, 8)))
    assert np.array_equal(load_mask(str(tmp_path / "mask.png"), size=(6, 8), invert=True)[0], 1 - center_hole((6, 8)))
    Image.fromarray((m // 2 + 1).astype(np.uint8)).save(tmp_path / "soft.png")
    with pytest.raises(ValueError, match="soft.png' must be black .0. and white .255. only"):
        load_mask(str(tmp_path / "soft.png"), size=(6, 8))
    assert load_mask(str(tmp_path / "soft.png"), size=(6, 8), threshold=100).sum() == center_hole((6, 8)).sum()
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_image(str(tmp_path / "missing.png"), size=8, channels=3)


def test_cli_edit_inpaint_keeps_known_pixels_and_refuses_bad_files(trained_workdir, tmp_path, capsys):
    from diffusion_jax.cli.main import main

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (8, 8), dtype=np.uint8)
    mask = np.full((8, 8), 255, np.uint8)
    mask[2:6, 2:6] = 0
    Image.fromarray(image).save(tmp_path / "image.png")
    Image.fromarray(mask).save(tmp_path / "mask.png")
    out, npz = tmp_path / "edit.png", tmp_path / "edit.npz"
    code = main(["edit", "--workdir", trained_workdir, "--task", "inpaint", "--image", str(tmp_path / "image.png"),
                 "--mask", str(tmp_path / "mask.png"), "--sampler", "ddim", "--steps", "3", "--num", "2",
                 "--out", str(out), "--npz", str(npz)])
    assert code == 0 and out.exists()
    edits = np.load(npz)["images"][..., 0]
    known = mask == 255
    for e in edits:
        np.testing.assert_array_equal(e[known], image[known])   # the known pixels, exactly
    Image.fromarray(np.full((4, 4), 255, np.uint8)).save(tmp_path / "small.png")
    code = main(["edit", "--workdir", trained_workdir, "--task", "inpaint", "--image", str(tmp_path / "image.png"),
                 "--mask", str(tmp_path / "small.png")])
    assert code == 2 and "small.png' is 4x4 (HxW) but the model takes 8x8" in capsys.readouterr().err
    code = main(["edit", "--workdir", trained_workdir, "--task", "img2img", "--image", str(tmp_path / "image.png")])
    assert code == 2 and "strength" in capsys.readouterr().err
