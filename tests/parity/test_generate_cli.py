"""`diffusion-jax convert` of a Stable Diffusion folder and `diffusion-jax generate` on it, in process: a tiny random
diffusers StableDiffusionPipeline (built locally, no downloads) is converted, then txt2img / img2img / inpaint run
through the command line; bad flags give errors that name them."""
import os

import numpy as np
import pytest
from harness import CHEAP_COMPILE, need
from PIL import Image

from diffusion_jax.cli.main import main
from diffusion_jax.cli.pipelines import default_out, detect_layout

torch, diffusers, transformers = need("torch", "diffusers", "transformers")
pytestmark = pytest.mark.torch

# the tiny random diffusers SD 1.x folder of test_stable_diffusion (16x16 images, 8x8x4 latents): (folder, pipeline)
from test_stable_diffusion import sd_folder  # noqa: E402, F401  (a module-scoped fixture)

FAST = ["--sampler", "dpmpp_2m", "--steps", "2", "--guidance", "3"]


_LOADED = {}


@pytest.fixture(autouse=True)
def fast_generate(monkeypatch):
    """Speed only, the command line runs as it is otherwise: generate's pipelines compile without XLA's expensive
    CPU passes (about 2x faster to compile here; stable_diffusion.generate has no compiler_options argument, so its
    make_pipeline is wrapped), and a folder already loaded in this module is not loaded again (loading traces three
    models with nnx.eval_shape: seconds per call)."""
    import functools

    from diffusion_jax.inference.pipelines import latent, stable_diffusion

    monkeypatch.setattr(stable_diffusion, "make_pipeline",
                        functools.partial(latent.make_pipeline, compiler_options=CHEAP_COMPILE))
    load = stable_diffusion.load_text_to_image

    def load_once(folder):
        key = os.path.abspath(folder)
        if key not in _LOADED:
            _LOADED[key] = load(folder)
        return _LOADED[key]

    monkeypatch.setattr(stable_diffusion, "load_text_to_image", load_once)


@pytest.fixture(scope="module")
def converted(sd_folder, tmp_path_factory):  # noqa: F811 (the imported fixture)
    """(the diffusers folder, its conversion by `diffusion-jax convert`)."""
    target = str(tmp_path_factory.mktemp("conv") / "sd")
    assert main(["convert", "--from", sd_folder[0], "--to", target]) == 0
    return sd_folder[0], target


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_convert_writes_the_converted_form_and_refuses_to_overwrite(converted, capsys):
    source, converted = converted
    assert detect_layout(source) == "stable_diffusion"
    assert sorted(os.listdir(converted)) == ["params", "pipeline.json", "tokenizer"]
    assert main(["convert", "--from", source, "--to", converted]) == 2
    err = capsys.readouterr().err
    assert "not empty" in err and converted in err
    assert main(["convert", "--from", source, "--to", converted + "2", "--data", "folder"]) == 2
    assert "--data" in capsys.readouterr().err


def test_txt2img_writes_grid_and_images_and_reproduces(converted, tmp_path, capsys):
    converted = converted[1]
    prompts = ["--prompt", "a photo of a cat", "--prompt", "an ankle boot"]
    assert main(["generate", "--workdir", converted, *prompts, *FAST, "--seed", "1", "--out",
                 str(tmp_path / "a.png")]) == 0
    out = capsys.readouterr().out
    assert "NFE" in out and str(tmp_path / "a.png") in out
    grid = Image.open(tmp_path / "a.png")
    assert grid.size[0] >= 48 and grid.mode == "RGB"   # 16x16 tiles, upscaled in the grid
    first, second = _pixels(tmp_path / "a_000.png"), _pixels(tmp_path / "a_001.png")
    assert first.shape == second.shape == (16, 16, 3) and not np.array_equal(first, second)

    # the same seed again, to the default place: WORKDIR/generated/<prompt>..., the same pixels
    assert main(["generate", "--workdir", converted, *prompts, *FAST, "--seed", "1"]) == 0
    again = default_out(converted, ["a photo of a cat", "an ankle boot"], "txt2img", 1)
    assert again == os.path.join(converted, "generated", "a-photo-of-a-cat-2prompts_txt2img_seed1.png")
    assert again in capsys.readouterr().out
    np.testing.assert_array_equal(_pixels(again[:-4] + "_000.png"), first)
    np.testing.assert_array_equal(_pixels(again[:-4] + "_001.png"), second)


def test_img2img_and_inpaint_run_from_files(converted, tmp_path, capsys):
    converted = converted[1]
    image = tmp_path / "in.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(image)
    assert main(["generate", "--workdir", converted, "--prompt", "a cat", *FAST, "--task", "img2img",
                 "--image", str(image), "--strength", "0.6", "--num-per-prompt", "2",
                 "--out", str(tmp_path / "i2i.png")]) == 0
    assert "strength 0.6" in capsys.readouterr().out
    assert _pixels(tmp_path / "i2i_001.png").shape == (16, 16, 3)

    mask = np.full((16, 16), 255, np.uint8)
    mask[4:12, 4:12] = 0                              # black = fill
    Image.fromarray(mask).save(tmp_path / "mask.png")
    assert main(["generate", "--workdir", converted, "--prompt", "a cat", *FAST, "--task", "inpaint",
                 "--image", str(image), "--mask", str(tmp_path / "mask.png"), "--out", str(tmp_path / "ip.png")]) == 0
    filled = _pixels(tmp_path / "ip_000.png")
    kept = mask == 255
    np.testing.assert_array_equal(filled[kept], _pixels(image)[kept])   # the known pixels are kept exactly
    assert not np.array_equal(filled[~kept], _pixels(image)[~kept])


def test_bad_arguments_are_named(converted, tmp_path, capsys):
    converted = converted[1]
    with pytest.raises(SystemExit):
        main(["generate", "--workdir", converted])
    assert "--prompt" in capsys.readouterr().err

    def error(*argv):
        assert main(["generate", "--workdir", converted, "--prompt", "a cat", *argv]) == 2
        return capsys.readouterr().err

    assert "--strength is for --task img2img" in error("--strength", "0.5")
    assert "needs --image" in error("--task", "img2img")
    assert "--mask" in error("--task", "img2img", "--image", "x.png", "--mask", "m.png")
    assert "--num-per-prompt" in error("--num-per-prompt", "0")
    assert "nope" in error("--option", "nope=1")
    for folder in (str(tmp_path / "missing"), str(tmp_path)):             # absent; not a model folder
        assert main(["generate", "--workdir", folder, "--prompt", "a cat"]) == 2
        assert folder in capsys.readouterr().err


def test_generate_with_the_pipelines_own_scheduler_config(converted, sd_folder, tmp_path, capsys):  # noqa: F811
    """--scheduler-config SD_FOLDER/scheduler (the pipeline's own DDIM) runs it as diffusers would; the flags it
    decides and the tasks it does not run are named errors."""
    folder, converted = sd_folder[0], converted[1]
    argv = ["generate", "--workdir", converted, "--prompt", "a cat", "--steps", "2", "--guidance", "2",
            "--scheduler-config", os.path.join(folder, "scheduler")]
    assert main([*argv, "--out", str(tmp_path / "s.png")]) == 0
    assert "DDIMScheduler as ddim" in capsys.readouterr().out and (tmp_path / "s_000.png").exists()
    assert main([*argv, "--sampler", "heun"]) == 2 and "--sampler / --spacing" in capsys.readouterr().err
    assert main([*argv, "--task", "img2img", "--image", "x.png"]) == 2
    assert "txt2img only" in capsys.readouterr().err


def test_generate_with_controlnets(converted, sd_folder, tmp_path, capsys):  # noqa: F811
    """A diffusers ControlNetModel made from the pipeline's U-Net: zero-initialised it changes nothing (the PNGs
    are identical); perturbed, it changes the images (several ControlNets and guess mode: the unit tests and
    `sample --controlnet / --guess-mode`); a control image
    of the wrong size and a ControlNet of another U-Net are refused."""
    converted = converted[1]
    unet = sd_folder[1].unet
    zero = diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16),
                                               conditioning_channels=1)
    zero.save_pretrained(str(tmp_path / "zero"))
    torch.manual_seed(1)
    with torch.no_grad():
        for p in zero.parameters():
            p.add_(0.1 * torch.randn_like(p))
    zero.save_pretrained(str(tmp_path / "moved"))
    edges = np.zeros((16, 16), np.uint8)
    edges[4:12, 4] = edges[4, 4:12] = 255
    Image.fromarray(edges).save(tmp_path / "edges.png")
    base = ["generate", "--workdir", converted, "--prompt", "a sandal", *FAST, "--seed", "2"]
    control = ["--control", str(tmp_path / "edges.png")]
    assert main([*base, "--out", str(tmp_path / "plain.png")]) == 0
    assert main([*base, "--controlnet", str(tmp_path / "zero"), *control, "--out", str(tmp_path / "zero.png")]) == 0
    assert "1 ControlNet(s) at conditioning_scale 1" in capsys.readouterr().out
    np.testing.assert_array_equal(_pixels(tmp_path / "zero.png"), _pixels(tmp_path / "plain.png"))
    assert main([*base, "--controlnet", str(tmp_path / "moved"), *control, "--out", str(tmp_path / "moved.png")]) == 0
    assert not np.array_equal(_pixels(tmp_path / "moved.png"), _pixels(tmp_path / "plain.png"))
    Image.fromarray(edges[:8, :8]).save(tmp_path / "small.png")
    other = diffusers.ControlNetModel(in_channels=4, block_out_channels=(8, 16), layers_per_block=1,
                                      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), attention_head_dim=2,
                                      cross_attention_dim=16, norm_num_groups=4, conditioning_channels=1,
                                      conditioning_embedding_out_channels=(8, 16))
    other.save_pretrained(str(tmp_path / "other"))
    for argv, message in [
        ([*base, "--controlnet", str(tmp_path / "zero"), "--control", str(tmp_path / "small.png")],
         "is 8x8 (HxW) but the model takes 16x16"),
        ([*base, "--controlnet", str(tmp_path / "other"), *control], "was made for another U-Net"),
        ([*base, *control], "give one --control IMAGE per --controlnet DIR"),
        ([*base, "--guess-mode"], "--guess-mode need --controlnet"),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err, (argv, err)
