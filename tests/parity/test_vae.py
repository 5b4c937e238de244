"""The KL autoencoder (models/vae.py), its diffusers converter and its training pieces.

Parity with diffusers' AutoencoderKL uses a randomly initialised model built locally (no downloads).
"""
import dataclasses
import json
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import numpy_fill
from flax import nnx
from harness import (
    FAST_COMPILE,
    assert_rel_close,
    assert_trees_equal,
    need,
    nhwc,
    random_torch_model,
    to_torch,
    torch_state_dict,
)
from harness import fast_jit as jit

from diffusion_jax.models.convert_vae import convert_vae, diffusers_key, load_vae
from diffusion_jax.models.vae import (
    VAE,
    DiagonalGaussian,
    VAEConfig,
    from_diffusion_latents,
    make_vae_fns,
    to_diffusion_latents,
    vae_graphdef,
)
from diffusion_jax.models.vae_loss import (
    DiscriminatorConfig,
    PatchDiscriminator,
    VAELossConfig,
    discriminator_loss,
    estimate_scaling_factor,
    hinge_d_loss,
    psnr,
    vae_loss,
)

TINY = VAEConfig(block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4)
TINY_DIFFUSERS = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                      up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 16], layers_per_block=1,
                      latent_channels=4, norm_num_groups=4, sample_size=16)
RTOL = 1e-4  # parity tolerance, relative to the largest magnitude of the reference output


def numpy_params(config: VAEConfig, seed: int = 0) -> dict:
    """Random params of VAE(config) from numpy (conftest.numpy_fill)."""
    abstract = nnx.split(nnx.eval_shape(lambda: VAE(config, rngs=nnx.Rngs(0))), nnx.Param)[1]
    return numpy_fill(nnx.to_pure_dict(abstract), seed)


def to_state_dict(params) -> dict:
    """Our params back to a diffusers-named numpy state_dict (inverse of convert_vae); contiguous arrays, as
    safetensors writes the raw buffer."""
    return torch_state_dict(params, diffusers_key)


@pytest.fixture(scope="module")
def fns():
    return make_vae_fns(TINY, compiler_options=FAST_COMPILE)


@pytest.fixture(scope="module")
def params():
    return numpy_params(TINY)


# ---- config and converter (no torch) --------------------------------------------------------------

def test_config_from_diffusers_and_refusals():
    cfg = VAEConfig.from_diffusers({**TINY_DIFFUSERS, "_class_name": "AutoencoderKL", "force_upcast": True,
                                    "shift_factor": 0.1, "scaling_factor": 0.5})
    assert cfg == dataclasses.replace(TINY, shift_factor=0.1, scaling_factor=0.5)
    for bad, key in [({"act_fn": "gelu"}, "act_fn"), ({"latents_mean": [0.0] * 4}, "latents_mean"),
                     ({"norm_type": "spatial"}, "norm_type"),
                     ({"down_block_types": ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]}, "down_block_types"),
                     ({"up_block_types": ["UpDecoderBlock2D"]}, "up_block_types"),
                     ({"norm_num_groups": 3}, "norm_num_groups")]:
        with pytest.raises(ValueError, match=key):
            VAEConfig.from_diffusers({**TINY_DIFFUSERS, **bad})
    with pytest.raises(ValueError, match="reconstruction"):
        VAELossConfig(vae=TINY, reconstruction="l3").validate()
    with pytest.raises(ValueError, match="in_channels"):
        VAELossConfig(vae=TINY, discriminator=DiscriminatorConfig(in_channels=1)).validate()


def test_convert_roundtrip_and_errors(params):
    sd = to_state_dict(params)
    back = convert_vae(sd, TINY)
    assert_trees_equal(back, params)
    # legacy attention names (query / key / value / proj_attn) give the same params
    legacy = {k.replace("to_q", "query").replace("to_k", "key").replace("to_v", "value")
              .replace("to_out.0", "proj_attn"): v for k, v in sd.items()}
    assert "decoder.mid_block.attentions.0.proj_attn.weight" in legacy
    back = convert_vae(legacy, TINY)
    assert_trees_equal(back, params)

    key = "decoder.up_blocks.1.resnets.1.conv1.weight"
    with pytest.raises(ValueError, match=f"missing.*{key}"):
        convert_vae({k: v for k, v in sd.items() if k != key}, TINY)
    with pytest.raises(ValueError, match="does not use.*encoder.extra.weight"):
        convert_vae({**sd, "encoder.extra.weight": np.zeros(3)}, TINY)
    with pytest.raises(ValueError, match=rf"{key}.*\(16, 8, 3, 3\).*\(3, 3, 8, 8\)"):
        convert_vae({**sd, key: np.zeros((16, 8, 3, 3))}, TINY)
    with pytest.raises(ValueError, match="both.*query"):
        convert_vae({**sd, "encoder.mid_block.attentions.0.query.weight": sd[
            "encoder.mid_block.attentions.0.to_q.weight"]}, TINY)
    no_attn = dataclasses.replace(TINY, mid_block_add_attention=False, use_quant_conv=False)
    with pytest.raises(ValueError, match="does not use.*(attentions|quant_conv)"):
        convert_vae(sd, no_attn)


def test_load_vae_missing_paths(tmp_path, params):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        load_vae(missing)
    (tmp_path / "config.json").write_text(json.dumps(TINY_DIFFUSERS))
    with pytest.raises(FileNotFoundError, match=f"diffusion_pytorch_model.safetensors.*{re.escape(str(tmp_path))}"):
        load_vae(tmp_path)
    from safetensors.numpy import save_file

    save_file(to_state_dict(params), str(tmp_path / "diffusion_pytorch_model.safetensors"))
    cfg, loaded = load_vae(tmp_path)
    assert cfg == TINY
    assert_trees_equal(loaded, params)


# ---- posterior, latents, scale, psnr ------------------------------------------------------------

def test_shapes_and_latent_scaling(fns, params):
    x = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (2, 16, 16, 3)), jnp.float32)
    post = fns.encode(params, x)
    assert post.mean.shape == post.logvar.shape == (2, 8, 8, 4)
    assert fns.decode(params, post.mean).shape == (2, 16, 16, 3)
    z = fns.encode_latents(params, x, jax.random.key(0))  # a posterior sample, scaled
    noise = (z / TINY.scaling_factor - post.mean) / post.std
    assert 0.8 < float(jnp.std(noise)) < 1.2 and abs(float(jnp.mean(noise))) < 0.15
    shifted = dataclasses.replace(TINY, scaling_factor=1.5, shift_factor=0.25)
    np.testing.assert_allclose(to_diffusion_latents(post.mean, shifted), (post.mean - 0.25) * 1.5, rtol=1e-6)
    np.testing.assert_allclose(from_diffusion_latents(to_diffusion_latents(post.mean, shifted), shifted),
                               post.mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fns.decode_latents(params, post.mean * TINY.scaling_factor),
                               fns.decode(params, post.mean), rtol=1e-4, atol=1e-5)


def test_posterior_clip_sample_kl():
    moments = jnp.concatenate([jnp.full((1, 2, 2, 1), 0.5), jnp.array([-40.0, 0.0, 1.0, 25.0]).reshape(1, 2, 2, 1)],
                              axis=-1)
    post = DiagonalGaussian.from_moments(moments)
    np.testing.assert_array_equal(post.logvar.ravel(), [-30.0, 0.0, 1.0, 20.0])
    lv = np.array([-30.0, 0.0, 1.0, 20.0])
    np.testing.assert_allclose(post.kl(), [0.5 * np.sum(0.25 + np.exp(lv) - 1 - lv)], rtol=1e-6)
    s = jit(lambda k: DiagonalGaussian(jnp.full((4000, 1, 1, 1), 2.0), jnp.full((4000, 1, 1, 1), math.log(9.0)))
            .sample(k))(jax.random.key(0))
    assert abs(float(s.mean()) - 2.0) < 0.15 and abs(float(s.std()) - 3.0) < 0.15


def test_estimate_scaling_factor_known_distribution():
    images = np.random.default_rng(0).standard_normal((512, 4, 4, 1)).astype(np.float32)
    encode_fn = jit(lambda p, x: (3.0 * x + 1.0, jnp.full_like(x, math.log(16.0))))
    scale, shift = estimate_scaling_factor(encode_fn, None, images, batch_size=256, return_shift=True)
    assert abs(scale - 1 / 3) < 0.01 and abs(shift - 1.0) < 0.05
    sampled = estimate_scaling_factor(encode_fn, None, images, key=jax.random.key(1), batch_size=256)
    assert abs(sampled - 1 / 5) < 0.005  # std of mean (3) and of the posterior noise (4) add in quadrature


def test_psnr():
    x = jnp.zeros((2, 4, 4, 3))
    np.testing.assert_allclose(psnr(x, x + jnp.array([0.2, 0.02])[:, None, None, None]), [20.0, 40.0], rtol=1e-5)


# ---- training ---------------------------------------------------------------------------------------

def _smooth_images(n=8, size=16, seed=0):
    rng = np.random.default_rng(seed)
    u = np.linspace(0, 1, size)
    f = rng.uniform(0.5, 2.0, (n, 1, 1, 3)) * 2 * np.pi
    ph = rng.uniform(0, 2 * np.pi, (n, 1, 1, 3))
    img = np.sin(f * u[None, :, None, None] + ph) * np.cos(f * u[None, None, :, None] - ph)
    return jnp.asarray(img, jnp.float32)


DISC = DiscriminatorConfig(in_channels=3, channels=8, num_layers=2, norm_num_groups=4)


def test_vae_loss_decreases(params):
    """A few Adam steps on a fixed batch; the PatchGAN term switches on at step 6 (one compiled step)."""
    kl_weight, disc_weight, start = 1e-3, 1.0, 6
    cfg = VAELossConfig(vae=TINY, reconstruction="l2", kl_weight=kl_weight, discriminator=DISC,
                        disc_weight=disc_weight, disc_start=start)
    d_params = nnx.to_pure_dict(nnx.split(PatchDiscriminator(
        DISC, rngs=nnx.Rngs(jax.random.key(0, impl="unsafe_rbg"))), nnx.Param)[1])
    opt = optax.adam(3e-3)
    batch = {"image": _smooth_images()}

    @jit
    def step(p, o, i):
        (loss, aux), g = jax.value_and_grad(vae_loss, has_aux=True)(
            p, batch, jax.random.fold_in(jax.random.key(0), i), cfg, step=i, disc_params=d_params)
        upd, o = opt.update(g, o, p)
        return optax.apply_updates(p, upd), o, aux.metrics

    p, o = params, opt.init(params)
    history = []
    for i in range(12):
        p, o, m = step(p, o, i)
        history.append({k: float(v) for k, v in m.items()})
    first, last = history[0], history[-1]
    assert all(np.isfinite(h["loss"]) for h in history)
    assert last["rec"] < 0.6 * first["rec"] and last["loss"] < 0.6 * first["loss"], history
    assert last["psnr"] > first["psnr"] + 2.0, history
    for i, h in enumerate(history):
        adv = disc_weight * h["g_loss"] if i >= start else 0.0
        assert h["disc_factor"] == float(i >= start)
        assert h["loss"] == pytest.approx(h["rec"] + kl_weight * h["kl"] + adv, rel=1e-5)
    with pytest.raises(ValueError, match="disc_params"):
        vae_loss(params, batch, None, cfg)


def test_discriminator_learns():
    cfg = VAELossConfig(vae=TINY, discriminator=DISC, disc_start=1)
    assert float(hinge_d_loss(jnp.full((2, 3), 2.0), jnp.full((2, 3), -2.0))) == 0.0
    assert float(hinge_d_loss(jnp.zeros(3), jnp.zeros(3))) == 1.0
    d_params = nnx.to_pure_dict(nnx.split(PatchDiscriminator(
        DISC, rngs=nnx.Rngs(jax.random.key(0, impl="unsafe_rbg"))), nnx.Param)[1])
    real = _smooth_images(4)
    fake = real + 0.3 * jnp.asarray(np.random.default_rng(0).standard_normal(real.shape), jnp.float32)
    opt = optax.adam(1e-3)

    @jit
    def d_step(dp, o, i):
        (loss, m), grads = jax.value_and_grad(discriminator_loss, has_aux=True)(dp, real, fake, cfg, step=i)
        upd, o = opt.update(grads, o, dp)
        return optax.apply_updates(dp, upd), o, loss, m

    *_, loss0, m0 = d_step(d_params, opt.init(d_params), 0)  # before disc_start: no loss
    assert float(loss0) == 0.0 and m0["logits_real"].shape == ()
    dp, o = d_params, opt.init(d_params)
    losses = []
    for _ in range(10):
        dp, o, loss, m = d_step(dp, o, 1)
        losses.append(float(loss))
    assert losses[0] > 0.5 and losses[-1] < 0.2 * losses[0], losses  # real vs noisy copies: separable
    assert float(m["logits_real"]) > 1.0 and float(m["logits_fake"]) < -1.0


# ---- parity with diffusers (torch) ------------------------------------------------------------------

@pytest.fixture(scope="module")
def torch_vae():
    torch, diffusers = need("torch", "diffusers")
    model = random_torch_model(diffusers.AutoencoderKL, seed=0, perturb=None, **TINY_DIFFUSERS).float()
    with torch.no_grad():  # non-trivial GroupNorm affines, so that their conversion is checked too
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(p))
    return model


@pytest.mark.torch
def test_parity_with_diffusers(torch_vae, fns, tmp_path):
    torch = need("torch")
    cfg = VAEConfig.from_diffusers(dict(torch_vae.config))
    assert cfg == TINY
    params = convert_vae(torch_vae.state_dict(), cfg)
    x = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    with torch.no_grad():
        dist = torch_vae.encode(to_torch(x, nchw_from_nhwc=True)).latent_dist
        ref_mean, ref_logvar = nhwc(dist.mean), nhwc(dist.logvar)
        ref_x = nhwc(torch_vae.decode(dist.mean).sample)
    post = fns.encode(params, jnp.asarray(x))
    out = fns.decode(params, jnp.asarray(ref_mean))
    for name, ours, ref in [("mean", post.mean, ref_mean), ("logvar", post.logvar, ref_logvar), ("decode", out, ref_x)]:
        assert_rel_close(ours, ref, RTOL, name)

    torch_vae.save_pretrained(str(tmp_path / "st"))                           # safetensors
    torch_vae.save_pretrained(str(tmp_path / "bin"), safe_serialization=False)  # torch pickle
    for sub in ("st", "bin"):
        loaded_cfg, loaded = load_vae(tmp_path / sub)
        assert loaded_cfg == cfg
        assert_trees_equal(loaded, params)


@pytest.mark.torch
def test_kl_matches_torch():
    need("torch", "diffusers")
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    moments = np.random.default_rng(0).normal(0, 3, (3, 8, 4, 4)).astype(np.float32)
    moments[0, 4, 0, 0] = -50.0  # clipped logvar
    ref = DiagonalGaussianDistribution(to_torch(moments))
    ours = DiagonalGaussian.from_moments(jnp.asarray(nhwc(moments)))
    np.testing.assert_allclose(ours.logvar, nhwc(ref.logvar), rtol=0, atol=0)
    np.testing.assert_allclose(ours.kl(), ref.kl().numpy(), rtol=1e-5)
    np.testing.assert_allclose(ours.std, nhwc(ref.std), rtol=1e-6)


def test_graphdef_is_cached():
    assert vae_graphdef(TINY) is vae_graphdef(dataclasses.replace(TINY))
