"""Train state, optimizer and the pure, jitted train step.

    state = TrainState(step, params, ema_params, opt_state, key)
    train_step(state, batch) -> (state, metrics)        jit, donated state, sharded over the "data" mesh axis

The step's randomness is fold_in(state.key, state.step): the same (state, batch) always gives the same
update, and a restored checkpoint resumes the exact random stream. The step never raises on a NaN: it
reports loss and grad_norm, and the host (train.faults.NonFiniteGuard) decides.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from diffusion_jax import parallel
from diffusion_jax.models.registry import backbone, build_backbone
from diffusion_jax.models.functional import make_apply_fn
from diffusion_jax.objectives.build import make_objective
from diffusion_jax.objectives.discrete import LossConfig
from diffusion_jax.objectives.vdm import VDMNetwork


@flax.struct.dataclass
class TrainState:
    step: jax.Array            # () int32, number of updates applied
    params: dict               # pure dict of the model's nnx.Param values
    ema_params: dict           # exponential moving average of params (what samples use)
    opt_state: optax.OptState
    key: jax.Array             # raw uint32 PRNG key; the step key is fold_in(key, step)


def learning_rate_schedule(optim, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to optim.learning_rate, then constant or cosine decay to 0 at total_steps."""
    if optim.decay == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, optim.learning_rate, optim.warmup_steps,
                                                  max(total_steps, optim.warmup_steps + 1), 0.0)
    if optim.warmup_steps == 0:
        return optax.constant_schedule(optim.learning_rate)
    return optax.join_schedules([optax.linear_schedule(0.0, optim.learning_rate, optim.warmup_steps),
                                 optax.constant_schedule(optim.learning_rate)], [optim.warmup_steps])


def make_optimizer(optim, total_steps: int, model_cfg=None) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with warmup and global-norm gradient clipping (Ho et al. 2020 use Adam, clip 1, warmup 5000). With the
    config of a backbone that trains only part of its params (its registry `trainable`, e.g. a ControlNet), the rest
    get no update and no optimizer state (optax.multi_transform with set_to_zero)."""
    lr = learning_rate_schedule(optim, total_steps)
    chain = [optax.clip_by_global_norm(optim.grad_clip)] if optim.grad_clip > 0 else []
    chain.append(optax.adamw(lr, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay))
    tx = optax.chain(*chain)
    rule = trainable_rule(model_cfg)
    if rule is not None:
        labels = lambda params: trainable_mask(rule, params, "train", "frozen")   # noqa: E731
        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
    return tx, lr


def trainable_rule(model_cfg):
    """The registry's `trainable(path) -> bool` of model_cfg's backbone, or None when every param trains."""
    return None if model_cfg is None else backbone(model_cfg.name).trainable


def trainable_mask(rule, params, yes=True, no=False):
    """params' tree with `yes` at the params that `rule(key path)` trains and `no` elsewhere."""
    def label(path, _):
        return yes if rule(tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path)) else no

    return jax.tree_util.tree_map_with_path(label, params)


def ema_decay_at(step, decay: float, warmup: bool):
    """Fixed decay, or min(decay, (1 + step) / (10 + step)) with warmup (TF ExponentialMovingAverage)."""
    if not warmup:
        return jnp.asarray(decay, jnp.float32)
    step = step.astype(jnp.float32)
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def build_network(model_cfg, rngs: nnx.Rngs, learned_gamma=None) -> nnx.Module:
    """The trained module: model.name's backbone (`models.registry`), or a `vdm.VDMNetwork` (backbone + gamma
    params) for a learned VDM gamma (`config.learned_gamma(exp.schedule)`)."""
    net = build_backbone(model_cfg, rngs)
    if learned_gamma is None:
        return net
    return VDMNetwork(net, learned_gamma.init(rngs.params()))


def make_init_fn(model_cfg, tx, key, learned_gamma=None) -> Callable[[], TrainState]:
    """A function of no arguments that builds the initial TrainState (jit it, or eval_shape it)."""
    init_key, state_key = jax.random.split(key)

    def init():
        model = build_network(model_cfg, nnx.Rngs(params=init_key), learned_gamma)
        _, params = nnx.split(model, nnx.Param)
        params = nnx.to_pure_dict(params)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          ema_params=jax.tree.map(lambda p: p + 0.0, params), opt_state=tx.init(params),
                          key=state_key)

    return init


def create_train_state(model_cfg, tx, key, mesh, fsdp: bool = False, learned_gamma=None):
    """Initialise directly into the target shardings (nothing is materialised replicated first).

    Returns (graphdef, state, state_shardings).
    """
    init = make_init_fn(model_cfg, tx, key, learned_gamma)
    shardings = parallel.state_shardings(mesh, jax.eval_shape(init), fsdp=fsdp)
    state = jax.jit(init, out_shardings=shardings)()
    return model_graphdef(model_cfg, learned_gamma), state, shardings


def model_graphdef(model_cfg, learned_gamma=None):
    return nnx.graphdef(nnx.eval_shape(lambda: build_network(model_cfg, nnx.Rngs(0), learned_gamma)))


def keep_if_finite(new_state, old_state, metrics: dict):
    """train.on_nonfinite="skip" inside a jitted step: new_state where metrics' loss and grad_norm are finite,
    else old_state with new_state's step (the update is skipped, the step still counts)."""
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
    kept = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, old_state)
    return kept.replace(step=new_state.step)


@dataclasses.dataclass(frozen=True)
class StepOptions:
    ema_decay: float
    ema_warmup: bool
    learn_sigma: bool
    num_classes: int | None
    skip_nonfinite: bool = False      # a non-finite loss / gradient leaves the state as it was (step + 1)
    trainable: Callable | None = None   # the backbone's `trainable(path)` rule: the other params get no gradient
    #   and keep their values exactly (params and EMA); None: all train


def restrict(full, like):
    """`full` (a nested dict) cut to the keys of `like`, a nested dict whose keys it holds: a teacher's shardings
    from its student's, whose params hold the teacher's and possibly more (a guidance projection)."""
    if isinstance(like, dict):
        return {k: restrict(full[k], v) for k, v in like.items()}
    return full


def make_train_step(graphdef, schedule, loss_cfg: LossConfig, tx, lr_fn: Callable,
                    opts: StepOptions, mesh, state_shardings, distill=None) -> Callable:
    """The jitted step (state, batch) -> (state, metrics); `state` is donated. distill: a `train.distill.Distillation`
    whose objective replaces the schedule's, given the step and the teacher's params (a jit argument sharded as the
    student's params)."""
    apply_fn = make_apply_fn(graphdef)
    if distill is None:
        objective = make_objective(schedule, loss_cfg, learn_sigma=opts.learn_sigma, num_classes=opts.num_classes)
    else:
        objective = distill.objective

    def train_step(state: TrainState, batch: dict, teacher=None):
        key = jax.random.fold_in(state.key, state.step)
        extra = {} if distill is None else {"step": state.step, "teacher": teacher}

        def loss_fn(params):
            if mask is not None:   # frozen params: no weight gradients computed at all
                params = jax.tree.map(lambda p, m: p if m else jax.lax.stop_gradient(p), params, mask)
            return objective(apply_fn, params, batch, key, train=True, **extra)

        mask = None if opts.trainable is None else trainable_mask(opts.trainable, state.params)
        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        decay = ema_decay_at(state.step, opts.ema_decay, opts.ema_warmup)
        ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
        if mask is not None:   # the EMA of a frozen param is the param, bit for bit
            ema = jax.tree.map(lambda e, p, m: e if m else p, ema, params, mask)
        metrics = dict(metrics, grad_norm=optax.tree.norm(grads), lr=lr_fn(state.step))
        new_state = state.replace(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state)
        if opts.skip_nonfinite:   # train.on_nonfinite="skip": keep the old params, EMA and optimizer state
            new_state = keep_if_finite(new_state, state, metrics)
        return new_state, metrics

    batch_sharding = parallel.batch_sharding(mesh)
    teacher = None if distill is None else distill.teacher_params
    if teacher is None:
        return jax.jit(train_step, in_shardings=(state_shardings, batch_sharding),
                       out_shardings=(state_shardings, parallel.replicated(mesh)), donate_argnums=(0,),
                       compiler_options=parallel.step_compiler_options(mesh))
    teacher_shardings = restrict(state_shardings.params, teacher)   # it may lack a student's guidance projection
    teacher = jax.device_put(teacher, teacher_shardings)
    jitted = jax.jit(train_step, in_shardings=(state_shardings, batch_sharding, teacher_shardings),
                     out_shardings=(state_shardings, parallel.replicated(mesh)), donate_argnums=(0,),
                     compiler_options=parallel.step_compiler_options(mesh))
    return lambda state, batch: jitted(state, batch, teacher)
