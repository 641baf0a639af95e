"""vLLM's token routes, for clients that count or inspect tokens before they ask:

- ``POST /tokenize {"prompt"}`` or ``{"messages", "add_generation_prompt"?, "continue_final_message"?}``:
  ``{"count", "max_model_len", "tokens", "token_strs"}``, the very ids ``/v1/completions`` or
  ``/v1/chat/completions`` would give the model (a prompt past the server's limits is counted,
  not refused: knowing that is what a client asks for); ``token_strs`` with ``return_token_strs``.
- ``POST /detokenize {"tokens"}``: ``{"prompt"}``, their text (ids past the vocabulary: 400).

``model``, when given, must name what the server serves (404 otherwise); tokenization does
not depend on the adapter. Both need the API key, as the ``/v1/`` routes do.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter

from lorakit.serve import schemas
from lorakit.serve.service import GENERATE, Service

def routes(service: Service) -> APIRouter:
    router = APIRouter()

    @router.post("/tokenize")
    async def tokenize(body: schemas.TokenizeRequest):
        if body.model is not None:
            service.check_served(body.model)
        if body.messages is not None:
            service.require_task(GENERATE)  # a chat template belongs to a generating model
            if body.model is not None:  # registered (on demand: loaded) as a generation would: its template counts
                await service.ensure_model(body.model)
            messages = [m.as_dict() for m in body.messages]
            ids = await asyncio.to_thread(service.encode_chat, messages, body.add_generation_prompt,
                                          body.continue_final_message, False, body.model)
        else:
            ids = await asyncio.to_thread(service.encode_prompt, body.prompt, False)
        strs = service.tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None
        return {"count": len(ids), "max_model_len": service.limits.context, "tokens": ids, "token_strs": strs}

    @router.post("/detokenize")
    async def detokenize(body: schemas.DetokenizeRequest):
        if body.model is not None:
            service.check_served(body.model)
        service.check_token_ids(body.tokens, "tokens")
        return {"prompt": service.tokenizer.decode(body.tokens)}

    return router
