"""Loading and unloading adapters over HTTP: lorakit's own routes and vLLM's.

lorakit's: ``POST /v1/adapters {"name", "path"}`` (201 with the adapter's model object) and
``DELETE /v1/adapters/{name}`` (200), errors in OpenAI's shape.

vLLM's (as its current release answers them, so its clients and scripts work unchanged):

- ``POST /v1/load_lora_adapter {"lora_name", "lora_path", "load_inplace"?}``: 200 with the
  plain-text body ``Success: LoRA adapter '<name>' added successfully.``; 400
  ``InvalidUserInput`` when a field is missing or empty, or when the name is taken
  (unless ``load_inplace``, which swaps in the new files); 404 ``NotFoundError`` when
  there is no adapter at that path.
- ``POST /v1/unload_lora_adapter {"lora_name"}``: 200 ``Success: LoRA adapter '<name>'
  removed successfully.``; 400 when the name is missing; 404 when it is not loaded.

vLLM's errors are ``{"error": {"message", "type", "param", "code": <status>}}``. Where
lorakit knows more than vLLM does, it keeps its own status: a path outside
``--adapter-root`` is 403, a file that does not load is 400 (vLLM answers 500).
"""

from __future__ import annotations

import json

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from lorakit.serve import schemas
from lorakit.serve.confine import PathForbidden
from lorakit.serve.registry import AdapterConflict, AdapterLoadError, MissingAdapter, UnknownAdapter, short
from lorakit.serve.responses import error_response, error_status
from lorakit.serve.service import Service


def routes(service: Service) -> APIRouter:
    router = APIRouter()

    @router.post("/v1/adapters", status_code=201)
    async def add_adapter(body: schemas.AdapterLoadRequest, request: Request):
        request.state.adapter = body.name
        return await service.add_adapter(body.name, body.path)

    @router.delete("/v1/adapters/{name:path}")
    async def remove_adapter(name: str, request: Request):
        request.state.adapter = name
        return await service.remove_adapter(name)

    @router.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request):
        body = await _vllm_body(request, schemas.LoadLoraAdapterRequest)
        if isinstance(body, Response):
            return body
        request.state.adapter = body.lora_name
        if not body.lora_name or not body.lora_path:
            return _vllm_error("Both 'lora_name' and 'lora_path' must be provided.", "InvalidUserInput", 400)
        taken = _vllm_error(f"The lora adapter '{body.lora_name}' has already been loaded. If you want to load "
                            "the adapter in place, set 'load_inplace' to True.", "InvalidUserInput", 400)
        if service.registry.knows(body.lora_name) and not body.load_inplace:
            return taken
        try:
            await service.add_adapter(body.lora_name, body.lora_path, replace=body.load_inplace)
        except AdapterConflict as err:  # loaded meanwhile by another request, or the reserved name "base"
            return taken if service.registry.knows(body.lora_name) else _vllm_error(str(err), "InvalidUserInput", 400)
        except MissingAdapter:
            return _vllm_error(f"Loading lora {short(body.lora_name)} failed: No adapter found for "
                               f"{short(body.lora_path)}",
                               "NotFoundError", 404)
        except AdapterLoadError as err:
            return _vllm_error(str(err), "BadRequestError", 400)
        except PathForbidden as err:
            return _vllm_error(str(err), "PermissionError", 403)
        except Exception as err:  # noqa: BLE001 - answered in vLLM's shape
            return _vllm_from(err)
        return Response(f"Success: LoRA adapter '{body.lora_name}' added successfully.", status_code=200)

    @router.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request):
        body = await _vllm_body(request, schemas.UnloadLoraAdapterRequest)
        if isinstance(body, Response):
            return body
        request.state.adapter = body.lora_name
        if not body.lora_name:
            return _vllm_error("'lora_name' needs to be provided to unload a LoRA adapter.", "InvalidUserInput", 400)
        try:
            await service.remove_adapter(body.lora_name)
        except UnknownAdapter:
            return _vllm_error(f"The lora adapter '{short(body.lora_name)}' cannot be found.", "NotFoundError", 404)
        except Exception as err:  # noqa: BLE001 - answered in vLLM's shape
            return _vllm_from(err)
        return Response(f"Success: LoRA adapter '{body.lora_name}' removed successfully.", status_code=200)

    return router


async def _vllm_body(request: Request, model):
    """The parsed body, or vLLM's 400 for one that is not a JSON object of the right fields."""
    try:
        data = json.loads(await request.body() or b"{}")
        return model.model_validate(data)
    except Exception as err:  # noqa: BLE001 - JSON or validation errors alike
        first = getattr(err, "errors", lambda: [{"msg": str(err)}])()[0]
        return _vllm_error(f"the request body is not valid: {first.get('msg', err)}", "BadRequestError", 400)


def _vllm_error(message: str, kind: str, status: int) -> JSONResponse:
    return JSONResponse(schemas.error_body(message, kind, None, status), status_code=status)


def _vllm_from(err: Exception) -> JSONResponse:
    status = error_status(err)
    if status == 500:
        return error_response(err)
    kind = {404: "NotFoundError", 409: "InvalidUserInput"}.get(status, "BadRequestError")
    return _vllm_error(str(err), kind, status)
