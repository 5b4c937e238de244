"""A diffusers unconditional `UNet2DModel` (DDPM: google/ddpm-cifar10-32, ddpm-celebahq-256, ...) turned into a
project training workdir, so that `diffusion-jax sample / edit / compare / likelihood --workdir` use it exactly as
they use a run trained here.

    convert_unet2d("path/to/ddpm-cifar10-32", "workdirs/ddpm_cifar10")      # once; nothing is downloaded
    diffusion-jax sample --workdir workdirs/ddpm_cifar10 --sampler ddim --steps 50 --num 64 --out cifar.png

Source layouts (local folders):
  model folder (google/ddpm-cifar10-32): config.json (_class_name UNet2DModel), diffusion_pytorch_model.safetensors
    (or .bin), scheduler_config.json, all at the root;
  pipeline folder (DDPMPipeline.save_pretrained): model_index.json, unet/ (config.json + weights),
    scheduler/scheduler_config.json.
Target workdir (`convert_unet2d`; an existing non-empty folder is refused):
  config.json        the resolved `Experiment` (as `train.loop.write_config` writes it);
  checkpoints/0/     the trainer's orbax TrainState: params = ema_params = the converted weights, opt_state = the
                     config's optimizer at init, step 0 (`train.checkpoint.load_trained` restores it);
  imported_from.json the source folder and its two diffusers configs, as read.
ScoreSdeVePipeline folders (google/ncsnpp-*: Skip*Block2D, Fourier time embedding, ScoreSdeVeScheduler) become VE-SDE
workdirs: schedule kind "ve" (sigma_min, sigma_max), loss.prediction "score" (the network's output / sigma), sampled
by sampler "pc" (predictor-corrector, as ScoreSdeVePipeline) with t-uniform steps; its snr / correct_steps are
logged, not imported. A class_embed_type network (it needs per-sample class_labels) and schedulers without a beta table
are refused.
The experiment: model = `unet_config_from_diffusers(config.json, weights)`; schedule (kind "discrete") and
loss.prediction from scheduler_config.json (`stable_diffusion.schedule_from_diffusers`); sample.variance from
variance_type (fixed_small / fixed_large; learned variances are refused), sample.clip_denoised from clip_sample /
clip_sample_range, sample.spacing from timestep_spacing. data: image_size from the model; name / data_dir as given,
by default name "folder" with data_dir TARGET/data (which need not exist: only `compare`, `likelihood` and further
training read data, so put real images there or pass e.g. data={"name": "tfds:cifar10", "data_dir": ...}; compare
scores such data with `--extractor inception:PATH`, its classifier extractor knowing only digits / fashion_mnist).
optim / train: the library's defaults (Ho et al.'s), used only if the workdir is trained further.
Timesteps: a scheduler_config.json with steps_offset=1 moves diffusers' "leading" timesteps up by one while ours do
not; "trailing" and "linspace" match diffusers exactly (as for Stable Diffusion, `stable_diffusion` module doc).
"""
from __future__ import annotations

import dataclasses
import logging
import os

import jax
import jax.numpy as jnp
from flax import nnx

from diffusion_jax import fileio
from diffusion_jax.config import Experiment
from diffusion_jax.inference.pipelines.stable_diffusion import schedule_from_diffusers
from diffusion_jax.models.convert_diffusers import convert_diffusers_unet, unet_config_from_diffusers
from diffusion_jax.models.weights_io import read_model_folder

log = logging.getLogger(__name__)

UNET_CLASS = "UNet2DModel"
SCORE_SDE_VE = "ScoreSdeVeScheduler"
# diffusers DDPMScheduler variance_type -> sample.variance (the *_log forms are the same variances)
_VARIANCES = {"fixed_small": "fixed_small", "fixed_small_log": "fixed_small", "fixed_large": "fixed_large",
              "fixed_large_log": "fixed_large"}
DIFFUSERS_SPACINGS = ("leading", "trailing", "linspace")   # timestep_spacing values that ours match


def is_unet2d_folder(folder: str) -> bool:
    """Whether `folder` holds a diffusers UNet2DModel in one of the two layouts of the module doc."""
    for config in (os.path.join(folder, "config.json"), os.path.join(folder, "unet", "config.json")):
        if os.path.isfile(config):
            return (fileio.read_json(config) or {}).get("_class_name") == UNET_CLASS
    return False


def scheduler_config_path(folder: str) -> str:
    """scheduler_config.json at the root (google layout) or in scheduler/ (pipeline layout); FileNotFoundError
    naming both places otherwise."""
    for path in (os.path.join(folder, "scheduler_config.json"),
                 os.path.join(folder, "scheduler", "scheduler_config.json")):
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"no scheduler_config.json in {folder} or {os.path.join(folder, 'scheduler')}: a "
                            f"{UNET_CLASS} folder needs its scheduler's config for the noise schedule")


def sample_from_diffusers(cfg: dict) -> dict:
    """The `SampleConfig` fields a diffusers scheduler_config.json sets (variance, clip_denoised, spacing)."""
    variance = cfg.get("variance_type", "fixed_small")
    if variance not in _VARIANCES:
        raise ValueError(f"scheduler_config.json: variance_type={variance!r} is not supported (a learned variance "
                         f"needs the improved-DDPM output head); one of {tuple(_VARIANCES)}")
    clip = float(cfg.get("clip_sample_range", 1.0)) if cfg.get("clip_sample", True) else 0.0
    if cfg.get("thresholding", False):
        log.warning("scheduler_config.json: thresholding (dynamic thresholding) is not imported; sampling clips "
                    "x0-hat to [-%g, %g] instead", clip, clip)
    sample = {"variance": _VARIANCES[variance], "clip_denoised": clip}
    spacing = cfg.get("timestep_spacing", "leading")
    if spacing in DIFFUSERS_SPACINGS:
        sample["spacing"] = spacing
    if sample.get("spacing", "leading") == "leading" and cfg.get("steps_offset", 0):
        log.warning("scheduler_config.json: steps_offset=%s moves diffusers' 'leading' timesteps up by that much; "
                    "ours do not ('trailing' and 'linspace' match diffusers exactly)", cfg["steps_offset"])
    return sample


def _process_from_diffusers(cfg: dict) -> tuple[dict, str, dict]:
    """(the "schedule", loss.prediction, "sample" sections) of a scheduler_config.json: a DDPM beta table (any
    scheduler class with one, or no _class_name) or ScoreSdeVeScheduler's VE SDE (the score of an NCSN++ model, output
    / sigma: sigma_min, sigma_max; sampled by predictor-corrector, as ScoreSdeVePipeline does). Others are refused."""
    from diffusion_jax.samplers.diffusers_schedulers import SCHEDULERS

    name = cfg.get("_class_name")
    if name == SCORE_SDE_VE:
        log.warning("scheduler_config.json: %s's snr=%s, correct_steps=%s and sampling_eps=%s are not imported: "
                    "sampler 'pc' uses its own (snr 0.16, one corrector step, the grid's t_min)", name,
                    cfg.get("snr", 0.15), cfg.get("correct_steps", 1), cfg.get("sampling_eps", 1e-5))
        schedule = {"kind": "ve", "sigma_min": float(cfg.get("sigma_min", 0.01)),
                    "sigma_max": float(cfg.get("sigma_max", 1348.0))}
        return schedule, "score", {"sampler": "pc", "steps": 1000, "spacing": "uniform", "clip_denoised": 0.0}
    if name is not None and "beta_schedule" not in getattr(SCHEDULERS.get(name), "defaults", {}):
        raise ValueError(f"scheduler_config.json: _class_name={name!r} has no DDPM beta table; convert takes a "
                         f"scheduler with beta_schedule (e.g. DDPMScheduler) or {SCORE_SDE_VE}")
    schedule, prediction = schedule_from_diffusers(cfg)
    return {"kind": "discrete", **schedule}, prediction, sample_from_diffusers(cfg)


def experiment_from_diffusers(unet_cfg: dict, scheduler_cfg: dict, *, data: dict, state_dict=None) -> Experiment:
    """The validated `Experiment` of a UNet2DModel config.json and its scheduler_config.json (module doc).

    data: `DataConfig` fields (name, data_dir, ...); image_size is the model's. state_dict: the weights (needed for
    time_embedding_type "fourier"). Errors name the diffusers key."""
    if unet_cfg.get("sample_size") is None:
        raise ValueError("config.json: sample_size (the image size) is missing")
    if unet_cfg.get("class_embed_type") is not None:
        raise ValueError(f"config.json: class_embed_type={unet_cfg['class_embed_type']!r} conditions on per-sample "
                         "class_labels that the project's samplers do not pass; models.convert_diffusers_unet maps "
                         "such a network for direct use")
    model = unet_config_from_diffusers(unet_cfg, state_dict)
    schedule, prediction, sample = _process_from_diffusers(scheduler_cfg)
    if (schedule["kind"] == "ve") != model.scale_by_sigma:
        raise ValueError(f"config.json: time_embedding_type={unet_cfg.get('time_embedding_type', 'positional')!r} "
                         f"does not go with scheduler_config.json's {scheduler_cfg.get('_class_name')}: a "
                         f"{SCORE_SDE_VE} needs the Fourier-embedded score network (output / sigma), and only it")
    raw = {"seed": 0, "data": {**data, "image_size": model.image_size}, "model": dataclasses.asdict(model),
           "schedule": schedule, "loss": {"prediction": prediction}, "sample": sample}
    return Experiment.from_config(raw)


def initial_state(exp: Experiment, params: dict):
    """The TrainState a run of `exp` would start from (`train.state.make_init_fn`), with `params` (the pure dict of
    `UNet(exp.model)`'s params, which is the trained network of a discrete schedule) as both params and EMA:
    opt_state = the optimizer's init, step 0, the run's state key. `load_trained` restores it (tests check)."""
    from diffusion_jax.train.state import TrainState, make_optimizer

    tx, _ = make_optimizer(exp.optim, exp.train.steps, exp.model)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params, opt_state=tx.init(params),
                      key=jax.random.split(jax.random.PRNGKey(exp.seed))[1])   # make_init_fn's state key


def convert_unet2d(source: str, target: str, *, data: dict | None = None) -> Experiment:
    """Convert a diffusers UNet2DModel folder (either layout of the module doc) into a training workdir at `target`.

    data: the workdir's `DataConfig` fields (default {"name": "folder", "data_dir": TARGET/data}).
    Returns the workdir's Experiment. FileExistsError if `target` exists and is not an empty folder;
    FileNotFoundError naming the missing folder or file; ValueError naming an unsupported diffusers setting."""
    from diffusion_jax.train.checkpoint import Checkpointer
    from diffusion_jax.train.loop import write_config

    source, target = os.fspath(source), os.fspath(target)
    if os.path.exists(target) and (not os.path.isdir(target) or os.listdir(target)):
        raise FileExistsError(f"{target!r} exists and is not an empty folder; give a new workdir")
    if not os.path.isdir(source):
        raise FileNotFoundError(f"{UNET_CLASS} folder {source!r} does not exist")
    scheduler_path = scheduler_config_path(source)
    unet_cfg, state_dict = read_model_folder(source, "unet", UNET_CLASS)
    if unet_cfg.get("_class_name", UNET_CLASS) != UNET_CLASS:
        raise ValueError(f"{source}: config.json describes a {unet_cfg['_class_name']}, not a {UNET_CLASS}")
    scheduler_cfg = fileio.read_json(scheduler_path)
    if not isinstance(scheduler_cfg, dict):
        raise ValueError(f"{scheduler_path} is not a JSON object")
    if data is None:
        data = {"name": "folder", "data_dir": os.path.join(os.path.abspath(target), "data")}
    exp = experiment_from_diffusers(unet_cfg, scheduler_cfg, data=data, state_dict=state_dict)
    params = nnx.to_pure_dict(convert_diffusers_unet(state_dict, exp.model))
    state = initial_state(exp, params)

    os.makedirs(target, exist_ok=True)
    write_config(target, exp)
    ckpt = Checkpointer(target, async_save=False)
    try:
        ckpt.save(0, state, exp.to_dict())
        ckpt.wait()
    finally:
        ckpt.close()
    fileio.write_json(os.path.join(target, "imported_from.json"),
                      {"format": f"diffusers {UNET_CLASS}", "source": os.path.abspath(source),
                       "unet_config": unet_cfg, "scheduler_config": scheduler_cfg})
    return exp
