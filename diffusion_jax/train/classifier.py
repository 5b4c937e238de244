"""Training the noise-conditional classifier p_phi(y | x_t, t) on noised data, and loading it back.

    info = train_noisy_classifier("workdirs/fmnist", "workdirs/fmnist-classifier", ClassifierRecipe(steps=2000))
    clf = load_noisy_classifier("workdirs/fmnist-classifier")   # .log_prob_fn(): (x, alpha, sigma) -> (B, K)

Objective (Dhariwal & Nichol 2021, sec. 4): cross-entropy of p_phi(y | x_t, t) on

    x_t = alpha_t x_0 + sigma_t eps,   eps ~ N(0, I),   (x_0, y) from the diffusion run's training data,

with the level drawn per example from the run's schedule: for a discrete (DDPM) schedule t ~ U{0, ..., T-1} and
(alpha_t, sigma_t) = (sqrt(abar_t), sqrt(1 - abar_t)); for a continuous one (VP, sub-VP, VE, EDM; `process/sde.py`)
t ~ U[t_min, t_max] and (alpha(t), sigma(t)). The classifier reads the level through its log-SNR
(`classifier.noise_condition`), so the same network is valid wherever that log-SNR was covered in training.

The step is pure and jitted: (state, batch) -> (state, metrics), randomness fold_in(state.key, state.step), AdamW
with warmup + cosine decay. Checkpoints: orbax via `train.checkpoint.Checkpointer` in OUT/checkpoints/<step>/
(resumed from the latest), OUT/config.json (recipe, architecture, the run's data and schedule) and, when training
ends, OUT/result.json (held-out accuracy at five noise levels).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import time

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from diffusion_jax.data import Batches, load_source
from diffusion_jax.fileio import read_json, write_json
from diffusion_jax.inference.guidance.classifier import ClassifierSpec, make_log_prob_fn, make_model
from diffusion_jax.models.functional import split_params
from diffusion_jax.train.runner import holds_workdir
from diffusion_jax.validate import check_int

LEVEL_QUANTILES = (0.0, 0.25, 0.5, 0.75, 1.0)   # where result.json reports held-out accuracy (fractions of [t0, t1])


@dataclasses.dataclass(frozen=True)
class ClassifierRecipe:
    """steps, batch_size, learning_rate (peak; linear warmup over warmup_steps, cosine to lr / 100), weight_decay,
    seed (init, data order, noise), ckpt_every (steps between checkpoints)."""
    steps: int = 2000
    batch_size: int = 128
    learning_rate: float = 2e-3
    warmup_steps: int = 100
    weight_decay: float = 1e-4
    seed: int = 0
    ckpt_every: int = 500

    def __post_init__(self):
        for key, flag in (("steps", " (--steps)"), ("batch_size", " (--batch-size)"), ("ckpt_every", "")):
            check_int(getattr(self, key), f"classifier {key}{flag}", minimum=1)
        check_int(self.warmup_steps, "classifier warmup_steps", minimum=0)
        check_int(self.seed, "classifier seed (--seed)", minimum=0)
        if not (isinstance(self.learning_rate, (int, float)) and 0 < self.learning_rate < 1):
            raise ValueError(f"classifier learning_rate (--lr) must be in (0, 1), got {self.learning_rate!r}")
        if not (isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0):
            raise ValueError(f"classifier weight_decay must be >= 0, got {self.weight_decay!r}")

    def optimizer(self) -> optax.GradientTransformation:
        lr = optax.warmup_cosine_decay_schedule(0.0, self.learning_rate, self.warmup_steps,
                                                max(self.steps, self.warmup_steps + 1), self.learning_rate / 100)
        return optax.adamw(lr, weight_decay=self.weight_decay)


@flax.struct.dataclass
class ClassifierState:
    step: jax.Array        # () int32
    params: dict
    opt_state: optax.OptState
    key: jax.Array         # raw PRNG key; the step's key is fold_in(key, step)


def level_range(schedule) -> tuple[float, float]:
    """(t0, t1) the levels are drawn from: (0, T - 1) for a DiscreteSchedule, else (t_min, t_max)."""
    return float(schedule.t_min), float(schedule.t_max)


def levels_at(schedule, t):
    """(alpha, sigma) at times t (B,): integer DDPM timesteps (tables) or continuous times."""
    if schedule.discrete:
        t = jnp.asarray(t).astype(jnp.int32)
    return schedule.alpha(t), schedule.sigma(t)


def sample_levels(schedule, key, batch: int):
    """(alpha, sigma), each (B,): t ~ U{0..T-1} (discrete) or U[t_min, t_max] (continuous)."""
    t0, t1 = level_range(schedule)
    if schedule.discrete:
        return levels_at(schedule, jax.random.randint(key, (batch,), 0, schedule.num_timesteps))
    return levels_at(schedule, jax.random.uniform(key, (batch,), minval=t0, maxval=t1))


def noised_loss(log_prob, params, schedule, x0, y, key):
    """(mean cross-entropy, accuracy) of p_phi(y | x_t) on x_t = alpha x0 + sigma eps at levels from `schedule`."""
    k_t, k_eps = jax.random.split(key)
    alpha, sigma = sample_levels(schedule, k_t, x0.shape[0])
    per_example = (-1,) + (1,) * (x0.ndim - 1)
    xt = alpha.reshape(per_example) * x0 + sigma.reshape(per_example) * jax.random.normal(k_eps, x0.shape)
    lp = log_prob(params, xt, alpha, sigma)
    nll = -jnp.take_along_axis(lp, y[:, None], axis=1)[:, 0]
    return nll.mean(), (lp.argmax(-1) == y).mean()


def make_train_step(graphdef, schedule, tx):
    """The jitted step (state, batch {"image", "label"}) -> (state, {"loss", "accuracy", "grad_norm"}); state donated."""
    log_prob = make_log_prob_fn(graphdef)

    @functools.partial(jax.jit, donate_argnums=(0,))
    def train_step(state: ClassifierState, batch: dict):
        key = jax.random.fold_in(state.key, state.step)
        loss_fn = lambda p: noised_loss(log_prob, p, schedule, batch["image"], batch["label"], key)
        (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        new = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates), opt_state=opt_state)
        return new, {"loss": loss, "accuracy": acc, "grad_norm": optax.tree.norm(grads)}

    return train_step


def init_state(spec: ClassifierSpec, recipe: ClassifierRecipe, tx):
    """(graphdef, ClassifierState at step 0), deterministic in recipe.seed; built in one jitted call."""
    def init():
        params = split_params(make_model(spec, nnx.Rngs(recipe.seed)))[1]
        key = jax.random.key_data(jax.random.fold_in(jax.random.key(recipe.seed), 1))
        return ClassifierState(jnp.zeros((), jnp.int32), params, tx.init(params), key)

    return classifier_graphdef(spec), jax.jit(init)()


def classifier_graphdef(spec: ClassifierSpec):
    return nnx.graphdef(nnx.eval_shape(lambda: make_model(spec, nnx.Rngs(0))))


def accuracy_by_level(log_prob, params, schedule, images, labels, *, seed: int = 0, batch: int = 500) -> list[dict]:
    """Held-out accuracy at the LEVEL_QUANTILES of the level range: [{"t", "log_snr", "accuracy"}]."""
    t0, t1 = level_range(schedule)
    fn = jax.jit(lambda p, x, y, t, k: noised_accuracy(log_prob, p, schedule, x, y, t, k))
    rows = []
    for q in LEVEL_QUANTILES:
        t = round(t0 + q * (t1 - t0)) if schedule.discrete else t0 + q * (t1 - t0)
        hits = 0.0
        for i in range(0, len(images), batch):
            x, y = images[i:i + batch], labels[i:i + batch]
            hits += float(fn(params, x, y, jnp.full((len(x),), t), jax.random.fold_in(jax.random.key(seed), i)))
        alpha, sigma = levels_at(schedule, jnp.asarray([t]))
        rows.append({"t": t, "log_snr": float(2 * (jnp.log(alpha[0]) - jnp.log(sigma[0]))),
                     "accuracy": hits / len(images)})
    return rows


def noised_accuracy(log_prob, params, schedule, x0, y, t, key):
    """Number of examples classified correctly at times t (B,)."""
    alpha, sigma = levels_at(schedule, t)
    per_example = (-1,) + (1,) * (x0.ndim - 1)
    xt = alpha.reshape(per_example) * x0 + sigma.reshape(per_example) * jax.random.normal(key, x0.shape)
    return jnp.sum(log_prob(params, xt, alpha, sigma).argmax(-1) == y)


@holds_workdir("train-classifier")
def train_noisy_classifier(workdir: str, out: str, recipe: ClassifierRecipe = ClassifierRecipe(), *,
                           progress: bool = True) -> dict:
    """Train (or resume, or reuse when finished) the classifier of diffusion run WORKDIR's data and schedule in OUT.

    Returns result.json's content: {"step", "train_seconds", "final_loss", "final_accuracy", "eval_split",
    "accuracy_by_level", "out"}. ValueError when OUT holds a classifier made with another recipe or data.
    """
    from diffusion_jax.config import Experiment, build_schedule, load_workdir_config

    exp = Experiment.from_config(load_workdir_config(workdir))
    source = load_source(exp.data)
    if source.num_classes is None:
        raise ValueError(f"the data of --workdir {workdir} ({exp.data.name!r}) has no class labels to classify")
    spec = ClassifierSpec(tuple(source.image_shape), int(source.num_classes))
    config = {"spec": spec.to_dict(), "recipe": dataclasses.asdict(recipe), "data": dataclasses.asdict(exp.data),
              "schedule": dataclasses.asdict(exp.schedule), "workdir": os.path.abspath(workdir)}
    old, result = (read_json(os.path.join(out, name)) for name in ("config.json", "result.json"))
    if old is not None and _without_workdir(old) != _without_workdir(json.loads(json.dumps(config, default=str))):
        raise ValueError(f"--out {out} holds a classifier made with another recipe, data or schedule; "
                         "use a new --out (nothing was changed)")
    if result is not None and os.path.isdir(os.path.join(out, "checkpoints", str(recipe.steps))):
        return result                                                   # finished: reused as it is
    write_json(os.path.join(out, "config.json"), config)
    # The classifier is conditioned on log-SNR, so a learned VDM gamma may be replaced by the linear one between the
    # same ends: the schedule only sets which noise levels training sees most (and needs no diffusion params).
    sc = dataclasses.replace(exp.schedule, gamma="linear") if exp.schedule.kind == "vdm" else exp.schedule
    schedule, t_start = build_schedule(sc), time.perf_counter()
    graphdef, state, metrics = _fit(spec, recipe, schedule, source, out, config, progress)
    try:
        held, split = load_source(dataclasses.replace(exp.data, split="test")), "test"
    except (ValueError, FileNotFoundError):          # a source with no test split (an image folder)
        held, split = source, "train"
    batch = held.get(np.arange(min(held.num_examples, 2000)))
    result = {"step": recipe.steps, "train_seconds": round(time.perf_counter() - t_start, 1),
              "final_loss": float(metrics.get("loss", np.nan)), "final_accuracy": float(metrics.get("accuracy", np.nan)),
              "eval_split": split, "out": os.path.abspath(out),
              "accuracy_by_level": accuracy_by_level(make_log_prob_fn(graphdef), state.params, schedule,
                                                     jnp.asarray(batch["image"]), jnp.asarray(batch["label"]))}
    write_json(os.path.join(out, "result.json"), result)
    return result


def _fit(spec, recipe: ClassifierRecipe, schedule, source, out: str, config: dict, progress: bool):
    """The training loop: resume from OUT's latest checkpoint, step to recipe.steps, checkpoint every ckpt_every.
    Returns (graphdef, final state, last metrics (host floats; {} when nothing was left to train))."""
    from tqdm.auto import tqdm

    from diffusion_jax.train.checkpoint import Checkpointer

    tx = recipe.optimizer()
    graphdef, state = init_state(spec, recipe, tx)
    ckpt = Checkpointer(out, keep=2, async_save=False)
    metrics = {}
    try:
        restored, _ = ckpt.restore_latest(state)
        state = state if restored is None else restored
        start, step_fn = int(state.step), make_train_step(graphdef, schedule, tx)
        batches = Batches(source, recipe.batch_size, seed=recipe.seed).iterate(start)
        bar = tqdm(total=recipe.steps, initial=start, desc="train classifier", unit="step", disable=not progress,
                   dynamic_ncols=True)
        for done, batch in zip(range(start + 1, recipe.steps + 1), batches):
            state, metrics = step_fn(state, {"image": batch["image"], "label": batch["label"]})
            bar.update(1)
            if done % 50 == 0 or done == recipe.steps:
                metrics = jax.device_get(metrics)
                if not np.isfinite(metrics["loss"]):
                    raise ValueError(f"classifier loss is {metrics['loss']} at step {done}: lower --lr")
                bar.set_postfix(loss=f"{metrics['loss']:.3f}", acc=f"{metrics['accuracy']:.2f}")
            if done % recipe.ckpt_every == 0 or done == recipe.steps:
                ckpt.save(done, state, config)
        batches.close()
        bar.close()
        ckpt.wait()
    finally:
        ckpt.close()
    return graphdef, state, metrics


def _without_workdir(config: dict) -> dict:
    return {k: v for k, v in config.items() if k != "workdir"}


@dataclasses.dataclass(frozen=True)
class TrainedClassifier:
    """A trained noise-conditional classifier: spec, graphdef, params, its config and result."""
    spec: ClassifierSpec
    graphdef: object
    params: dict
    config: dict
    result: dict

    def log_prob_fn(self, params=None):
        """(x, alpha, sigma) -> (B, K) log p_phi(y | x) with these (or the given, e.g. traced) params."""
        return functools.partial(make_log_prob_fn(self.graphdef), self.params if params is None else params)


def load_noisy_classifier(folder: str) -> TrainedClassifier:
    """The classifier trained by `train_noisy_classifier` in FOLDER (its final checkpoint)."""
    from diffusion_jax.train.checkpoint import Checkpointer

    config = read_json(os.path.join(folder, "config.json"))
    result = read_json(os.path.join(folder, "result.json"))
    if config is None or result is None:
        raise FileNotFoundError(f"--classifier {folder}: no finished classifier there (config.json and result.json); "
                                "train one with `diffusion-jax train-classifier --workdir W --out DIR`")
    spec, recipe = ClassifierSpec.from_dict(config["spec"]), ClassifierRecipe(**config["recipe"])
    tx = recipe.optimizer()
    abstract = jax.eval_shape(lambda: init_state(spec, recipe, tx)[1])
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract)
    ckpt = Checkpointer(folder, async_save=False)
    try:
        state, _ = ckpt.restore_newest_good(abstract, recipe.steps)
    finally:
        ckpt.close()
    return TrainedClassifier(spec, classifier_graphdef(spec), state.params, config, result)
