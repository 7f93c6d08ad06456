"""`Model`: one GGUF model and its llama.cpp context, owned by the C++ core."""
from __future__ import annotations

import math
import os
import re
import uuid
from functools import cached_property
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from . import _core
from .text import check_text, literal_pattern


class ContextLengthError(ValueError):
    """A prompt that cannot fit a model's context; `min_tokens`: the fewest tokens it can have."""

    def __init__(self, message: str, min_tokens: int):
        super().__init__(message)
        self.min_tokens = min_tokens


AMX_ENV = "BLENDIN_CPP_AMX"


def amx_requested(amx: bool | None = None) -> bool:
    """Whether a model that is not deterministic may use llama.cpp's AMX weight buffers: `amx` if
    given, else BLENDIN_CPP_AMX=1."""
    if amx is not None:
        return bool(amx)
    return os.environ.get(AMX_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def use_extra_buffer_types(deterministic: bool = True, amx: bool | None = None) -> bool:
    """The `use_extra_bufts` a load gets: llama.cpp takes all of its extra CPU weight buffer types
    (CPU_REPACK, AMX where the CPU has it) or none. None for a deterministic model: their kernels
    take another accumulation order for one row than for several, so a row's logits would depend on
    the batch it came in. Otherwise all of them, except on a CPU that offers AMX unless AMX is asked
    for (`amx_requested`): llama.cpp's AMX matmul segfaults on quantized models on some Xeons."""
    if deterministic:
        return False
    return amx_requested(amx) or "AMX" not in _core.cpu_extra_buffer_types()


def gpu_devices() -> list[str]:
    """The GPUs llama.cpp can use in this build on this machine ("CUDA0: NVIDIA H200, 143771 MiB");
    empty for a CPU build of llama-cpp-python or a machine without a usable GPU."""
    return list(_core.gpu_devices())


def default_gpu_layers(rpc_servers: Sequence[str] = ()) -> int:
    """The `n_gpu_layers` a load gets when none is given: every layer (-1) where there is somewhere
    to put them (a GPU in this build, or RPC servers), else 0 (the CPU). llama.cpp's own default
    (llama_model_default_params) is also every layer; llama-server's is "auto" (as many as fit);
    llama-cpp-python's `Llama` defaults to 0."""
    return -1 if rpc_servers or gpu_devices() else 0


def parse_rpc(rpc: str | Iterable[str] | None) -> list[str]:
    """RPC servers as a list of "host:port": a list, or one string with commas ("a:1,b:2")."""
    if rpc is None:
        return []
    items = rpc.split(",") if isinstance(rpc, str) else list(rpc)
    out = []
    for item in items:
        if not isinstance(item, str):
            raise TypeError(f"rpc servers must be 'host:port' strings, got {type(item).__name__} {item!r}")
        if item.strip():
            out.append(item.strip())
    return out


def _int_param(name: str, value, *, minimum: int, allow_none: bool = False) -> int | None:
    """An integer for the core, which holds 32 bits: beyond them the binding could not pass it on."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    if not minimum <= value < 2 ** 31:
        raise ValueError(f"{name} must be an integer >= {minimum} and below 2^31, got {value}")
    return int(value)


class Model:
    """A GGUF model loaded through llama.cpp.

    Args:
        path: the .gguf file.
        n_ctx: KV cells in tokens, shared out among the n_seq_max sequences: each holds
            n_ctx // n_seq_max (`n_ctx_seq`) in its own cells (default: the model's training context).
        n_gpu_layers: layers to offload to the GPU or the RPC servers (-1: all; 0: none, the CPU
            alone; default: all where the llama-cpp-python build has a GPU backend and finds a GPU,
            or with `rpc`; else none). See `default_gpu_layers`.
        n_threads: CPU threads (default: all cores).
        n_batch: most tokens one decode call takes (prompts are split into such chunks).
        n_seq_max: parallel sequences in the KV cache (batched requests, best-of-N).
        kv_type: the KV cache's type: "q8_0" (a sequence's logits are the same bits alone and in a
            batch, at any length), "f16" (llama.cpp's default: the same only while a sequence
            holds fewer than 256 tokens) or "f32" (exact comparisons with other programs); default
            (None): q8_0 where 32 divides the model's head sizes, else f16 (`kv_type` says which).
        adapters: LoRA adapters as (path, scale) pairs; scales can change later with
            `set_adapter_scales` without reloading.
        verbose: print llama.cpp's log (process-wide; off by default).
        deterministic: a sequence's logits are the same bits alone and in a batch of any size
            (True, the default): llama.cpp's repacked weight buffers (CPU_REPACK, AMX), whose
            kernels round one row and several differently, are left out. False: they are used
            where the CPU offers them, faster on batches and prompts (docs/performance.md).
            `buffer_types` says where the weights went.
        amx: with `deterministic=False` on a CPU that offers AMX, use it too (default: the
            BLENDIN_CPP_AMX environment variable, else off: see "AMX on Intel Xeons" in
            docs/troubleshooting.md).
        rpc: "host:port" of llama.cpp RPC servers (`python -m blendin_cpp rpc-server` on each
            machine) that hold the model's layers, split in proportion to their free memory; needs
            llama-cpp-python built with -DGGML_RPC=on (see docs/rpc.md).
    """

    def __init__(self, path: str | os.PathLike, *, n_ctx: int | None = None, n_gpu_layers: int | None = None,
                 n_threads: int | None = None, n_batch: int = 512, n_seq_max: int = 1,
                 kv_type: str | None = None, adapters: Iterable[tuple[str | os.PathLike, float]] = (),
                 verbose: bool = False, deterministic: bool = True, amx: bool | None = None,
                 rpc: str | Iterable[str] | None = None):
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
        if not isinstance(deterministic, bool):
            raise TypeError(f"deterministic must be True or False, got {deterministic!r}")
        if deterministic and amx:
            raise ValueError("amx=True needs deterministic=False: AMX's kernels round a row differently "
                             "alone and in a batch")
        n_ctx = _int_param("n_ctx", n_ctx, minimum=1, allow_none=True)
        n_threads = _int_param("n_threads", n_threads, minimum=1, allow_none=True)
        rpc_servers = parse_rpc(rpc)
        if n_gpu_layers is None:
            n_gpu_layers = default_gpu_layers(rpc_servers)
        n_gpu_layers = _int_param("n_gpu_layers", n_gpu_layers, minimum=-1)
        n_batch = _int_param("n_batch", n_batch, minimum=1)
        n_seq_max = _int_param("n_seq_max", n_seq_max, minimum=1)
        adapter_list = []
        for item in adapters:
            try:
                apath, scale = item
                scale = float(scale)
            except (TypeError, ValueError):
                raise TypeError(f"adapters must be (path, scale) pairs, got {item!r}") from None
            if not math.isfinite(scale):
                raise ValueError(f"adapter scale for {apath} must be finite, got {scale}")
            adapter_list.append((str(apath), scale))
        if verbose:
            _core.set_verbose(True)
        self.path = str(Path(path))
        self.adapter_names = [Path(a).stem for a, _ in adapter_list]  # one knob per adapter, by file stem
        self._handle = _core.Model(self.path, n_ctx or 0, n_batch, n_seq_max, n_gpu_layers,
                                   n_threads or 0, kv_type or "", adapter_list,
                                   use_extra_buffer_types(deterministic, amx), rpc_servers)
        self.deterministic = deterministic

    def __repr__(self) -> str:
        return f"Model({self.path!r}, n_vocab={self.n_vocab}, n_ctx={self.n_ctx})"

    # --- vocabulary -------------------------------------------------------------------------
    @property
    def n_vocab(self) -> int:
        return self._handle.n_vocab

    @property
    def special_tokens(self) -> dict[str, int]:
        """bos/eos/eot ids (-1 where the model has none)."""
        h = self._handle
        return {"bos": h.bos, "eos": h.eos, "eot": h.eot}

    def is_eog(self, token: int) -> bool:
        """True for end-of-generation tokens (eos, eot and the like)."""
        return self._handle.is_eog(int(token))

    def tokenize(self, text: str, *, add_special: bool = True, special: bool = False) -> list[int]:
        """Text to token ids. `add_special` adds BOS if the model asks for it; `special` parses
        control-token text such as "<|user|>" into the control tokens."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return self._handle.tokenize(check_text("text", text), add_special, special)

    @cached_property
    def _vocab_text(self) -> tuple[dict[str, int], "re.Pattern | None", int]:
        """(the text of each control token -> its id, a pattern matching those texts, the most
        bytes one token stands for). One pass over the vocabulary, the first time it is needed."""
        h = self._handle
        controls: dict[str, int] = {}
        longest = 1
        for t in range(h.n_vocab):
            piece = h.piece(t, True)
            longest = max(longest, len(piece))
            if piece and h.is_control(t):
                controls.setdefault(piece.decode("utf-8", errors="replace"), t)
        return controls, literal_pattern(controls), longest

    def check_fits(self, text: str, what: str) -> None:
        """Raise ContextLengthError when `text` cannot fit this model's context whatever its
        tokenization, without tokenizing it: no token stands for more bytes than the longest
        piece of the vocabulary. (A long text is costly to tokenize: refuse it first.)"""
        n = len(check_text(what, text).encode("utf-8"))
        longest = self._vocab_text[2]
        if n > self.n_ctx * longest:
            least = -(-n // longest)
            raise ContextLengthError(f"{what} has {n} bytes, so at least {least} tokens (a token of {self.name} "
                                     f"stands for {longest} bytes at most): more than its context of {self.n_ctx} "
                                     "tokens", least)

    def chat_tokens(self, messages: Sequence[dict], *, add_generation_prompt: bool = True) -> list[int]:
        """This model's prompt for a conversation: its chat template rendered, the template's own
        markers as control tokens and the messages' text as text, so that a message that spells a
        marker (say "<|end|>\\n<|assistant|>") cannot end its turn or forge another. Without such
        text in any message this is llama.cpp's own tokenization of the rendered text."""
        from .chat_template import check_messages
        messages = check_messages(messages)
        text = self.render_chat(messages, add_generation_prompt=add_generation_prompt)
        self.check_fits(text, "the chat prompt")
        pattern = self._vocab_text[1]
        if pattern is None or not any(pattern.search(m["content"]) for m in messages):
            return self.tokenize(text, add_special=False, special=True)
        return self._spliced_chat_tokens(messages, text, add_generation_prompt)

    def _spliced_chat_tokens(self, messages: list[dict], text: str, add_generation_prompt: bool) -> list[int]:
        """chat_tokens for messages that spell markers (`text`: their rendering)."""
        controls, pattern, _ = self._vocab_text
        # Render again with a placeholder for each message's text: what is not a placeholder is
        # the template's. Its control-token texts are the only control tokens; the rest (the
        # template's other text and the messages' text, as the template wrote them: as they
        # are, or stripped as many templates do) is tokenized as text between them, as llama.cpp
        # tokenizes the text between the markers it finds.
        mark = f"@@{uuid.uuid4().hex}:"
        shell = self.render_chat([{"role": m["role"], "content": f"{mark}{i}@@"} for i, m in enumerate(messages)],
                                 add_generation_prompt=add_generation_prompt)
        parts = re.split(re.escape(mark) + r"(\d+)@@", shell)
        contents = [m["content"] for m in messages]
        for written in (contents, [c.strip() for c in contents]):
            if "".join(written[int(p)] if i % 2 else p for i, p in enumerate(parts)) == text:
                break
        else:
            written = contents
        tokens: list[int] = []
        raw: list[str] = []

        def flush():
            if "".join(raw):
                tokens.extend(self.tokenize("".join(raw), add_special=False, special=False))
            raw.clear()
        for i, part in enumerate(parts):
            if i % 2:
                raw.append(written[int(part)])
                continue
            at = 0
            for m in pattern.finditer(part):
                raw.append(part[at:m.start()])
                flush()
                tokens.append(controls[m.group()])
                at = m.end()
            raw.append(part[at:])
        flush()
        return tokens

    def detokenize(self, tokens: Sequence[int], *, special: bool = False) -> str:
        """Token ids to text. Control tokens are left out unless `special` is true."""
        return self.detokenize_bytes(tokens, special=special).decode("utf-8", errors="replace")

    def detokenize_bytes(self, tokens: Sequence[int], *, special: bool = False) -> bytes:
        return self._handle.detokenize(self._tokens(tokens), not special, special)

    def piece(self, token: int, *, special: bool = False) -> bytes:
        """The bytes a token stands for (may be part of a UTF-8 character)."""
        return self._handle.piece(int(token), special)

    def _tokens(self, tokens: Sequence[int]) -> list[int]:
        try:
            return [int(t) for t in tokens]
        except (TypeError, ValueError):
            raise TypeError("tokens must be a sequence of integers") from None

    # --- metadata ---------------------------------------------------------------------------
    @property
    def n_ctx(self) -> int:
        """KV cells, all sequences together."""
        return self._handle.n_ctx

    @property
    def kv_type(self) -> str:
        """The KV cache's type: "q8_0", "f16" or "f32"."""
        return self._handle.kv_type

    @property
    def n_ctx_seq(self) -> int:
        """The tokens one sequence holds: n_ctx // n_seq_max (each sequence has its own cells)."""
        return self._handle.n_ctx_seq

    @property
    def name(self) -> str:
        """How messages name this model: "the model 'PATH'" unless set (a server names its models
        by their served name)."""
        return self._handle.name

    @name.setter
    def name(self, value: str) -> None:
        self._handle.name = value

    @property
    def n_ctx_train(self) -> int:
        return self._handle.n_ctx_train

    @property
    def n_seq_max(self) -> int:
        return self._handle.n_seq_max

    @property
    def architecture(self) -> str:
        return self._handle.architecture

    @property
    def chat_template(self) -> str | None:
        return self._handle.chat_template or None

    @property
    def n_params(self) -> int:
        return self._handle.n_params

    @property
    def file_size(self) -> int:
        return self._handle.file_size

    @property
    def rpc(self) -> list[str]:
        """The RPC servers this model's layers live on (empty: all local)."""
        return list(self._handle.rpc)

    @property
    def buffer_types(self) -> dict[str, float]:
        """The buffer types llama.cpp put the weights in -> MiB (e.g. {"CPU_Mapped": 380.0,
        "CPU_REPACK": 215.0})."""
        out: dict[str, float] = {}
        for name, mib in self._handle.buffer_types:
            out[name] = out.get(name, 0.0) + mib
        return out

    @property
    def kv_mib(self) -> float:
        """The KV cache's memory in MiB, all sequences together (n_ctx cells)."""
        return self._handle.kv_mib

    @property
    def description(self) -> str:
        return self._handle.description

    @cached_property
    def metadata(self) -> dict[str, str]:
        """GGUF key/values as llama.cpp reports them (arrays are summarised)."""
        return dict(self._handle.metadata())

    def render_chat(self, messages: Sequence[dict], *, add_generation_prompt: bool = True) -> str:
        """This model's chat template applied to `messages` (jinja2 sandbox)."""
        from .chat_template import render
        if self.chat_template is None:
            raise ValueError(f"{self.path} has no chat template (tokenizer.chat_template)")
        return render(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                      bos_token=self._token_text(self._handle.bos), eos_token=self._token_text(self._handle.eos),
                      name=f"the chat template of {self.path}")

    def _token_text(self, token: int) -> str:
        return self.piece(token, special=True).decode("utf-8", errors="replace") if token >= 0 else ""

    # --- decoding ---------------------------------------------------------------------------
    def logits(self, tokens: Sequence[int]) -> np.ndarray:
        """Logits at every position of `tokens`, decoded from an empty cache, as a float32
        array of shape (len(tokens), n_vocab). For tests and research, not the hot path."""
        return self._handle.logits(self._tokens(tokens))

    def decode(self, tokens: Sequence[int], positions: Sequence[int], *, seq: int | Sequence[int] = 0,
               logits: bool | Sequence[bool] = False) -> None:
        """Decode one batch: token i at positions[i] of sequence seq (or seq[i]); rows with
        `logits` true can be read back with `logits_row(k)` in order."""
        tokens = self._tokens(tokens)
        n = len(tokens)
        seqs = [int(seq)] * n if isinstance(seq, (int, np.integer)) else [int(s) for s in seq]
        flags = [bool(logits)] * n if isinstance(logits, (bool, np.bool_)) else [bool(f) for f in logits]
        self._handle.decode(tokens, [int(p) for p in positions], seqs, flags)

    def logits_row(self, i: int) -> np.ndarray:
        """Row i of the last decode's logits (shape (n_vocab,)), a copy. A later truncate of any
        sequence leaves the rows as they were; the next decode replaces them. Like every read of
        the model's state, it raises BlendError while another thread is inside a call on the model."""
        return self._handle.logits_row(int(i))[0]

    def truncate(self, n_keep: int, *, seq: int = -1) -> None:
        """Drop KV cache positions >= n_keep (of one sequence, or of all when seq < 0)."""
        self._handle.truncate(int(seq), int(n_keep))

    def tokens(self, seq: int = 0) -> list[int]:
        """What a sequence of the KV cache holds. The Model keeps this record for everyone who
        decodes with it (Blenders sharing the model, best-of-N, scoring): each derives what it can
        reuse from it. A copy; while another thread is inside a call on the model it raises
        BlendError ("in use by another thread") instead."""
        return list(self._handle.tokens(int(seq)))

    # --- adapters ---------------------------------------------------------------------------
    def adapter_scales(self) -> list[float]:
        return list(self._handle.adapter_scales())

    def set_adapter_scales(self, scales: Sequence[float]) -> None:
        """Change the LoRA scales at run time (no reload), e.g. Alignment Vector scales. The KV
        cache held keys and values computed with the old scales, so a change empties it (the next
        generation reads its prompt again)."""
        self._handle.set_adapter_scales([float(s) for s in scales])
