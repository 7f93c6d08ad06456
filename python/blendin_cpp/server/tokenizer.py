"""vLLM's tokenizer endpoints over the base's vocabulary (the vocabulary of prompts, completions and
logprobs), as lm-evaluation-harness's `tokenizer_backend=remote` uses them:

- `GET /tokenizer_info`: bos/eos/pad tokens, whether the base adds its start token, the context,
  and a chat template that renders what /v1/chat/completions gives the base (a plain transcript);
- `POST /tokenize {"prompt", "add_special_tokens"}` -> `{"count", "max_model_len", "tokens"}`:
  control-token text ("</s>") becomes the control token, as Hugging Face tokenizers and vLLM read
  it (a string prompt on /v1/completions reads such text as plain text: send token ids to put
  control tokens in a prompt);
- `POST /detokenize {"tokens"}` -> `{"prompt"}`: control tokens are left out, so that the text
  reads back as the same prompt (the base adds its start token to a string prompt again).
"""
from __future__ import annotations

import asyncio

from fastapi import Request

from ..chat_template import BASE_TRANSCRIPT_TEMPLATE
from .schemas import ApiError, DetokenizeRequest, TokenizeRequest


def _token_text(model, token: int) -> str | None:
    return model.piece(token, special=True).decode("utf-8", errors="replace") if token >= 0 else None


def tokenizer_info(server) -> dict:
    base = server.blender.base
    special = base.special_tokens
    pad = base.metadata.get("tokenizer.ggml.padding_token_id")
    kind = base.metadata.get("tokenizer.ggml.model", "")
    return {
        "tokenizer_class": f"llama.cpp {kind}".strip(),
        "bos_token": _token_text(base, special["bos"]),
        "eos_token": _token_text(base, special["eos"]),
        "pad_token": _token_text(base, int(pad)) if pad not in (None, "") else None,
        "add_bos_token": bool(base._handle.add_bos),
        "model_max_length": server.n_ctx,
        "chat_template": BASE_TRANSCRIPT_TEMPLATE,
    }


def add_tokenizer_routes(app, server) -> None:
    @app.get("/tokenizer_info")
    async def info(request: Request):
        server.check_key(request)
        return tokenizer_info(server)

    @app.post("/tokenize")
    async def tokenize(request: Request):
        req = await server.parse(request, TokenizeRequest)
        base = server.blender.base
        tokens = await asyncio.to_thread(base.tokenize, req.prompt, add_special=req.add_special_tokens, special=True)
        strs = [_token_text(base, t) for t in tokens] if req.return_token_strs else None
        return {"count": len(tokens), "max_model_len": server.n_ctx, "tokens": tokens, "token_strs": strs}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        req = await server.parse(request, DetokenizeRequest)
        base = server.blender.base
        for t in req.tokens:
            if t >= base.n_vocab:
                raise ApiError(400, f"token {t} is outside the vocabulary of {base.n_vocab} tokens", param="tokens",
                               code="invalid_value")
        return {"prompt": await asyncio.to_thread(base.detokenize, req.tokens)}
