"""Classifier guidance: the exact identity on a Gaussian mixture, gradient sign and scale, two samplers, the
noise-conditional classifier's training step, and the command-line flags."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.inference.guidance import ClassifierSpec, class_log_prob_grad, classifier_guided
from diffusion_jax.process.discrete import make_schedule
from diffusion_jax.process.sde import EDMSchedule
from diffusion_jax.samplers import run_sampler
from diffusion_jax.testbed import GaussianMixture, alpha_sigma_denoiser, discrete_denoise_fn
from diffusion_jax.train.classifier import ClassifierRecipe, init_state, load_noisy_classifier, make_train_step

SCHEDULE = make_schedule("linear", 1000)
MIX = GaussianMixture.create([0.5, 0.3, 0.2], [[0.6, -0.4, 0.2, 0.0], [-0.5, 0.5, -0.3, 0.4], [0.1, 0.1, 0.7, -0.6]],
                             [0.15, 0.25, 0.2])


def exact_log_posterior(x, alpha, sigma):
    """log p(k | x_t) of MIX written out independently of the testbed: log w_k + log N(x; alpha mu_k, v_k I),
    normalised over k (x (B, d); alpha, sigma scalars or (B,))."""
    alpha, sigma = (jnp.broadcast_to(jnp.asarray(a, jnp.float32).reshape(-1), x.shape[:1])[:, None]
                    for a in (alpha, sigma))
    v = alpha ** 2 * MIX.stds ** 2 + sigma ** 2                                           # (B, K)
    sq = jnp.sum((x[:, None, :] - alpha[:, :, None] * MIX.means[None]) ** 2, axis=-1)     # (B, K)
    return jax.nn.log_softmax(jnp.log(MIX.weights) - 0.5 * sq / v - 0.5 * x.shape[1] * jnp.log(v), axis=-1)


def exact_conditional(x, alpha, sigma, y, prediction):
    """E[. | x_t, y] for the component y of MIX (a Gaussian N(mu_y, s_y^2 I)), in the kind `prediction`."""
    alpha, sigma = (jnp.broadcast_to(jnp.asarray(a, jnp.float32).reshape(-1), x.shape[:1])[:, None]
                    for a in (alpha, sigma))
    mu, s2 = MIX.means[y], MIX.stds[y][:, None] ** 2
    v = alpha ** 2 * s2 + sigma ** 2
    eps = sigma * (x - alpha * mu) / v
    x0 = mu + alpha * s2 / v * (x - alpha * mu)
    return {"eps": eps, "x0": x0, "edm": x0, "v": alpha * eps - sigma * x0, "score": -(x - alpha * mu) / v}[prediction]


@pytest.mark.parametrize("prediction", ["eps", "x0", "v", "score"])
@pytest.mark.parametrize("t_kind", ["int", "fractional"])
def test_guided_prediction_is_the_exact_class_conditional_one_at_w1(prediction, t_kind):
    x = jax.random.normal(jax.random.key(0), (12, 4)) * 0.8
    y = jnp.arange(12, dtype=jnp.int32) % 3
    t = jnp.linspace(20, 900, 12)
    t = t.round().astype(jnp.int32) if t_kind == "int" else t + 0.37
    uncond = discrete_denoise_fn(MIX, SCHEDULE, prediction)
    guided = classifier_guided(uncond, exact_log_posterior, y, SCHEDULE, 1.0, prediction=prediction)
    alpha, sigma = SCHEDULE.interpolated_level(t)
    want = exact_conditional(x, alpha, sigma, y, prediction)
    got = guided(x, t)
    scale = float(jnp.max(jnp.abs(want)))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5 * max(scale, 1.0))
    assert float(jnp.max(jnp.abs(uncond(x, t) - want))) > 1e-2 * scale   # guidance changed something


def test_guided_edm_denoiser_is_the_exact_class_conditional_one_at_w1():
    """EDM's D(x; s) (alpha = 1, sigma = s): D' = D + s^2 grad log p(y | x) = E[x0 | x, y]."""
    x = jax.random.normal(jax.random.key(1), (9, 4)) * 1.5
    y = jnp.arange(9, dtype=jnp.int32) % 3
    s = jnp.linspace(0.05, 3.0, 9)
    uncond = lambda x, s: alpha_sigma_denoiser(MIX, "x0")(x, 1.0, s)
    guided = classifier_guided(uncond, exact_log_posterior, y, EDMSchedule(), 1.0, prediction="edm")
    np.testing.assert_allclose(np.asarray(guided(x, s)), np.asarray(exact_conditional(x, 1.0, s, y, "edm")),
                               atol=2e-5)


def test_gradient_matches_finite_differences_and_guidance_is_linear_in_w():
    x = jax.random.normal(jax.random.key(2), (4, 4)) * 0.6
    y = jnp.array([0, 1, 2, 1], jnp.int32)
    alpha, sigma = 0.8, 0.6
    g = np.asarray(class_log_prob_grad(exact_log_posterior, x, y, alpha, sigma), np.float64)
    lp = lambda z: np.asarray(jnp.take_along_axis(exact_log_posterior(z, alpha, sigma), y[:, None], 1)[:, 0])
    h = 1e-2
    for j in range(4):   # central differences, each example separately (the batch gradient is per example)
        e = jnp.zeros_like(x).at[:, j].set(h)
        np.testing.assert_allclose((lp(x + e) - lp(x - e)) / (2 * h), g[:, j], rtol=2e-3, atol=2e-3)
    t = jnp.full((4,), 300, jnp.int32)
    uncond = discrete_denoise_fn(MIX, SCHEDULE, "eps")
    base = uncond(x, t)
    a_t, s_t = SCHEDULE.interpolated_level(t)
    d1 = classifier_guided(uncond, exact_log_posterior, y, SCHEDULE, 1.0)(x, t) - base
    d3 = classifier_guided(uncond, exact_log_posterior, y, SCHEDULE, 3.0)(x, t) - base
    np.testing.assert_allclose(np.asarray(d3), 3 * np.asarray(d1), rtol=1e-4, atol=1e-6)
    grad = class_log_prob_grad(exact_log_posterior, x, y, a_t, s_t)
    np.testing.assert_allclose(np.asarray(d1), np.asarray(-s_t[:, None] * grad), rtol=1e-5, atol=1e-7)  # eq. 14
    # the sign: x0_hat moves uphill on log p(y | x_t), so the guided x0_hat is more typical of class y
    x0_change = -(s_t / a_t)[:, None] * d1
    assert np.all(np.sum(np.asarray(x0_change * grad), axis=1) > 0)
    assert classifier_guided(uncond, exact_log_posterior, y, SCHEDULE, 0.0) is uncond


@pytest.mark.parametrize("sampler,spacing", [("ddim", "leading"), ("dpmpp_2m", "karras")])
def test_two_samplers_guided_at_w1_follow_the_exact_conditional_model(sampler, spacing):
    """DDIM passes int32 timesteps, DPM-Solver++ on a Karras grid fractional ones: either way, guidance with the
    exact classifier at w = 1 reproduces sampling with the exact class-conditional network from the same noise;
    w = 4 raises the exact p(y | x_0) of the samples further."""
    n, key = 240, jax.random.key(3)
    y = jnp.arange(n, dtype=jnp.int32) % 3
    uncond = discrete_denoise_fn(MIX, SCHEDULE, "eps")

    def cond(x, t):
        a, s = SCHEDULE.interpolated_level(jnp.broadcast_to(t, x.shape[:1]))
        return exact_conditional(x, a, s, y, "eps")

    def run(fn):
        return run_sampler(sampler, fn, SCHEDULE, key, (n, 4), steps=25, spacing=spacing)[0]

    exact, plain = run(cond), run(uncond)
    guided1 = run(classifier_guided(uncond, exact_log_posterior, y, SCHEDULE, 1.0))
    np.testing.assert_allclose(np.asarray(guided1), np.asarray(exact), atol=2e-3)
    guided4 = run(classifier_guided(uncond, exact_log_posterior, y, SCHEDULE, 4.0))
    confidence = lambda x: float(jnp.mean(jnp.take_along_axis(exact_log_posterior(x, 1.0, 0.0), y[:, None], 1)))
    assert confidence(plain) < confidence(guided1) < confidence(guided4)     # w > 1: p(y | x_t)^w, sharper


def _two_class_images(rng, n):
    """8x8 images: class 0 bright in the top half, class 1 in the bottom half, plus a little noise."""
    y = rng.integers(0, 2, n).astype(np.int32)
    top = np.where(np.arange(8)[:, None] < 4, 1.0, -1.0) * np.ones((8, 8))
    x = np.where(y[:, None, None] == 0, top, -top)[..., None] * 0.8 + 0.1 * rng.standard_normal((n, 8, 8, 1))
    return x.astype(np.float32), y


def test_classifier_train_step_reduces_the_loss():
    spec = ClassifierSpec((8, 8, 1), 2, convs=((8, 2), (16, 2)), emb_dim=16, groups=4)
    recipe = ClassifierRecipe(steps=150, batch_size=32, learning_rate=5e-3, warmup_steps=5)
    tx = recipe.optimizer()
    graphdef, state = init_state(spec, recipe, tx)
    step = make_train_step(graphdef, SCHEDULE, tx)
    rng, losses, accuracies = np.random.default_rng(0), [], []
    for _ in range(recipe.steps):
        x, y = _two_class_images(rng, recipe.batch_size)
        state, m = step(state, {"image": x, "label": y})
        losses.append(float(m["loss"]))
        accuracies.append(float(m["accuracy"]))
    assert int(state.step) == recipe.steps
    assert np.mean(losses[-20:]) < 0.75 * np.mean(losses[:10])     # chance: log 2 = 0.69
    assert np.mean(accuracies[-20:]) > 0.7   # 0.69 -> ~0.35 nats, ~80%: the noisiest levels (t uniform) stay at chance


def test_recipe_and_wrapper_errors_name_the_argument():
    with pytest.raises(ValueError, match="--steps"):
        ClassifierRecipe(steps=0)
    with pytest.raises(ValueError, match="--lr"):
        ClassifierRecipe(learning_rate=2.0)
    with pytest.raises(ValueError, match="classifier scale"):
        classifier_guided(lambda x, t: x, exact_log_posterior, jnp.zeros(2, jnp.int32), SCHEDULE, -1.0)
    with pytest.raises(ValueError, match="labels"):
        classifier_guided(lambda x, t: x, exact_log_posterior, jnp.zeros((2, 1), jnp.int32), SCHEDULE, 1.0)
    with pytest.raises(ValueError, match="prediction"):
        classifier_guided(lambda x, t: x, exact_log_posterior, jnp.zeros(2, jnp.int32), SCHEDULE, 1.0,
                          prediction="noise")


def test_a_classifier_must_fit_the_model():
    from diffusion_jax.train.classifier import TrainedClassifier
    from diffusion_jax.train.guided import check_classifier_fits

    clf = TrainedClassifier(ClassifierSpec((16, 16, 1), 10), None, {}, {}, {})
    check_classifier_fits(clf, (16, 16, 1), 10)
    check_classifier_fits(clf, (16, 16, 1), None)            # an unconditional model: any number of classes
    with pytest.raises(ValueError, match="--classifier: the classifier reads"):
        check_classifier_fits(clf, (8, 8, 1), 10)
    with pytest.raises(ValueError, match="10 classes"):
        check_classifier_fits(clf, (16, 16, 1), 5)


def test_train_classifier_cli_then_guided_sampling(capsys, trained_workdir, tmp_path):
    """train-classifier on the tiny digits run (resumable, reused when finished), then sample --classifier."""
    from diffusion_jax.cli.main import main

    out = str(tmp_path / "clf")
    assert main(["train-classifier", "--workdir", trained_workdir, "--out", out, "--steps", "4", "--batch-size", "16",
                 "--no-progress"]) == 0
    assert "held-out accuracy" in capsys.readouterr().out
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["4"]
    assert main(["train-classifier", "--workdir", trained_workdir, "--out", out, "--steps", "4", "--batch-size", "16",
                 "--no-progress"]) == 0                                               # finished: reused
    assert main(["train-classifier", "--workdir", trained_workdir, "--out", out, "--steps", "5", "--batch-size", "16",
                 "--no-progress"]) == 2
    assert "another recipe" in capsys.readouterr().err

    grid = str(tmp_path / "g.png")
    args = ["sample", "--workdir", trained_workdir, "--sampler", "dpmpp_2m", "--steps", "3", "--num", "4", "--out", grid,
            "--classifier", out]
    assert main(args + ["--classifier-scale", "3", "--npz", str(tmp_path / "s.npz")]) == 0
    assert f"classifier {out} scale 3" in capsys.readouterr().out and os.path.exists(grid)
    with np.load(tmp_path / "s.npz") as z:
        assert list(z["labels"]) == [0, 1, 2, 3] and z["images"].shape == (4, 8, 8, 1)
    assert main(args + ["--classifier-scale", "-1"]) == 2
    assert "--classifier-scale must be a finite number >= 0" in capsys.readouterr().err
    clf = load_noisy_classifier(out)
    assert clf.spec.image_shape == (8, 8, 1) and clf.spec.num_classes == 10 and clf.result["step"] == 4


@pytest.mark.parametrize("flags,message", [
    (["--classifier-scale", "2"], "--classifier-scale needs --classifier"),
    (["--classifier", "/nonexistent/clf"], "no finished classifier"),
])
def test_sample_classifier_flag_errors(capsys, trained_workdir, tmp_path, flags, message):
    from diffusion_jax.cli.main import main

    assert main(["sample", "--workdir", trained_workdir, "--out", str(tmp_path / "g.png"), "--num", "2"] + flags) == 2
    assert message in capsys.readouterr().err
