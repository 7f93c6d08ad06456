"""Steps and statistics in OpenAI's response shapes (chat.completion, text_completion, chunks)."""
from __future__ import annotations

import time
import uuid

from ..blender import Step
from ..options import json_safe
from ..text import utf8_boundary

FINISH = {"stop": "stop", "length": "length", "context": "length"}


def usage(prompt: int, completion: int) -> dict:
    """OpenAI's usage object. `completion` counts the tokens of the text (the end token is not
    one of them), on every path: plain, streamed, and n / best_of candidates."""
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class _Format:
    def __init__(self, server, logprobs: int | None, trace: bool = False):
        self.server, self.logprobs, self.trace = server, logprobs, trace
        self.id = f"{self.prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.server.model_id}

    def _token(self, token: int) -> tuple[str, list[int]]:
        raw = self.server.blender.base.piece(token)
        return raw.decode("utf-8", errors="replace"), list(raw)

    def _counted(self, steps: list[Step]) -> list[Step]:
        """Steps that have a token to report (not the end-of-generation token)."""
        return [s for s in steps if not self.server.blender.is_end(s.token)]

    def shows(self, step: Step) -> bool:
        """Whether a step gets a chunk of its own when streaming (text, or a token's logprobs or trace)."""
        return bool(step.text) or ((self.logprobs is not None or self.trace) and bool(self._counted([step])))

    def steps(self, steps: list[Step]) -> dict:
        """With `trace`: {"steps": the per-token diagnostics}, each as `generate --json --trace` lists
        them (a chunk's own token, or every token of a whole answer); else nothing."""
        return {"steps": [json_safe(s.as_dict()) for s in self._counted(steps)]} if self.trace else {}


class ChatFormat(_Format):
    prefix = "chatcmpl"
    whole_object = "chat.completion"

    def choice(self, index: int, text: str, finish: str) -> dict:
        return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": finish}

    def _logprobs(self, steps: list[Step]) -> dict | None:
        if self.logprobs is None:
            return None
        content = []
        for s in self._counted(steps):
            text, raw = self._token(s.token)
            top = []
            for t, lp in s.top_logprobs:
                ttext, traw = self._token(t)
                top.append({"token": ttext, "logprob": lp, "bytes": traw})
            content.append({"token": text, "logprob": s.logprob, "bytes": raw, "top_logprobs": top})
        return {"content": content}

    def whole(self, steps: list[Step], stats: dict, used: dict) -> dict:
        return {**self.head("chat.completion"),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(s.text for s in steps)},
                             "logprobs": self._logprobs(steps), "finish_reason": FINISH[stats["finish_reason"]]}],
                "usage": used, "blend": json_safe(stats), **self.steps(steps)}

    def chunk(self, step: Step | None, first: bool = False) -> dict:
        delta = {"role": "assistant", "content": ""} if first else {"content": step.text}
        return {**self.head("chat.completion.chunk"),
                "choices": [{"index": 0, "delta": delta,
                             "logprobs": None if first else self._logprobs([step]), "finish_reason": None}],
                **({} if first else self.steps([step]))}

    def final(self, stats: dict) -> dict:
        return {**self.head("chat.completion.chunk"),
                "choices": [{"index": 0, "delta": {}, "logprobs": None,
                             "finish_reason": FINISH[stats["finish_reason"]]}],
                "blend": json_safe(stats)}

    def usage_chunk(self, used: dict) -> dict:
        return {**self.head("chat.completion.chunk"), "choices": [], "usage": used}


class CompletionFormat(_Format):
    prefix = "cmpl"
    whole_object = "text_completion"

    def choice(self, index: int, text: str, finish: str) -> dict:
        return {"index": index, "text": text, "logprobs": None, "finish_reason": finish}

    def __init__(self, server, logprobs: int | None, trace: bool = False):
        super().__init__(server, logprobs, trace)
        # text_offset counts characters of the answer: the characters the tokens' bytes so far
        # complete (a token may hold part of a character; its offset is that character's)
        self.chars = 0
        self.pending = b""  # the bytes of a character not complete yet

    # The legacy format lists every token the completion ended with, an end token included (as
    # OpenAI and vLLM do): a one-token request whose token is the end token still gets its logprob.
    def _counted(self, steps: list[Step]) -> list[Step]:
        return list(steps)

    def _token(self, token: int) -> tuple[str, list[int]]:
        """A control token (an end token) by its own text ("</s>"), as it has none in the text."""
        raw = self.server.blender.base.piece(token, special=True)
        return raw.decode("utf-8", errors="replace"), list(raw)

    def _logprobs(self, steps: list[Step]) -> dict | None:
        if self.logprobs is None:
            return None
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for s in self._counted(steps):
            text, raw = self._token(s.token)
            out["tokens"].append(text)
            out["token_logprobs"].append(s.logprob)
            out["top_logprobs"].append({self._token(t)[0]: lp for t, lp in s.top_logprobs})
            out["text_offset"].append(self.chars)
            data = self.pending + bytes(raw)
            cut = utf8_boundary(data)
            self.chars += len(data[:cut].decode("utf-8", errors="replace"))
            self.pending = data[cut:]
        return out

    def whole(self, steps: list[Step], stats: dict, used: dict) -> dict:
        return {**self.head("text_completion"),
                "choices": [{"index": 0, "text": "".join(s.text for s in steps), "logprobs": self._logprobs(steps),
                             "finish_reason": FINISH[stats["finish_reason"]]}],
                "usage": used, "blend": json_safe(stats), **self.steps(steps)}

    def chunk(self, step: Step | None, first: bool = False) -> dict | None:
        return {**self.head("text_completion"),
                "choices": [{"index": 0, "text": "" if first else step.text,
                             "logprobs": None if first else self._logprobs([step]), "finish_reason": None}],
                **({} if first else self.steps([step]))}

    def final(self, stats: dict) -> dict:
        return {**self.head("text_completion"),
                "choices": [{"index": 0, "text": "", "logprobs": None,
                             "finish_reason": FINISH[stats["finish_reason"]]}],
                "blend": json_safe(stats)}

    def usage_chunk(self, used: dict) -> dict:
        return {**self.head("text_completion"), "choices": [], "usage": used}
