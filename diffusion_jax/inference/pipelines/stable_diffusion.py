"""A Stable Diffusion 1.x / 2.x folder (diffusers' `save_pretrained` layout) as a `TextToImage` model, and the
project's converted form of it (`convert`, read back by `load_text_to_image`).

    model = load_text_to_image("path/to/stable-diffusion-v1-5")      # a diffusers folder or a converted one
    images, nfe = generate(model, ["a photo of a cat"], SamplerSpec("dpmpp_2m", 20, clip_denoised=None,
                                                                      guidance_scale=7.5))

Diffusers folder: model_index.json, unet/ (UNet2DConditionModel), vae/ (AutoencoderKL), text_encoder/
(transformers CLIPTextModel), tokenizer/ (vocab.json + merges.txt), scheduler/scheduler_config.json. The prompt
embedding is CLIP's last hidden state (B, 77, D), as diffusers' StableDiffusionPipeline uses it; the unconditional
branch of guidance embeds the negative prompt ("" by default). Timesteps: SD 1.x scheduler configs carry
steps_offset=1, which moves diffusers' "leading" timesteps up by one (801, 601, ... for 5 of 1000); our
"leading" starts at 0, so the two differ by that one-step shift, while "trailing" and "linspace" (which ignore
steps_offset) match diffusers exactly.
Converted folder (`convert`): pipeline.json (the typed configs, schedule and prediction), params/ (one orbax
checkpoint of {"unet", "vae", "text"}), tokenizer/.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable

import jax
import numpy as np
import orbax.checkpoint as ocp

from diffusion_jax import fileio
from diffusion_jax.inference.pipelines.latent import LatentPipeline, make_pipeline
from diffusion_jax.inference.sampling import SamplerSpec
from diffusion_jax.models.convert_unet_cond import load_unet_cond, unet_cond_graphdef
from diffusion_jax.models.convert_vae import load_vae
from diffusion_jax.models.functional import abstract_params
from diffusion_jax.models.text.clip import CLIPTextConfig, CLIPTextModel, make_clip_apply
from diffusion_jax.models.text.clip_tokenizer import CLIPTokenizer
from diffusion_jax.models.text.convert import load_clip_text
from diffusion_jax.models.unet_cond import UNetCond, UNetCondConfig
from diffusion_jax.models.vae import VAE, VAEConfig
from diffusion_jax.process.discrete import make_schedule
from diffusion_jax.samplers.diffusers_levels import DIFFUSERS_BETAS, DIFFUSERS_PREDICTIONS  # their names -> ours

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


@dataclasses.dataclass(frozen=True, eq=False)
class TextToImage:
    """A loaded text-to-image model: the latent pipeline, its params {"unet", "vae", "text"} and the text side.

    encode(prompts) -> (N, L, D) float32 prompt embeddings (`clip_prompt_encoder`). image_size: the default
    (H, W), the U-Net's sample_size times the VAE's factor."""

    pipe: LatentPipeline
    params: dict
    encode: Callable[[list[str]], np.ndarray]
    image_size: tuple[int, int]
    configs: dict  # {"unet": UNetCondConfig, "vae": VAEConfig, "text": CLIPTextConfig, "schedule": dict}


def schedule_from_diffusers(cfg: dict) -> tuple[dict, str]:
    """A diffusers scheduler_config.json dict -> (make_schedule kwargs, prediction). Errors name the key."""
    name = cfg.get("beta_schedule", "linear")
    if cfg.get("trained_betas") is not None:
        raise ValueError("scheduler_config.json: trained_betas (a custom beta table) is not supported")
    if name not in DIFFUSERS_BETAS:
        raise ValueError(f"scheduler_config.json: beta_schedule={name!r} is not supported; one of "
                         f"{tuple(DIFFUSERS_BETAS)}")
    kind = cfg.get("prediction_type", "epsilon")
    if kind not in DIFFUSERS_PREDICTIONS:
        raise ValueError(f"scheduler_config.json: prediction_type={kind!r} is not supported; one of "
                         f"{tuple(DIFFUSERS_PREDICTIONS)}")
    schedule = {"name": DIFFUSERS_BETAS[name], "num_timesteps": int(cfg.get("num_train_timesteps", 1000)),
                "zero_terminal_snr": bool(cfg.get("rescale_betas_zero_snr", False))}
    if name != "squaredcos_cap_v2":
        schedule.update(beta_start=float(cfg.get("beta_start", 1e-4)), beta_end=float(cfg.get("beta_end", 0.02)))
    return schedule, DIFFUSERS_PREDICTIONS[kind]


def clip_prompt_encoder(tokenizer: CLIPTokenizer, graphdef, params, max_length: int) -> Callable:
    """encode(prompts) -> CLIP's last hidden state (N, max_length, D) float32 numpy, jitted."""
    apply = jax.jit(make_clip_apply(graphdef))

    def encode(prompts):
        ids = tokenizer(list(prompts), max_length=max_length)["input_ids"]
        return np.asarray(apply(params, ids)["last_hidden_state"], np.float32)

    return encode


def _pad_token(folder: str) -> str:
    """The tokenizer's pad token (SD 1.x pads with the end token, SD 2.x with "!")."""
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = os.path.join(folder, name)
        if os.path.exists(path):
            pad = fileio.read_json(path).get("pad_token")
            if pad is not None:
                return pad["content"] if isinstance(pad, dict) else pad
    return "<|endoftext|>"


def _assemble(configs: dict, params: dict, tokenizer: CLIPTokenizer) -> TextToImage:
    unet, vae, text = configs["unet"], configs["vae"], configs["text"]
    pipe = LatentPipeline(unet_cond_graphdef(unet), vae, make_schedule(**configs["schedule"]),
                          prediction=configs["prediction"], guidance_input=unet.time_cond_proj_dim is not None)
    text_graphdef = abstract_params(lambda rngs: CLIPTextModel(text, rngs=rngs))[0]
    encode = clip_prompt_encoder(tokenizer, text_graphdef, params["text"], text.max_position_embeddings)
    size = (unet.sample_size or 64) * vae.downsample_factor
    return TextToImage(pipe, params, encode, (size, size), configs)


def load_diffusers_pipeline(folder: str) -> TextToImage:
    """A diffusers Stable Diffusion folder (module doc) -> TextToImage. Errors name the missing component."""
    if not os.path.isfile(os.path.join(folder, "model_index.json")):
        raise FileNotFoundError(f"{folder!r} has no model_index.json: not a diffusers pipeline folder")
    for name in COMPONENTS:
        if not os.path.isdir(os.path.join(folder, name)):
            raise FileNotFoundError(f"diffusers folder {folder!r} lacks its {name}/ component")
    unet, unet_params = load_unet_cond(os.path.join(folder, "unet"))
    vae, vae_params = load_vae(os.path.join(folder, "vae"))
    text, _, text_params = load_clip_text(os.path.join(folder, "text_encoder"))
    scheduler = fileio.read_json(os.path.join(folder, "scheduler", "scheduler_config.json"))
    schedule, prediction = schedule_from_diffusers(scheduler)
    tok_dir = os.path.join(folder, "tokenizer")
    tokenizer = CLIPTokenizer.from_vocab(tok_dir, pad_token=_pad_token(tok_dir))
    configs = {"unet": unet, "vae": vae, "text": text, "schedule": schedule, "prediction": prediction}
    return _assemble(configs, {"unet": unet_params, "vae": vae_params, "text": text_params}, tokenizer)


def convert(source: str, target: str) -> TextToImage:
    """Convert a diffusers folder into the project's form at `target` (module doc); refuses to overwrite."""
    if os.path.exists(target) and os.listdir(target):
        raise FileExistsError(f"{target!r} exists and is not empty; give a new folder")
    model = load_diffusers_pipeline(source)
    os.makedirs(target, exist_ok=True)
    c = model.configs
    meta = {"format": "diffusion_jax.text_to_image", "unet": dataclasses.asdict(c["unet"]),
            "vae": dataclasses.asdict(c["vae"]), "text": dataclasses.asdict(c["text"]),
            "schedule": c["schedule"], "prediction": c["prediction"], "source": os.path.abspath(source)}
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(os.path.abspath(os.path.join(target, "params")), model.params)
    model_tok = os.path.join(source, "tokenizer")
    CLIPTokenizer.from_vocab(model_tok).save_vocab(os.path.join(target, "tokenizer"))
    meta["pad_token"] = _pad_token(model_tok)
    fileio.write_json(os.path.join(target, "pipeline.json"), meta)
    return model


def load_converted(folder: str) -> TextToImage:
    """A folder written by `convert` -> TextToImage."""
    meta = fileio.read_json(os.path.join(folder, "pipeline.json"))
    if meta.get("format") != "diffusion_jax.text_to_image":
        raise ValueError(f"{folder}/pipeline.json is not a converted text-to-image model (format "
                         f"{meta.get('format')!r})")
    configs = {"unet": UNetCondConfig(**meta["unet"]), "vae": VAEConfig(**meta["vae"]),
               "text": CLIPTextConfig(**meta["text"]), "schedule": meta["schedule"], "prediction": meta["prediction"]}
    abstract = {"unet": abstract_params(lambda rngs: UNetCond(configs["unet"], rngs=rngs))[1],
                "vae": abstract_params(lambda rngs: VAE(configs["vae"], rngs=rngs))[1],
                "text": abstract_params(lambda rngs: CLIPTextModel(configs["text"], rngs=rngs))[1]}
    with ocp.StandardCheckpointer() as ckpt:
        params = ckpt.restore(os.path.abspath(os.path.join(folder, "params")), abstract)
    tokenizer = CLIPTokenizer.from_vocab(os.path.join(folder, "tokenizer"), pad_token=meta["pad_token"])
    return _assemble(configs, params, tokenizer)


def load_text_to_image(folder: str) -> TextToImage:
    """A converted folder (pipeline.json) or a diffusers one (model_index.json). A text-conditioned latent
    diffusion run of this project (config.json) loads with `train.latent.load_text_to_image`, which takes all three."""
    if os.path.isfile(os.path.join(folder, "pipeline.json")):
        return load_converted(folder)
    if os.path.isfile(os.path.join(folder, "model_index.json")):
        return load_diffusers_pipeline(folder)
    raise FileNotFoundError(f"{folder!r} holds neither pipeline.json (a converted model), model_index.json (a "
                            "diffusers Stable Diffusion folder) nor config.json (a latent diffusion run)")


def generate(model: TextToImage, prompts: list[str], spec: SamplerSpec, *, task: str = "txt2img",
             negative_prompt: str = "", seed: int = 0, image=None, mask=None, strength: float | None = None,
             image_size: tuple[int, int] | None = None, latents=None, mesh=None, control: dict | None = None,
             guess_mode: bool = False) -> tuple[np.ndarray, int]:
    """One image per prompt with `latent.make_pipeline` -> (images (N, H, W, 3) in [-1, 1], NFE); the
    unconditional branch of guidance embeds `negative_prompt`. latents: txt2img's z_T (default from seed).
    control / guess_mode: a model with ControlNets (`with_controlnets`), as `latent.make_pipeline` takes them."""
    if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r}")
    if control is not None and "controlnets" not in model.configs:
        raise ValueError("control images need ControlNets: load them with with_controlnets (generate --controlnet)")
    size = tuple(image_size or model.image_size)
    run = make_pipeline(model.pipe, spec, task, num=len(prompts), image_size=size, strength=strength, mesh=mesh,
                        guess_mode=guess_mode)
    if negative_prompt and model.pipe.guidance_input:
        raise ValueError(f"negative_prompt={negative_prompt!r}: this U-Net takes the guidance weight as input (a "
                         "guidance-distilled student) and runs no unconditional branch to embed it in")
    context = model.encode(prompts)
    null = model.encode([negative_prompt]) if spec.guidance_scale != 1.0 and not model.pipe.guidance_input else None
    return run(model.params, jax.random.PRNGKey(seed), context, null, image=image, mask=mask, latents=latents,
               control=control)


def with_controlnets(model: TextToImage, folders) -> TextToImage:
    """The model with diffusers ControlNetModel folders (or `diffusion-jax export`s of the project's) attached to
    its U-Net (`models.controlnet.ControlledUNet`; several: residuals summed). Each must have been made for this
    U-Net: ValueError naming the first setting that differs. configs["controlnets"] holds their ControlNetConfigs
    (control_size, conditioning_channels)."""
    from flax import nnx

    from diffusion_jax.models.controlnet import ControlledUNet
    from diffusion_jax.models.convert_controlnet import load_controlnet, unet_differences
    from diffusion_jax.models.unet_cond_backbone import UNetCondBackboneConfig

    if "unet" in model.configs:   # a Stable Diffusion folder: a bare UNetCond
        unet, base_params = model.configs["unet"], {"net": model.params["unet"]}
    else:                         # a latent run of this project: a unet_cond backbone
        section = {k: tuple(v) if isinstance(v, list) else v for k, v in model.configs["experiment"]["model"].items()}
        unet, base_params = UNetCondBackboneConfig(**section).diffusers_config(), model.params["unet"]
    latent = model.image_size[0] // model.pipe.vae.downsample_factor
    loaded = [load_controlnet(folder, sample_size=latent) for folder in folders]
    fields = [f.name for f in dataclasses.fields(unet) if f.name not in ("sample_size", "dtype", "dropout")]
    for folder, (config, _) in zip(folders, loaded):
        for name, a, b in unet_differences(config.base.diffusers_config(), unet, fields)[:1]:
            raise ValueError(f"ControlNet {folder!r} was made for another U-Net: its {name}={a!r}, the model's {b!r}")
    configs = tuple(dataclasses.replace(c, base=dataclasses.replace(c.base, dtype=unet.dtype)) for c, _ in loaded)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: ControlledUNet(configs[0], rngs=nnx.Rngs(0),
                                                                  controlnet_configs=configs)))
    params = dict(model.params, unet={"base": base_params, "controlnets": {i: p for i, (_, p) in enumerate(loaded)}})
    return dataclasses.replace(model, pipe=dataclasses.replace(model.pipe, unet_graphdef=graphdef), params=params,
                               configs=dict(model.configs, controlnets=configs))

