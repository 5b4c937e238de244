"""U-ViT (models/uvit.py): the paper's U-ViT-S size, the tokens (time, label with its null class, patches) and the
long skips, and validation. (It trains through the CLI in tests/e2e/test_backbones.py.)"""
import jax
import numpy as np
import pytest
from conftest import numpy_fill
from flax import nnx

from diffusion_jax.models.uvit import UViT, UViTConfig


def n_params(config) -> int:
    _, params = nnx.split(nnx.eval_shape(lambda: UViT(config, rngs=nnx.Rngs(0))), nnx.Param)
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def test_uvit_s_size():
    """U-ViT-S/2 of the official CIFAR-10 config (32 x 32 x 3, patch 2, D 512, depth 12 + mid = the paper's 13
    layers, 8 heads, no qkv bias, unconditional): 44M parameters (the paper's Table 1), term by term."""
    config = UViTConfig(image_size=32, in_channels=3, patch_size=2, hidden_size=512, depth=12, num_heads=8)
    D, blocks, skips, tokens = 512, 13, 6, 1 + 16 * 16
    block = 3 * D * D + (D * D + D) + 4 * D + (4 * D * D + 4 * D) + (4 * D * D + D)   # qkv, proj, 2 LN, MLP
    count = (4 * 3 * D + D) + tokens * D + blocks * block + skips * (2 * D * D + D) + 2 * D + (D * 12 + 12) \
        + (9 * 3 * 3 + 3)
    assert n_params(config) == count and round(count / 1e6) == 44
    assert n_params(UViTConfig(skip=False)) == count - skips * (2 * D * D + D)
    labelled = UViTConfig(num_classes=10, mlp_time_embed=True)
    assert n_params(labelled) == count + 11 * D + D + (D * 4 * D + 4 * D) + (4 * D * D + D)   # table, token, MLP


@pytest.fixture(scope="module")
def tiny():
    """A tiny class-conditional U-Net of tokens with random params (numpy-filled: no initialiser to compile)."""
    config = UViTConfig(image_size=8, in_channels=1, patch_size=2, hidden_size=32, depth=2, num_heads=4,
                        num_classes=10)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: UViT(config, rngs=nnx.Rngs(0))), nnx.Param)
    state = numpy_fill(nnx.to_pure_dict(abstract))
    return config, graphdef, state


def test_tokens_skips_and_null_class(tiny):
    config, graphdef, state = tiny
    run = jax.jit(lambda s, x, t, y: nnx.merge(graphdef, s)(x, t, y))
    x = np.random.default_rng(0).standard_normal((2, 8, 8, 1)).astype(np.float32)
    t = np.array([10.0, 700.0], np.float32)
    out = np.asarray(run(state, x, t, np.array([3, 10])))
    assert out.shape == (2, 8, 8, 1) and np.isfinite(out).all()
    np.testing.assert_array_equal(np.asarray(run(state, x, t, None)),              # y None: the null class (10)
                                  np.asarray(run(state, x, t, np.array([10, 10]))))
    assert not np.allclose(run(state, x, t, np.array([4, 10])), out)              # the label token
    assert not np.allclose(run(state, x, t[::-1], np.array([3, 10])), out)        # the time token
    cut = jax.tree.map(lambda a: a, state)                                         # a copy to change
    w = cut["out_blocks"][0]["skip_linear"]["kernel"]
    cut["out_blocks"][0]["skip_linear"]["kernel"] = w.at[32:].set(0.0)            # the long skip's half of it
    assert not np.allclose(run(cut, x, t, np.array([3, 10])), out)
    np.testing.assert_array_equal(np.asarray(run(state, x, t, np.array([3, 10]))), out)   # the original unchanged


@pytest.mark.parametrize("changes, key", [(dict(depth=3), "model.depth"), (dict(patch_size=3), "model.patch_size"),
                                          (dict(num_heads=5), "model.num_heads"), (dict(context_dim=8),
                                                                                    "model.context_dim")])
def test_validation_names_the_key(changes, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        UViTConfig(**changes).validate()
