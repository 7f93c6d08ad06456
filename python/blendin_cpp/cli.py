"""The command line: `python -m blendin_cpp {generate,chat,serve,eval,bon,winrate,overlap,av,models,rpc-server} ...`.
The flags and the model loading the subcommands share live in options.py."""
from __future__ import annotations

import argparse
import json
import os
import sys

from . import alignment_vectors, best_of_n, chat, evaluate, overlap, real_models, rpc_server, server
from ._core import BlendError
from .options import add_blend_args, add_model_args, blender_from_args, json_safe, sampling_kwargs


def cmd_generate(args) -> int:
    blender = blender_from_args(args)
    text = args.prompt if args.prompt is not None else sys.stdin.read()
    # a request, as in the chat: the base reads it as a plain transcript, the guide through its
    # template; --raw hands the text to the base as it is
    prompt = text if args.raw else [{"role": "user", "content": text}]
    kw = sampling_kwargs(args)
    if args.json:
        r = blender.complete(prompt, args.guide_prompt, diagnostics=args.trace, **kw)
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
    g.add_argument("--trace", action="store_true",
                   help="with --json: add per-token diagnostics as 'steps' (with the vocabulary-sized ones: "
                        "overlap, guide_rank, mass_above)")
    g.set_defaults(func=cmd_generate)

    for module in (chat, evaluate, server, best_of_n, overlap, alignment_vectors, real_models, rpc_server):
        module.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError, TypeError, BlendError, real_models.FetchError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`... | head`): nothing left to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
