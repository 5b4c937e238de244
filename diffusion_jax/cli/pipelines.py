"""The `generate`, `convert` and `export` subcommands of `diffusion-jax` (registered by diffusion_jax/cli/main.py).

    diffusion-jax convert  --from path/to/stable-diffusion-v1-5 --to models/sd15        # or a DDPM UNet2DModel
    diffusion-jax export   --workdir workdirs/digits --to exported/digits               # the way back (train.export)
    diffusion-jax generate --workdir models/sd15 --prompt "a photo of a cat" --prompt "a boot" \\
        --sampler dpmpp_2m --steps 20 --guidance 7.5 --num-per-prompt 2 --seed 0 --out cats.png
    diffusion-jax generate --workdir models/sd15 --prompt "a watercolour" --task img2img --image in.png --strength 0.6
    diffusion-jax generate --workdir models/sd15 --prompt "a red hat" --task inpaint --image in.png --mask hole.png

convert reads a local diffusers folder: a Stable Diffusion pipeline (model_index.json + text_encoder/ ...) becomes a
converted text-to-image folder (`stable_diffusion.convert`); a UNet2DModel (google/ddpm-cifar10-32's layout, or a
DDPMPipeline folder) becomes a training workdir that `sample`, `edit` and `compare` take (`ddpm_import`).
generate runs a text-to-image model (any folder `train.latent.load_text_to_image` takes) and writes a PNG grid
plus one PNG per image (OUT_000.png, ...); without --out they go to WORKDIR/generated/<first prompt>_<task>_seed<N>.png.
The handlers take (args, overrides) as every handler of diffusion_jax/cli/main.py does; they import the library lazily.
"""
from __future__ import annotations

import os
import re

_LAYOUTS = ("a diffusers Stable Diffusion pipeline folder (model_index.json with unet/ vae/ text_encoder/ tokenizer/ "
            "scheduler/), a diffusers UNet2DModel folder (config.json with _class_name UNet2DModel + "
            "diffusion_pytorch_model.safetensors or .bin + scheduler_config.json, as google/ddpm-cifar10-32) or a "
            "DDPMPipeline folder (model_index.json with unet/ and scheduler/)")


def detect_layout(folder: str) -> str:
    """"stable_diffusion" or "unet2d": which converter takes `folder`; FileNotFoundError / ValueError otherwise."""
    from diffusion_jax.train.ddpm_import import is_unet2d_folder

    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--from folder {folder!r} does not exist")
    index = os.path.join(folder, "model_index.json")
    if os.path.isfile(index) and ("text_encoder" in _read_json(index) or os.path.isdir(os.path.join(folder,
                                                                                                   "text_encoder"))):
        return "stable_diffusion"
    if is_unet2d_folder(folder):
        return "unet2d"
    raise ValueError(f"--from {folder!r} is not a layout convert takes; it takes {_LAYOUTS}")


def _read_json(path: str) -> dict:
    from diffusion_jax import fileio

    value = fileio.read_json(path)
    if not isinstance(value, dict):
        raise ValueError(f"{path} is not a JSON object")
    return value


def _convert(args, overrides) -> None:
    if overrides:
        raise ValueError(f"convert takes no --config.* overrides (got {overrides}); its options are flags")
    source, target = args.source, args.target
    kind = detect_layout(source)
    if kind != "unet2d" and (args.data is not None or args.data_dir is not None):
        raise ValueError("--data / --data-dir are for a UNet2DModel source (a training workdir), not a Stable "
                         "Diffusion pipeline")
    if args.data_dir is not None and args.data is None:
        raise ValueError("--data-dir needs --data NAME (e.g. --data folder or --data tfds:cifar10)")
    try:
        if kind == "stable_diffusion":
            from diffusion_jax.inference.pipelines.stable_diffusion import convert

            model = convert(source, target)
            c = model.configs
            print(f"Stable Diffusion pipeline {source} -> {target}: pipeline.json ({model.image_size[0]}x"
                  f"{model.image_size[1]} images, schedule {c['schedule']['name']}, prediction {c['prediction']}), "
                  f"params/ (orbax: unet, vae, text), tokenizer/\n"
                  f"run it: diffusion-jax generate --workdir {target} --prompt '...'")
            return
        from diffusion_jax.train.ddpm_import import convert_unet2d

        data = None if args.data is None else {"name": args.data, "data_dir": args.data_dir}
        exp = convert_unet2d(source, target, data=data)
    except FileExistsError as e:   # main() reports ValueError / FileNotFoundError as bad input (exit 2)
        raise ValueError(str(e)) from None
    m, s = exp.model, exp.schedule
    print(f"UNet2DModel {source} -> training workdir {target}: config.json ({m.image_size}x{m.image_size}x"
          f"{m.in_channels}, channels {m.channels} x {m.channel_mult}, T={s.num_timesteps} {s.name}, prediction "
          f"{exp.loss.prediction}; data {exp.data.name} {exp.data.data_dir or ''}), checkpoints/0 (orbax TrainState, "
          f"params = EMA = the diffusers weights), imported_from.json\n"
          f"sample it: diffusion-jax sample --workdir {target} --sampler ddim --steps 50 --num 16")


def add_convert_parser(sub) -> None:
    p = sub.add_parser("convert", help="convert a local diffusers folder (Stable Diffusion, or a DDPM UNet2DModel)",
                       epilog=f"--from takes {_LAYOUTS}. Stable Diffusion becomes a text-to-image folder for "
                              "generate; a UNet2DModel a training workdir for sample / edit / compare. --to must be a "
                              "new or empty folder.")
    p.add_argument("--from", dest="source", required=True, metavar="DIR", help="the diffusers folder")
    p.add_argument("--to", dest="target", required=True, metavar="DIR", help="the new folder")
    p.add_argument("--data", default=None, metavar="NAME",
                   help="UNet2DModel only: the workdir's data.name, read by compare / likelihood / further training "
                        "(e.g. tfds:cifar10; default folder, with --data-dir TO/data)")
    p.add_argument("--data-dir", default=None, metavar="DIR", help="UNet2DModel only: the workdir's data.data_dir")
    p.set_defaults(func=_convert)


def _export(args, overrides) -> None:
    if overrides:
        raise ValueError(f"export takes no --config.* overrides (got {overrides}); its options are flags")
    from diffusion_jax.train.export import export_workdir

    try:
        name = export_workdir(args.workdir, args.target)
    except FileExistsError as e:   # main() reports ValueError / FileNotFoundError as bad input (exit 2)
        raise ValueError(str(e)) from None
    what = ("DDPMPipeline folder: model_index.json, unet/ (UNet2DModel, EMA params), scheduler/ (DDPMScheduler)"
            if name == "unet" else "AutoencoderKL folder: config.json (with the run's scaling_factor), weights")
    print(f"{name} run {args.workdir} -> diffusers {what} at {args.target}\n"
          f"load it: diffusers.{'DDPMPipeline' if name == 'unet' else 'AutoencoderKL'}.from_pretrained("
          f"{args.target!r})")


def add_export_parser(sub) -> None:
    p = sub.add_parser("export", help="write a trained workdir as a diffusers folder (from_pretrained loads it)",
                       epilog="model.name unet (discrete schedule) -> DDPMPipeline folder; vae -> AutoencoderKL "
                              "folder. --to must be a new or empty folder.")
    p.add_argument("--workdir", required=True, help="a training workdir (diffusion-jax train)")
    p.add_argument("--to", dest="target", required=True, metavar="DIR", help="the new folder")
    p.set_defaults(func=_export)


def default_out(workdir: str, prompts: list[str], task: str, seed: int) -> str:
    """WORKDIR/generated/<first prompt, slugged>[-<N>prompts]_<task>_seed<seed>.png."""
    slug = re.sub(r"[^a-z0-9]+", "-", prompts[0].lower()).strip("-")[:48].strip("-") or "prompt"
    if len(prompts) > 1:
        slug += f"-{len(prompts)}prompts"
    return os.path.join(workdir, "generated", f"{slug}_{task}_seed{seed}.png")


def _check_generate_flags(args) -> None:
    """Flag combinations that are wrong whatever the model; checked before anything is loaded."""
    if args.num_per_prompt < 1:
        raise ValueError(f"--num-per-prompt must be >= 1, got {args.num_per_prompt}")
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    if args.strength is not None and args.task != "img2img":
        raise ValueError(f"--strength is for --task img2img only, got --task {args.task}")
    if args.image is None and args.task != "txt2img":
        raise ValueError(f"--task {args.task} needs --image PNG (the model's image size)")
    if args.image is not None and args.task == "txt2img":
        raise ValueError("--image is for --task img2img / inpaint / outpaint, not txt2img")
    if (args.mask is not None or args.invert_mask or args.mask_threshold is not None) and args.task not in (
            "inpaint", "outpaint"):
        raise ValueError(f"--mask / --invert-mask / --mask-threshold are for --task inpaint / outpaint, not "
                         f"{args.task}")
    if not os.path.isdir(args.workdir):
        raise FileNotFoundError(f"--workdir {args.workdir!r} does not exist")
    if args.scheduler_config is not None and (args.sampler or args.spacing):
        raise ValueError("--sampler / --spacing: the --scheduler-config chooses the sampler and its spacing; drop them")
    if args.scheduler_config is not None and args.task != "txt2img":
        raise ValueError(f"--scheduler-config samples --task txt2img only, got --task {args.task}")
    if len(args.control) != len(args.controlnet):
        raise ValueError(f"give one --control IMAGE per --controlnet DIR; got {len(args.control)} and "
                         f"{len(args.controlnet)}")
    if (args.conditioning_scale or args.guess_mode) and not args.controlnet:
        raise ValueError("--conditioning-scale / --guess-mode need --controlnet DIR and --control IMAGE")


def _generate(args, overrides) -> None:
    if overrides:
        raise ValueError(f"generate takes no --config.* overrides (got {overrides}); its options are flags")
    _check_generate_flags(args)

    import numpy as np
    from PIL import Image

    from diffusion_jax import viz
    from diffusion_jax.cli.options import control_note, control_scales, parse_option
    from diffusion_jax.fileio import atomic_write
    from diffusion_jax.inference.editing import load_image, load_mask
    from diffusion_jax.inference.editing.files import read_control
    from diffusion_jax.inference.pipelines.stable_diffusion import generate, with_controlnets
    from diffusion_jax.inference.sampling import SamplerSpec
    from diffusion_jax.train.latent import load_text_to_image

    options = dict(parse_option(o) for o in args.option)
    spec = SamplerSpec(args.sampler or "dpmpp_2m", args.steps, spacing=args.spacing or "leading", clip_denoised=None,
                       options=tuple(sorted(options.items())), guidance_scale=args.guidance,
                       scheduler_config=args.scheduler_config)
    # an unknown --option or a bad scheduler config is named before the model loads; the names are for the report
    if args.scheduler_config is None:
        spec.validate()
        args.sampler, args.spacing = spec.sampler, spec.spacing
    else:
        imported = spec.imported()
        args.sampler, args.spacing = f"{imported.scheduler} as {imported.sampler}", "its config's spacing"
    scales = control_scales(args.conditioning_scale, len(args.controlnet)) if args.controlnet else None
    model = load_text_to_image(args.workdir)
    control = None
    if args.controlnet:
        model = with_controlnets(model, args.controlnet)
        num = len(args.prompt) * args.num_per_prompt
        images = [read_control(path, c.control_size, c.conditioning_channels)
                  for path, c in zip(args.control, model.configs["controlnets"])]
        control = {"control": tuple(np.repeat(c, num, axis=0) for c in images), "conditioning_scale": scales}
    size, channels = tuple(model.image_size), model.pipe.vae.in_channels
    image = mask = None
    if args.image is not None:
        image = load_image(args.image, size=size, channels=channels)
    if args.mask is not None:
        mask = load_mask(args.mask, size=size, invert=args.invert_mask, threshold=args.mask_threshold)
    strength = args.strength if args.strength is not None or args.task != "img2img" else 0.8
    prompts = [p for p in args.prompt for _ in range(args.num_per_prompt)]
    images, nfe = generate(model, prompts, spec, task=args.task, negative_prompt=args.negative_prompt,
                           seed=args.seed, image=image, mask=mask, strength=strength, control=control,
                           guess_mode=args.guess_mode)
    out = args.out or default_out(args.workdir, args.prompt, args.task, args.seed)
    viz.save_grid(images, out, nrow=args.num_per_prompt if args.num_per_prompt > 1 else None)
    stem = os.path.splitext(out)[0]
    for i, x in enumerate(viz.to_uint8(images)):
        pixels = x[..., 0] if x.shape[-1] == 1 else x
        atomic_write(f"{stem}_{i:03d}.png", lambda f: Image.fromarray(pixels).save(f, format="PNG"))
    extra = (f", strength {strength:g}" if args.task == "img2img" else "") + control_note(control, args.guess_mode)
    print(f"{args.task} ({args.sampler}, {args.steps} steps, {args.spacing}, guidance {args.guidance:g}{extra}, "
          f"NFE {nfe}) of {len(args.prompt)} prompt(s) x {args.num_per_prompt}, {size[0]}x{size[1]}, seed "
          f"{args.seed}, from {args.workdir} -> {out} (grid, a row per prompt) and {stem}_000.png ... "
          f"{stem}_{len(prompts) - 1:03d}.png")


def add_generate_parser(sub) -> None:
    from diffusion_jax.inference.pipelines.latent import TASKS
    from diffusion_jax.samplers import SAMPLERS, SPACINGS

    p = sub.add_parser("generate", help="text-to-image (img2img, inpaint, outpaint) with a Stable Diffusion folder",
                       epilog="WORKDIR: anything train.latent.load_text_to_image takes. Masks: "
                              "white = keep, black = fill (--invert-mask for diffusers' white = fill); images and "
                              "masks must have the model's image size. Timesteps: 'trailing' and 'linspace' match "
                              "diffusers exactly; SD's 'leading' with steps_offset=1 is ours + 1.")
    p.add_argument("--workdir", required=True, help="text-to-image folder: convert's output, a diffusers SD folder or "
                                                     "a text-conditioned latent diffusion run (load_text_to_image)")
    p.add_argument("--prompt", action="append", required=True, help="repeatable: one grid row per prompt")
    p.add_argument("--negative-prompt", default="", help="the unconditional branch of guidance (default: '')")
    p.add_argument("--sampler", default=None, choices=sorted(SAMPLERS), help="default: dpmpp_2m")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--spacing", default=None, choices=list(SPACINGS), help="default: leading")
    p.add_argument("--scheduler-config", default=None, metavar="PATH",
                   help="sample as diffusers does with this scheduler_config.json (e.g. the SD folder's scheduler/) "
                        "instead of --sampler / --spacing")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance weight (1 = off)")
    p.add_argument("--option", action="append", default=[], metavar="NAME=VALUE",
                   help="any sampler option, repeatable, e.g. --option eta=1")
    p.add_argument("--num-per-prompt", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--task", default="txt2img", choices=list(TASKS))
    p.add_argument("--image", default=None, help="img2img / inpaint / outpaint input (PNG of the model's size)")
    p.add_argument("--mask", default=None, help="inpaint / outpaint mask (default: a centre hole / a border)")
    p.add_argument("--invert-mask", action="store_true", help="white = the area to fill (diffusers convention)")
    p.add_argument("--mask-threshold", type=int, default=None, help="gray >= this is known (antialiased masks)")
    p.add_argument("--strength", type=float, default=None, help="img2img: noise level in [0, 1] (default 0.8)")
    p.add_argument("--controlnet", action="append", default=[], metavar="DIR",
                   help="repeatable: a diffusers ControlNetModel folder (or an exported one) made for this U-Net")
    p.add_argument("--control", action="append", default=[], metavar="IMAGE",
                   help="repeatable, one per --controlnet: its control image at the output size (e.g. edges)")
    p.add_argument("--conditioning-scale", action="append", type=float, default=[], metavar="S",
                   help="ControlNet residual weight (default 1): once, or once per --controlnet")
    p.add_argument("--guess-mode", action="store_true", help="control only the prompted branch of guidance")
    p.add_argument("--out", default=None, help="PNG grid (default WORKDIR/generated/<prompt>_<task>_seed<N>.png); "
                                               "each image goes beside it as OUT_000.png, ...")
    p.set_defaults(func=_generate)
