"""Prompts for the two models of a pair, built from one conversation.

The guide reads its own chat template (a GGUF's `tokenizer.chat_template`, rendered with jinja2 in
a sandbox, as llama-cpp-python renders it); the base, a plain pretrained model, reads a plain
transcript of the same conversation.
"""
from __future__ import annotations

import math
import sys
import time
from functools import lru_cache
from typing import Sequence

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .text import check_text

ROLES = ("system", "user", "assistant")

# A template comes with a model file, so it is input: its rendering is bounded. Real templates
# render in milliseconds and a prompt of RENDER_CHARS characters fits no context.
RENDER_SECONDS = 1.0       # CPU time of the rendering thread
RENDER_CHARS = 10_000_000  # the rendered text, and any string or list the template builds


class _Bound(Exception):
    """The rendering went past a bound (the message says which)."""


def _raise(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _size(x) -> int | None:
    return len(x) if isinstance(x, (str, bytes, list, tuple)) else None


def _check_size(n: float, what: str) -> None:
    if n > RENDER_CHARS:
        raise _Bound(f"builds {what} of more than {RENDER_CHARS} characters")


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """The sandbox, refusing before it is computed a value larger than RENDER_CHARS from the
    operators that multiply sizes ('x' * 10**9, 10 ** 10 ** 9) or add them, and any call with an
    integer argument beyond RENDER_CHARS ('x'.center(10**9))."""
    intercepted_binops = frozenset({"*", "**", "+"})

    def call_binop(self, context, operator, left, right):
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if _size(seq) is not None and isinstance(n, int):
                    _check_size(len(seq) * n, "a string or list")
        elif operator == "**":
            if isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right > 0:
                _check_size(right * math.log10(abs(left)), "a number with")
        elif _size(left) is not None and _size(right) is not None:
            _check_size(len(left) + len(right), "a string or list")
        return super().call_binop(context, operator, left, right)

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja2's signature)
        for a in (*args, *kwargs.values()):
            if isinstance(a, int) and not isinstance(a, bool) and abs(a) > RENDER_CHARS:
                raise _Bound(f"passes {a} to {getattr(__obj, '__name__', 'a function')}()")
        return super().call(__context, __obj, *args, **kwargs)


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = _BoundedSandbox(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    return env.from_string(template)


def _generate_bounded(template: jinja2.Template, context: dict) -> str:
    """template.render(context) within RENDER_SECONDS of this thread's CPU time and RENDER_CHARS
    characters of output. The clock is read at every line the compiled template executes (a
    trace function on its frames only: loops in it, however they are written, come back to a
    line), so a template that loops for ever stops there."""
    deadline = time.thread_time() + RENDER_SECONDS

    def on_line(frame, event, arg):
        if time.thread_time() > deadline:
            raise _Bound(f"ran past its limit of {RENDER_SECONDS:g} s of CPU time (does it loop?)")
        return on_line

    def on_call(frame, event, arg):
        return on_line(frame, event, arg) if frame.f_code.co_filename == "<template>" else None

    previous = sys.gettrace()
    sys.settrace(on_call)
    try:
        out, n = [], 0
        for chunk in template.generate(context):
            n += len(chunk)
            if n > RENDER_CHARS:
                raise _Bound(f"renders more than {RENDER_CHARS} characters")
            out.append(chunk)
        return "".join(out)
    finally:
        sys.settrace(previous)


def check_messages(messages: Sequence[dict]) -> list[dict]:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"message {i} must be a dict with 'role' and 'content', got {m!r}")
        if m["role"] not in ROLES:
            raise ValueError(f"message {i} has role {m['role']!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise ValueError(f"message {i} content must be a string")
        check_text(f"message {i} content", m["content"])
        out.append({"role": m["role"], "content": m["content"]})
    return out


def render(template: str, messages: Sequence[dict], *, add_generation_prompt: bool = True,
           bos_token: str = "", eos_token: str = "", name: str = "the chat template") -> str:
    """The template (jinja2, in a sandbox, bounded in time and size) applied to `messages`;
    every failure is a ValueError that begins with `name`."""
    messages = check_messages(messages)
    try:
        return _generate_bounded(_compile(template), dict(messages=messages, add_generation_prompt=add_generation_prompt,
                                                          bos_token=bos_token, eos_token=eos_token))
    except _Bound as e:
        raise ValueError(f"{name} {e}") from None
    except jinja2.exceptions.TemplateError as e:
        raise ValueError(f"{name} failed to render: {e}") from None
    except (ArithmeticError, LookupError, TypeError, ValueError, AttributeError, RecursionError, MemoryError) as e:
        raise ValueError(f"{name} failed to render: {type(e).__name__}: {e}") from None


def base_transcript(messages: Sequence[dict]) -> str:
    """The plain completion prompt a pretrained base reads for a conversation: "Question:
    ...\\nAnswer: ..." lines, ending with "Answer:". System messages are the guide's alone: a
    pretrained base does not follow instructions, and one told to answer briefly answered fewer
    questions (docs/design.md section 9.1)."""
    messages = check_messages(messages)
    if messages[-1]["role"] != "user":
        raise ValueError("the last message must come from the user")
    parts = []
    for m in messages:
        if m["role"] == "user":
            parts.append(f"Question: {m['content'].strip()}\nAnswer:")
        elif m["role"] == "assistant":
            parts.append(f" {m['content'].strip()}\n")
    return "".join(parts)


# base_transcript as a chat template, for clients that render prompts themselves (the server's
# /tokenizer_info): rendered with add_generation_prompt it gives base_transcript's text.
BASE_TRANSCRIPT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}{{ 'Question: ' + m['content'] | trim + '\\nAnswer:' }}"
    "{% elif m['role'] == 'assistant' %}{{ ' ' + m['content'] | trim + '\\n' }}{% endif %}"
    "{% endfor %}"
)
