"""The OpenAI-compatible HTTP API of a worker (FastAPI): routes, auth, errors, streaming.

``/v1/models``, ``/v1/completions`` and ``/v1/chat/completions`` turn their bodies into a
``pb.GenerateRequest`` (``openai_schema``) and serve it through the same ``Generations`` as
the gRPC ``Generate``: the same checks, admission limit, drain and metrics. ``stream: true``
answers with server-sent events in OpenAI's chunk format, ending with ``data: [DONE]``.
A client that disconnects cancels its request (its KV is released at the next step).
``GET /health`` answers 200 while the worker takes requests, 503 while it drains or while no
cache-service replica is healthy (no token needed, for load balancers; the gRPC health
service says the same for ``icecache.v1.Worker``).
"""

from __future__ import annotations

import hmac
import json
import secrets
from collections.abc import AsyncIterator
from typing import Any

import anyio
import grpc
from anyio import to_thread
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from proto.icecache.v1 import worker_pb2 as pb
from worker.serving.generation import Generation, Generations
from worker.serving.openai_schema import (
    COMPLETIONS_MAX_TOKENS,
    ChatBody,
    CompletionBody,
    Reply,
    RequestError,
    error_body,
    refuse_unsupported,
    to_generate,
)

HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
"""How a refusal's gRPC status goes out over HTTP (anything else: 500)."""


def create_app(calls: Generations, model: str, token: str = "") -> FastAPI:
    """The API over ``calls``, serving the model as ``model``; ``token``: Bearer auth."""
    app = FastAPI(title="IceCache", docs_url=None, redoc_url=None, openapi_url=None)
    threads = anyio.CapacityLimiter(calls.max_requests + 4)  # one per waiting call, no more
    expected = f"Bearer {token}".encode()

    def authorized(request: Request) -> None:
        if not token:
            return
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            reason = "no authorization header" if not given else "wrong token"
            raise RequestError(
                f"{reason}: send 'Authorization: Bearer <token>' with the worker's shared secret "
                "(the openai client's api_key)",
                status=401,
                code="invalid_api_key",
            )

    def check_model(name: str) -> None:
        if name != model:
            raise RequestError(
                f"the model {name!r} does not exist here; this worker serves {model!r}",
                "model",
                404,
                "model_not_found",
            )

    def model_card() -> dict[str, Any]:
        return {"id": model, "object": "model", "created": 0, "owned_by": "icecache",
                "max_model_len": calls.max_context}  # fmt: skip

    @app.exception_handler(RequestError)
    async def request_error(request: Request, err: RequestError) -> JSONResponse:
        if err.status == 400:
            calls.refuse(err)  # counted as INVALID_ARGUMENT, as over gRPC
        return _error(str(err), err.status, err.param, err.code)

    @app.exception_handler(ValueError)
    async def bad_value(request: Request, err: ValueError) -> JSONResponse:
        return _refused(calls, err)  # e.g. a message list for a model without a chat template

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0]
        where = [str(p) for p in first["loc"] if p != "body"]
        param = where[0] if where else None
        if first["type"] == "extra_forbidden":
            message = f"Unrecognized request argument supplied: {'.'.join(where)}"
        elif first["type"] == "json_invalid":
            message, param = "the body is not valid JSON: " + first["msg"], None
        else:
            message = f"{'.'.join(where) or 'body'}: {first['msg']}"
        calls.refuse(ValueError(message))
        return _error(message, 400, param, None)

    @app.get("/health")
    async def health() -> JSONResponse:
        if calls.draining.is_set():
            return JSONResponse({"status": "draining"}, status_code=503)
        replicas = calls.scheduler.engine.kv.replicas()
        if replicas and not any(r.healthy for r in replicas):
            return JSONResponse({"status": "no healthy cache service"}, status_code=503)
        return JSONResponse({"status": "serving"})

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}", dependencies=[Depends(authorized)])
    async def one_model(name: str) -> dict[str, Any]:
        check_model(name)
        return model_card()

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    async def completions(body: CompletionBody, request: Request) -> Any:
        check_model(body.model)
        refuse_unsupported(body)
        prompt = body.prompt_input()
        wanted = COMPLETIONS_MAX_TOKENS if body.max_tokens is None else body.max_tokens
        reply = Reply.new("cmpl-" + secrets.token_hex(12), model, chat=False)
        generate = to_generate(body, prompt, wanted, reply.id)
        return await serve(generate, body.stream, body.include_usage, reply, request)

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat(body: ChatBody, request: Request) -> Any:
        check_model(body.model)
        refuse_unsupported(body)
        turns = body.turns()
        ids = await to_thread.run_sync(calls.tokenizer.chat_ids, turns, limiter=threads)
        wanted = body.wanted_tokens
        if wanted is None:  # OpenAI's default: as many as fit
            wanted = max(0, min(calls.max_new_tokens, calls.max_context - len(ids)))
        reply = Reply.new("chatcmpl-" + secrets.token_hex(12), model, chat=True)
        generate = to_generate(body, ids, wanted, reply.id)
        return await serve(generate, body.stream, body.include_usage, reply, request)

    async def serve(
        generate: pb.GenerateRequest,
        stream: bool | None,
        include_usage: bool,
        reply: Reply,
        request: Request,
    ) -> Any:
        try:
            call = await to_thread.run_sync(calls.open, generate, limiter=threads)
        except Exception as err:
            return _refused(calls, err)
        if stream:
            events = _events(call, reply, include_usage, threads)
            return StreamingResponse(events, media_type="text/event-stream")
        try:
            done = await _until_done(call, request, threads)
        except Exception as err:
            return _refused(calls, err)
        if done is None:  # the client left; nobody to answer
            return JSONResponse({}, status_code=499)
        return reply.completion(done)

    return app


async def _next(call: Generation, threads: anyio.CapacityLimiter) -> pb.GenerateResponse | None:
    # abandoned on cancel: the thread returns at the request's next event (close() cancels it)
    return await to_thread.run_sync(call.next_message, limiter=threads, abandon_on_cancel=True)


async def _until_done(
    call: Generation, request: Request, threads: anyio.CapacityLimiter
) -> pb.GenerateDone | None:
    """The call's final message, or ``None`` when the client disconnected first (then the
    request is cancelled)."""
    done: pb.GenerateDone | None = None
    try:
        async with anyio.create_task_group() as group:

            async def watch() -> None:
                while (await request.receive())["type"] != "http.disconnect":
                    pass
                group.cancel_scope.cancel()

            group.start_soon(watch)
            while (message := await _next(call, threads)) is not None:
                if message.HasField("done"):
                    done = message.done
            group.cancel_scope.cancel()
    finally:
        call.close()
    return done


async def _events(
    call: Generation, reply: Reply, include_usage: bool, threads: anyio.CapacityLimiter
) -> AsyncIterator[str]:
    """Server-sent events of a streamed call; a failure after the first byte goes out as an
    error event (the status is already sent). Starlette cancels this on disconnect."""
    try:
        if (first := reply.first_chunk()) is not None:
            yield _event(first)
        while (message := await _next(call, threads)) is not None:
            if message.HasField("token"):
                if message.token.text:
                    yield _event(reply.chunk(message.token.text))
                continue
            yield _event(reply.last_chunk(message.done))
            if include_usage:
                yield _event(reply.usage_chunk(message.done))
        yield "data: [DONE]\n\n"
    except Exception as err:
        status = HTTP_STATUS.get(call.owner.refuse(err), 500)
        yield _event(error_body(str(err), status, None, None))
    finally:
        call.close()


def _event(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _refused(calls: Generations, err: BaseException) -> JSONResponse:
    status = HTTP_STATUS.get(calls.refuse(err), 500)
    return _error(str(err), status, None, None)


def _error(message: str, status: int, param: str | None, code: str | None) -> JSONResponse:
    return JSONResponse(error_body(message, status, param, code), status_code=status)
