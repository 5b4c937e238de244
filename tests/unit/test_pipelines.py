"""Latent pipelines (pipelines/latent.py) on a tiny random VAE + cross-attention U-Net: every task runs with several
samplers, img2img at strength 0 is the VAE's reconstruction, inpainting keeps the known pixels bit for bit,
classifier-free guidance obeys its identities, and bad inputs are refused by name."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import numpy_fill

from diffusion_jax.inference.editing.masks import border_hole, center_hole
from diffusion_jax.inference.pipelines import LatentPipeline, latent_mask, make_pipeline
from diffusion_jax.inference.sampling import SamplerSpec as Spec
from diffusion_jax.models.functional import abstract_params
from diffusion_jax.models.unet_cond import UNetCond, UNetCondConfig
from diffusion_jax.models.vae import VAE, VAEConfig, decode, encode
from diffusion_jax.parallel import make_mesh
from diffusion_jax.process.discrete import make_schedule

VAE_CFG = VAEConfig(block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4)
UNET_CFG = UNetCondConfig(block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                          up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
                          num_attention_heads=2, cross_attention_dim=12, norm_num_groups=4, sample_size=8)
SIZE, NUM, L, D = (16, 16), 2, 5, 12
FAST = {"xla_backend_optimization_level": 0}  # compiles these tiny pipelines several times faster on CPU


def pipeline(pipe, spec, task="txt2img", **kwargs):
    return make_pipeline(pipe, spec, task, num=NUM, image_size=SIZE, compiler_options=FAST, **kwargs)


@pytest.fixture(scope="module")
def model():
    """(pipe, params, context, null_context, image): random weights everywhere (the U-Net's zero-initialised
    output layers too, so that the prediction depends on the input and the text)."""
    graphdef, unet_abstract = abstract_params(lambda rngs: UNetCond(UNET_CFG, rngs=rngs))
    vae_abstract = abstract_params(lambda rngs: VAE(VAE_CFG, rngs=rngs))[1]
    params = {"unet": numpy_fill(unet_abstract, 1), "vae": numpy_fill(vae_abstract, 2)}
    pipe = LatentPipeline(graphdef, VAE_CFG, make_schedule("scaled_linear", 1000), prediction="eps")
    rng = np.random.default_rng(0)
    context = rng.standard_normal((NUM, L, D)).astype(np.float32)
    null = rng.standard_normal((1, L, D)).astype(np.float32)
    image = np.tanh(rng.standard_normal((1, *SIZE, 3))).astype(np.float32)
    return pipe, params, context, null, image


def spec(sampler="ddim", steps=4, scale=1.0):
    return Spec(sampler, steps, clip_denoised=None, guidance_scale=scale)


@pytest.mark.parametrize("sampler,nfe", [("ddim", 4), ("dpmpp_2m", 4), ("heun", 7)])
def test_txt2img_runs_any_sampler_and_follows_the_text(model, sampler, nfe):
    pipe, params, context, null, _ = model
    run = pipeline(pipe, spec(sampler), "txt2img")
    x, got = run(params, jax.random.key(0), context)
    assert x.shape == (NUM, *SIZE, 3) and got == nfe
    assert np.isfinite(x).all() and np.abs(x).max() <= 1.0
    again, _ = run(params, jax.random.key(0), context)
    np.testing.assert_array_equal(x, again)                       # a seed fixes the images
    other, _ = run(params, jax.random.key(0), context[::-1])      # ... and the text changes them
    assert np.abs(other[0] - x[0]).max() > 1e-3


def test_guidance_identities(model):
    """w = 1 is the conditional model; any w with null_context == context is too; w = 0 is the null branch."""
    pipe, params, context, null, _ = model
    key = jax.random.key(3)
    conditional = pipeline(pipe, spec())
    plain, _ = conditional(params, key, context)
    guided = pipeline(pipe, spec(scale=4.0))
    x_same, nfe = guided(params, key, context, context)
    np.testing.assert_allclose(x_same, plain, atol=2e-5)
    assert nfe == 4
    x_w, _ = guided(params, key, context, null)
    assert np.abs(x_w - plain).max() > 1e-3
    x_null, _ = pipeline(pipe, spec(scale=0.0))(params, key, context, null)
    uncond, _ = conditional(params, key, np.repeat(null, NUM, 0))
    np.testing.assert_allclose(x_null, uncond, atol=2e-5)


def test_img2img_strength_zero_is_the_vae_reconstruction(model):
    pipe, params, context, _, image = model
    x, nfe = pipeline(pipe, spec(), "img2img", strength=0.0)(
        params, jax.random.key(0), context, image=image)
    recon = np.clip(np.asarray(decode(params["vae"], encode(params["vae"], jnp.asarray(image), VAE_CFG).mode(),
                                      VAE_CFG)), -1, 1)
    assert nfe == 0
    np.testing.assert_allclose(x, np.repeat(recon, NUM, 0), atol=1e-5)
    weak, nfe = pipeline(pipe, spec(steps=10), "img2img", strength=0.3)(
        params, jax.random.key(0), context, image=image)
    assert nfe == 10 and np.abs(weak - x).max() > 1e-4             # SDEdit: N steps from t_0 down to 0


@pytest.mark.parametrize("task,mask", [("inpaint", center_hole(SIZE)), ("outpaint", None)])
def test_inpaint_and_outpaint_keep_the_known_pixels_exactly(model, task, mask):
    pipe, params, context, null, image = model
    run = pipeline(pipe, spec("dpmpp_2m", scale=3.0), task)
    x, nfe = run(params, jax.random.key(1), context, null, image=image, mask=mask)
    keep = (center_hole(SIZE) if mask is not None else border_hole(SIZE, SIZE[0] // 4))[..., 0] > 0
    assert nfe == 4
    np.testing.assert_array_equal(x[:, keep], np.broadcast_to(image, x.shape)[:, keep])
    assert np.abs(x[:, ~keep] - np.broadcast_to(image, x.shape)[:, ~keep]).max() > 1e-3


def test_latent_mask_keeps_only_fully_known_cells():
    mask = np.ones((1, 4, 4, 1), np.float32)
    mask[0, 1, 2] = 0
    got = np.asarray(latent_mask(jnp.asarray(mask), 2))[0, ..., 0]
    np.testing.assert_array_equal(got, [[1, 0], [1, 1]])


def test_a_one_device_mesh_gives_the_same_images(model):
    pipe, params, context, _, _ = model
    x, _ = pipeline(pipe, spec())(params, jax.random.key(5), context)
    y, _ = pipeline(pipe, spec(), mesh=make_mesh(1))(params, jax.random.key(5), context)
    np.testing.assert_allclose(x, y, atol=1e-6)


def test_bad_inputs_are_refused_by_name(model):
    pipe, params, context, null, image = model
    with pytest.raises(ValueError, match="clip_denoised"):
        pipeline(pipe, Spec("ddim", 4))
    with pytest.raises(ValueError, match="task='paint'"):
        pipeline(pipe, spec(), "paint")
    with pytest.raises(ValueError, match="downsampling factor 2"):
        make_pipeline(pipe, spec(), num=NUM, image_size=(15, 16))
    with pytest.raises(ValueError, match="strength"):
        pipeline(pipe, spec(), "inpaint", strength=0.5)
    with pytest.raises(ValueError, match="strength"):
        pipeline(pipe, spec(), "img2img", strength=1.5)
    run = pipeline(pipe, spec(scale=2.0))
    with pytest.raises(ValueError, match="null_context"):
        run(params, jax.random.key(0), context)
    with pytest.raises(ValueError, match="context must be"):
        run(params, jax.random.key(0), context[0], null)
    with pytest.raises(ValueError, match=r"null_context has shape \(1, 5, 7\)"):
        run(params, jax.random.key(0), context, null[..., :7])
    with pytest.raises(ValueError, match="takes no image"):
        run(params, jax.random.key(0), context, null, image=image)
    edit = pipeline(pipe, spec(), "inpaint")
    with pytest.raises(ValueError, match="needs an image"):
        edit(params, jax.random.key(0), context)
    with pytest.raises(ValueError, match="image must be"):
        edit(params, jax.random.key(0), context, image=image * 3)
    with pytest.raises(ValueError, match="mask must be"):
        edit(params, jax.random.key(0), context, image=image, mask=np.ones((8, 8)))
