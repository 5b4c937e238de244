"""The `sample` and `edit` subcommands of `diffusion-jax` (registered by diffusion_jax/cli/main.py): a trained
workdir's EMA network through any sampler, with classifier(-free) guidance, ControlNet control images or a LoRA file.

    diffusion-jax sample --workdir workdirs/digits --sampler dpmpp_2m --steps 10 --num 100 --out digits.png
    diffusion-jax sample --workdir workdirs/digits_controlnet --control-from digit.png --label 3
    diffusion-jax edit   --workdir workdirs/digits --task inpaint --image digit.png --mask mask.png --num 4
"""
from __future__ import annotations

from diffusion_jax.cli.options import control_note, control_scales, parse_option


def _sampler_spec(args, exp):
    """The SamplerSpec of the sampler flags; flags left out fall back to the run's config.sample (its sampler,
    steps, spacing, clip, num, eta, variance). Fills args.sampler / steps / spacing / clip / num in place."""
    import dataclasses

    from diffusion_jax.inference.sampling import SamplerSpec

    config = getattr(args, "scheduler_config", None)
    if config is not None:
        chosen = [f"--{f}" for f in ("sampler", "spacing", "eta", "variance", "clip") if getattr(args, f) is not None]
        if chosen:
            raise ValueError(f"{', '.join(chosen)}: the --scheduler-config chooses the sampler, its spacing and "
                             f"clipping; drop {'them' if len(chosen) > 1 else 'it'} (--steps and --option still apply)")
    for flag, key in (("sampler", "sampler"), ("steps", "steps"), ("spacing", "spacing"), ("clip", "clip_denoised"),
                      ("num", "num")):
        if getattr(args, flag) is None:
            setattr(args, flag, getattr(exp.sample, key))
    explicit = dict(parse_option(o) for o in args.option)
    if args.eta is not None:
        explicit["eta"] = args.eta
    if args.variance is not None:
        explicit["variance"] = args.variance
    if args.num < 1:
        raise ValueError(f"--num must be >= 1, got {args.num}")
    top = exp.schedule.num_timesteps if exp.schedule.kind == "discrete" else float("inf")
    if not 1 <= args.steps <= top:
        raise ValueError(f"--steps must be in [1, {top}], got {args.steps}")
    sample_config = dataclasses.replace(exp.sample, sampler=args.sampler, steps=args.steps, spacing=args.spacing,
                                 clip_denoised=args.clip)
    spec = SamplerSpec.from_config(sample_config, options=explicit, guidance_scale=args.guidance_scale)
    if config is None:
        return spec
    spec = dataclasses.replace(spec, options=tuple(sorted(explicit.items())), clip_denoised=None,
                               scheduler_config=config)
    imported = spec.imported()
    args.sampler = f"{imported.scheduler} as {imported.sampler}"
    return spec


def _load_run(args, num_of):
    """(exp, graphdef, params, step, control) of --workdir at --step: with the ControlNet flags (`_add_control_flags`)
    the workdir's ControlNet plus every --controlnet on its base, and control = {"control": one (num, S, S, k) batch
    per ControlNet, "conditioning_scale": (k,)} with num = num_of(exp); else load_trained's run and control None."""

    if not (args.control or args.control_from or args.controlnet):
        if args.conditioning_scale or args.guess_mode:
            raise ValueError("--conditioning-scale / --guess-mode need control images: --control or --control-from")
        from diffusion_jax.train.checkpoint import load_trained

        return (*load_trained(args.workdir, args.step), None)
    from diffusion_jax.train.controlnet import load_controlnets

    run = load_controlnets([args.workdir, *args.controlnet], args.step)
    scales = control_scales(args.conditioning_scale, len(run.workdirs))
    control = {"control": run.controls(num_of(run.exp), files=args.control, from_images=args.control_from),
               "conditioning_scale": scales}
    return run.exp, run.graphdef, run.params, run.step, control


def _edit(args, overrides) -> None:
    if overrides:
        raise ValueError(f"edit takes no --config.* overrides (got {overrides}); its options are flags")

    import numpy as np

    from diffusion_jax import viz
    from diffusion_jax.config import build_schedule
    from diffusion_jax.inference.editing import default_mask, edit, load_image, load_mask

    exp, graphdef, params, step, control = _load_run(args, lambda exp: args.num or exp.sample.num)
    spec = _sampler_spec(args, exp)
    size, channels = exp.model.image_size, exp.model.in_channels
    image = load_image(args.image, size=size, channels=channels)
    mask = None
    if args.mask is not None:
        if args.task not in ("inpaint", "outpaint"):
            raise ValueError(f"--mask is for --task inpaint / outpaint, not {args.task}")
        mask = load_mask(args.mask, size=size, invert=args.invert_mask, threshold=args.mask_threshold)
    labels = None if args.label is None else np.full((args.num,), args.label, np.int32)
    images, nfe = edit(graphdef, params, build_schedule(exp.schedule, params), spec, args.task, image,
                       image_shape=(size, size, channels), mask=mask, strength=args.strength, seed=args.seed,
                       num_samples=args.num, prediction=exp.loss.prediction, learn_sigma=exp.model.learn_sigma,
                       num_classes=exp.model.num_classes, labels=labels, method=args.method,
                       jump_length=args.jump_length, resamplings=args.resamplings, control=control,
                       guess_mode=args.guess_mode)
    shown = image
    if args.task == "colorize":   # what the model is given: the gray
        shown = np.repeat(image.mean(axis=-1, keepdims=True), channels, axis=-1)
    elif args.task != "img2img":  # the hole as mid-gray
        used = mask if mask is not None else default_mask(args.task, size)
        shown = image * used
    viz.save_grid(np.concatenate([shown, images]), args.out, nrow=args.num + 1)
    print(f"{args.task} ({args.method}, {args.sampler}, {args.steps} steps, NFE {nfe}"
          f"{control_note(control, args.guess_mode)}) of {args.image}, "
          f"step {step}: input | {args.num} sample(s) -> {args.out}")
    if args.npz:
        np.savez(args.npz, images=viz.to_uint8(images))
        print(f"uint8 NHWC edits -> {args.npz}")


def _sample(args, overrides) -> None:
    if overrides:
        raise ValueError(f"sample takes no --config.* overrides (got {overrides}); its options are flags")

    import jax
    import numpy as np

    from diffusion_jax import parallel, viz
    from diffusion_jax.config import build_schedule, sampling_kwargs
    from diffusion_jax.inference.sampling import class_labels, make_sample_fn

    if args.classifier is None and args.classifier_scale is not None:
        raise ValueError("--classifier-scale needs --classifier DIR (a classifier from diffusion-jax train-classifier)")
    if args.classifier is not None and args.classifier_scale is None:
        args.classifier_scale = 1.0
    if args.classifier is not None and args.scheduler_config is not None:
        raise ValueError("--classifier guidance with --scheduler-config is not supported; drop one")
    controlled = bool(args.control or args.control_from or args.controlnet)
    if controlled and args.classifier is not None:
        raise ValueError("--classifier guidance with ControlNet control images is not supported; drop one")
    exp, graphdef, params, step, control = _load_run(args, lambda exp: args.num or exp.sample.num)
    if args.lora_scale is not None and args.lora is None:
        raise ValueError("--lora-scale needs --lora FILE")
    if args.lora is not None:
        if controlled:
            raise ValueError("--lora with ControlNet control images is not supported; drop one")
        from diffusion_jax.train.lora import with_lora

        params = with_lora(exp, params, args.lora, 1.0 if args.lora_scale is None else args.lora_scale)
    spec = _sampler_spec(args, exp)
    options = dict(spec.options)
    schedule = build_schedule(exp.schedule, params)
    shape = (args.num, exp.model.image_size, exp.model.image_size, exp.model.in_channels)
    mesh = parallel.make_mesh(args.num_devices, flag="--num-devices")
    parallel.check_divisible(args.num, mesh, "--num", hint="--num-devices")
    if args.classifier is None:
        sample_fn = make_sample_fn(graphdef, schedule, spec, shape, mesh=mesh, guess_mode=args.guess_mode,
                                   **sampling_kwargs(exp))
        labels = class_labels(args.num, exp.model.num_classes)
        if args.label is not None:
            if exp.model.num_classes is None or not 0 <= args.label < exp.model.num_classes:
                raise ValueError(f"--label {args.label}: the model takes labels in [0, {exp.model.num_classes})"
                                 if exp.model.num_classes else "--label: the model is unconditional")
            labels = np.full((args.num,), args.label, np.int32)
    else:   # classifier guidance toward labels 0, 1, ...
        from diffusion_jax.train.guided import guided_sample_fn_for_run

        sample_fn, labels = guided_sample_fn_for_run(exp, graphdef, params, spec, shape, args.classifier,
                                                     args.classifier_scale, mesh=mesh)
    controlled_note = control_note(control, args.guess_mode)
    if control is not None:
        images, nfe = sample_fn(params, jax.random.PRNGKey(args.seed), labels, control=control)
    else:
        images, nfe = sample_fn(params, jax.random.PRNGKey(args.seed), labels)
    images = np.asarray(images)
    viz.save_grid(images, args.out)
    print(f"{args.num} samples from step {step} ({args.sampler}, {args.steps} steps, NFE {nfe}"
          f"{', options ' + str(options) if options else ''}"
          f"{f', classifier {args.classifier} scale {args.classifier_scale:g}' if args.classifier else ''}"
          f"{controlled_note}) -> {args.out}")
    if args.npz:
        extra = {} if labels is None else {"labels": np.asarray(labels)}
        np.savez(args.npz, images=viz.to_uint8(images), x=images.astype(np.float32), **extra)
        print(f"uint8 NHWC samples (images) and the sampler's unclipped float32 output (x) -> {args.npz}")


def _add_sampler_flags(parser) -> None:
    """The flags `sample` and `edit` share: which sampler, its options, how many samples, which checkpoint."""
    from diffusion_jax.samplers import SAMPLERS, SPACINGS

    parser.add_argument("--sampler", default=None, choices=sorted(SAMPLERS),
                        help="; ".join(f"{k}: {v.about}" for k, v in SAMPLERS.items()))
    parser.add_argument("--steps", type=int, default=None, help="default: the run's config.sample.steps")
    parser.add_argument("--spacing", default=None, choices=list(SPACINGS))
    parser.add_argument("--eta", type=float, default=None, help="ddim / euler_ancestral stochasticity")
    parser.add_argument("--variance", default=None, choices=["fixed_small", "fixed_large", "learned"],
                        help="ddpm variance (default fixed_small)")
    parser.add_argument("--option", action="append", default=[], metavar="NAME=VALUE",
                        help="any sampler option, repeatable, e.g. --option s_churn=40 --option order=3")
    parser.add_argument("--guidance-scale", type=float, default=1.0,
                        help="classifier-free guidance weight (class-conditional models; 1 = off)")
    parser.add_argument("--clip", type=float, default=None, help="clip x0-hat to [-c, c]; 0 disables")
    parser.add_argument("--num", type=int, default=None, help="default: the run's config.sample.num")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")


def _add_control_flags(parser) -> None:
    control = parser.add_argument_group("ControlNet (a workdir trained with model.name='controlnet')")
    control.add_argument("--control", action="append", default=[], metavar="FILE",
                         help="repeatable, one per ControlNet: a control image (e.g. an edge map) of model.control_size")
    control.add_argument("--control-from", action="append", default=[], metavar="IMAGE",
                         help="repeatable, one per ControlNet: an image of the model's size; its condition (the run's "
                              "model.condition, e.g. canny edges) is the control")
    control.add_argument("--controlnet", action="append", default=[], metavar="DIR",
                         help="repeatable: another ControlNet workdir on the same base; the residuals are summed")
    control.add_argument("--conditioning-scale", action="append", type=float, default=[], metavar="S",
                         help="residual weight (default 1); once for all ControlNets or once per ControlNet")
    control.add_argument("--guess-mode", action="store_true",
                         help="control only the conditional branch of guidance, residuals weighted 0.1 -> 1 "
                              "(diffusers' guess mode)")


def add_sample_parser(sub) -> None:
    sample = sub.add_parser("sample", help="sample from the EMA params of a trained workdir",
                            epilog="Flags left out take their value from the run's config.sample.")
    sample.add_argument("--workdir", required=True)
    sample.add_argument("--scheduler-config", default=None, metavar="PATH",
                        help="sample with a diffusers scheduler_config.json (its class, grid, clipping) as diffusers "
                             "does; the model's betas must match it")
    _add_sampler_flags(sample)
    sample.add_argument("--num-devices", type=int, default=0,
                        help="split the samples over this many devices (0 = all); the samples do not depend on it")
    sample.add_argument("--out", default="samples.png", help="PNG grid")
    sample.add_argument("--npz", default=None, help="also save uint8 samples to this .npz")
    sample.add_argument("--classifier", default=None, metavar="DIR",
                        help="classifier guidance with the noise-conditional classifier in DIR (train-classifier); "
                             "runs on one device")
    sample.add_argument("--classifier-scale", type=float, default=None,
                        help="classifier guidance weight w >= 0 (default 1 with --classifier)")
    sample.add_argument("--label", type=int, default=None,
                        help="class-conditional models: every sample of this class (default: 0, 1, 2, ... in turn)")
    sample.add_argument("--lora", default=None, metavar="FILE",
                        help="a LoRA file or folder (pytorch_lora_weights.safetensors, diffusers / peft layout, e.g. "
                             "from diffusion-jax export) merged into this workdir's U-Net")
    sample.add_argument("--lora-scale", type=float, default=None, help="multiplies the LoRA update (default 1)")
    _add_control_flags(sample)
    sample.set_defaults(func=_sample)


def add_edit_parser(sub) -> None:
    edit = sub.add_parser("edit", help="inpaint / outpaint / colorize / img2img an image with a trained workdir",
                          epilog="Any sampler works with --method projection (score_sde); --method repaint runs "
                                 "RePaint's resampling loop (sampler ddpm or ddim). Masks: white = keep, black = "
                                 "fill (--invert-mask for white = fill). Images must have the model's size.")
    edit.add_argument("--workdir", required=True)
    edit.add_argument("--task", required=True, choices=["inpaint", "outpaint", "colorize", "img2img"])
    edit.add_argument("--image", required=True, help="PNG (or any PIL format) of the model's size")
    edit.add_argument("--mask", default=None, help="inpaint / outpaint mask file (default: a centre hole / a "
                                                    "border of a quarter of the size)")
    edit.add_argument("--invert-mask", action="store_true", help="white = the area to fill (diffusers convention)")
    edit.add_argument("--mask-threshold", type=int, default=None, help="gray >= this is known (antialiased masks)")
    edit.add_argument("--strength", type=float, default=None, help="img2img: noise level in (0, 1] to start from")
    edit.add_argument("--method", default="projection", choices=["projection", "repaint"])
    edit.add_argument("--jump-length", type=int, default=10, help="repaint: steps per jump back")
    edit.add_argument("--resamplings", type=int, default=10, help="repaint: times each jump is resampled")
    edit.add_argument("--label", type=int, default=None, help="class label (class-conditional models)")
    _add_sampler_flags(edit)
    edit.add_argument("--out", default="edit.png", help="PNG grid: input | samples")
    edit.add_argument("--npz", default=None, help="also save the uint8 edits to this .npz")
    _add_control_flags(edit)
    edit.set_defaults(func=_edit)
