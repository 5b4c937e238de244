"""Text encoders in Flax NNX (used functionally) and their tokenizers.

- `CLIPTextModel` (+ `CLIPTokenizer` from CLIP's BPE vocabulary): Stable Diffusion's text encoder.
- `BertModel` + `sentence_embedding`; `load_minilm` / `encode_text`: the pretrained all-MiniLM-L6-v2.
- `load_clip_text` / `load_bert`: transformers folders (config.json + safetensors / .bin) -> params.
"""

from diffusion_jax.models.text.bert import (
    BertConfig,
    BertModel,
    make_bert_apply,
    sentence_embedding,
)
from diffusion_jax.models.text.clip import CLIPTextConfig, CLIPTextModel, make_clip_apply
from diffusion_jax.models.text.clip_tokenizer import CLIPTokenizer
from diffusion_jax.models.text.common import LoadedModel
from diffusion_jax.models.text.convert import (
    convert_bert,
    convert_clip_text,
    load_bert,
    load_clip_text,
    read_checkpoint,
)
from diffusion_jax.models.text.minilm import (
    WordPieceTokenizer,
    encode_text,
    load_minilm,
    minilm_tokenizer,
)

__all__ = [
    "BertConfig", "BertModel", "CLIPTextConfig", "CLIPTextModel", "CLIPTokenizer", "LoadedModel",
    "WordPieceTokenizer", "convert_bert", "convert_clip_text", "encode_text", "load_bert", "load_clip_text",
    "load_minilm", "make_bert_apply", "make_clip_apply", "minilm_tokenizer", "read_checkpoint",
    "sentence_embedding",
]
