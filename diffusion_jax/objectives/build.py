"""Which loss a schedule is trained with, as one function of (apply_fn, params, batch, key):

    schedule.kind   process                                loss
    discrete        process.discrete.DiscreteSchedule      discrete.diffusion_loss  (DDPM / improved DDPM, any weighting)
    vp, subvp, ve   process.sde.VPSDE / SubVPSDE / VESDE   dsm.dsm_loss             (Song et al. 2021, continuous time)
    edm             process.sde.EDMSchedule                edm.edm_loss             (Karras et al. 2022)
    flow            process.flow.RectifiedFlow             flow.flow_matching_loss  (Lipman et al. 2023, SD3's times)
    vdm             process.vdm.VDMSchedule                vdm.vdm_loss             (Kingma et al. 2021; a learned
                                                                                    gamma's params are params["gamma"])

and what the samplers are told the network predicts (`sampler_prediction`).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from diffusion_jax.objectives.discrete import LossConfig, diffusion_loss
from diffusion_jax.objectives.dsm import DSMConfig, dsm_loss
from diffusion_jax.objectives.edm import EDMLossConfig, edm_loss
from diffusion_jax.objectives.flow import FlowLossConfig, flow_matching_loss
from diffusion_jax.objectives.vdm import VDMLossConfig, gamma_params_of, vdm_loss


_FLOW_ONLY = ("time_sampling", "logit_mean", "logit_std", "mode_scale")


def continuous_config(kind: str, cfg: LossConfig):
    """The EDMLossConfig (kind "edm"), VDMLossConfig ("vdm"), FlowLossConfig ("flow") or DSMConfig (vp / subvp / ve)
    of config.loss."""
    if kind == "flow":
        if cfg.weighting != "simple" or cfg.importance_sampling:
            raise ValueError("schedule.kind='flow' trains the velocity MSE, weighted by its time sampling: leave "
                             "loss.weighting='simple' and loss.importance_sampling=False and set loss.time_sampling")
        return FlowLossConfig(prediction=cfg.prediction, time_sampling=cfg.time_sampling, logit_mean=cfg.logit_mean,
                              logit_std=cfg.logit_std, mode_scale=cfg.mode_scale, eps=cfg.eps,
                              cond_drop_prob=cfg.cond_drop_prob)
    check_not_flow(cfg, kind)
    if kind == "vdm":
        if cfg.weighting != "simple" or cfg.importance_sampling:
            raise ValueError("schedule.kind='vdm' trains VDM's continuous VLB, whose weighting is fixed: leave "
                             f"loss.weighting='simple' and loss.importance_sampling=False (got {cfg.weighting!r}, "
                             f"{cfg.importance_sampling})")
        return VDMLossConfig(prediction=cfg.prediction, cond_drop_prob=cfg.cond_drop_prob)
    if kind == "edm":
        if cfg.prediction != "edm":
            raise ValueError(f"schedule.kind='edm' trains EDM's preconditioned network: set loss.prediction='edm', "
                             f"got {cfg.prediction!r}")
        return EDMLossConfig(p_mean=cfg.p_mean, p_std=cfg.p_std, cond_drop_prob=cfg.cond_drop_prob)
    return DSMConfig(prediction=cfg.prediction, weighting=cfg.weighting, importance_sampling=cfg.importance_sampling,
                     eps=cfg.eps, cond_drop_prob=cfg.cond_drop_prob, snr_gamma=cfg.snr_gamma)


def check_not_flow(cfg: LossConfig, kind: str) -> None:
    """ValueError naming a flow-matching setting of config.loss given for a schedule of another kind."""
    default = LossConfig()
    for name in _FLOW_ONLY:
        if getattr(cfg, name) != getattr(default, name):
            raise ValueError(f"loss.{name} is a flow-matching setting (schedule.kind='flow'); this schedule has kind "
                             f"{kind!r}")
    if cfg.prediction == "flow":
        raise ValueError(f"loss.prediction='flow' (the velocity eps - x0 of the linear interpolant) needs "
                         f"schedule.kind='flow', got {kind!r}")


def validate_loss(cfg: LossConfig, learn_sigma: bool, kind: str = "discrete") -> None:
    """config.loss for a schedule of `kind`: the discrete fields, or the continuous objective it becomes."""
    if kind == "discrete":
        check_not_flow(cfg, kind)
        return cfg.validate(learn_sigma)
    if learn_sigma or cfg.loss_type != "mse":
        raise ValueError(f"schedule.kind={kind!r} trains with an MSE objective: set loss.loss_type='mse' "
                         "and model.learn_sigma=False")
    continuous_config(kind, cfg).validate()


def make_objective(schedule, cfg: LossConfig, *, learn_sigma: bool = False,
                   num_classes: int | None = None) -> Callable:
    """objective(apply_fn, params, batch, key, train=True) -> (scalar loss, metrics dict with "loss"), chosen by
    the process's kind (module doc)."""
    kind = schedule.kind
    if kind == "discrete":
        return lambda apply_fn, params, batch, key, train=True: diffusion_loss(
            apply_fn, schedule, cfg, params, batch, key, learn_sigma=learn_sigma, num_classes=num_classes,
            train=train)
    if kind == "vdm":
        sub = dataclasses.replace(continuous_config("vdm", cfg), time_scale=schedule.time_scale)
        return lambda apply_fn, params, batch, key, train=True: vdm_loss(
            apply_fn, schedule.gamma, sub, params, gamma_params_of(params), batch, key, num_classes=num_classes,
            train=train)
    loss = {"edm": edm_loss, "flow": flow_matching_loss}.get(kind, dsm_loss)
    sub = continuous_config(kind if kind in ("edm", "flow") else "sde", cfg)
    return lambda apply_fn, params, batch, key, train=True: loss(
        apply_fn, schedule, sub, params, batch, key, num_classes=num_classes, train=train)
