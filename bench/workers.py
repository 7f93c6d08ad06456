"""One benchmark configuration in its own process, so that its peak RSS is its own.

Started by bench/run.py as `python bench/workers.py SPEC.json`. The worker loads its models, runs
the prompts once untimed, then answers commands on stdin, one per line: `run` (all prompts once,
timed) and `quit` (peak memory, then exit). Replies are JSON lines on stdout prefixed with "@@ ".
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def peak_rss_kb(pid: int | str = "self") -> int:
    """The process's peak resident set (VmHWM, KiB). Not getrusage's ru_maxrss: Linux carries that
    over exec from the process that spawned this one (here the runner, which has loaded the models)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/<pid>/status (Linux only)")


def reply(**fields) -> None:
    print("@@ " + json.dumps(fields), flush=True)


class ModelsOnly:
    """Both models loaded through blendin_cpp, one token decoded by each so that the weights are
    paged in (llama.cpp maps the files; untouched pages are not resident), nothing generated."""

    def __init__(self, spec):
        import blendin_cpp as bc
        self.models = [bc.Model(spec[r], n_ctx=spec["n_ctx"], n_threads=spec["n_threads"], kv_type="f16")
                       for r in ("base", "guide")]
        for m in self.models:
            m.decode([m.special_tokens["bos"]], [0], logits=True)

    def run(self, prompts):
        return [[] for _ in prompts]


class BlendinCpp:
    """blendin_cpp's Blender; method "base" runs the base alone through the same engine."""

    def __init__(self, spec, *, method="blendin", lazy=True, speculative="off", drafter="guide"):
        import blendin_cpp as bc
        kw = dict(n_ctx=spec["n_ctx"], n_threads=spec["n_threads"], kv_type="f16")
        base = bc.Model(spec["base"], **kw)
        guide = bc.Model(spec["guide"], **kw) if method != "base" else None
        self.blender = bc.Blender(base, guide, method=method, gamma=spec["gamma"], alpha="auto", lazy=lazy,
                                  speculative=speculative, drafter=drafter)
        self.max_tokens = spec["max_tokens"]

    def run(self, prompts):
        outputs, total = [], {}
        for p in prompts:
            self.blender.reset()  # every peer starts from empty caches
            r = self.blender.complete(p["messages"], max_tokens=self.max_tokens)
            outputs.append(r.tokens)
            add_stats(total, r.stats)
        self.stats = total
        return outputs


def add_stats(total: dict, stats: dict) -> None:
    for k in ("tokens", "interventions", "drafted", "accepted"):
        total[k] = total.get(k, 0) + stats[k]
    calls = total.setdefault("decode_calls", {"base": 0, "guide": 0})
    for role in calls:
        calls[role] += stats["decode_calls"][role]


class PythonPeer:
    """bench/python_peer.py: BlendIn in Python over llama-cpp-python and numpy."""

    def __init__(self, spec):
        from python_peer import PythonBlendIn, load, vocab_map
        base, guide = (load(spec[r], n_ctx=spec["n_ctx"], n_threads=spec["n_threads"]) for r in ("base", "guide"))
        bridge = vocab_map(base, guide) if spec["bridged"] else None  # untimed, like loading
        self.peer = PythonBlendIn(base, guide, gamma=spec["gamma"], alpha="auto", eog=spec["eog"], bridge=bridge)
        self.max_tokens = spec["max_tokens"]
        for p in spec["prompts"]:
            assert tokenize(base, guide, p) == (p["base_tokens"], p["guide_tokens"]), "tokenized unlike blendin_cpp"

    def run(self, prompts):
        self.peer.interventions = 0
        self.peer.decode_calls = {"base": 0, "guide": 0}
        outputs = [self.peer.generate(*tokenize(self.peer.base, self.peer.guide, p), self.max_tokens) for p in prompts]
        self.stats = {"tokens": sum(map(len, outputs)), "interventions": self.peer.interventions,
                      "decode_calls": dict(self.peer.decode_calls)}
        return outputs


def tokenize(base, guide, prompt: dict) -> tuple[list[int], list[int]]:
    """The texts as llama-cpp-python users tokenize them (timed, as blendin_cpp's own tokenizing is):
    the base's plain prompt with BOS, the guide's rendered chat template with its control tokens."""
    base_tokens = base.tokenize(prompt["base_text"].encode(), add_bos=True)
    guide_tokens = guide.tokenize(prompt["guide_text"].encode(), add_bos=False, special=True) if guide else []
    return base_tokens, guide_tokens


class LlamaCppBase:
    """The base model alone: llama-cpp-python's `Llama.generate`, greedy."""

    def __init__(self, spec):
        from python_peer import load
        self.llm = load(spec["base"], n_ctx=spec["n_ctx"], n_threads=spec["n_threads"])
        self.eog = set(spec["eog"])
        self.max_tokens = spec["max_tokens"]
        for p in spec["prompts"]:
            assert tokenize(self.llm, None, p)[0] == p["base_tokens"], "tokenized unlike blendin_cpp"

    def run(self, prompts):
        outputs = []
        for p in prompts:
            self.llm.reset()
            out = []
            for token in self.llm.generate(tokenize(self.llm, None, p)[0], temp=0.0):
                out.append(token)
                if token in self.eog or len(out) == self.max_tokens:
                    break
            outputs.append(out)
        self.stats = {"tokens": sum(map(len, outputs))}
        return outputs


class HttpPeer:
    """bench/http_peer.py: per-token requests with top-100 logprobs to two llama_cpp.server."""

    def __init__(self, spec):
        from http_peer import Server
        log = Path(spec["log_dir"])
        self.servers = [Server(spec[r], n_ctx=spec["n_ctx"], n_threads=spec["n_threads"], log=log / f"server-{r}.log",
                               end_tokens=spec["eog"]) for r in ("base", "guide")]
        self.spec = spec

    def run(self, prompts):
        from http_peer import blendin_http
        outputs, interventions = [], 0
        for p in prompts:
            out, n = blendin_http(*self.servers, p["base_text"], p["guide_text_http"], self.spec["max_tokens"],
                                  gamma=self.spec["gamma"], end_on_empty=self.spec["end_on_empty"])
            outputs.append(out)
            interventions += n
        self.stats = {"tokens": sum(map(len, outputs)), "interventions": interventions}
        return outputs

    def servers_rss_kb(self) -> int:
        return sum(peak_rss_kb(s.proc.pid) for s in self.servers)

    def close(self):
        for s in self.servers:
            s.close()


CONFIGS = {
    "models_only": ModelsOnly,
    "blendin_naive": lambda spec: BlendinCpp(spec, lazy=False),
    "blendin_lazy": lambda spec: BlendinCpp(spec, lazy=True),
    "blendin_speculative": lambda spec: BlendinCpp(spec, lazy=True, speculative="on"),
    "blendin_auto": lambda spec: BlendinCpp(spec, speculative="auto"),
    "blendin_ngram": lambda spec: BlendinCpp(spec, speculative="on", drafter="ngram"),
    "blendin_cpp_base": lambda spec: BlendinCpp(spec, method="base"),
    "python_peer": PythonPeer,
    "http_peer": HttpPeer,
    "llama_cpp_base": LlamaCppBase,
}


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    prompts = spec["prompts"]
    t0 = time.perf_counter()
    config = CONFIGS[spec["config"]](spec)
    load_s = time.perf_counter() - t0
    try:
        config.run(prompts[-1:])  # warm-up (the last prompt, so that the first timed one is not cached)
        reply(ready=True, load_s=load_s)
        for line in sys.stdin:
            if line.strip() == "run":
                t0 = time.perf_counter()
                outputs = config.run(prompts)
                seconds = time.perf_counter() - t0
                reply(seconds=seconds, outputs=outputs, stats=getattr(config, "stats", {}))
            elif line.strip() == "quit":
                extra = config.servers_rss_kb() if hasattr(config, "servers_rss_kb") else 0
                reply(peak_rss_kb=peak_rss_kb() + extra, helper_rss_kb=extra)
                return
    finally:
        if hasattr(config, "close"):  # never leave the HTTP peer's servers behind
            config.close()


if __name__ == "__main__":
    main()
