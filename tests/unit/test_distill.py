"""Few-step students (objectives/distill.py, train/distill.py, samplers/consistency.py): the consistency function's
boundary condition, Salimans & Ho's target, iCT's curriculum and pair sampling, multistep consistency sampling, and one
progressive-distillation round on the exact-score testbed."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import DIGITS

from diffusion_jax.config import build_schedule, load_experiment
from diffusion_jax.objectives import distill as maths
from diffusion_jax.samplers import run_sampler
from diffusion_jax.samplers.registry import make_grid
from diffusion_jax.samplers.wrapper import make_denoiser
from diffusion_jax.testbed.mixture import GaussianMixture, discrete_denoise_fn


@pytest.mark.parametrize("prediction", ["eps", "x0", "v", "edm"])
@pytest.mark.parametrize("s_min,alpha", [(0.0, 1.0), (0.002, 1.0), (0.05, 0.8)])
def test_consistency_function_is_the_identity_at_the_boundary_whatever_the_network(prediction, s_min, alpha):
    sigma = np.float32(s_min * alpha)
    s_min = float(sigma / np.float32(alpha))   # the boundary level as float32 sees it
    param = maths.ConsistencyParam(s_min, sigma_data=0.5)
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 4, 4, 2)) * 3.0
    garbage = lambda x, t: 1e3 * jnp.sin(x) + 7.0   # noqa: E731  any network output at all
    if sigma == 0.0:   # the clean end: the coefficients alone (the denoiser is never called at sigma = 0)
        c_skip, c_out = param.coefficients(jnp.float32(0.0))
        assert float(c_skip) == 1.0 and float(c_out) == 0.0
        return
    den = make_denoiser(garbage, prediction, consistency=param)
    f, _ = den(x, jnp.float32(0.3), jnp.float32(alpha), jnp.float32(sigma))
    np.testing.assert_array_equal(np.asarray(f), np.asarray(x / jnp.float32(alpha)))   # exact: f(x, t_min) = y
    f_above, _ = den(x, jnp.float32(0.3), jnp.float32(alpha), jnp.float32(sigma + 0.5))
    assert not np.allclose(f_above, x / alpha)   # and not above it: the network counts there


def test_consistency_coefficients_leave_the_identity_smoothly():
    param = maths.ConsistencyParam(0.002, 0.5)
    s = jnp.asarray([0.002, 0.01, 0.5, 80.0])
    c_skip, c_out = (np.asarray(c) for c in param.coefficients(s))
    assert c_skip[0] == 1.0 and c_out[0] == 0.0
    np.testing.assert_allclose(c_skip[2], 0.25 / (0.498 ** 2 + 0.25), rtol=1e-6)
    assert c_out[-1] > 0.9999 and c_skip[-1] < 1e-4      # the network's x0 estimate at high noise
    assert np.all(np.diff(c_skip) < 0) and np.all(np.diff(c_out) > 0)


def test_pd_target_is_the_x0_whose_ddim_step_lands_on_the_teacher():
    k = jax.random.split(jax.random.PRNGKey(1), 2)
    z_t, z_tpp = jax.random.normal(k[0], (5, 8)), jax.random.normal(k[1], (5, 8))
    a, s, a2, s2 = 0.6, 0.8, 0.9, math.sqrt(1 - 0.81)
    x_tilde = maths.pd_target(z_t, z_tpp, a, s, a2, s2)
    eps = (z_t - a * x_tilde) / s                         # DDIM: eps_hat of x0_hat at z_t
    np.testing.assert_allclose(a2 * x_tilde + s2 * eps, z_tpp, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(maths.pd_target(z_t, z_tpp, a, s, 1.0, 0.0), z_tpp)   # the clean end


def test_ict_curriculum_and_karras_levels_follow_the_paper():
    # K = 8000, s0 = 10, s1 = 1280: K' = floor(8000 / (log2(128) + 1)) = 1000
    got = [int(maths.ict_num_levels(k, 8000, 10, 1280)) for k in (0, 999, 1000, 2500, 6999, 7000, 7999)]
    assert got == [11, 11, 21, 41, 641, 1281, 1281]
    n = 11
    s = np.asarray([float(maths.karras_levels(i, n, 0.002, 80.0)) for i in range(1, n + 1)])
    np.testing.assert_allclose([s[0], s[-1]], [0.002, 80.0], rtol=1e-5)
    assert np.all(np.diff(s) > 0)


def test_ict_pair_index_draws_the_lognormal_pair_probabilities():
    n, draws = 11, 40000
    i = np.asarray(maths.ict_pair_index(jax.random.PRNGKey(0), (draws,), jnp.int32(n), 1281, 0.002, 80.0, -1.1, 2.0))
    assert i.min() >= 1 and i.max() <= n - 1
    s = np.asarray([float(maths.karras_levels(j, n, 0.002, 80.0)) for j in range(1, n + 1)])
    cdf = np.asarray(jax.scipy.special.erf((np.log(s) + 1.1) / (math.sqrt(2) * 2.0)))
    p = np.diff(cdf) / np.diff(cdf).sum()
    freq = np.bincount(i, minlength=n)[1:] / draws
    np.testing.assert_allclose(freq, p, atol=4 * np.sqrt(p * (1 - p) / draws).max())


def test_multistep_consistency_sampling_denoises_then_renoises_to_each_level():
    schedule = build_schedule(load_experiment(DIGITS + ":debug")[0].schedule)
    grid = make_grid(schedule, 3, "trailing")
    seen = []

    def denoise_fn(x, t):      # records its levels; "x0" = 0.5 x
        seen.append(t)
        return 0.5 * x

    x_T = jax.random.normal(jax.random.PRNGKey(0), (4, 8))
    x, info = jax.jit(lambda x_T: run_sampler("consistency", denoise_fn, schedule, jax.random.PRNGKey(3), x_T.shape,
                                              steps=3, prediction="x0", spacing="trailing", x_T=x_T))(x_T)
    assert info["nfe"] == 3
    # by hand: y = 0.5 x_T; then x_i = alpha_i (y + s_i z_i), y = 0.5 x_i for levels 1, 2 (s_end = 0)
    key = jax.random.fold_in(jax.random.PRNGKey(3), 1)
    y = 0.5 * x_T
    for i in (1, 2):
        z = jax.random.normal(jax.random.fold_in(key, i), y.shape)
        y = 0.5 * grid.alpha[i] * (y + grid.sigma_ve[i] * z)
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ one progressive round on the exact testbed
STUDENT_STEPS = 4


def _gaussian_testbed():
    """Data N(mu, 0.4^2 I) in 64 dims (one component of the exact-score testbed), the digits' cosine schedule."""
    mu = 0.3 * jax.random.normal(jax.random.PRNGKey(5), (1, 64))
    return GaussianMixture.create([1.0], mu, 0.4)


def test_one_progressive_round_on_the_exact_testbed_halves_the_steps_at_the_teachers_error():
    from diffusion_jax.train.distill import make_distillation, student_grid

    exp = load_experiment(DIGITS + ":debug", ["loss.prediction=x0", "loss.cond_drop_prob=0.0",
                                              "distill.method=progressive", "distill.teacher=exact",
                                              f"distill.student_steps={STUDENT_STEPS}"])[0]
    schedule = build_schedule(exp.schedule)
    mixture = _gaussian_testbed()
    exact = discrete_denoise_fn(mixture, schedule, "x0")
    levels = jnp.asarray(student_grid(exp, schedule).t[::2][:STUDENT_STEPS])

    def apply_fn(params, x, t, y=None, context=None, train=False, dropout_key=None):
        """The teacher: the exact x0. The student: the exact x0 plus a learned affine map per student level (for
        Gaussian data the two-step target is affine in x, so the family holds it; zero = the teacher, as PD starts)."""
        x0 = exact(x, t)
        if "a" not in params:
            return x0
        n = jnp.argmin(jnp.abs(levels[None, :] - jnp.reshape(t, (-1, 1))), axis=1)
        return x0 + params["a"][n].reshape(-1, 1, 1, 1) * x + params["b"][n].reshape(-1, 8, 8, 1)

    distill = make_distillation(exp, schedule, teacher_params={"exact": jnp.zeros(())})
    params = {"a": jnp.zeros((STUDENT_STEPS,)), "b": jnp.zeros((STUDENT_STEPS, 64))}
    tx = optax.adam(3e-2)

    @jax.jit
    def step(params, opt, key):
        data = mixture.sample(key, 256).reshape(256, 8, 8, 1)
        (loss, _), g = jax.value_and_grad(distill.objective, argnums=1, has_aux=True)(
            apply_fn, params, {"image": data}, jax.random.fold_in(key, 1), step=0, teacher=distill.teacher_params)
        updates, opt = tx.update(g, opt)
        return optax.apply_updates(params, updates), opt, loss

    opt = tx.init(params)
    for k in range(400):
        params, opt, loss = step(params, opt, jax.random.PRNGKey(100 + k))

    x_T = jax.random.normal(jax.random.PRNGKey(9), (512, 8, 8, 1))

    def ddim(fn, steps):
        return run_sampler("ddim", fn, schedule, None, x_T.shape, steps=steps, prediction="x0", spacing="trailing",
                           x_T=x_T)[0]

    ode = ddim(exact, 1000)                                  # the ODE solution (DDIM on every timestep)
    rms = lambda a, b: float(jnp.sqrt(jnp.mean((a - b) ** 2)))   # noqa: E731
    teacher_n, teacher_2n = rms(ddim(exact, STUDENT_STEPS), ode), rms(ddim(exact, 2 * STUDENT_STEPS), ode)
    student_n = ddim(lambda x, t: apply_fn(params, x, t), STUDENT_STEPS)
    assert teacher_n > 1.5 * teacher_2n                      # halving the steps matters for the teacher ...
    assert abs(rms(student_n, ode) - teacher_2n) < 0.1 * (teacher_n - teacher_2n)   # ... not for the student
    assert rms(student_n, ddim(exact, 2 * STUDENT_STEPS)) < 0.1 * teacher_n


# ------------------------------------------------------------------ config errors, named
@pytest.mark.parametrize("overrides,match", [
    (["distill.method=progressive", "distill.student_steps=4"], "needs distill.teacher"),
    (["distill.method=progressive", "distill.teacher=/x", "distill.student_steps=3"], "power of two"),
    (["distill.method=progressive", "distill.teacher=/x", "distill.student_steps=4", "loss.prediction=eps"],
     "eps-prediction student"),
    (["distill.method=consistency_training"], "schedule.kind='edm'"),
    (["distill.method=consistency_training", "distill.teacher=/x", "schedule.kind=edm", "loss.prediction=edm"],
     "takes no teacher"),
    (["distill.method=cm"], "distill.method='cm' is unknown"),
    (["distill.method=consistency_distillation", "distill.teacher=/x", "train.init_from=/y"], "train.init_from"),
    (["distill.method=consistency_distillation", "distill.teacher=/x", "schedule.kind=vdm", "schedule.gamma=learned",
      "sample.spacing=logsnr"], "learned VDM gamma"),
])
def test_bad_distill_configs_name_the_key(overrides, match):
    with pytest.raises(ValueError, match=match):
        load_experiment(DIGITS + ":debug", overrides)


def test_an_adapter_run_is_not_distilled_itself(tmp_path):
    import json

    with open(tmp_path / "config.json", "w") as f:   # a base run's config is all the adapter reads at validation
        json.dump(load_experiment(DIGITS)[0].to_dict(), f)
    with pytest.raises(ValueError, match="model.name='lora', an adapter of a base run: distil the base run"):
        load_experiment("configs/lora_digits.py", [f"model.base_workdir={tmp_path}", "distill.teacher=/x",
                                                   "distill.method=consistency_distillation"])


# ------------------------------------------------------------------ guidance distillation (Meng et al. 2023)
def _class_testbed(schedule):
    """Two classes of 64-dim Gaussian data and their mixture (the null class 10 of the digits config): the exact x0
    of each, as a network apply(params, x, t, y) would return it."""
    mus = 0.5 * jax.random.normal(jax.random.PRNGKey(6), (2, 64))
    per_class = [discrete_denoise_fn(GaussianMixture.create([1.0], mus[k:k + 1], 0.3), schedule, "x0")
                 for k in range(2)]
    mixture = discrete_denoise_fn(GaussianMixture.create([0.5, 0.5], mus, 0.3), schedule, "x0")

    def teacher(params, x, t, y=None, context=None, train=False, dropout_key=None):
        yb = jnp.reshape(y, (-1, 1, 1, 1))
        return jnp.where(yb == 0, per_class[0](x, t), jnp.where(yb == 1, per_class[1](x, t), mixture(x, t)))
    return mus, teacher


def _guided(teacher, params, x, t, y, w):
    """The classifier-free guided x0 of the testbed at w (B,): uncond + w (cond - uncond)."""
    cond, uncond = teacher(params, x, t, y), teacher(params, x, t, jnp.full_like(y, 10))
    return uncond + jnp.reshape(w, (-1, 1, 1, 1)) * (cond - uncond)


def test_guidance_distillation_learns_the_classifier_free_guided_teacher_on_the_exact_testbed():
    """A student x0 = cond + a (w - 1) (cond - uncond) holds the guided teacher at a = 1 only: the objective is zero
    there, positive at a = 0 (the conditional teacher), and gradient descent from a = 0 finds a = 1."""
    from diffusion_jax.train.distill import make_distillation

    exp = load_experiment(DIGITS + ":debug", ["loss.prediction=x0", "loss.cond_drop_prob=0.0",
                                              "distill.method=guidance", "distill.teacher=exact",
                                              "model.guidance_embed_dim=8", "distill.num_scales=1000",
                                              "distill.w_min=1", "distill.w_max=4"])[0]
    schedule = build_schedule(exp.schedule)
    mus, teacher = _class_testbed(schedule)

    def apply_fn(params, x, t, y=None, context=None, train=False, dropout_key=None, guidance=None):
        return _guided(teacher, params, x, t, y, 1.0 + params["a"] * (guidance - 1.0))

    distill = make_distillation(exp, schedule, teacher_params={"exact": jnp.zeros(())}, teacher_apply=teacher)
    labels = jnp.arange(256) % 2
    data = mus[labels] + 0.3 * jax.random.normal(jax.random.PRNGKey(3), (256, 64))
    batch = {"image": data.reshape(256, 8, 8, 1), "label": labels}

    @jax.jit
    def loss_and_grad(a, key):
        return jax.value_and_grad(lambda a: distill.objective(apply_fn, {"a": a}, batch, key, step=0,
                                                              teacher=distill.teacher_params)[0])(a)

    at_one, at_zero = loss_and_grad(1.0, jax.random.PRNGKey(0))[0], loss_and_grad(0.0, jax.random.PRNGKey(0))[0]
    assert at_one < 1e-8 * at_zero and at_zero > 0
    a, tx = jnp.zeros(()), optax.adam(0.05)
    opt = tx.init(a)
    for k in range(150):
        _, g = loss_and_grad(a, jax.random.PRNGKey(k))
        updates, opt = tx.update(g, opt)
        a = optax.apply_updates(a, updates)
    assert abs(float(a) - 1.0) < 0.05


def test_a_student_taking_w_samples_in_one_branch_what_two_branch_guidance_gives():
    """network_denoise_fn(w=...) hands w to the network (guidance=w (B,)) and guidance_of turns the two-branch
    guidance off: the exact guided student at w = 3 samples what the teacher's two-branch guidance at w = 3 does."""
    from diffusion_jax.inference.sampling import SamplerSpec, guidance_of, network_denoise_fn
    from diffusion_jax.samplers import Guidance

    schedule = build_schedule(load_experiment(DIGITS + ":debug")[0].schedule)
    _, teacher = _class_testbed(schedule)
    y = jnp.arange(8) % 2

    def student(params, x, t, y=None, context=None, guidance=None):
        return _guided(teacher, params, x, t, y, guidance)

    spec = SamplerSpec("ddim", steps=6, spacing="trailing", clip_denoised=None, guidance_scale=3.0)
    guidance, w = guidance_of(spec, True)
    assert not guidance.active and w == 3.0
    run = dict(steps=6, prediction="x0", spacing="trailing", x_T=jax.random.normal(jax.random.PRNGKey(1), (8, 8, 8, 1)))
    one, info_one = run_sampler("ddim", network_denoise_fn(student, {}, y, channels=1, w=w), schedule, None,
                                (8, 8, 8, 1), **run)
    two, info_two = run_sampler("ddim", network_denoise_fn(teacher, {}, y, channels=1), schedule, None, (8, 8, 8, 1),
                                guidance=Guidance(3.0), uncond_fn=network_denoise_fn(teacher, {}, jnp.full_like(y, 10),
                                                                                     channels=1), **run)
    np.testing.assert_allclose(one, two, rtol=1e-5, atol=1e-5)
    assert int(info_one["nfe"]) == int(info_two["nfe"]) == 6     # denoiser evaluations: 6 vs 12 network calls
    with pytest.raises(ValueError, match="guidance_rescale=0.5 rescales two-branch guidance"):
        guidance_of(SamplerSpec("ddim", guidance_scale=3.0, guidance_rescale=0.5), True)


@pytest.mark.parametrize("overrides,match", [
    (["model.guidance_embed_dim=8"], "a network that takes the guidance weight w is a distilled student"),
    (["distill.method=guidance", "distill.teacher=/x"], "set model.guidance_embed_dim"),
    (["distill.method=consistency_training", "schedule.kind=edm", "loss.prediction=edm",
      "model.guidance_embed_dim=8"], "set distill.method to one of"),
    (["distill.w_min=3", "distill.w_max=2"], "0 <= w_min <= w_max"),
    (["model.guidance_embed_dim=0", "distill.method=guidance", "distill.teacher=/x"],
     "model.guidance_embed_dim=0 must be a positive int"),
])
def test_bad_guidance_distillation_configs_name_the_key(overrides, match):
    with pytest.raises(ValueError, match=match):
        load_experiment(DIGITS + ":debug", overrides)
    with pytest.raises(ValueError, match="classifier-free guidance needs a conditional model"):
        maths.check_distill(maths.DistillConfig(method="guidance", teacher="/x"), "discrete", "v",
                            guidance_embed_dim=8, conditional=False)


@pytest.mark.parametrize("method", ["progressive", "cd", "ct", "guidance", "guided-pd", "guided-cd"])
def test_the_distillation_recipes_load_and_validate(method):
    """configs/distill.py's recipes (experiments/distill.py runs them): each one's method, the guidance weight as an
    input exactly for the guided ones, and the teacher's model, schedule and prediction for each data option."""
    teacher = [] if method == "ct" else ["distill.teacher=/x"]
    for arg, base in ((method, "configs/digits.py"), (method + ",debug", "configs/digits.py:debug"),
                      (method + ",fashion_mnist", "configs/fashion_mnist.py:cpu-v")):
        exp = load_experiment(f"configs/distill.py:{arg}", teacher)[0]
        ref = load_experiment(base)[0]
        assert (exp.data.name, exp.model.channels, exp.model.channel_mult) == (
            ref.data.name, ref.model.channels, ref.model.channel_mult)
        if method != "ct":
            assert (exp.schedule, exp.loss.prediction) == (ref.schedule, ref.loss.prediction)
        assert (exp.model.guidance_embed_dim is not None) == method.startswith("guid")
        assert exp.distill.method == {"progressive": "progressive", "cd": "consistency_distillation",
                                      "ct": "consistency_training", "guidance": "guidance",
                                      "guided-pd": "progressive", "guided-cd": "consistency_distillation"}[method]
    for bad in ("lcm", method + ",cifar10"):
        with pytest.raises(ValueError, match="takes one of"):
            load_experiment(f"configs/distill.py:{bad}")
