"""The small routes: ``/health`` (no key needed), ``/v1/models`` (and one by id) and ``/metrics``."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from rxruntime.serving.http.context import Context
from rxruntime.serving.http.errors import not_found


async def health(ctx: Context, request: Request, owner: str) -> Response:
    """200 ``ready``, or 503 with ``loading`` / ``failed`` / ``shutting_down`` (for load balancers)."""
    status = ctx.slot.status
    body: dict[str, object] = {"status": status}
    if status == "failed":
        body["error"] = ctx.slot.error
    return JSONResponse(body, status_code=200 if status == "ready" else 503)


async def list_models(ctx: Context, request: Request, owner: str) -> Response:
    return JSONResponse({"object": "list", "data": [_model(ctx)]})


async def get_model(ctx: Context, request: Request, owner: str) -> Response:
    """The one model, by its id; 404 in OpenAI's error shape for any other id."""
    model_id = request.path_params["model_id"]
    if model_id != ctx.model_name:
        raise not_found(f"model {model_id!r}", "model")
    return JSONResponse(_model(ctx))


def _model(ctx: Context) -> dict[str, object]:
    engine = ctx.slot.engine
    config = engine.config
    model = {
        "id": ctx.model_name,
        "object": "model",
        "created": 0,
        "owned_by": "rxruntime",
        "rxrt": {
            "layers": config.num_layers,
            "dim": config.dim,
            "stm_size": config.stm_size,
            "max_seq_len": config.max_seq_len,
            "vocab_size": config.vocab_size,
        },
    }
    return model


async def metrics(ctx: Context, request: Request, owner: str) -> Response:
    return Response(ctx.metrics.render(), media_type=ctx.metrics.CONTENT_TYPE)
