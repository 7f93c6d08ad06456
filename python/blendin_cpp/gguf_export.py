"""Write llama-architecture GGUF files from numpy weights and a byte-level BPE tokenizer.

Used by the generated test models (`blendin_cpp.testing`) and by the demo-model trainer
(`models/train_demo.py`). Facts this relies on (llama.cpp 0c1e570, gguf 0.19.0):
- numpy matrices are given in (out, in) order, as PyTorch's Linear stores them; the writer
  reverses the dimensions, so llama.cpp sees ne = (in, out).
- norm weights must be f32 (f16 norms load, then abort on the first decode).
- `tokenizer.ggml.pre = "default"` splits digit runs off words; "gpt2" is rejected.
- rotary embedding for the llama architecture rotates adjacent pairs; weights trained with that
  convention need no Q/K permutation.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# llama.cpp token types (llama_token_type in llama.h)
TOKEN_NORMAL = 1
TOKEN_CONTROL = 3


@dataclass
class LlamaShape:
    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_ctx: int = 2048
    rms_eps: float = 1e-5
    rope_base: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


@dataclass
class Tokenizer:
    """A byte-level BPE vocabulary in GGUF form: GPT-2 byte symbols, merges as "a b" strings."""
    tokens: list[str]
    types: list[int]
    merges: list[str]
    bos: int
    eos: int
    eot: int | None = None
    add_bos: bool = True
    special: dict[str, int] = field(default_factory=dict)


def tensor_shapes(shape: LlamaShape, tied_output: bool = False) -> dict[str, tuple[int, ...]]:
    """Every tensor of a llama model with its numpy shape ((out, in) for matrices)."""
    e, hd = shape.n_embd, shape.head_dim
    kv = shape.n_head_kv * hd
    out = {"token_embd.weight": (shape.n_vocab, e), "output_norm.weight": (e,)}
    if not tied_output:
        out["output.weight"] = (shape.n_vocab, e)
    for i in range(shape.n_layer):
        b = f"blk.{i}."
        out.update({
            b + "attn_norm.weight": (e,),
            b + "attn_q.weight": (e, e),
            b + "attn_k.weight": (kv, e),
            b + "attn_v.weight": (kv, e),
            b + "attn_output.weight": (e, e),
            b + "ffn_norm.weight": (e,),
            b + "ffn_gate.weight": (shape.n_ff, e),
            b + "ffn_up.weight": (shape.n_ff, e),
            b + "ffn_down.weight": (e, shape.n_ff),
        })
    return out


def write_llama(path: str | Path, shape: LlamaShape, tensors: dict[str, np.ndarray],
                tokenizer: Tokenizer, *, name: str = "blendin-generated",
                chat_template: str | None = None, dtype: str = "f32",
                metadata: dict[str, object] | None = None) -> Path:
    """Write one GGUF file. `dtype` ("f32" or "f16") applies to matrices; norms stay f32.

    `metadata` entries are stored as strings/ints/floats under their own keys (use a
    `blendin.` prefix for ours, e.g. how a model was made)."""
    import gguf  # imported here: only writers of models need the gguf package

    if dtype not in ("f32", "f16"):
        raise ValueError(f"dtype must be 'f32' or 'f16', not {dtype!r}")
    expected = tensor_shapes(shape, tied_output="output.weight" not in tensors)
    if set(tensors) != set(expected):
        missing = sorted(set(expected) - set(tensors))
        extra = sorted(set(tensors) - set(expected))
        raise ValueError(f"tensor set does not match the llama layout: missing {missing}, extra {extra}")
    for k, want in expected.items():
        if tuple(tensors[k].shape) != want:
            raise ValueError(f"tensor {k} has shape {tensors[k].shape}, expected {want}")
    if len(tokenizer.tokens) != shape.n_vocab:
        raise ValueError(f"tokenizer has {len(tokenizer.tokens)} tokens, shape says {shape.n_vocab}")

    path = Path(path)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(name)
    w.add_context_length(shape.n_ctx)
    w.add_embedding_length(shape.n_embd)
    w.add_block_count(shape.n_layer)
    w.add_feed_forward_length(shape.n_ff)
    w.add_head_count(shape.n_head)
    w.add_head_count_kv(shape.n_head_kv)
    w.add_layer_norm_rms_eps(shape.rms_eps)
    w.add_rope_freq_base(shape.rope_base)
    w.add_rope_dimension_count(shape.head_dim)
    w.add_vocab_size(shape.n_vocab)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32)

    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokenizer.tokens)
    w.add_token_types(tokenizer.types)
    w.add_token_merges(tokenizer.merges)
    w.add_bos_token_id(tokenizer.bos)
    w.add_eos_token_id(tokenizer.eos)
    if tokenizer.eot is not None:
        w.add_eot_token_id(tokenizer.eot)
    w.add_add_bos_token(tokenizer.add_bos)
    w.add_add_eos_token(False)
    if chat_template is not None:
        w.add_chat_template(chat_template)
    for key, value in (metadata or {}).items():
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_int64(key, value)
        elif isinstance(value, float):
            w.add_float64(key, value)
        else:
            w.add_string(key, str(value))

    for k in expected:  # a stable order: embeddings, output, then layer by layer
        t = np.ascontiguousarray(tensors[k], dtype=np.float32)
        if dtype == "f16" and t.ndim == 2:
            t = t.astype(np.float16)
        w.add_tensor(k, t)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
