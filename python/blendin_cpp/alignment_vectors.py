"""Alignment Vectors (Shahriar et al. 2024, "Inference time LLM alignment in single and
multidomain preference spectrum"): AV_d = theta_aligned_d - theta_base, served as
theta = theta_base + sum_d s_d * AV_d with the scales s_d as knobs (the paper's lambdas; here
lambda names DeRa's weight).

An AV file takes one of two forms:
- a full delta: a GGUF with every tensor of the base (same names and shapes), the exact
  difference. `apply` merges any number of them into a new model file.
- a rank-R LoRA adapter in llama.cpp's format: a truncated SVD of every changed matrix. Loaded
  with `Model(base, adapters=[(path, scale)])`, its scale changes at run time with
  `Model.set_adapter_scales` (no reload). 1-D tensors (norms) have no low-rank form: their
  delta is left out and named in the file (`blendin.av.dropped`) and in the report.
Both record the base they were made from (`blendin.av.base_sha256`, the sha256 of the base
file as `sha256sum` prints it), so that applying one to another base is an error.
"""
from __future__ import annotations

import argparse
import hashlib
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

KIND_KEY = "blendin.av.kind"            # "delta" or "lora"
BASE_SHA_KEY = "blendin.av.base_sha256"
BASE_NAME_KEY = "blendin.av.base_name"
BASE_COUNT_KEY = "blendin.av.base_tensor_count"
ALIGNED_SHA_KEY = "blendin.av.aligned_sha256"
ALIGNED_NAME_KEY = "blendin.av.aligned_name"
DROPPED_KEY = "blendin.av.dropped"      # changed base tensors a LoRA AV leaves out (comma-separated)
TYPES = ("f32", "f16", "q8_0")
TOKEN_EMBD = "token_embd.weight"        # llama.cpp reads its LoRA pair in the other layout


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


class GGUF:
    """A GGUF file read lazily: metadata values and dequantised tensors (numpy (out, in) order)."""

    def __init__(self, path: str | os.PathLike):
        import gguf  # only the AV tools need the gguf package
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no such GGUF file: '{self.path}'")
        try:
            self.reader = gguf.GGUFReader(str(self.path))
        except Exception as e:  # the reader raises ValueError/struct errors/... on bad files
            raise ValueError(f"'{self.path}' is not a readable GGUF file: {e}") from None
        self.tensors = {t.name: t for t in self.reader.tensors}

    def get(self, key: str, default=None):
        field = self.reader.fields.get(key)
        return default if field is None else field.contents()

    @property
    def arch(self) -> str:
        return self.get("general.architecture", "")

    @property
    def name(self) -> str:
        return self.get("general.name", self.path.stem)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in reversed(self.tensors[name].shape))  # GGUF stores ne order

    def array(self, name: str) -> np.ndarray:
        import gguf
        t = self.tensors[name]
        data = gguf.quants.dequantize(t.data, t.tensor_type)
        return np.asarray(data, dtype=np.float32).reshape(self.shape(name))


# --- checks -------------------------------------------------------------------------------------

def check_pair(base: GGUF, aligned: GGUF) -> None:
    """Raise ValueError unless `aligned` is `base` with other weights: same architecture, tensors,
    shapes and vocabulary."""
    if base.arch != aligned.arch:
        raise ValueError(f"general.architecture differs: base '{base.path}' is {base.arch!r}, "
                         f"aligned '{aligned.path}' is {aligned.arch!r}")
    missing, extra = sorted(set(base.tensors) - set(aligned.tensors)), sorted(set(aligned.tensors) - set(base.tensors))
    if missing or extra:
        raise ValueError(f"the tensor sets differ: only in the base {missing[:5]}, only in the aligned model {extra[:5]}")
    for name in base.tensors:
        if base.shape(name) != aligned.shape(name):
            raise ValueError(f"tensor {name} has shape {base.shape(name)} in the base but "
                             f"{aligned.shape(name)} in the aligned model")
    if base.get("tokenizer.ggml.tokens") != aligned.get("tokenizer.ggml.tokens"):
        raise ValueError("tokenizer.ggml.tokens differs: the two models do not share a vocabulary")


def check_av_base(av: GGUF, base: GGUF, base_sha: str | None = None) -> str:
    """Raise ValueError unless `av` is an AV made from this very base file; returns its kind."""
    kind = av.get(KIND_KEY)
    if kind not in ("delta", "lora"):
        raise ValueError(f"'{av.path}' is not an alignment vector (metadata {KIND_KEY} is {kind!r}; "
                         "make one with `python -m blendin_cpp av extract`)")
    want = av.get(BASE_SHA_KEY)
    got = base_sha or file_sha256(base.path)
    if want != got:
        raise ValueError(f"{BASE_SHA_KEY} mismatch: '{av.path}' was made for base {av.get(BASE_NAME_KEY)!r} "
                         f"(sha256 {want}), but '{base.path}' ({base.name!r}) has sha256 {got}")
    if av.arch != base.arch:
        raise ValueError(f"general.architecture differs: AV '{av.path}' is {av.arch!r}, base is {base.arch!r}")
    return kind


def finite_scale(value, what: str) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number, got {value!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number, got {value}")
    return value


def parse_av_spec(spec: str) -> tuple[str, float]:
    """'PATH:SCALE' -> (PATH, SCALE). The last colon splits, so paths may contain colons."""
    path, sep, scale = str(spec).rpartition(":")
    if not sep or not path or not scale.strip():
        raise ValueError(f"malformed AV spec {spec!r}: expected PATH:SCALE, e.g. av/expert.gguf:0.5")
    try:
        value = float(scale)
    except ValueError:
        raise ValueError(f"malformed AV spec {spec!r}: {scale!r} after the last ':' is not a number") from None
    return path, finite_scale(value, f"scale in AV spec {spec!r}")


def runtime_adapters(specs: Iterable[str], base_path: str | os.PathLike) -> list[tuple[str, float]]:
    """`--av PATH:SCALE` options -> `Model(adapters=...)` pairs, after checking that each is a
    LoRA adapter made for this base (a full-delta AV must be merged with `av apply` instead)."""
    pairs = [parse_av_spec(s) for s in specs]
    if not pairs:
        return []
    base, base_sha = GGUF(base_path), file_sha256(base_path)
    for path, _ in pairs:
        av = GGUF(path)
        if av.get("general.type") == "adapter" and av.get(KIND_KEY) is None:
            continue  # a LoRA adapter from elsewhere: llama.cpp checks its shapes
        if check_av_base(av, base, base_sha) != "lora":
            raise ValueError(f"'{path}' is a full-delta AV: merge it with `python -m blendin_cpp av apply`, "
                             "or extract a LoRA AV (`av extract --rank R`) to turn its scale at run time")
    return pairs


# --- extract ------------------------------------------------------------------------------------

@dataclass
class TensorReport:
    """One base tensor in an extracted AV. `rel_change` = ||delta|| / ||theta_base||;
    `rel_error` = ||delta - B A|| / ||delta|| of the stored LoRA pair (0 for a full delta)."""
    name: str
    shape: tuple[int, ...]
    rel_change: float
    rank: int | None = None
    rel_error: float = 0.0
    note: str = ""


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    nb = float(np.linalg.norm(b))
    return float(np.linalg.norm(a)) / nb if nb else (0.0 if not np.any(a) else math.inf)


def _lora_pair(delta: np.ndarray, rank: int, alpha: float, dtype) -> tuple[np.ndarray, np.ndarray, float]:
    """Truncated SVD delta ~ P @ Q (P (out, r), Q (r, in)), split as U sqrt(S) and sqrt(S) V^T so
    both halves have similar ranges (f16). llama.cpp scales B A by scale * alpha / r; P carries
    r / alpha so that scale 1 adds exactly P Q. Returns (P, Q, relative error as stored)."""
    u, s, vt = np.linalg.svd(delta.astype(np.float64), full_matrices=False)
    root = np.sqrt(s[:rank])
    p = (u[:, :rank] * root * (rank / alpha)).astype(dtype)
    q = (root[:, None] * vt[:rank]).astype(dtype)
    approx = (p.astype(np.float64) @ q.astype(np.float64)) * (alpha / rank)
    return p, q, _rel(delta - approx, delta)


def _writer(path: Path, arch: str):
    import gguf
    return gguf.GGUFWriter(str(path), arch)


def _finish(w) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def extract(base_path: str | os.PathLike, aligned_path: str | os.PathLike, out_path: str | os.PathLike, *,
            rank: int | None = None, dtype: str = "f32") -> list[TensorReport]:
    """Write the AV aligned - base to `out_path`: the full delta (rank None) or a rank-`rank` LoRA
    adapter. Returns one report row per base tensor."""
    import gguf
    if dtype not in ("f32", "f16"):
        raise ValueError(f"AV tensors are stored as 'f32' or 'f16', not {dtype!r}")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    out = Path(out_path)
    if out.exists() and any(out.samefile(p) for p in (base_path, aligned_path)):
        raise ValueError(f"the output '{out}' is one of the inputs; write the AV to a new file")
    base, aligned = GGUF(base_path), GGUF(aligned_path)
    check_pair(base, aligned)
    np_type = np.float16 if dtype == "f16" else np.float32
    tied = "output.weight" not in base.tensors

    w = _writer(out, base.arch)
    w.add_name(f"AV {aligned.name} - {base.name}")
    w.add_string(KIND_KEY, "delta" if rank is None else "lora")
    w.add_string(BASE_SHA_KEY, file_sha256(base.path))
    w.add_string(BASE_NAME_KEY, base.name)
    w.add_uint32(BASE_COUNT_KEY, len(base.tensors))
    w.add_string(ALIGNED_SHA_KEY, file_sha256(aligned.path))
    w.add_string(ALIGNED_NAME_KEY, aligned.name)
    if rank is None:
        w.add_string("general.type", "alignment_vector")
    else:  # llama.cpp's LoRA adapter keys (docs/design.md 7.1)
        w.add_string("general.type", "adapter")
        w.add_string("adapter.type", "lora")
        w.add_float32("adapter.lora.alpha", float(rank))

    rows, dropped = [], []
    for name in base.tensors:
        b = base.array(name)
        delta = aligned.array(name) - b
        row = TensorReport(name, b.shape, _rel(delta, b))
        rows.append(row)
        if rank is None:  # norms stay f32 (docs/design.md 7.1)
            w.add_tensor(name, np.ascontiguousarray(delta.astype(np_type if delta.ndim == 2 else np.float32)))
            continue
        if not np.any(delta):
            row.note = "unchanged"
            continue
        if delta.ndim != 2 or (name == TOKEN_EMBD and tied):
            # a 1-D delta has no B A form; a tied embedding doubles as the output matrix, where
            # llama.cpp would read its (flipped) token_embd pair in the wrong layout
            row.rel_error, row.note = 1.0, "dropped: " + ("1-D" if delta.ndim != 2 else "tied output")
            dropped.append(name)
            continue
        r = min(rank, *delta.shape)
        p, q, row.rel_error = _lora_pair(delta, r, float(rank), np_type)
        row.rank = r
        # lora_a (r, in) / lora_b (out, r); token_embd's pair is flipped: a (n_vocab, r), b (n_embd, r)
        lora_a, lora_b = (p, q.T) if name == TOKEN_EMBD else (q, p)
        w.add_tensor(name + ".lora_a", np.ascontiguousarray(lora_a))
        w.add_tensor(name + ".lora_b", np.ascontiguousarray(lora_b))
    if rank is not None:
        w.add_string(DROPPED_KEY, ",".join(dropped))
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32)
    _finish(w)
    return rows


def av_tensors(av: GGUF, base: GGUF) -> dict[str, np.ndarray]:
    """The AV as full-size deltas (LoRA pairs multiplied out at scale 1), checked against the
    base's tensor shapes."""
    if av.get(KIND_KEY) == "delta":
        if av.get(BASE_COUNT_KEY) != len(base.tensors) or set(av.tensors) != set(base.tensors):
            raise ValueError(f"'{av.path}' does not hold the base's {len(base.tensors)} tensors")
        out = {name: av.array(name) for name in av.tensors}
    else:
        alpha = float(av.get("adapter.lora.alpha", 0.0))
        out = {}
        for name in av.tensors:
            if not name.endswith(".lora_a"):
                continue
            stem = name[: -len(".lora_a")]
            if stem not in base.tensors or stem + ".lora_b" not in av.tensors:
                raise ValueError(f"LoRA tensor {name} of '{av.path}' has no base tensor or no lora_b")
            a, b = av.array(name), av.array(stem + ".lora_b")
            if stem == TOKEN_EMBD:
                delta, r = a @ b.T, b.shape[1]
            else:
                delta, r = b @ a, a.shape[0]
            out[stem] = delta * (alpha / r if alpha else 1.0)
    for name, d in out.items():
        if d.shape != base.shape(name):
            raise ValueError(f"tensor {name} has shape {d.shape} in the AV '{av.path}' but {base.shape(name)} in the base")
    return out


# --- apply --------------------------------------------------------------------------------------

def _copy_metadata(src: GGUF, w, skip: set[str]) -> None:
    import gguf
    for key, field in src.reader.fields.items():
        if key.startswith("GGUF.") or key in skip:
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, field.contents(), vtype, sub)


def apply(base_path: str | os.PathLike, avs: Sequence[tuple[str | os.PathLike, float]],
          out_path: str | os.PathLike, *, dtype: str = "f32") -> Path:
    """Write theta_base + sum_d s_d * AV_d as a model file (all metadata and the tokenizer of
    the base are kept). `dtype` is the matrices' type; norms stay f32."""
    import gguf
    if dtype not in TYPES:
        raise ValueError(f"--type must be one of {', '.join(TYPES)}, not {dtype!r}")
    avs = [(str(p), finite_scale(scale, f"scale for '{p}'")) for p, scale in avs]
    out_path = Path(out_path)
    if out_path.exists() and any(out_path.samefile(p) for p in [base_path, *(p for p, _ in avs)]):
        raise ValueError(f"the output '{out_path}' is one of the inputs; write the merge to a new file")
    base = GGUF(base_path)
    base_sha = file_sha256(base.path)
    loaded = []
    for path, scale in avs:
        av = GGUF(path)
        check_av_base(av, base, base_sha)
        loaded.append((av_tensors(av, base), scale))

    qtype = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
             "q8_0": gguf.GGMLQuantizationType.Q8_0}[dtype]
    w = _writer(out_path, base.arch)
    _copy_metadata(base, w, skip={"general.architecture", "general.file_type"})
    w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                     "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype])
    w.add_string("blendin.av.applied", ", ".join(f"{Path(p).name}:{scale:g}" for p, scale in avs))
    for name in base.tensors:
        theta = base.array(name)
        for deltas, scale in loaded:
            if name in deltas:
                theta = theta + np.float32(scale) * deltas[name]
        theta = np.ascontiguousarray(theta, dtype=np.float32)
        if theta.ndim != 2:
            w.add_tensor(name, theta)  # norms stay f32 (docs/design.md 7.1)
        elif qtype == gguf.GGMLQuantizationType.Q8_0 and theta.shape[-1] % 32 == 0:
            w.add_tensor(name, gguf.quants.quantize(theta, qtype), raw_dtype=qtype)
        else:  # q8_0 needs rows in blocks of 32; such matrices fall back to f16
            w.add_tensor(name, theta.astype(np.float32 if dtype == "f32" else np.float16))
    _finish(w)
    return out_path


# --- CLI ----------------------------------------------------------------------------------------

def print_report(rows: list[TensorReport], lora: bool, file=None) -> None:
    file = file or sys.stdout
    width = max(len(r.name) for r in rows)
    if lora:
        print(f"{'tensor':<{width}}  {'shape':>12}  {'|d|/|w|':>8}  {'rank':>4}  {'|d-BA|/|d|':>10}  note", file=file)
    else:
        print(f"{'tensor':<{width}}  {'shape':>12}  {'|d|/|w|':>8}", file=file)
    for r in rows:
        shape = "x".join(map(str, r.shape))
        if lora:
            rank = "-" if r.rank is None else str(r.rank)
            print(f"{r.name:<{width}}  {shape:>12}  {r.rel_change:8.4f}  {rank:>4}  {r.rel_error:10.2e}  {r.note}", file=file)
        else:
            print(f"{r.name:<{width}}  {shape:>12}  {r.rel_change:8.4f}", file=file)


def cmd_extract(args) -> int:
    rows = extract(args.base, args.aligned, args.output, rank=args.rank, dtype=args.type)
    print_report(rows, lora=args.rank is not None)
    dropped = [r.name for r in rows if r.note.startswith("dropped")]
    if dropped:
        print(f"note: {len(dropped)} changed tensor(s) have no LoRA form and are left out of the AV: "
              f"{', '.join(dropped[:6])}{' ...' if len(dropped) > 6 else ''}", file=sys.stderr)
    print(f"wrote {args.output}")
    return 0


def cmd_apply(args) -> int:
    out = apply(args.base, [parse_av_spec(s) for s in args.av], args.output, dtype=args.type)
    print(f"wrote {out}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("av", help="Alignment Vectors: extract aligned - base, merge with scales",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    avsub = p.add_subparsers(dest="av_command", required=True)
    e = avsub.add_parser("extract", help="write the AV aligned - base (full delta, or LoRA with --rank)")
    e.add_argument("--base", required=True, help="the base model (GGUF)")
    e.add_argument("--aligned", required=True, help="the aligned model: the base fine-tuned (GGUF)")
    e.add_argument("-o", "--output", required=True, help="the AV file to write")
    e.add_argument("--rank", type=int, default=None,
                   help="write a rank-R LoRA adapter (truncated SVD; run-time scale) instead of the full delta")
    e.add_argument("--type", default="f32", choices=("f32", "f16"), help="tensor type of the AV (default f32)")
    e.set_defaults(func=cmd_extract)
    a = avsub.add_parser("apply", help="merge theta_base + sum s_d * AV_d (s_d: each AV's scale) into a new model file")
    a.add_argument("--base", required=True, help="the base model the AVs were extracted from")
    a.add_argument("--av", action="append", required=True, metavar="PATH:SCALE",
                   help="an AV (full delta or LoRA) and its scale (repeatable)")
    a.add_argument("-o", "--output", required=True, help="the merged model to write")
    a.add_argument("--type", default="f32", choices=TYPES, help="matrix type of the merged model (default f32)")
    a.set_defaults(func=cmd_apply)
