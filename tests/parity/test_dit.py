"""DiT (models/dit.py): the paper's sizes (Table 1) by eval_shape, parity with diffusers' DiTTransformer2DModel on
converted random weights (convert_dit.py), and the network's own conventions (null class, zero-initialised output,
validation)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from harness import meta_model, need, random_torch_model, run_nhwc, torch_param_count

from diffusion_jax.models.convert_dit import convert_dit, dit_config_from_diffusers
from diffusion_jax.models.dit import DiT, DiTConfig, dit_config, sincos_pos_embed


def n_params(config) -> int:
    _, params = nnx.split(nnx.eval_shape(lambda: DiT(config, rngs=nnx.Rngs(0))), nnx.Param)
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def formula(D, N, p, C=4, classes=1000):
    """DiT's parameter count written out: patch conv, timestep MLP, label table (+ null), N blocks of qkv, proj, MLP
    and adaLN (18 D^2 + 15 D), the final adaLN and linear."""
    return (p * p * C * D + D) + (256 * D + D + D * D + D) + (classes + 1) * D + N * (18 * D * D + 15 * D) \
        + (2 * D * D + 2 * D) + (D * p * p * 2 * C + p * p * 2 * C)


@pytest.mark.parametrize("name, millions", [("DiT-S/2", 33), ("DiT-B/4", 130), ("DiT-L/2", 458), ("DiT-XL/2", 675)])
def test_paper_sizes(name, millions):
    """Table 1's parameter counts (in millions, rounded as the paper prints them), without allocating. DiT's own code
    reports 675,129,632 for DiT-XL/2, counting its fixed sin-cos position embedding (a frozen Parameter of 256 x 1152),
    which here is a constant."""
    config = dit_config(name)
    size, _, patch = name[4:].partition("/")
    count = n_params(config)
    assert count == formula(config.hidden_size, config.depth, int(patch))
    assert round(count / 1e6) == millions, count
    if name == "DiT-XL/2":
        assert count + 256 * 1152 == 675_129_632


@pytest.mark.torch
def test_counts_match_diffusers():
    """diffusers' DiT-S/2 holds 12 copies of the timestep / label embedder (one per block); ours shares one."""
    _, diffusers = need("torch", "diffusers")
    ref = meta_model(diffusers.DiTTransformer2DModel, num_attention_heads=6, attention_head_dim=64, num_layers=12,
                     sample_size=32, patch_size=2, in_channels=4, out_channels=8, num_embeds_ada_norm=1000)
    D = 384
    embedder = 256 * D + D + D * D + D + 1001 * D
    assert torch_param_count(ref) - 11 * embedder == n_params(dit_config("DiT-S/2"))


TINY = dict(num_attention_heads=2, attention_head_dim=16, num_layers=2, sample_size=8, patch_size=2, in_channels=4,
            out_channels=8, num_embeds_ada_norm=10)


@pytest.fixture(scope="module")
def reference():
    torch, diffusers = need("torch", "diffusers")
    ref = random_torch_model(diffusers.DiTTransformer2DModel, seed=0, perturb=0.1, **TINY)
    with torch.no_grad():   # real checkpoints hold one embedder, copied into every block
        for block in ref.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(ref.transformer_blocks[0].norm1.emb.state_dict())
    return ref


@pytest.mark.torch
def test_parity_with_diffusers(reference):
    config = dit_config_from_diffusers(reference.config)
    assert (config.hidden_size, config.depth, config.freq_shift, config.mlp_norm_eps) == (32, 2, 1.0, 1e-5)
    params = convert_dit(reference.state_dict(), config)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: DiT(config, rngs=nnx.Rngs(0))), nnx.Param)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 8, 8, 4)).astype(np.float32)
    t, y = np.array([3.0, 500.0, 999.0], np.float32), np.array([0, 9, 10], np.int64)    # 10: the null class
    ours = np.asarray(jax.jit(lambda p, x, t, y: nnx.merge(graphdef, p)(x, t, y))(params, x, t, y))
    want = run_nhwc(reference, x, t, class_labels=y)
    assert ours.shape == want.shape == (3, 8, 8, 8)
    assert np.abs(ours - want).max() <= 1e-4 * np.abs(want).max()


@pytest.mark.torch
def test_the_hubs_transformer_2d_model_class_converts_too():
    """facebook/DiT-XL-2-256 names Transformer2DModel with norm_type 'ada_norm_zero' on patches: the same modules."""
    torch, diffusers = need("torch", "diffusers")
    dit_keys = dict(norm_type="ada_norm_zero", activation_fn="gelu-approximate", attention_bias=True,
                    norm_elementwise_affine=False)
    ref = random_torch_model(diffusers.Transformer2DModel, seed=2, perturb=0.1, **TINY, **dit_keys)
    with torch.no_grad():
        for block in ref.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(ref.transformer_blocks[0].norm1.emb.state_dict())
    cfg = {**dict(ref.config), "_class_name": "Transformer2DModel"}
    config = dit_config_from_diffusers(cfg)
    params = convert_dit(ref.state_dict(), config)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: DiT(config, rngs=nnx.Rngs(0))), nnx.Param)
    x = np.random.default_rng(3).standard_normal((2, 8, 8, 4)).astype(np.float32)
    t, y = np.array([10.0, 700.0], np.float32), np.array([4, 10], np.int64)
    ours = np.asarray(nnx.merge(graphdef, params)(x, t, y))
    want = run_nhwc(ref, x, timestep=t, class_labels=y)
    assert np.abs(ours - want).max() <= 1e-4 * np.abs(want).max()
    # its defaults are a text-to-image transformer's: left out, they are refused by name
    with pytest.raises(ValueError, match="activation_fn='geglu' is not supported"):
        dit_config_from_diffusers({**TINY, "norm_type": "ada_norm_zero", "_class_name": "Transformer2DModel"})
    with pytest.raises(ValueError, match="cross_attention_dim=64 is not DiT's"):
        dit_config_from_diffusers({**cfg, "cross_attention_dim": 64})
    with pytest.raises(ValueError, match="interpolation_scale 2"):
        dit_config_from_diffusers({**cfg, "sample_size": 128})
    with pytest.raises(ValueError, match="without patch_size"):
        dit_config_from_diffusers({**cfg, "patch_size": None})
    with pytest.raises(ValueError, match="'UNet2DModel' is not a DiT"):
        dit_config_from_diffusers({**TINY, "_class_name": "UNet2DModel"})


@pytest.mark.torch
def test_converter_refuses_what_differs(reference):
    config = dit_config_from_diffusers(reference.config)
    sd = {k: v.clone() for k, v in reference.state_dict().items()}
    sd["transformer_blocks.1.norm1.emb.timestep_embedder.linear_1.bias"] += 1.0
    with pytest.raises(ValueError, match="transformer_blocks.1.norm1.emb.timestep_embedder.linear_1.bias.* differs"):
        convert_dit(sd, config)
    with pytest.raises(ValueError, match="norm_type='ada_norm_single' is not supported"):
        dit_config_from_diffusers({**TINY, "norm_type": "ada_norm_single"})
    with pytest.raises(ValueError, match=r"keys \['caption_channels'\] are not known"):
        dit_config_from_diffusers({**TINY, "caption_channels": 4})


def test_network_conventions():
    config = DiTConfig(image_size=8, in_channels=1, patch_size=2, hidden_size=32, depth=2, num_heads=4, num_classes=10)
    model = DiT(config, rngs=nnx.Rngs(jax.random.key(0, impl="unsafe_rbg")))
    x, t = np.ones((2, 8, 8, 1), np.float32), np.array([1.0, 500.0], np.float32)
    out = model(x, t, np.array([3, 10]))
    assert out.shape == (2, 8, 8, 1) and not np.any(np.asarray(out))        # adaLN-Zero: the output starts at zero
    np.testing.assert_array_equal(model(x, t), out)                          # y None: the null class
    learned = DiT(DiTConfig(image_size=8, in_channels=1, hidden_size=32, depth=1, num_heads=4, pos_embed="learned"),
                  rngs=nnx.Rngs(0))
    assert learned.pos.shape == (16, 32)
    emb = sincos_pos_embed(32, 4)
    assert emb.shape == (16, 32) and np.allclose(emb[0], np.r_[np.zeros(8), np.ones(8), np.zeros(8), np.ones(8)])
    for bad, key in ((dict(patch_size=3), "model.patch_size"), (dict(num_heads=5), "model.num_heads"),
                     (dict(context_dim=8), "model.context_dim"), (dict(pos_embed="rope"), "model.pos_embed")):
        with pytest.raises(ValueError, match=key.replace(".", r"\.")):
            DiTConfig(**{"image_size": 8, "hidden_size": 32, "num_heads": 4, **bad}).validate()
    with pytest.raises(ValueError, match="unconditional"):
        DiT(DiTConfig(image_size=8, in_channels=1, hidden_size=32, depth=1, num_heads=4), rngs=nnx.Rngs(0))(
            x, t, jnp.array([1, 2]))
