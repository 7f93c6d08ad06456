"""The papers' architecture: one llama-cpp-python OpenAI-compatible server per model, and a client
that sends one completion request per token with the top-100 logprobs and blends those lists
(as the reference implementations of BlendIn and Nudging do).

Only the top-100 tokens of each model are known, so the mixture is over their union and
`agree` is 0 when the guide's favourite is not in the base's list. Texts, not token ids, go over
the wire: the server re-tokenizes prompt + continuation on every request.
"""
from __future__ import annotations

import http.client
import json
import math
import socket
import subprocess
import sys
import time
from pathlib import Path

TOP_LOGPROBS = 100


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m llama_cpp.server` on 127.0.0.1, with logits_all on (logprobs need it), loading
    its model as blendin_cpp does (blendin_cpp.llama_cpp_peer)."""

    def __init__(self, model: str, *, n_ctx: int, n_threads: int, log: Path, end_tokens=()):
        self.port = free_port()
        # the server returns no logprobs when its own pick is an end token, so it is told never to
        # pick one; the logprobs it returns are computed before that bias
        self.logit_bias = {str(t): -100.0 for t in end_tokens}
        self._log = open(log, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "blendin_cpp.llama_cpp_peer", "server", "--model", model, "--host", "127.0.0.1",
             "--port", str(self.port), "--n_ctx", str(n_ctx), "--n_threads", str(n_threads),
             "--n_threads_batch", str(n_threads), "--logits_all", "true", "--flash_attn", "true",
             "--type_k", "1", "--type_v", "1", "--verbose", "false"],
            stdout=self._log, stderr=subprocess.STDOUT)
        self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        deadline = time.monotonic() + 120
        while True:
            try:
                self.conn.request("GET", "/v1/models")
                self.conn.getresponse().read()
                break
            except OSError:
                self.conn.close()
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"llama_cpp.server for {model} did not start; see {log}")
                time.sleep(0.2)

    def top_logprobs(self, prompt: str) -> dict[str, float]:
        body = json.dumps({"prompt": prompt, "max_tokens": 1, "temperature": 0.0, "logprobs": TOP_LOGPROBS,
                           "logit_bias": self.logit_bias})
        try:
            self.conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
            reply = self.conn.getresponse().read()
        except (http.client.RemoteDisconnected, ConnectionError):
            # uvicorn closes a connection after 5 s idle (the other configurations' turn): reconnect
            self.conn.close()
            self.conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
            reply = self.conn.getresponse().read()
        reply = json.loads(reply)
        return reply["choices"][0]["logprobs"]["top_logprobs"][0]

    def close(self) -> None:
        self.conn.close()
        self.proc.terminate()
        self.proc.wait(30)
        self._log.close()


def blendin_http(base: Server, guide: Server, base_text: str, guide_text: str, max_tokens: int, *,
                 gamma: float = 0.4, end_on_empty: bool = True) -> tuple[list[str], int]:
    """Greedy BlendIn (alpha auto) over top-100 lists, one request per model per token (the guide
    only where the gate opens). Returns the token texts and the number of interventions.
    Control tokens and byte fragments both arrive as "": with `end_on_empty` the end token is
    taken to be that one, otherwise "" is never chosen (random-weight models)."""
    out: list[str] = []
    interventions = 0
    while len(out) < max_tokens:
        text = "".join(out)
        p = pb = {t: math.exp(lp) for t, lp in base.top_logprobs(base_text + text).items()}
        best_b = max(pb, key=pb.get)
        if pb[best_b] < gamma:
            pg = {t: math.exp(lp) for t, lp in guide.top_logprobs(guide_text + text).items()}
            best_g = max(pg, key=pg.get)
            alpha = min(max(pg[best_g] / (pb[best_b] + pg[best_g]) + 0.1 * pb.get(best_g, 0.0), 0.0), 1.0)
            p = {t: (1 - alpha) * pb.get(t, 0.0) + alpha * pg.get(t, 0.0) for t in pb.keys() | pg.keys()}
            interventions += 1
        token = max((t for t in p if t or end_on_empty), key=p.get)
        if token == "":
            break
        out.append(token)
    return out, interventions
