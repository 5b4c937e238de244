"""A training run of any registered backbone: model.name's kind (`models.registry`) picks the run's config schema
and the objective that trains it; both go through the one host loop (`runner.run_job`).

    run = load_run("configs/vae.py:debug", ["train.steps=20"])     # an Experiment or a train.vae.VAERun
    train(run, workdir)            # diffusion: the final TrainState; autoencoder: eval.json's dict

    kind          config schema          trained by
    denoiser      config.Experiment      loop.train_and_evaluate (a diffusion objective, sample grids)
    autoencoder   train.vae.VAERun       vae.train_vae (reconstruction + KL (+ PatchGAN); vae.json, eval.json)
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

from diffusion_jax.config import Experiment, apply_overrides, load_config_file
from diffusion_jax.models.registry import backbone
from diffusion_jax.train.loop import train_and_evaluate
from diffusion_jax.train.metrics import read_metrics
from diffusion_jax.train.vae import VAERun, train_vae


def _diffusion_summary(state, workdir: str) -> str:
    rows = [r for r in read_metrics(workdir) if "loss" in r]
    loss = (f": loss {rows[0]['loss']:.4f} (step {rows[0]['step']}) -> {rows[-1]['loss']:.4f} (step "
            f"{rows[-1]['step']})" if rows else "")
    return f"trained to step {int(state.step)}{loss}; workdir {workdir}"


def _autoencoder_summary(result: dict, workdir: str) -> str:
    return (f"VAE trained to step {result['steps']}: held-out PSNR {result['psnr']:.2f} dB on {result['eval_num']} "
            f"'{result['eval_split']}' images (train {result['psnr_train']:.2f} dB), scaling factor "
            f"{result['scaling_factor']:.4f}; workdir {workdir}")


@dataclasses.dataclass(frozen=True)
class RunKind:
    schema: type                  # SECTIONS, section_class(name, values), from_config(ConfigDict)
    train: Callable               # train(run, workdir, *, progress) -> result
    summary: Callable             # summary(result, workdir) -> the line the CLI prints


RUN_KINDS = {"denoiser": RunKind(Experiment, train_and_evaluate, _diffusion_summary),
             "autoencoder": RunKind(VAERun, train_vae, _autoencoder_summary)}


def _model_name(config, overrides: Sequence[str]) -> str:
    name = (config.get("model") or {}).get("name", "unet")
    for item in overrides:
        key, _, value = item.partition("=")
        if key == "model.name":
            name = value
    return name


def load_run(spec: str, overrides: Sequence[str] = ()):
    """Config file (`path.py` or `path.py:arg`) + overrides -> the validated run of its model.name's kind."""
    config = load_config_file(spec)
    schema = RUN_KINDS[backbone(_model_name(config, overrides)).kind].schema
    return schema.from_config(apply_overrides(config, overrides, run_class=schema))


def kind_of(run) -> RunKind:
    return RUN_KINDS[backbone(run.model.name).kind]


def train(run, workdir: str, *, progress: bool = True):
    """Train `run` (from `load_run`) in WORKDIR, resuming from its latest checkpoint."""
    return kind_of(run).train(run, workdir, progress=progress)
