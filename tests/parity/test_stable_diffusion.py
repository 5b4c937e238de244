"""A Stable Diffusion folder end to end: a tiny random diffusers StableDiffusionPipeline (built locally, no
downloads) is saved, loaded by pipelines/stable_diffusion.py, converted and loaded again, and gives diffusers'
images from the same initial latents (DDIM with classifier-free guidance)."""
import os

import numpy as np
import pytest
from harness import need, nhwc, to_torch

from diffusion_jax.inference.pipelines.stable_diffusion import (
    convert,
    generate,
    load_text_to_image,
    schedule_from_diffusers,
)
from diffusion_jax.inference.sampling import SamplerSpec
from diffusion_jax.models.text.clip_tokenizer import CLIPTokenizer

torch, diffusers, transformers = need("torch", "diffusers", "transformers")
pytestmark = pytest.mark.torch

PROMPTS = ["a photo of a cat", "an ankle boot"]


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    """(folder, the diffusers pipeline) for a tiny SD 1.x-layout pipeline with random weights."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("sd")
    tok_dir = str(root / "vocab")
    CLIPTokenizer.from_vocab().save_vocab(tok_dir)
    tokenizer = transformers.CLIPTokenizer(os.path.join(tok_dir, "vocab.json"), os.path.join(tok_dir, "merges.txt"),
                                           model_max_length=77)
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)).eval()
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=2, cross_attention_dim=16, norm_num_groups=4).eval()
    with torch.no_grad():  # diffusers zero-initialises nothing here, but make the outputs clearly non-trivial
        unet.conv_out.weight.normal_(0, 0.05)
    vae = diffusers.AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                                  sample_size=16).eval()
    scheduler = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                        clip_sample=False, set_alpha_to_one=True, steps_offset=0)
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                             scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    folder = str(root / "pipeline")
    pipe.save_pretrained(folder)
    return folder, pipe


def test_scheduler_config_maps_to_our_schedule():
    assert schedule_from_diffusers({"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                                    "prediction_type": "v_prediction", "rescale_betas_zero_snr": True}) == (
        {"name": "scaled_linear", "num_timesteps": 1000, "zero_terminal_snr": True, "beta_start": 0.00085,
         "beta_end": 0.012}, "v")
    with pytest.raises(ValueError, match="beta_schedule='exp'"):
        schedule_from_diffusers({"beta_schedule": "exp"})
    with pytest.raises(ValueError, match="prediction_type='flow'"):
        schedule_from_diffusers({"prediction_type": "flow"})


def test_diffusers_folder_gives_diffusers_images(sd_folder, tmp_path):
    folder, ref = sd_folder
    model = load_text_to_image(folder)
    assert model.image_size == (16, 16)
    with torch.no_grad():
        cond, uncond = ref.encode_prompt(PROMPTS, "cpu", 1, True, negative_prompt=None)
    np.testing.assert_allclose(model.encode(PROMPTS), cond.numpy(), atol=1e-5)
    np.testing.assert_allclose(model.encode([""])[0], uncond[0].numpy(), atol=1e-5)

    latents = np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32)
    with torch.no_grad():
        ref.scheduler = diffusers.DDIMScheduler.from_config(ref.scheduler.config, timestep_spacing="trailing")
        want = ref(PROMPTS, num_inference_steps=5, guidance_scale=4.0, latents=to_torch(latents),
                   output_type="np").images
    # "trailing": diffusers rewrites steps_offset=0 to 1 on load, which shifts its "leading" timesteps by one
    spec = SamplerSpec("ddim", 5, spacing="trailing", clip_denoised=None, guidance_scale=4.0)
    got, nfe = generate(model, PROMPTS, spec, latents=nhwc(latents))
    assert nfe == 5
    np.testing.assert_allclose(got * 0.5 + 0.5, want, atol=2e-4)

    # The converted folder loads without torch's formats and gives the same images.
    convert(folder, str(tmp_path / "converted"))
    again, _ = generate(load_text_to_image(str(tmp_path / "converted")), PROMPTS, spec,
                        latents=nhwc(latents))
    np.testing.assert_allclose(again, got, atol=1e-6)
    with pytest.raises(FileExistsError, match="not empty"):
        convert(folder, str(tmp_path / "converted"))


def test_bad_folders_are_named(tmp_path, sd_folder):
    with pytest.raises(FileNotFoundError, match="neither pipeline.json"):
        load_text_to_image(str(tmp_path))
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="lacks its unet/"):
        load_text_to_image(str(tmp_path))
    model = load_text_to_image(sd_folder[0])
    with pytest.raises(ValueError, match="prompts must be"):
        generate(model, "a cat", SamplerSpec("ddim", 2, clip_denoised=None))
    with pytest.raises(ValueError, match="clip_denoised"):
        generate(model, ["a cat"], SamplerSpec("ddim", 2))


def _patch_step_noise(monkeypatch, module, first: int = 0) -> list:
    """Make `module.randn_tensor` give generate's step noise at seed 0: its i-th call returns
    normal(fold_in(fold_in(PRNGKey(0), 1), first + i)) drawn in NHWC, as NCHW. Returns the step indices drawn."""
    import jax

    key, calls = jax.random.fold_in(jax.random.PRNGKey(0), 1), []

    def randn_tensor(shape, *args, **kwargs):
        n, c, h, w = shape
        calls.append(first + len(calls))
        return to_torch(np.asarray(jax.random.normal(jax.random.fold_in(key, calls[-1]), (n, h, w, c))),
                        nchw_from_nhwc=True)
    monkeypatch.setattr(module, "randn_tensor", randn_tensor)
    return calls


@pytest.mark.parametrize("cls, keys, steps", [
    ("DDIMScheduler", {"set_alpha_to_one": False, "steps_offset": 1, "timestep_spacing": "leading"}, 5),
    ("PNDMScheduler", {"skip_prk_steps": True, "steps_offset": 1, "timestep_spacing": "leading"}, 6),
    ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True, "solver_order": 2}, 6),
    ("EulerAncestralDiscreteScheduler", {"timestep_spacing": "trailing"}, 5),
    ("EulerDiscreteScheduler", {"timestep_spacing": "trailing"}, 5)])
def test_scheduler_config_end_to_end(sd_folder, tmp_path, cls, keys, steps, monkeypatch):
    """The pipeline with a diffusers scheduler config (SD 1.x's DDIM and PNDM, DPM-Solver++(2M) Karras, Euler
    ancestral with our noise): `generate` with SamplerSpec(scheduler_config=...) from the same latents gives diffusers'
    decoded images to 1e-3."""
    import json

    folder, ref = sd_folder
    saved = {k: v for k, v in ref.scheduler.config.items() if k != "_use_default_values"}     # as a json file has it
    config = {**saved, "_class_name": cls, **keys}
    path = tmp_path / "scheduler_config.json"
    path.write_text(json.dumps(config))
    latents = np.random.default_rng(1).standard_normal((2, 4, 8, 8)).astype(np.float32)
    if cls == "EulerAncestralDiscreteScheduler":
        from diffusers.schedulers import scheduling_euler_ancestral_discrete as module
        _patch_step_noise(monkeypatch, module)
    with torch.no_grad():
        ref.scheduler = getattr(diffusers, cls).from_config(config)
        want = ref(PROMPTS, num_inference_steps=steps, guidance_scale=4.0, latents=to_torch(latents),
                   output_type="np").images
    spec = SamplerSpec("ddim", steps, clip_denoised=None, guidance_scale=4.0, scheduler_config=str(path))
    got, _ = generate(load_text_to_image(folder), PROMPTS, spec, latents=nhwc(latents), seed=0)
    assert np.abs(got * 0.5 + 0.5 - want).max() <= 1e-3, np.abs(got * 0.5 + 0.5 - want).max()


@pytest.mark.slow    # about 30 s: a second tiny pipeline saved, loaded, and sampled by diffusers and by us
def test_latent_consistency_folder_gives_diffusers_images(sd_folder, tmp_path, monkeypatch):
    """A latent consistency model folder (diffusers' LatentConsistencyModelPipeline: a U-Net with time_cond_proj_dim,
    LCMScheduler): `generate` with its scheduler config and w = 4 as the U-Net's input gives diffusers' decoded
    images to 1e-3 from the same latents and step noise (LCM re-noises between its 4 steps)."""

    folder, sd = sd_folder
    torch.manual_seed(1)
    unet = diffusers.UNet2DConditionModel(**{**sd.unet.config, "time_cond_proj_dim": 8}).eval()
    with torch.no_grad():
        unet.conv_out.weight.normal_(0, 0.05)
        unet.time_embedding.cond_proj.weight.normal_(0, 0.05)     # zero-initialised by LCM's distillation
    scheduler = diffusers.LCMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    ref = diffusers.LatentConsistencyModelPipeline(vae=sd.vae, text_encoder=sd.text_encoder, tokenizer=sd.tokenizer,
                                                   unet=unet, scheduler=scheduler, safety_checker=None,
                                                   feature_extractor=None, requires_safety_checker=False)
    lcm_folder = str(tmp_path / "lcm")
    ref.save_pretrained(lcm_folder)
    latents = np.random.default_rng(2).standard_normal((2, 4, 8, 8)).astype(np.float32)
    from diffusers.schedulers import scheduling_lcm
    calls = _patch_step_noise(monkeypatch, scheduling_lcm, first=1)    # multistep consistency: steps i >= 1
    with torch.no_grad():
        want = ref(PROMPTS, num_inference_steps=4, guidance_scale=4.0, latents=to_torch(latents),
                   output_type="np").images
    assert calls == [1, 2, 3]
    spec = SamplerSpec("ddim", 4, clip_denoised=None, guidance_scale=4.0,
                       scheduler_config=os.path.join(lcm_folder, "scheduler"))
    got, nfe = generate(load_text_to_image(lcm_folder), PROMPTS, spec, latents=nhwc(latents), seed=0)
    assert nfe == 4
    assert np.abs(got * 0.5 + 0.5 - want).max() <= 1e-3, np.abs(got * 0.5 + 0.5 - want).max()
