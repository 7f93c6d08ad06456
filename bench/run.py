"""blendin_cpp against its peers (docs/design.md section 6): tokens/s and peak memory in one run.

    python bench/run.py                  # demo pair (when trained), 32k and 128k pairs
    python bench/run.py --quick          # 32k pair only, fewer tokens and repeats, no HTTP peer
    python bench/run.py --pairs real,qwen            # the real pairs (downloaded on first use)
    python bench/run.py --base B.gguf --guide G.gguf  # any pair

Every configuration runs in its own process (bench/workers.py) on the same prompts and models;
the repeats go round-robin over the configurations, so that a slow spell of a shared machine
hits all of them alike, and the table gives medians and ratios measured in this one run.
See bench/README.md for what each row means.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import blendin_cpp as bc
from blendin_cpp import real_models
from blendin_cpp.chat_template import base_transcript
from blendin_cpp.testing import make_tokenizer, random_llama

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".models"
# prompts for real models: open requests with long answers, none of them from the eval's questions
REAL_PROMPTS = HERE.parent / "models" / "real" / "bench_prompts.jsonl"

# The random pairs of docs/design.md section 6: base 512 x 4 layers, guide 256 x 2, f16, one tokenizer.
# logit_std puts the base's top probability around 0.4 often enough; gamma is then calibrated so
# that about half of the steps are blended.
RANDOM_PAIRS = {"32k": 32000, "128k": 128256}
LOGIT_STD = 6.0
TARGET_RATE = 0.5
RANDOM_QUESTIONS = [
    "What is the capital of France?",
    "Tell me a short story about a robot who liked to read.",
    "What is 12 + 345?",
    "Describe the weather today in one sentence.",
]

ROWS = [  # (config, label) in table order
    ("blendin_naive", "blendin_cpp BlendIn naive (lazy=False)"),
    ("blendin_lazy", "blendin_cpp BlendIn lazy"),
    ("blendin_speculative", "blendin_cpp BlendIn lazy+speculative"),
    ("blendin_auto", "blendin_cpp BlendIn speculative=auto"),
    ("blendin_ngram", "blendin_cpp BlendIn speculative, n-gram drafts"),
    ("python_peer", "Python loop, llama-cpp-python + numpy"),
    ("http_peer", "per-token HTTP, top-100 logprobs"),
    ("llama_cpp_base", "base alone, llama-cpp-python"),
    ("blendin_cpp_base", "base alone, blendin_cpp engine"),
]


BLENDIN_ROWS = [c for c, _ in ROWS if c.startswith("blendin_") and c != "blendin_cpp_base"]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- models and prompts ---------------------------------------------------------------------------
def random_pair(name: str, n_vocab: int) -> tuple[str, str]:
    """The generated pair, written once to bench/.models."""
    CACHE.mkdir(exist_ok=True)
    stem = f"v{n_vocab}-std{LOGIT_STD:g}"
    base, guide = CACHE / f"{stem}-base.gguf", CACHE / f"{stem}-guide.gguf"
    if not (base.exists() and guide.exists()):
        t0 = time.perf_counter()
        tok = make_tokenizer(n_vocab, seed=7)
        log(f"[{name}] make_tokenizer({n_vocab}): {time.perf_counter() - t0:.1f} s")
        t0 = time.perf_counter()
        for path, shape in ((base, dict(n_embd=512, n_layer=4, n_head=8, seed=1)),
                            (guide, dict(n_embd=256, n_layer=2, n_head=4, seed=2))):
            tmp = path.with_suffix(".tmp")
            random_llama(tmp, n_vocab=n_vocab, dtype="f16", logit_std=LOGIT_STD, tokenizer=tok, n_ctx=4096, **shape)
            tmp.rename(path)
        log(f"[{name}] wrote the pair in {time.perf_counter() - t0:.1f} s")
    return str(base), str(guide)


def demo_questions(n: int) -> list[str] | None:
    """Questions from the demo's dev split (never heldout.jsonl), or None without demo models."""
    try:
        from blendin_cpp.demo import demo_dir
        dev = demo_dir() / "dev.jsonl"
    except FileNotFoundError:
        return None
    if not dev.exists():
        return None
    lines = dev.read_text().splitlines()
    return [json.loads(line)["question"] for line in lines[:n]]


def prompts_for(blender: bc.Blender, questions: list[str]) -> list[dict]:
    """Each question as the chat message blendin_cpp gets, the token ids the llama-cpp-python peers
    get, and the texts the HTTP peer sends (the guide's without its BOS, which the server adds)."""
    out = []
    bos_text = blender.guide.piece(blender.guide.special_tokens["bos"], special=True).decode()
    for q in questions:
        messages = [{"role": "user", "content": q}]
        base_tokens, guide_tokens = blender.prompts(messages)
        guide_text = blender.guide.render_chat(messages)
        out.append(dict(messages=messages, base_tokens=base_tokens, guide_tokens=guide_tokens,
                        base_text=base_transcript(messages), guide_text=guide_text,
                        guide_text_http=guide_text[len(bos_text):] if guide_text.startswith(bos_text) else guide_text))
    return out


def calibrate_gamma(blender: bc.Blender, prompts: list[dict], max_tokens: int) -> tuple[float, float]:
    """Bisect gamma until about TARGET_RATE of the steps are blended (starting at 0.4)."""
    lo, hi = 0.0, 0.8
    for _ in range(12):
        gamma = (lo + hi) / 2
        steps = blended = 0
        for p in prompts:
            blender.reset()
            st = blender.complete(p["messages"], max_tokens=max_tokens, gamma=gamma).stats
            steps += st["tokens"]
            blended += st["interventions"]
        rate = blended / steps
        if abs(rate - TARGET_RATE) <= 0.03:
            break
        lo, hi = (gamma, hi) if rate < TARGET_RATE else (lo, gamma)
    return gamma, rate


def read_prompts(path: Path) -> list[str]:
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [json.loads(line)["question"] if line.lstrip().startswith("{") else line for line in lines]


def prepare(name: str, args) -> dict | None:
    """Paths, prompts, gamma and end tokens of one pair (None: skip it)."""
    if name in real_models.PAIRS or name == "user":
        base, guide = real_models.pair_paths(name) if name != "user" else (args.base, args.guide)
        if name == "user":
            name = f"{Path(base).stem}+{Path(guide).stem}"
        questions = read_prompts(Path(args.prompts))
    elif name == "demo":
        questions = demo_questions(args.demo_questions)
        if questions is None:
            log("[demo] skipped: the demo models are not there yet (models/demo/base.gguf and dev.jsonl); "
                "train them with models/train_demo.py")
            return None
        from blendin_cpp.demo import demo_path
        base, guide = demo_path("base"), demo_path("guide")
    elif name in RANDOM_PAIRS:
        base, guide = random_pair(name, RANDOM_PAIRS[name])
        questions = RANDOM_QUESTIONS[:args.random_questions]
    else:
        raise SystemExit(f"unknown pair {name!r}; choose from demo, {', '.join([*RANDOM_PAIRS, *real_models.PAIRS])}")
    kw = dict(n_ctx=args.n_ctx, n_threads=args.threads, kv_type="f16")
    bm, gm = bc.Model(base, **kw), bc.Model(guide, **kw)
    blender = bc.Blender(bm, gm, method="blendin", gamma=0.4)
    prompts = prompts_for(blender, questions)
    bridged = blender._engine.bridged
    eog = sorted({t for t in bm.special_tokens.values() if t >= 0 and bm.is_eog(t)})
    if name not in RANDOM_PAIRS and not args.calibrate_gamma:  # trained models: BlendIn's default gamma
        gamma, how = 0.4, "fixed"
    else:
        key = hashlib.sha1(json.dumps([base, prompts, args.tokens, TARGET_RATE]).encode()).hexdigest()[:16]
        cache = CACHE / "gamma.json"
        known = json.loads(cache.read_text()) if cache.exists() else {}
        if key not in known:
            t0 = time.perf_counter()
            known[key] = calibrate_gamma(blender, prompts, args.tokens)
            CACHE.mkdir(exist_ok=True)
            cache.write_text(json.dumps(known, indent=1))
            log(f"[{name}] calibrated gamma in {time.perf_counter() - t0:.0f} s")
        gamma, how = known[key][0], "calibrated"
    del blender, bm, gm
    # the HTTP peer sees control tokens as "": trained models end there, random ones never should
    return dict(name=name, base=base, guide=guide, prompts=prompts, eog=eog, gamma=gamma, bridged=bridged,
                gamma_how=how, n_ctx=args.n_ctx, n_threads=args.threads, end_on_empty=name not in RANDOM_PAIRS)


# ---- running the workers --------------------------------------------------------------------------
class Worker:
    def __init__(self, config: str, pair: dict, max_tokens: int, tmp: Path):
        spec = dict(pair, config=config, max_tokens=max_tokens, log_dir=str(tmp))
        path = tmp / f"{pair['name']}-{config}.json"
        path.write_text(json.dumps(spec))
        self.config = config
        self.stderr_path = tmp / f"{pair['name']}-{config}.stderr"
        self.stderr = open(self.stderr_path, "w")
        self.proc = subprocess.Popen([sys.executable, str(HERE / "workers.py"), str(path)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.stderr, text=True, bufsize=1)

    def read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith("@@ "):
                return json.loads(line[3:])
        raise RuntimeError(f"worker {self.config} died; its stderr:\n{self.stderr_path.read_text()[-3000:]}")

    def ask(self, command: str) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self) -> dict:
        out = self.ask("quit")
        self.proc.wait(60)
        self.stderr.close()
        return out


# configurations that cannot run on a pair, and why (the table says n/a)
def not_applicable(pair: dict, config: str) -> str | None:
    if config in ("blendin_speculative", "blendin_auto", "blendin_ngram") and pair["bridged"]:
        return "speculative verification needs a guide that shares the base's vocabulary"
    return None


def bench_pair(pair: dict, args, configs: list[str]) -> dict:
    name = pair["name"]
    skipped = {c: why for c in configs if (why := not_applicable(pair, c))}
    configs = [c for c in configs if c not in skipped]
    tmp = Path(tempfile.mkdtemp(prefix=f"blendin-bench-{name}-"))
    tokens = {c: args.http_tokens if c == "http_peer" else args.tokens for c in configs}
    repeats = {c: min(args.http_repeats, args.repeats) if c == "http_peer" else args.repeats for c in configs}
    workers = {}
    for c in ["models_only"] + configs:  # one at a time, so that loading does not overlap a timed run
        workers[c] = Worker(c, pair, tokens.get(c, args.tokens), tmp)
        ready = workers[c].read()
        log(f"[{name}] {c}: loaded in {ready['load_s']:.2f} s")
    runs = {c: [] for c in configs}
    for r in range(args.repeats):
        order = configs[r % len(configs):] + configs[:r % len(configs)]  # a different one goes first
        for c in order:
            if len(runs[c]) < repeats[c]:
                runs[c].append(workers[c].ask("run"))
        log(f"[{name}] repeat {r + 1}/{args.repeats}: " +
            ", ".join(f"{c} {runs[c][-1]['stats']['tokens'] / runs[c][-1]['seconds']:.0f}" for c in configs
                      if len(runs[c]) > r))
    memory = {c: w.close() for c, w in workers.items()}
    shutil.rmtree(tmp)  # kept when a worker fails: its stderr and the servers' logs are there
    result = {"pair": name, "base": Path(pair["base"]).name, "guide": Path(pair["guide"]).name,
              "bridged": pair["bridged"], "not_applicable": skipped, "gamma": pair["gamma"],
              "gamma_how": pair["gamma_how"], "prompts": len(pair["prompts"]), "repeats": args.repeats,
              "http_repeats": repeats.get("http_peer"),
              "models_only_rss_kb": memory["models_only"]["peak_rss_kb"], "configs": {}}
    for c in configs:
        rates = [run["stats"]["tokens"] / run["seconds"] for run in runs[c]]
        result["configs"][c] = dict(tokens_per_s=statistics.median(rates), runs=rates, max_tokens=tokens[c],
                                    stats=runs[c][-1]["stats"], outputs=runs[c][-1]["outputs"],
                                    peak_rss_kb=memory[c]["peak_rss_kb"], helper_rss_kb=memory[c]["helper_rss_kb"])
    return result


# ---- reporting ------------------------------------------------------------------------------------
def checks(result: dict) -> list[str]:
    """Do the loops agree? The greedy tokens of every in-process BlendIn against blendin_cpp's naive loop."""
    cfg = result["configs"]
    lines = []
    ref = cfg.get("blendin_naive")
    if ref is None:
        return lines
    for c in [*BLENDIN_ROWS[1:], "python_peer"]:
        if c not in cfg:
            continue
        same = sum(a == b for a, b in zip(cfg[c]["outputs"], ref["outputs"]))
        first = "equal" if cfg[c]["outputs"][0] == ref["outputs"][0] else "DIFFER from"
        lines.append(f"{c}: greedy tokens {first} blendin_cpp's on prompt 1 ({len(ref['outputs'][0])} tokens); "
                     f"{same}/{len(ref['outputs'])} prompts identical")
    return lines


def fmt_rate(tokens_per_s: float) -> str:
    return f"{tokens_per_s:.0f}" if tokens_per_s >= 100 else f"{tokens_per_s:.1f}"  # real models are slow


def fmt_ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def table(result: dict) -> str:
    cfg = result["configs"]
    tps = {c: v["tokens_per_s"] for c, v in cfg.items()}
    base_ref, peer_ref = tps.get("llama_cpp_base"), tps.get("python_peer")
    models_kb = result["models_only_rss_kb"]
    head = ["configuration", "tokens/prompt", "tok/s", "vs base (4)", "vs Python (2)", "decode calls b/g",
            "drafted/accepted (rate)", "blended", "peak RSS MiB", "vs models only"]
    rows = []
    for c, label in ROWS:
        if c in result.get("not_applicable", {}):
            rows.append([label, "n/a (see below)"] + ["-"] * (len(head) - 2))
        if c not in cfg:
            continue
        v = cfg[c]
        st = v["stats"]
        calls = st.get("decode_calls")
        drafted = st.get("drafted", 0)
        rows.append([
            label, f"{st['tokens'] / result['prompts']:.0f} (max {v['max_tokens']})", fmt_rate(v["tokens_per_s"]),
            fmt_ratio(v["tokens_per_s"], base_ref),
            fmt_ratio(v["tokens_per_s"], peer_ref),
            f"{calls['base']}/{calls['guide']}" if calls else "-",
            f"{drafted}/{st['accepted']} ({st['accepted'] / drafted:.0%})" if drafted else "-",
            f"{st['interventions'] / st['tokens']:.0%}" if "interventions" in st and st["tokens"] else "-",
            f"{v['peak_rss_kb'] / 1024:.0f}" + (" *" if v["helper_rss_kb"] else ""),
            f"{(v['peak_rss_kb'] - models_kb) / models_kb:+.1%}",
        ])
    rows.append(["models only (both loaded, nothing generated)", "-", "-", "-", "-", "-", "-", "-",
                 f"{models_kb / 1024:.0f}", "-"])
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    line = lambda r: "| " + " | ".join(x.ljust(w) for x, w in zip(r, widths)) + " |"
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows])


def targets(result: dict) -> list[str]:
    cfg = result["configs"]
    tps = lambda c: cfg[c]["tokens_per_s"] if c in cfg else None
    best = max((c for c in BLENDIN_ROWS if c in cfg),
               key=tps, default=None)
    if best is None:
        return []
    out = []
    models_kb = result["models_only_rss_kb"]

    def check(what, value, goal, fmt="{:.2f}x"):
        if value is not None:
            out.append(f"{'MEETS' if value >= goal else 'MISSES'}  {what}: {fmt.format(value)} (target >= {fmt.format(goal)})")

    ratio = lambda a, b: tps(a) / tps(b) if tps(a) and tps(b) else None
    check(f"best blendin_cpp ({best}) vs Python peer", ratio(best, "python_peer"), 1.5)
    check(f"best blendin_cpp ({best}) vs per-token HTTP", ratio(best, "http_peer"), 10.0)
    check(f"blended generation ({best}) vs base alone (llama-cpp-python)", ratio(best, "llama_cpp_base"), 1.0)
    for c in BLENDIN_ROWS:
        if c in cfg:
            over = (cfg[c]["peak_rss_kb"] - models_kb) / models_kb
            out.append(f"{'MEETS' if over <= 0.05 else 'MISSES'}  peak memory of {c}: {over:+.1%} over the "
                       f"models' own footprint (target <= +5%)")
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="32k pair only, 64 tokens, 5 repeats, no HTTP peer")
    ap.add_argument("--pairs", default=None,
                    help="comma-separated: demo, 32k, 128k, " + ", ".join(real_models.PAIRS) +
                         " (default: demo,32k,128k, or none with --base/--guide)")
    ap.add_argument("--base", help="with --guide: also benchmark this pair (GGUF files)")
    ap.add_argument("--guide")
    ap.add_argument("--prompts", default=str(REAL_PROMPTS),
                    help="prompts for the real pairs and --base/--guide: JSONL with 'question', or one per line "
                         "(default: models/real/bench_prompts.jsonl)")
    ap.add_argument("--tokens", type=int, default=128, help="greedy tokens per prompt (at most)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--http-tokens", type=int, default=32, help="tokens per prompt for the slow HTTP peer")
    ap.add_argument("--http-repeats", type=int, default=3)
    ap.add_argument("--no-http", action="store_true", help="leave out the per-token HTTP peer")
    ap.add_argument("--configs", help="comma-separated subset of the rows: " + ", ".join(c for c, _ in ROWS))
    ap.add_argument("--calibrate-gamma", action="store_true",
                    help="calibrate gamma for --base/--guide too, as for the random pairs (about half the steps "
                         "blended): for random-weight models such as bench/standins.py's stand-ins")
    ap.add_argument("--threads", type=int, default=2, help="n_threads of every model")
    ap.add_argument("--n-ctx", type=int, default=512)
    ap.add_argument("--random-questions", type=int, default=2, help="prompts per random pair")
    ap.add_argument("--demo-questions", type=int, default=100, help="dev.jsonl questions for the demo pair")
    ap.add_argument("--json", help="write every number (and the per-repeat rates) to this file")
    ap.add_argument("--report", metavar="JSON", help="print the tables of an earlier run's --json file, run nothing")
    args = ap.parse_args(argv)
    if args.report:
        saved = json.loads(Path(args.report).read_text())
        print(saved["header"])
        for result in saved["results"]:
            report(result)
        return
    if (args.base is None) != (args.guide is None):
        raise SystemExit("--base and --guide go together")
    if args.quick:
        args.pairs, args.tokens, args.repeats, args.no_http = "32k", 64, 5, True
        args.random_questions = min(args.random_questions, 2)
    names = (args.pairs or ("" if args.base else "demo,32k,128k")).split(",")
    names = [n.strip() for n in names if n.strip()] + (["user"] if args.base else [])
    configs = [c for c, _ in ROWS if not (c == "http_peer" and args.no_http)]
    if args.configs:
        unknown = set(args.configs.split(",")) - set(configs)
        if unknown:
            raise SystemExit(f"unknown configuration(s): {', '.join(sorted(unknown))}")
        configs = [c for c in configs if c in args.configs.split(",")]

    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    header = (f"blendin_cpp benchmark, {started}; {os.cpu_count()} x {cpu} ({platform.machine()}); "
              f"load average at start {os.getloadavg()[0]:.1f}; n_threads {args.threads}, n_ctx {args.n_ctx}, "
              f"f16 KV, greedy; "
              f"command: python bench/run.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(header, flush=True)
    results = []
    for name in names:
        pair = prepare(name, args)
        if pair is None:
            continue
        results.append(bench_pair(pair, args, configs))
        report(results[-1])
    header += f"; load average at the end {os.getloadavg()[0]:.1f}"
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f} (1 min)")
    if args.json:
        Path(args.json).write_text(json.dumps({"header": header, "results": results}, indent=1))


def report(result: dict) -> None:
    how = f", {result['gamma_how']}" if result["gamma_how"] != "fixed" else ""
    http = f" (HTTP: {result['http_repeats']})" if result.get("http_repeats") else ""
    print(f"\n## {result['pair']} pair: gamma {result['gamma']:.3f}{how}, alpha auto, {result['prompts']} prompts, "
          f"median of {result.get('repeats', '?')} repeats{http}")
    print(table(result))
    for line in checks(result) + targets(result):
        print("  " + line)
    for c, why in result.get("not_applicable", {}).items():
        print(f"  n/a {c}: {why}")
    if "http_peer" in result["configs"]:
        print("  (* the HTTP row's memory is the two servers' peak RSS plus the client's)")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
