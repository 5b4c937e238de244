"""A training workdir written as a diffusers folder that `from_pretrained` loads: the inverse of `ddpm_import`
(and of `models.convert_vae`).

    export_workdir("workdirs/digits", "exported/digits")      # diffusion-jax export --workdir ... --to ...

model.name "unet" (discrete schedule): a DDPMPipeline folder: model_index.json, unet/ (UNet2DModel config.json +
  diffusion_pytorch_model.safetensors, the EMA params, which is what the project samples with) and
  scheduler/scheduler_config.json (DDPMScheduler: the betas, prediction_type, variance_type, clip and
  timestep_spacing of the run). `DDPMPipeline.from_pretrained(folder)` samples it; a class-conditional model takes
  `class_labels` in 0..num_classes, num_classes being the null class of classifier-free guidance.
model.name "unet_cond": unet/ (UNet2DConditionModel) and scheduler/ (DDPMScheduler), e.g. a latent text-to-image
  run's U-Net: `UNet2DConditionModel.from_pretrained(folder, subfolder="unet")`.
model.name "controlnet" on a unet_cond base: a ControlNetModel folder (the trained ControlNet; its locked base is
  exported from the base run's own workdir).
model.name "lora": pytorch_lora_weights.safetensors in the layout diffusers' `load_lora_weights` and peft read
  (models/lora_io.py; the base is exported from its own workdir).
model.name "dreambooth": the fine-tuned network as its base's kind (unet / unet_cond) with one more class label.
model.name "vae": an AutoencoderKL folder (config.json with the run's estimated scaling_factor + weights).
Refused, with the reason: a ControlNet on a `unet` (DDPM / ADM) base (diffusers' ControlNetModel has the
UNet2DConditionModel layout), continuous-time schedules (diffusers' DDPMScheduler is discrete), the score_sde U-Net
options, an unfinished autoencoder run, and a target that exists and is not empty (nothing is overwritten).
"""
from __future__ import annotations

import dataclasses
import logging
import os

from flax import nnx

from diffusion_jax import fileio
from diffusion_jax.config import load_workdir_config
from diffusion_jax.inference.pipelines.stable_diffusion import DIFFUSERS_BETAS, DIFFUSERS_PREDICTIONS
from diffusion_jax.models.export_diffusers import (
    controlnet_diffusers_config,
    controlnet_state_dict,
    save_model_folder,
    unet_cond_diffusers_config,
    unet_cond_state_dict,
    unet2d_config,
    unet2d_state_dict,
    vae_diffusers_config,
    vae_state_dict,
)
from diffusion_jax.process.discrete import check_schedule
from diffusion_jax.train.ddpm_import import DIFFUSERS_SPACINGS

# the importers' maps (diffusers -> ours) inverted; sigmoid, which diffusers' DDPMScheduler computes as we do, is
# written though the importer does not read it
_BETAS = {ours: theirs for theirs, ours in DIFFUSERS_BETAS.items()} | {"sigmoid": "sigmoid"}
log = logging.getLogger(__name__)
_PREDICTIONS = {ours: theirs for theirs, ours in DIFFUSERS_PREDICTIONS.items()}


def scheduler_config(exp) -> dict:
    """The DDPMScheduler scheduler_config.json of a discrete-schedule Experiment (the inverse of
    `ddpm_import.sample_from_diffusers` and `stable_diffusion.schedule_from_diffusers`)."""
    sc = exp.schedule
    if sc.kind != "discrete":
        raise ValueError(f"schedule.kind={sc.kind!r}: diffusers' DDPMScheduler is discrete-time; export takes runs "
                         "with schedule.kind='discrete'")
    if exp.loss.prediction not in _PREDICTIONS:
        raise ValueError(f"loss.prediction={exp.loss.prediction!r} has no DDPMScheduler prediction_type; one of "
                         f"{tuple(_PREDICTIONS)}")
    start, end = check_schedule(sc.name, sc.num_timesteps, sc.beta_start, sc.beta_end)
    clip = exp.sample.clip_denoised
    return {"_class_name": "DDPMScheduler", "num_train_timesteps": sc.num_timesteps, "beta_schedule": _BETAS[sc.name],
            "beta_start": start if start is not None else 1e-4, "beta_end": end if end is not None else 0.02,
            "trained_betas": None, "prediction_type": _PREDICTIONS[exp.loss.prediction],
            "variance_type": "learned_range" if exp.model.learn_sigma else exp.sample.variance,
            "clip_sample": clip > 0, "clip_sample_range": clip if clip > 0 else 1.0, "thresholding": False,
            "timestep_spacing": exp.sample.spacing if exp.sample.spacing in DIFFUSERS_SPACINGS else "leading",
            "steps_offset": 0, "rescale_betas_zero_snr": sc.zero_terminal_snr}


def sampler_scheduler_config(exp, classes: tuple[str, ...] | None = None) -> tuple[dict, str]:
    """(scheduler_config, note): the run's sampler (config.sample: sampler, steps, spacing, eta / variance, clip) as
    the diffusers scheduler that runs it exactly (`samplers.diffusers_export.to_diffusers_config`) when there is one
    (and its class is in `classes`: a DDPMPipeline calls neither scale_model_input nor init_noise_sigma, so only
    DDPMScheduler / DDIMScheduler run right there); else the DDPMScheduler of `scheduler_config`, the note says
    why."""
    from diffusion_jax.samplers.diffusers_export import to_diffusers_config
    from diffusion_jax.samplers.registry import sampler_options

    base, sample = scheduler_config(exp), exp.sample
    accepted = sampler_options(sample.sampler)
    options = {k: getattr(sample, k) for k in ("eta", "variance") if k in accepted}
    if options.get("eta") == 0.0 and sample.sampler == "ddim":
        options.pop("eta")                                   # DDIM's default: no config key needed
    try:
        if set(options) - {"variance"}:
            raise ValueError(f"{options}: pipeline arguments in diffusers, not scheduler config keys")
        cfg = to_diffusers_config(sample.sampler, sample.steps, schedule_config=base, spacing=sample.spacing,
                                  options=options, clip_denoised=sample.clip_denoised or None)
    except ValueError as e:
        return base, f"the run's sampler is written as DDPMScheduler: {e}"
    if classes is not None and cfg["_class_name"] not in classes:
        return base, (f"the run's sampler ({cfg['_class_name']}) is written as DDPMScheduler: this pipeline runs "
                      f"only {', '.join(classes)} right")
    return cfg, f"the run's sampler ({sample.sampler}, {sample.spacing}) is written as {cfg['_class_name']}"


def _experiment(workdir: str):
    from diffusion_jax.config import Experiment

    return Experiment.from_config(load_workdir_config(workdir))


def _export_unet(workdir: str, target: str, exp=None) -> None:
    from diffusion_jax.train.checkpoint import load_trained

    exp = exp or _experiment(workdir)
    scheduler_config(exp)                  # the refusals before anything is restored or written
    scheduler, note = sampler_scheduler_config(exp, ("DDPMScheduler", "DDIMScheduler"))
    unet = unet2d_config(exp.model)
    _, _, params, _ = load_trained(workdir)
    state_dict = unet2d_state_dict(params, exp.model)
    save_model_folder(os.path.join(target, "unet"), unet, state_dict)
    fileio.write_json(os.path.join(target, "scheduler", "scheduler_config.json"), scheduler)
    fileio.write_json(os.path.join(target, "model_index.json"),
                      {"_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DModel"],
                       "scheduler": ["diffusers", scheduler["_class_name"]]})
    log.info("export: %s", note)


def _export_unet_cond(workdir: str, target: str, exp=None) -> None:
    from diffusion_jax.train.checkpoint import load_trained

    exp = exp or _experiment(workdir)
    scheduler_config(exp)
    scheduler, note = sampler_scheduler_config(exp)
    unet = unet_cond_diffusers_config(exp.model.diffusers_config())
    _, _, params, _ = load_trained(workdir, allow_latent=True)
    save_model_folder(os.path.join(target, "unet"), unet, unet_cond_state_dict(params["net"]))
    fileio.write_json(os.path.join(target, "scheduler", "scheduler_config.json"), scheduler)
    log.info("export: %s", note)


def _export_controlnet(workdir: str, target: str) -> None:
    from diffusion_jax.config import Experiment
    from diffusion_jax.train.checkpoint import load_trained

    exp = Experiment.from_config(load_workdir_config(workdir))
    config = controlnet_diffusers_config(exp.model)   # refuses a `unet` base before anything is restored
    _, _, params, _ = load_trained(workdir, allow_latent=True)
    save_model_folder(target, config, controlnet_state_dict(params["controlnets"][0]))


def _export_lora(workdir: str, target: str) -> None:
    from diffusion_jax.config import Experiment
    from diffusion_jax.models.lora_io import save_lora
    from diffusion_jax.train.checkpoint import load_trained

    exp = Experiment.from_config(load_workdir_config(workdir))
    _, graphdef, params, _ = load_trained(workdir, allow_latent=True)
    paths = nnx.merge(graphdef, params).paths
    save_lora(target, exp.model, params["adapters"], paths)


def _export_dreambooth(workdir: str, target: str) -> None:
    exp = _experiment(workdir)   # the network is the base's with one more label: exported as a run of its kind
    network = exp.model.network_config
    EXPORTS[network.name](workdir, target, dataclasses.replace(exp, model=network))


def _export_vae(workdir: str, target: str) -> None:
    from diffusion_jax.train.vae import VAERun, load_vae

    run = VAERun.from_config(load_workdir_config(workdir))
    vae, params = load_vae(workdir)       # with the estimated scaling factor; refuses an unfinished run
    save_model_folder(target, vae_diffusers_config(vae, sample_size=run.data.image_size), vae_state_dict(params, vae))


EXPORTS = {"unet": _export_unet, "unet_cond": _export_unet_cond, "controlnet": _export_controlnet, "lora": _export_lora,
           "dreambooth": _export_dreambooth, "vae": _export_vae}


def export_workdir(workdir: str, target: str) -> str:
    """Write WORKDIR's trained model as a diffusers folder at TARGET (module doc); returns its model.name."""
    workdir, target = os.fspath(workdir), os.fspath(target)
    if os.path.exists(target) and (not os.path.isdir(target) or os.listdir(target)):
        raise FileExistsError(f"--to {target!r} exists and is not an empty folder; give a new folder")
    config = load_workdir_config(workdir)
    name = "vae" if "vae" in config and "model" not in config else (config.get("model") or {}).get("name", "unet")
    if name not in EXPORTS:
        raise ValueError(f"model.name={name!r} cannot be exported to diffusers; export takes {sorted(EXPORTS)}")
    EXPORTS[name](workdir, target)
    return name
