"""The command line: `python -m blendin_cpp {generate,chat,serve,eval,bon,winrate,overlap,av} ...`, and the
helpers the subcommands share (model and blending flags, loading the models)."""
from __future__ import annotations

import argparse
import os
import json
import math
import sys
import time

from . import demo


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("models (default: the bundled demo pair)")
    g.add_argument("--base", help="the base model (pretrained GGUF)")
    g.add_argument("--guide", help="the guide model (instruction-tuned GGUF, same vocabulary)")
    g.add_argument("--anti", help="the guide's untuned sibling (needed by --method proxy)")
    g.add_argument("--ctx", type=int, default=2048, help="context length per model (default 2048)")
    g.add_argument("--n-gpu-layers", type=int, default=0, help="layers to offload to the GPU (-1 = all)")
    g.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    g.add_argument("--verbose", action="store_true", help="show llama.cpp's log")
    g.add_argument("--av", action="append", default=[], metavar="PATH:LAMBDA",
                   help="an Alignment Vector (a LoRA AV from `av extract --rank`) on the base, with its lambda "
                        "(repeatable; the chat's /set av NAME VALUE and the server's av_scales turn it later)")


def add_blend_args(p: argparse.ArgumentParser) -> None:
    from .blender import METHODS
    g = p.add_argument_group("blending")
    g.add_argument("--method", default="blendin", choices=METHODS)
    g.add_argument("--gamma", type=float, default=0.4, help="intervene when the base's top probability is below this")
    g.add_argument("--alpha", default="auto", help="blendin mixing weight in [0, 1], or 'auto'")
    g.add_argument("--beta", type=float, default=1.0, help="proxy-tuning strength")
    g.add_argument("--lambda", dest="lambda_", type=float, default=0.5, help="DeRa weight (> 1 extrapolates)")
    g.add_argument("--max-intervention-rate", type=float, default=None, help="cap on the share of steered tokens")
    g.add_argument("--naive", action="store_true", help="decode both models on every token (reference loop)")
    g.add_argument("--speculative", action="store_true",
                   help="the guide drafts, the base verifies a batch (same output, fewer base decodes)")
    g.add_argument("--draft-max", type=int, default=8, help="longest speculative draft")
    s = p.add_argument_group("sampling")
    s.add_argument("--max-tokens", type=int, default=256)
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    s.add_argument("--top-k", type=int, default=0)
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--min-p", type=float, default=0.0)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    s.add_argument("--ignore-eos", action="store_true", help="never end on an end token (max-tokens ends it)")


def parse_alpha(text: str) -> float | str:
    if text == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"--alpha must be a number in [0, 1] or 'auto', not {text!r}") from None


def load_models(args, need_anti: bool = False, log=None, n_seq_max: int = 1):
    """Load base, guide (and anti) as the arguments say; the demo pair fills what is not given.
    With `log` (a stream), say what loads and how long it took ("loading base model X ... done
    (1.2 s)"); a failure's "error: ..." then completes that line."""
    from .alignment_vectors import runtime_adapters
    from .model import Model
    paths = {"base": args.base, "guide": args.guide, "anti": args.anti}
    if paths["base"] is None:
        paths["base"] = demo.demo_path("base")
    if paths["guide"] is None and args.base is None:
        paths["guide"] = demo.demo_path("guide")
    if paths["anti"] is None and need_anti and args.base is None:
        paths["anti"] = demo.demo_path("anti")
    kw = dict(n_ctx=args.ctx, n_gpu_layers=args.n_gpu_layers, n_threads=args.threads, verbose=args.verbose,
              n_seq_max=n_seq_max)
    # Alignment Vectors (--av PATH:LAMBDA): LoRA adapters on the base, checked against it
    av = {"adapters": runtime_adapters(args.av, paths["base"])} if getattr(args, "av", None) else {}
    models = {}
    for role, p in paths.items():
        if log and p:
            print(f"loading {role} model {p} ... ", end="", file=log, flush=True)
            t0 = time.perf_counter()
        models[role] = Model(p, **kw, **(av if role == "base" else {})) if p else None
        if log and p:
            print(f"done ({time.perf_counter() - t0:.1f} s)", file=log, flush=True)
    return models


def blender_from_args(args, log=None, n_seq_max: int = 1):
    from .blender import Blender
    models = load_models(args, need_anti=args.method == "proxy", log=log, n_seq_max=n_seq_max)
    return Blender(models["base"], models["guide"], anti=models["anti"], method=args.method, gamma=args.gamma,
                   alpha=parse_alpha(args.alpha), beta=args.beta, lambda_=args.lambda_,
                   max_intervention_rate=args.max_intervention_rate, lazy=not args.naive,
                   speculative=getattr(args, "speculative", False), draft_max=getattr(args, "draft_max", 8))


def sampling_kwargs(args) -> dict:
    return dict(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                min_p=args.min_p, seed=args.seed, stop=args.stop, ignore_eos=args.ignore_eos)


def json_safe(x):
    """NaN has no JSON spelling: write null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, list):
        return [json_safe(v) for v in x]
    return x


def cmd_generate(args) -> int:
    blender = blender_from_args(args)
    text = args.prompt if args.prompt is not None else sys.stdin.read()
    # a request, as in the chat: the base reads it as a plain transcript, the guide through its
    # template; --raw hands the text to the base as it is
    prompt = text if args.raw else [{"role": "user", "content": text}]
    kw = sampling_kwargs(args)
    if args.json:
        r = blender.complete(prompt, args.guide_prompt, **kw)
        out = {"text": r.text, "tokens": r.tokens, "stats": r.stats}
        if args.trace:
            out["steps"] = [s.as_dict() for s in r.steps]
        print(json.dumps(json_safe(out), ensure_ascii=False))
        return 0
    for step in blender.generate(prompt, args.guide_prompt, **kw):
        sys.stdout.write(step.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    st = blender.last_stats
    print(f"[{st['tokens']} tokens, {st['tokens_per_s']:.1f} tok/s, intervention rate "
          f"{st['intervention_rate']:.0%}, mean alpha {st['mean_alpha']:.2f}, {st['finish_reason']}]", file=sys.stderr)
    if st["warning"]:
        print(f"warning: {st['warning']}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m blendin_cpp",
                                description="Inference-time alignment of local GGUF models: a base and a guide decoded together.")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="one generation (plain text, or one JSON object with --json)")
    add_model_args(g)
    add_blend_args(g)
    g.add_argument("--prompt", help="the request (default: read standard input)")
    g.add_argument("--guide-prompt", help="the guide's exact prompt (default: its chat template around --prompt)")
    g.add_argument("--raw", action="store_true",
                   help="give --prompt to the base as it is (default: as a question in a plain transcript, "
                        "'Question: ...\\nAnswer:')")
    g.add_argument("--json", action="store_true", help="print one JSON object: text, tokens, stats")
    g.add_argument("--trace", action="store_true", help="with --json: add per-token diagnostics as 'steps'")
    g.set_defaults(func=cmd_generate)

    from . import chat
    chat.add_parser(sub)
    for module in ("evaluate", "server", "best_of_n", "overlap", "alignment_vectors"):
        try:
            mod = __import__(f"blendin_cpp.{module}", fromlist=["add_parser"])
        except ImportError:
            continue
        mod.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`... | head`): nothing left to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
