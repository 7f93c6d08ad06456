"""/v1/completions for evaluation harnesses: token-id prompts, lists of prompts (one choice per
prompt, in order), `echo` (the prompt comes back, with its tokens' log-probabilities under the
policy when `logprobs` is set), and a method chosen by the model name.

The guide's view of an echoed prompt: the server cannot know where a question ends inside an echoed
prompt (lm-evaluation-harness sends context and continuation as one token list and splits them on
its side), so both models read an echoed prompt as plain text, the guide with no chat template
(`Blender.score(..., template=False)`: the base's very tokens on a shared vocabulary, the text
through its own tokenizer otherwise). The completion after the echo is generated exactly as without
echo (the guide reads the prompt through its chat template).
"""
from __future__ import annotations

import asyncio
import codecs
import json
from functools import partial

from starlette.responses import Response

from ..blender import METHODS, Blender
from ..options import json_safe
from .openai_format import FINISH, CompletionFormat, usage
from .batcher import gather_while_connected
from .schemas import ApiError

# JSON has no -Infinity: a token the policy gives probability 0 (within float precision) gets
# vLLM's floor instead.
LOGPROB_FLOOR = -9999.0
# What one request may ask for: prompts in a list, and log-probabilities in its answer (each
# token's own and its top alternatives, echoed and generated, over all prompts; about 40 bytes of
# JSON each). lm-evaluation-harness's batches are far below both.
MAX_PROMPTS = 1024
MAX_LOGPROB_ENTRIES = 500_000


def model_method(req) -> None:
    """A model name that ends in ":METHOD" ("demo:nudging") chooses that method, as the `method`
    field does (which wins when both are given): clients that send nothing but the model name per
    request, such as lm-evaluation-harness's log-likelihood requests, can pick the method. Any
    other model name changes nothing."""
    if req.method is None and req.model and ":" in req.model:
        suffix = req.model.rsplit(":", 1)[1]
        if suffix in METHODS:
            req.method = suffix


def read_prompts(server, req) -> list[tuple[str | list[int], int]]:
    """The request's prompts, each with where its echo starts: a string as it is (the base's
    tokenizer adds its start token, which the echo shows), token ids as given, after the base's
    start token when the base adds one and they do not begin with it (as a string prompt gets it;
    the echo shows only the ids sent)."""
    p = req.prompt
    if isinstance(p, str) or (p and all(isinstance(t, int) for t in p)):
        prompts = [p]
    else:
        prompts = list(p)
    if not prompts:
        raise ApiError(400, "prompt is an empty list", param="prompt", code="invalid_value")
    if len(prompts) > MAX_PROMPTS:
        raise ApiError(400, f"prompt lists {len(prompts)} prompts; a request may have {MAX_PROMPTS} at most (send "
                       "several requests)", param="prompt", code="invalid_value")
    base = server.blender.base
    bos = base.special_tokens["bos"]
    out = []
    for i, one in enumerate(prompts):
        if isinstance(one, str):
            out.append((one, 0))
            continue
        if not one:
            raise ApiError(400, f"prompt {i} has no tokens", param="prompt", code="invalid_value")
        if base._handle.add_bos and bos >= 0 and one[0] != bos:
            out.append(([bos] + list(one), 1))
        else:
            out.append((list(one), 0))
    return out


def _score_echo(blender: Blender, tokens: list[int], kwargs: dict, top: int):
    """Worker thread, models held: the plain-text view's log-probabilities of tokens[1:]."""
    scales = kwargs.get("av_scales")
    if scales is not None:
        blender.base.set_adapter_scales(scales)
    settings = {k: kwargs[k] for k in Blender.SETTINGS if k in kwargs}
    return blender.score(tokens[:1], tokens[1:], template=False, top_logprobs=top, **settings)


def _floor(lp: float) -> float:
    return max(lp, LOGPROB_FLOOR)


def _echo_logprobs(fmt: CompletionFormat, shown: list[int], scored) -> dict:
    """The echoed tokens in the legacy logprobs shape: the first has no log-probability (null),
    as OpenAI and vLLM answer. text_offset counts characters of the echoed text."""
    base = fmt.server.blender.base
    decoder = codecs.getincrementaldecoder("utf-8")(errors="ignore")
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    chars = 0
    for k, t in enumerate(shown):
        out["tokens"].append(fmt._token(t)[0])
        out["text_offset"].append(chars)
        chars += len(decoder.decode(base.piece(t)))  # a character split over tokens counts where it ends
        if k == 0:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        step = scored.steps[len(scored.steps) - len(shown) + k]
        out["token_logprobs"].append(_floor(step.logprob))
        out["top_logprobs"].append({fmt._token(a)[0]: _floor(lp) for a, lp in step.top_logprobs})
    return out


async def complete_prompts(server, request, req, prompts: list[tuple[str | list[int], int]]):
    """Several prompts and/or echo: one choice per prompt, in order, each generated as a single
    prompt is. The prompts run concurrently, as separate requests would (decoded together, up to
    the server's --parallel at a time)."""
    if req.stream:
        raise ApiError(400, "echo and lists of prompts cannot be streamed", param="stream", code="invalid_value")
    if req.n > 1 or req.best_of:
        raise ApiError(400, "n and best_of take one prompt without echo", param="n", code="invalid_value")
    if req.trace:
        raise ApiError(400, "echo and lists of prompts cannot be traced (trace is per token of one answer)",
                       param="trace", code="invalid_value")
    head = CompletionFormat(server, req.logprobs)
    # every prompt is checked before any runs: a bad one fails the request at once
    prepared = [await server.prepare(req, prompt, req.max_tokens, req.logprobs or 0, "prompt") for prompt, _ in prompts]
    if req.logprobs is not None:
        entries = (req.logprobs + 1) * sum((len(tokens.base) - shown_from if req.echo else 0) + kwargs["max_tokens"]
                                           for (_, shown_from), (tokens, kwargs) in zip(prompts, prepared))
        if entries > MAX_LOGPROB_ENTRIES:
            raise ApiError(400, f"the answer would hold up to {entries} log-probabilities (tokens x (logprobs + 1) "
                           f"over all prompts); a request may ask for {MAX_LOGPROB_ENTRIES} at most (send fewer "
                           "prompts, fewer tokens or a lower logprobs)", param="logprobs", code="invalid_value")
    turns = asyncio.Semaphore(server.batcher.parallel)

    async def one(index: int):
        (prompt, shown_from), (tokens, kwargs) = prompts[index], prepared[index]
        async with turns:
            scored = None
            if req.echo and req.logprobs is not None and len(tokens.base) > 1:
                try:
                    scored = await server.batcher.exclusive(request, partial(_score_echo, server.blender, tokens.base,
                                                                             kwargs, req.logprobs), "echo_scoring")
                except (ValueError, TypeError) as e:
                    raise ApiError(400, str(e), param="prompt") from None
                if scored is None:
                    return None  # the client left
            done = await server.run_to_end(request, tokens, kwargs)
        if done is None:
            return None
        # off the event loop: an echo with logprobs can be a large answer
        return await asyncio.to_thread(choice, index, done, scored)

    def choice(index: int, done, scored):
        (prompt, shown_from), (tokens, kwargs) = prompts[index], prepared[index]
        steps, stats, completion_tokens = done
        fmt = CompletionFormat(server, req.logprobs)
        text = "".join(s.text for s in steps)
        logprobs = None
        if req.echo:
            shown = tokens.base[shown_from:]
            echoed = prompt if isinstance(prompt, str) else server.blender.base.detokenize(shown)
            if req.logprobs is not None:
                echo_lp = _echo_logprobs(fmt, shown, scored)  # scored is None only for a one-token prompt
                fmt.chars = len(echoed)  # the generated tokens' text_offset counts on from the echo's end
                generated = fmt._logprobs(steps)
                logprobs = {k: echo_lp[k] + generated[k] for k in generated}
            text = echoed + text
        elif req.logprobs is not None:
            logprobs = fmt._logprobs(steps)
        out = {"index": index, "text": text, "logprobs": logprobs,
               "finish_reason": FINISH[stats["finish_reason"]], "blend": json_safe(stats)}
        return out, server.prompt_tokens(tokens, kwargs), completion_tokens

    results = await gather_while_connected(request, [one(i) for i in range(len(prompts))])
    if results is None or any(r is None for r in results):
        return Response(status_code=204)  # the client is gone; nobody reads this
    choices = [r[0] for r in results]
    body = {**head.head("text_completion"), "choices": choices,
            "usage": usage(sum(r[1] for r in results), sum(r[2] for r in results))}
    if len(prompts) == 1:
        body["blend"] = choices[0]["blend"]
    # encoded off the event loop too: /health and the other requests go on meanwhile
    return Response(await asyncio.to_thread(_json_bytes, body), media_type="application/json")


def _json_bytes(body: dict) -> bytes:
    return json.dumps(body, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()
