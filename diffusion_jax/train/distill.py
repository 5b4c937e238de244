"""Few-step students as objectives of the one train loop (config.distill; the maths is `objectives.distill`'s).

    distill = make_distillation(exp, schedule)        # loads and checks the teacher run, builds the objective
    objective(apply_fn, params, batch, key, train=True, *, step, teacher) -> (loss, metrics)

`train.state.make_train_step` passes the step (iCT's curriculum) and the teacher's EMA params (a jit argument, sharded
as the student's params: the teacher shares the student's model section). A student starts from its teacher's EMA
weights (`loop.load_pretrained`); consistency training starts from scratch.

    guidance                  Meng et al. 2023, stage one: x0_hat(x_t, w) of a student that takes w as input ->
                              the teacher's guided x0_hat, uncond + w (cond - uncond), w ~ U[w_min, w_max], on the
                              levels of a num_scales-step grid; truncated-SNR weight
    progressive               Salimans & Ho 2022, Alg. 2: one student DDIM step = two teacher DDIM steps, on the
                              levels of a 2N-step grid (the student samples its N-step grid, every other level)
    consistency_distillation  Song et al. 2023, Alg. 2: f(x_n, t_n) -> f_(stop grad)(x_hat_{n+1}, t_{n+1}), x_hat_{n+1}
                              one step of the teacher's ODE by `distill.solver` (any deterministic registry sampler)
                              on an N-step grid; iCT's pseudo-Huber metric and 1 / (s_n - s_{n+1}) weight
    consistency_training      Song & Dhariwal 2023 (iCT): the same with x_hat_{n+1} = x0 + s_{n+1} z on the same z,
                              Karras levels, the N(k) curriculum and log-normal pairs; no teacher, no EMA target

Each example draws its own level; a per-example level reaches the network as a per-example time under `jax.vmap`,
and the teacher's solver runs on that example's slice of the grid.

A student that takes the guidance weight as input (model.guidance_embed_dim) draws w ~ U[w_min, w_max] per example
and learns the teacher at that w: a teacher that takes w too is called with it (Meng et al.'s stage two: progressive
rounds of a guidance-distilled student), any other teacher runs both branches of classifier-free guidance (the
null class or the empty caption), as LCM's teacher solver does (Luo et al. 2023).
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.config import Experiment, build_schedule, consistency_of, takes_w
from diffusion_jax.inference.sampling import network_denoise_fn
from diffusion_jax.models.layers import is_guidance_param
from diffusion_jax.objectives import distill as maths
from diffusion_jax.objectives.discrete import mean_flat, read_batch
from diffusion_jax.samplers.registry import get_entry, get_sampler, make_grid
from diffusion_jax.samplers.wrapper import guide, make_denoiser


@dataclasses.dataclass(frozen=True)
class Distillation:
    objective: Callable          # (apply_fn, params, batch, key, train=True, *, step, teacher) -> (loss, metrics)
    teacher_params: dict | None  # the teacher's EMA params (None: consistency training)


def student_grid(exp: Experiment, schedule):
    """The levels the student is trained on: progressive's 2N-step grid (the student's levels are its even ones),
    consistency and guidance distillation's num_scales-step grid; None for consistency training (levels drawn in the
    step)."""
    d = exp.distill
    if d.method == "progressive":
        grid = make_grid(schedule, 2 * d.student_steps, d.spacing)
        own = make_grid(schedule, d.student_steps, d.spacing)
        if not np.allclose(np.asarray(grid.sigma)[::2], np.asarray(own.sigma), rtol=1e-5, atol=1e-6):
            raise ValueError(f"distill.spacing={d.spacing!r}: the student's {d.student_steps}-step levels are not "
                             f"every other level of the teacher's {2 * d.student_steps}; use 'trailing' or 'uniform'")
        return grid
    if d.method in ("consistency_distillation", "guidance"):
        return make_grid(schedule, d.num_scales, d.spacing)
    return None


def student_spec(exp: Experiment):
    """How the training grid samples the student: DDIM on its N-step levels (progressive) or on train.sample_steps
    (guidance; w = 1), else one consistency step on distill.spacing; no clipping."""
    from diffusion_jax.inference.sampling import SamplerSpec

    d = exp.distill
    if d.method == "progressive":
        return SamplerSpec("ddim", steps=d.student_steps, spacing=d.spacing, clip_denoised=None)
    if d.method == "guidance":
        return SamplerSpec("ddim", steps=exp.train.sample_steps, spacing=d.spacing, clip_denoised=None)
    return SamplerSpec("consistency", steps=1, spacing=d.spacing, clip_denoised=None)


def check_teacher(exp: Experiment, teacher: Experiment) -> None:
    """The student must share the teacher's model, schedule, loss.prediction and latent sections (it starts from
    the teacher's weights and reads its outputs the same way); a progressive round's teacher is the previous round."""
    d, path = exp.distill, exp.distill.teacher
    check_guided_teacher(exp, teacher)
    for section in ("model", "schedule", "latent"):
        ours, theirs = dataclasses.asdict(getattr(exp, section)), dataclasses.asdict(getattr(teacher, section))
        if section == "model" and theirs.get("guidance_embed_dim") is None:   # a w-student of a two-branch teacher
            ours.pop("guidance_embed_dim", None), theirs.pop("guidance_embed_dim", None)
        for key in sorted(set(ours) | set(theirs)):
            if ours.get(key) != theirs.get(key):
                raise ValueError(f"distill.teacher={path!r} is incompatible: its {section}.{key}={theirs.get(key)!r}, "
                                 f"this student's is {ours.get(key)!r}; a student shares its teacher's {section} "
                                 "section")
    if teacher.loss.prediction != exp.loss.prediction:
        raise ValueError(f"distill.teacher={path!r} is incompatible: it predicts {teacher.loss.prediction!r}, this "
                         f"student's loss.prediction is {exp.loss.prediction!r}")
    t = teacher.distill
    if t.consistency:
        raise ValueError(f"distill.teacher={path!r} is a consistency model ({t.method}): its ODE is not the data's; "
                         "distil from a diffusion run or a progressive-distillation student")
    if t.method == "progressive" and (d.method != "progressive" or t.student_steps != 2 * d.student_steps
                                      or t.spacing != d.spacing):
        raise ValueError(f"distill.teacher={path!r} is a {t.student_steps}-step progressive student on "
                         f"{t.spacing!r} levels: its next round is distill.method='progressive', distill.student_steps="
                         f"{t.student_steps // 2}, distill.spacing={t.spacing!r}")


def check_guided_teacher(exp: Experiment, teacher: Experiment) -> None:
    """A student taking w learns a teacher taking w (the same width) or a classifier-free guided one (trained with
    dropped labels / captions); a student without w cannot learn a teacher that needs it."""
    path = exp.distill.teacher
    if takes_w(teacher) and not takes_w(exp):
        raise ValueError(f"distill.teacher={path!r} takes the guidance weight as input (model.guidance_embed_dim="
                         f"{teacher.model.guidance_embed_dim}); its student must too: set the same "
                         "model.guidance_embed_dim")
    if takes_w(teacher) and exp.distill.method == "guidance":
        raise ValueError(f"distill.teacher={path!r} is already guidance-distilled (it takes w); its next round is "
                         "distill.method='progressive' or 'consistency_distillation'")
    if takes_w(exp) and not takes_w(teacher) and not teacher.loss.cond_drop_prob > 0:
        raise ValueError(f"distill.teacher={path!r} was trained with loss.cond_drop_prob="
                         f"{teacher.loss.cond_drop_prob}: it has no unconditional branch for classifier-free "
                         "guidance, so a student taking w has nothing to learn")


def check_solver(d) -> None:
    if d.method == "consistency_distillation" and get_entry(d.solver).stochastic:
        raise ValueError(f"distill.solver={d.solver!r} is stochastic; the teacher's one ODE step needs a "
                         "deterministic sampler, e.g. 'heun', 'ddim', 'euler', 'dpm_solver_2'")


def check_student(exp: Experiment) -> None:
    """What can be checked before anything compiles: the teacher run's config (`check_teacher`; FileNotFoundError
    naming distill.teacher when it is not a run) and consistency distillation's solver."""
    from diffusion_jax.config import load_workdir_config

    d = exp.distill
    check_solver(d)
    if d.method not in maths.TEACHER_METHODS:
        return
    if not os.path.isfile(os.path.join(d.teacher, "config.json")):
        raise FileNotFoundError(f"distill.teacher={d.teacher!r} is not a training workdir (no config.json there)")
    check_teacher(exp, Experiment.from_config(load_workdir_config(d.teacher)))


def load_teacher(exp: Experiment):
    """The EMA params of distill.teacher after `check_student` (FileNotFoundError / ValueError naming the key); None
    for a method without a teacher."""
    from diffusion_jax.train.checkpoint import load_trained

    check_student(exp)
    path = exp.distill.teacher
    if exp.distill.method not in maths.TEACHER_METHODS:
        return None
    try:
        return load_trained(path, allow_latent=True)[2]
    except FileNotFoundError as e:
        raise FileNotFoundError(f"distill.teacher={path!r}: {e}") from e


def params_take_w(params) -> bool:
    """Whether a network's params hold a guidance projection (its model.guidance_embed_dim is set)."""
    return any(is_guidance_param(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0])


def _batched(tree):
    return jax.tree.map(lambda a: a[None], tree)


def make_distillation(exp: Experiment, schedule=None, *, teacher_params=None, teacher_apply=None) -> Distillation:
    """The objective of exp.distill on `schedule` (default: built from exp.schedule); the teacher is loaded from
    distill.teacher unless `teacher_params` are given. teacher_apply: the network of a two-branch teacher of a
    student taking w (default: the student's model section without its guidance projection)."""
    d, lc = exp.distill, exp.loss
    schedule = build_schedule(exp.schedule) if schedule is None else schedule
    if d.method in maths.TEACHER_METHODS and teacher_params is None:
        teacher_params = load_teacher(exp)
    prediction = "edm" if schedule.kind == "edm" else lc.prediction
    channels = exp.model.in_channels
    cparam = consistency_of(exp)
    grid = student_grid(exp, schedule)
    check_solver(d)
    if d.method == "consistency_distillation":
        solver = get_sampler(d.solver)
    elif d.method == "progressive":
        solver = get_sampler("ddim")
    else:
        solver = None

    student_w = takes_w(exp)
    teacher_w = teacher_params is not None and params_take_w(teacher_params)
    own_apply = teacher_apply   # a two-branch teacher of a w-student is a network without the guidance projection
    if student_w and not teacher_w and teacher_params is not None and own_apply is None:
        from diffusion_jax.models.functional import make_apply_fn
        from diffusion_jax.train.state import model_graphdef

        own_apply = make_apply_fn(model_graphdef(dataclasses.replace(exp.model, guidance_embed_dim=None)))

    def network_of(apply_fn, params, cond, *, w=None, train=False, dropout_key=None):
        """The network's raw denoise_fn(x, t) with these params, conditioning and (a student's) w."""
        def apply(p, x, t, **kw):   # edm_denoise passes its own train=False: the step's flags win
            kw = {k: v for k, v in kw.items() if k not in ("train", "dropout_key")}
            return apply_fn(p, x, t, train=train, dropout_key=dropout_key, **kw)
        control = {"control": cond["control"]} if cond.get("control") is not None else None
        return network_denoise_fn(apply, params, cond.get("y"), channels=channels, schedule=schedule,
                                  context=cond.get("context"), control=control, w=w)

    def denoiser_of(apply_fn, params, cond, *, w=None, consistency=None, train=False, dropout_key=None):
        """denoiser(x, t, alpha, sigma) -> (x0_hat, eps_hat) of the network with these params and conditioning."""
        fn = network_of(apply_fn, params, cond, w=w, train=train, dropout_key=dropout_key)
        return make_denoiser(fn, prediction, consistency=consistency)

    def teacher_of(apply_fn, teacher, cond, null, w):
        """The teacher's denoiser at the student's w: itself without w, called with w when it takes it, else
        classifier-free guided, uncond + w (cond - uncond) of its raw outputs (`samplers.wrapper.guide`)."""
        if w is None or teacher_w:
            return denoiser_of(apply_fn, teacher, cond, w=w)
        f_c, f_u = network_of(own_apply, teacher, cond), network_of(own_apply, teacher, null)
        return make_denoiser(lambda x, t: guide(f_c(x, t), f_u(x, t), w), prediction)

    def x0_at(apply_fn, params, x, levels, cond, w, *, consistency=None, train=False, keys=None):
        """x0_hat (B, ...) of each example x_b at its own level (t_b, alpha_b, sigma_b) and w_b: levels are three
        (B,), w (B,) or None."""
        def one(x_b, t, a, s, cond_b, w_b, k):
            den = denoiser_of(apply_fn, params, _batched(cond_b), w=w_b, consistency=consistency, train=train,
                              dropout_key=k)
            return den(x_b[None], t, a, s)[0][0]
        keys = jnp.zeros((x.shape[0], 2), jnp.uint32) if keys is None else keys
        return jax.vmap(one)(x, *levels, cond, w, keys)

    def teacher_x0(apply_fn, teacher, x, levels, cond, null, w):
        """The teacher's x0_hat (B, ...) of each example at its own level and w (`teacher_of`)."""
        def one(x_b, t, a, s, cond_b, null_b, w_b):
            return teacher_of(apply_fn, teacher, _batched(cond_b), _batched(null_b), w_b)(x_b[None], t, a, s)[0][0]
        return jax.lax.stop_gradient(jax.vmap(one)(x, *levels, cond, null, w))

    def solve(apply_fn, teacher, x, start, num, cond, null, w):
        """Each example x_b moved `num` steps of `solver` along the grid from its level start_b (the teacher at w_b)."""
        def one(x_b, n, cond_b, null_b, w_b):
            sub = jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, n, num + 1), grid)
            den = teacher_of(apply_fn, teacher, _batched(cond_b), _batched(null_b), w_b)
            return solver(den, sub, x_b[None])[0][0]
        return jax.lax.stop_gradient(jax.vmap(one)(x, start, cond, null, w))

    def draw_w(key, batch):
        """(B,) guidance weights ~ U[w_min, w_max] for a student taking w, else None."""
        return jax.random.uniform(key, (batch,), minval=d.w_min, maxval=d.w_max) if student_w else None

    def null_of(batch, cond):
        """The unconditional branch's conditioning: the null class, the empty caption's context."""
        null = dict(cond)
        if cond.get("y") is not None:
            null["y"] = jnp.full_like(cond["y"], exp.model.num_classes)
        if cond.get("context") is not None:
            null["context"] = batch["null_context"]
        return null

    def levels(i):
        return grid.t[i], grid.alpha[i], grid.sigma[i]

    def column(v, x):
        return v.reshape((-1,) + (1,) * (x.ndim - 1))

    def draw(batch, key):
        """(x0, cond, null cond, w, the levels' key, noise z, dropout keys) of a batch."""
        k_n, k_z, k_drop, k_cond = jax.random.split(key, 4)
        x0, cond = read_batch(batch, k_cond, exp.model.num_classes, lc.cond_drop_prob)
        B = x0.shape[0]
        return (x0, cond, null_of(batch, cond), draw_w(jax.random.fold_in(key, 4), B), k_n,
                jax.random.normal(k_z, x0.shape, x0.dtype), jax.random.split(k_drop, B))

    def weighted_x0_loss(apply_fn, params, x_t, lv, cond, w, target, keys, train):
        x0_hat = x0_at(apply_fn, params, x_t, lv, cond, w, train=train, keys=keys)
        mse = mean_flat((jax.lax.stop_gradient(target) - x0_hat) ** 2)
        loss = jnp.mean(maths.truncated_snr_weight(lv[1], lv[2]) * mse)
        return loss, {"loss": loss, "mse": jnp.mean(mse)}

    def guidance(apply_fn, params, batch, key, train=True, *, step=None, teacher=None):
        x0, cond, null, w, k_n, z, keys = draw(batch, key)
        lv = levels(jax.random.randint(k_n, (x0.shape[0],), 0, d.num_scales))
        x_t = column(lv[1], x0) * x0 + column(lv[2], x0) * z
        target = teacher_x0(apply_fn, teacher, x_t, lv, cond, null, w)
        return weighted_x0_loss(apply_fn, params, x_t, lv, cond, w, target, keys, train)

    def progressive(apply_fn, params, batch, key, train=True, *, step=None, teacher=None):
        x0, cond, null, w, k_n, z, keys = draw(batch, key)
        i = 2 * jax.random.randint(k_n, (x0.shape[0],), 0, d.student_steps)   # teacher levels i -> i + 2
        lv = levels(i)
        a, s = column(lv[1], x0), column(lv[2], x0)
        x_t = a * x0 + s * z
        x_tpp = solve(apply_fn, teacher, x_t, i, 2, cond, null, w)
        target = maths.pd_target(x_t, x_tpp, a, s, column(grid.alpha[i + 2], x0), column(grid.sigma[i + 2], x0))
        return weighted_x0_loss(apply_fn, params, x_t, lv, cond, w, target, keys, train)

    def consistency(apply_fn, params, batch, key, train=True, *, step=None, teacher=None):
        x0, cond, null, w, k_n, z, keys = draw(batch, key)
        B = x0.shape[0]
        if d.method == "consistency_distillation":   # the pair of levels n -> n + 1
            n = jax.random.randint(k_n, (B,), 0, d.num_scales)
            here, there = levels(n), levels(n + 1)
            x_n = column(here[1], x0) * x0 + column(here[2], x0) * z
            x_next = solve(apply_fn, teacher, x_n, n, 1, cond, null, w)
            num = jnp.asarray(d.num_scales + 1)
        else:   # iCT on EDM's levels (alpha = 1, t = sigma): s_{i+1} > s_i, the student at the noisier one
            num = maths.ict_num_levels(step, exp.train.steps, d.s0, d.s1)
            i = maths.ict_pair_index(k_n, (B,), num, d.s1 + 1, schedule.sigma_min, schedule.sigma_max, d.p_mean,
                                     d.p_std)
            s_hi = maths.karras_levels(i + 1, num, schedule.sigma_min, schedule.sigma_max)
            s_lo = maths.karras_levels(i, num, schedule.sigma_min, schedule.sigma_max)
            one = jnp.ones_like(s_hi)
            here, there = (s_hi, one, s_hi), (s_lo, one, s_lo)
            x_n = x0 + column(s_hi, x0) * z
            x_next = x0 + column(s_lo, x0) * z
        f = x0_at(apply_fn, params, x_n, here, cond, w, consistency=cparam, train=train, keys=keys)
        f_target = x0_at(apply_fn, jax.lax.stop_gradient(params), x_next, there, cond, w, consistency=cparam)
        at_end = column(there[2], x0) <= 0            # the clean end: f is the identity there (boundary condition)
        f_target = jax.lax.stop_gradient(jnp.where(at_end, x_next / column(there[1], x0), f_target))
        s_here, s_there = here[2] / here[1], there[2] / there[1]
        c = maths.huber_c_for(d, math.prod(x0.shape[1:]))
        dist = maths.pseudo_huber(f, f_target, c)
        loss = jnp.mean(dist / (s_here - s_there))
        return loss, {"loss": loss, "distance": jnp.mean(dist), "num_levels": num.astype(jnp.float32)}

    if d.method == "guidance":
        return Distillation(guidance, teacher_params)
    if d.method == "progressive":
        return Distillation(progressive, teacher_params)
    if d.consistency:
        return Distillation(consistency, teacher_params)
    raise ValueError(f"distill.method={d.method!r}: make_distillation needs a distillation method")
