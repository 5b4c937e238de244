"""CLIP's byte-level BPE tokenizer, built on the `tokenizers` package from CLIP's own vocabulary file.

The vocabulary `bpe_simple_vocab_16e6.txt.gz` (OpenAI CLIP's, also in the `open-clip-torch` wheel) holds
the BPE merges; the 49408-entry vocabulary is derived from them exactly as CLIP's SimpleTokenizer does.
Text handling (NFC, whitespace collapsed, lower case, CLIP's pre-tokenisation regex) is transformers'
CLIPTokenizer's, so ids equal those of transformers and of Stable Diffusion pipelines. Like transformers
(and unlike OpenAI's code) it does not run ftfy or html.unescape on the text.

    tok = CLIPTokenizer.from_vocab()                 # or from_vocab(path to .gz, or an HF tokenizer folder)
    batch = tok(["a photo of a cat"])                # input_ids, attention_mask: int32 (B, 77)
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import os
from collections.abc import Sequence

import numpy as np

VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP map of the 256 bytes onto printable unicode characters (byte -> char)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def default_vocab_path() -> str:
    """The vocabulary file inside the installed open_clip package (found without importing it)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"CLIP's {VOCAB_FILE} ships in the open-clip-torch wheel: "
                                "pip install --no-deps open-clip-torch (or pass its path explicitly)")
    path = os.path.join(next(iter(spec.submodule_search_locations)), VOCAB_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path!r} does not exist (reinstall open-clip-torch)")
    return path


def clip_vocab_and_merges(path: str) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's SimpleTokenizer construction: (token -> id for 49408 tokens, the 48894 merges in rank order)."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, merges


def frame_batch(ids: Sequence[Sequence[int]], max_length: int, bos: int, eos: int, pad: int) -> dict[str, np.ndarray]:
    """[bos] + ids[:max_length - 2] + [eos], right-padded with `pad` to max_length.

    Returns input_ids and attention_mask (1 on bos..eos, 0 on padding), int32 (B, max_length).
    """
    if max_length < 2:
        raise ValueError(f"max_length={max_length} leaves no room for the start and end tokens")
    input_ids = np.full((len(ids), max_length), pad, np.int32)
    mask = np.zeros((len(ids), max_length), np.int32)
    for i, seq in enumerate(ids):
        row = [bos, *list(seq)[: max_length - 2], eos]
        input_ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


class CLIPTokenizer:
    """CLIP BPE tokenizer. `vocab` token -> id, `merges` in rank order; padding with `pad_token`
    (CLIP and SD 1.x pad with the end token; SD 2.x's tokenizer pads with "!")."""

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], pad_token: str = EOS):
        from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
        from tokenizers.models import BPE

        for name in (BOS, EOS, pad_token):
            if name not in vocab:
                raise ValueError(f"token {name!r} is not in the vocabulary")
        self.vocab, self.merges = vocab, merges
        self.bos_id, self.eos_id, self.pad_id = vocab[BOS], vocab[EOS], vocab[pad_token]
        tok = Tokenizer(BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix="</w>",
                            fuse_unk=False, unk_token=EOS))
        tok.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False)])
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([BOS, EOS])
        self.backend = tok

    @classmethod
    def from_vocab(cls, path: str | None = None, pad_token: str = EOS) -> CLIPTokenizer:
        """From CLIP's .txt.gz (default: the one in open_clip), or a tokenizer folder: vocab.json + merges.txt
        (the slow tokenizer's files) or tokenizer.json (what recent transformers save)."""
        path = default_vocab_path() if path is None else os.fspath(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"CLIP vocabulary {path!r} does not exist")
        if not os.path.isdir(path):
            return cls(*clip_vocab_and_merges(path), pad_token=pad_token)
        if os.path.isfile(os.path.join(path, "vocab.json")) and os.path.isfile(os.path.join(path, "merges.txt")):
            with open(os.path.join(path, "vocab.json"), encoding="utf-8") as f:
                vocab = json.load(f)
            with open(os.path.join(path, "merges.txt"), encoding="utf-8") as f:
                lines = [line for line in f.read().split("\n") if line and not line.startswith("#version")]
            return cls(vocab, [tuple(line.split()) for line in lines], pad_token)
        fast = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(fast):
            raise FileNotFoundError(f"tokenizer folder {path!r} has neither vocab.json + merges.txt nor "
                                    "tokenizer.json")
        with open(fast, encoding="utf-8") as f:
            model = json.load(f).get("model", {})
        if model.get("type") != "BPE":
            raise ValueError(f"{fast}: model type {model.get('type')!r} is not CLIP's BPE")
        merges = [tuple(m.split()) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        return cls(model["vocab"], merges, pad_token)

    def save_vocab(self, directory: str) -> None:
        """Write vocab.json + merges.txt (the files transformers' CLIPTokenizer reads)."""
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "vocab.json"), "w", encoding="utf-8") as f:
            json.dump(self.vocab, f, ensure_ascii=False)
        with open(os.path.join(directory, "merges.txt"), "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in self.merges))

    def encode(self, text: str) -> list[int]:
        """Token ids of one text, without the start / end tokens."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of token ids up to the first end token (start token dropped), words separated by spaces."""
        ids = [int(i) for i in ids]
        ids = ids[: ids.index(self.eos_id)] if self.eos_id in ids else ids
        keep = [i for i in ids if i != self.bos_id]
        return self.backend.decode(keep).replace("</w>", " ").strip()

    def __call__(self, texts: str | Sequence[str], max_length: int = 77) -> dict[str, np.ndarray]:
        """texts -> input_ids, attention_mask int32 (B, max_length); long texts keep the end token."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        ids = [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]
        return frame_batch(ids, max_length, self.bos_id, self.eos_id, self.pad_id)
