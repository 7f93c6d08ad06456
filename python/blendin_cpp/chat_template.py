"""Prompts for the two models of a pair, built from one conversation.

The guide reads its own chat template (a GGUF's `tokenizer.chat_template`, rendered with jinja2 in
a sandbox, as llama-cpp-python renders it); the base, a plain pretrained model, reads a plain
transcript of the same conversation.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

ROLES = ("system", "user", "assistant")


def _raise(message: str):
    raise jinja2.exceptions.TemplateError(message)


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    return env.from_string(template)


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
        out.append({"role": m["role"], "content": m["content"]})
    return out


def render(template: str, messages: Sequence[dict], *, add_generation_prompt: bool = True,
           bos_token: str = "", eos_token: str = "") -> str:
    try:
        return _compile(template).render(messages=check_messages(messages),
                                          add_generation_prompt=add_generation_prompt,
                                          bos_token=bos_token, eos_token=eos_token)
    except jinja2.exceptions.TemplateError as e:
        raise ValueError(f"the chat template failed to render: {e}") from None


def base_transcript(messages: Sequence[dict]) -> str:
    """The plain completion prompt a pretrained base reads for a conversation: a system message
    as a leading paragraph, then "Question: ...\\nAnswer: ..." lines, ending with "Answer:"."""
    messages = check_messages(messages)
    if messages[-1]["role"] != "user":
        raise ValueError("the last message must come from the user")
    parts = []
    for m in messages:
        if m["role"] == "system":
            parts.append(m["content"].strip() + "\n\n")
        elif m["role"] == "user":
            parts.append(f"Question: {m['content'].strip()}\nAnswer:")
        else:
            parts.append(f" {m['content'].strip()}\n")
    return "".join(parts)


# base_transcript as a chat template, for clients that render prompts themselves (the server's
# /tokenizer_info): rendered with add_generation_prompt it gives base_transcript's text.
BASE_TRANSCRIPT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] | trim }}{{ '\\n\\n' }}"
    "{% elif m['role'] == 'user' %}{{ 'Question: ' + m['content'] | trim + '\\nAnswer:' }}"
    "{% else %}{{ ' ' + m['content'] | trim + '\\n' }}{% endif %}"
    "{% endfor %}"
)
