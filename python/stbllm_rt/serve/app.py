"""The OpenAI-compatible ASGI app: /v1/completions, /v1/chat/completions (both with server-sent events),
/v1/models, /health and /metrics, over one model and one continuous-batching engine.

`create_app(settings)` returns an app that holds only its settings until the ASGI lifespan starts: the model is
loaded (once) at startup, so the same app object runs under uvicorn or as a Ray Serve replica.
"""
# No `from __future__ import annotations` here: Ray pickles the app's route functions by value, and FastAPI must
# still see real classes (not strings it cannot resolve any more) in their signatures.

import asyncio
import hmac
import json
import os
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..model import Model
from .engine import GenerationRequest, Piece, QueueFull, Sampling, ServingEngine
from .metrics import ServerMetrics
from .schemas import ChatCompletionRequest, CompletionRequest, SamplingRequest, UnsupportedField

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
DISCONNECT_POLL_S = 0.5  # how often a non-streaming request checks whether its client is still there


@dataclass
class ServerSettings:
    model_path: str
    model_name: str | None = None  # default: the file name without .stb
    threads: int | None = None
    kv_cache: str = "f16"  # KV cache element type: "f16" or "f32"
    max_batch: int = 8
    max_queue: int = 64
    api_key: str | None = None
    timeout: float = 600.0  # seconds from arrival to the last token
    max_step_tokens: int = 256  # rows per batched forward (prompt chunks of joining requests share them)

    @property
    def served_name(self) -> str:
        return self.model_name or Path(self.model_path).name.removesuffix(".stb")


class APIError(Exception):
    """An error answered as OpenAI's JSON error body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code
        self.headers = headers

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.kind, "param": self.param,
                                       "code": self.code}}, status_code=self.status, headers=self.headers)


def _sse(payload) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'), ensure_ascii=False)}\n\n"


class _Output:
    """The shape of one route's answers (completion or chat), whole or as stream chunks."""

    def __init__(self, chat: bool, model_name: str):
        self.chat = chat
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model_name = model_name

    def _envelope(self, kind: str, choices: list, usage: dict | None = None) -> dict:
        body = {"id": self.id, "object": kind, "created": self.created, "model": self.model_name, "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return body

    def whole(self, text: str, finish: str, usage: dict) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finish}
            return self._envelope("chat.completion", [choice], usage)
        return self._envelope("text_completion", [{"index": 0, "text": text, "logprobs": None,
                                                   "finish_reason": finish}], usage)

    def opening_chunk(self) -> dict | None:
        if not self.chat:
            return None
        return self._envelope("chat.completion.chunk", [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                         "logprobs": None, "finish_reason": None}])

    def chunk(self, text: str, finish: str | None) -> dict:
        if self.chat:
            delta = {"content": text} if text else {}
            return self._envelope("chat.completion.chunk", [{"index": 0, "delta": delta, "logprobs": None,
                                                             "finish_reason": finish}])
        return self._envelope("text_completion", [{"index": 0, "text": text, "logprobs": None,
                                                   "finish_reason": finish}])

    def usage_chunk(self, usage: dict) -> dict:
        return self._envelope("chat.completion.chunk" if self.chat else "text_completion", [], usage)


class _Server:
    """What the routes share: settings, then (after startup) the model, the engine and the metrics."""

    def __init__(self, settings: ServerSettings):
        self.settings = settings
        self.model: Model | None = None
        self.engine: ServingEngine | None = None
        self.metrics: ServerMetrics | None = None  # made at startup: locks do not pickle (Ray ships the app)

    def start(self) -> None:
        s = self.settings
        self.model = Model(s.model_path, threads=s.threads, kv_cache=s.kv_cache)
        if self.model.tokenizer.kind == "none":
            raise RuntimeError(f"{s.model_path} has no tokenizer; the server needs one (stbllm-convert --tokenizer)")
        self.metrics = ServerMetrics()
        self.engine = ServingEngine(self.model, s.max_batch, s.max_queue, s.max_step_tokens, self.metrics)
        self.engine.start()

    def stop(self) -> None:
        if self.engine:
            self.engine.stop()

    # ---- request preparation (every check that can fail happens before the request is queued) ------------------

    def check_model(self, body: SamplingRequest) -> None:
        if body.model != self.settings.served_name:
            raise APIError(404, f"model {body.model!r} does not exist; this server serves "
                                f"{self.settings.served_name!r}", "model", code="model_not_found")

    def completion_prompt(self, body: CompletionRequest) -> list[int]:
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise APIError(400, "a list of several prompts is not supported; send one prompt per request",
                               "prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            return self.model.tokenize(prompt)
        vocab = self.model.config["vocab_size"]
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"token id {bad[0]} is outside the vocabulary [0, {vocab})", "prompt")
        return list(prompt)

    def chat_prompt(self, body: ChatCompletionRequest) -> list[int]:
        if not self.model.tokenizer.chat_template:
            raise APIError(400, "this model has no chat template; use /v1/completions", "messages")
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            text = self.model.apply_chat_template(messages)
        except Exception as error:  # noqa: BLE001 - the template itself may raise on a message order it refuses
            raise APIError(400, f"the chat template refused these messages: {error}", "messages") from error
        return self.model.tokenize(text)

    def generation_request(self, body: SamplingRequest, prompt_ids: list[int], prompt_field: str,
                           max_tokens: int | None, default_max_tokens: int | None) -> GenerationRequest:
        context = self.model.config["max_position_embeddings"]
        if not prompt_ids:
            raise APIError(400, "the prompt is empty", prompt_field)
        if len(prompt_ids) >= context:
            raise APIError(400, f"the prompt has {len(prompt_ids)} tokens; the model's context is {context}",
                           prompt_field)
        room = context - len(prompt_ids)
        if max_tokens is None:
            max_tokens = min(room, default_max_tokens or room)
        elif max_tokens > room:
            raise APIError(400, f"max_tokens {max_tokens} + the prompt's {len(prompt_ids)} tokens exceed the "
                                f"model's context of {context} tokens", "max_tokens")
        seed = body.seed if body.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        sampling = Sampling(temperature=body.temperature, top_k=max(body.top_k, 0), top_p=body.top_p,
                            min_p=body.min_p, repetition_penalty=body.repetition_penalty,
                            frequency_penalty=body.frequency_penalty, presence_penalty=body.presence_penalty,
                            seed=seed)
        return GenerationRequest(prompt_ids, max_tokens, sampling, stop=body.stop_strings)

    # ---- running one request -----------------------------------------------------------------------------------

    async def answer(self, body: SamplingRequest, request: GenerationRequest, http: Request, output: _Output):
        try:
            self.engine.submit(request)
        except QueueFull as error:
            raise APIError(429, f"the server is busy ({error}); retry later", kind="rate_limit_error",
                           headers={"Retry-After": "1"}) from error
        deadline = request.arrival + self.settings.timeout
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(self._stream(request, output, deadline, include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return JSONResponse(await self._collect(request, output, deadline, http))

    def _usage(self, request: GenerationRequest, piece: Piece) -> dict:
        prompt = len(request.prompt_ids)
        return {"prompt_tokens": prompt, "completion_tokens": piece.completion_tokens,
                "total_tokens": prompt + piece.completion_tokens}

    async def _collect(self, request: GenerationRequest, output: _Output, deadline: float, http: Request) -> dict:
        texts = []
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    self.engine.cancel(request, "timeout")
                    raise APIError(504, f"the request did not finish within {self.settings.timeout:g} s",
                                   kind="timeout")
                try:
                    piece = await request.next_piece(min(left, DISCONNECT_POLL_S))
                except asyncio.TimeoutError:
                    if await http.is_disconnected():
                        self.engine.cancel(request)
                        return {}
                    continue
                texts.append(piece.text)
                if piece.finish_reason:
                    return output.whole("".join(texts), piece.finish_reason, self._usage(request, piece))
        except (ValueError, RuntimeError) as error:
            raise APIError(500, str(error), kind="server_error") from error
        finally:
            self.engine.cancel(request)  # a no-op once finished; frees the KV slot if this task was cancelled

    async def _stream(self, request: GenerationRequest, output: _Output, deadline: float, include_usage: bool):
        # A client that disconnects makes Starlette cancel this generator; `finally` then frees its KV slot.
        try:
            opening = output.opening_chunk()
            if opening:
                yield _sse(opening)
            while True:
                try:
                    piece = await request.next_piece(max(deadline - time.monotonic(), 0))
                except asyncio.TimeoutError:
                    self.engine.cancel(request, "timeout")
                    yield _sse({"error": {"message": f"the request did not finish within {self.settings.timeout:g}"
                                                     " s", "type": "timeout", "param": None, "code": None}})
                    break
                except (ValueError, RuntimeError) as error:
                    yield _sse({"error": {"message": str(error), "type": "server_error", "param": None,
                                          "code": None}})
                    break
                if piece.text or piece.finish_reason:
                    yield _sse(output.chunk(piece.text, piece.finish_reason))
                if piece.finish_reason:
                    if include_usage:
                        yield _sse(output.usage_chunk(self._usage(request, piece)))
                    break
            yield "data: [DONE]\n\n"
        finally:
            self.engine.cancel(request)


def _field_of(location) -> tuple[str | None, str]:
    """(top-level field, full path) of a pydantic error location like ('body', 'messages', 0, 'role')."""
    parts = [str(p) for p in location if p != "body"]
    return (parts[0] if parts else None), ".".join(parts)


def create_app(settings: ServerSettings) -> FastAPI:
    server = _Server(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await asyncio.to_thread(server.start)
        app.state.server = server
        yield
        await asyncio.to_thread(server.stop)

    app = FastAPI(title="stbllm", description="OpenAI-compatible server for structured-binary LLMs",
                  lifespan=lifespan)

    @app.exception_handler(APIError)
    async def api_error(_, error: APIError):
        if error.status in (400, 401, 404):
            server.metrics.request_done("invalid")
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_, error: RequestValidationError):
        first = error.errors()[0]
        if first.get("type") == "json_invalid":
            return await api_error(None, APIError(400, f"the body is not valid JSON: {first.get('msg')}"))
        field, path = _field_of(first.get("loc", ()))
        return await api_error(None, APIError(400, f"{path}: {first.get('msg')}" if path else first.get("msg"),
                                              field))

    @app.exception_handler(UnsupportedField)
    async def unsupported(_, error: UnsupportedField):
        return await api_error(None, APIError(400, str(error), error.field))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, error: StarletteHTTPException):
        return APIError(error.status_code, str(error.detail), kind="not_found_error" if error.status_code == 404
                        else "invalid_request_error", headers=getattr(error, "headers", None)).response()

    async def check_api_key(request: Request) -> None:
        if settings.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {settings.api_key}".encode()):
            raise APIError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')",
                           kind="authentication_error", code="invalid_api_key")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_api_key)])

    @v1.get("/models")
    async def models():
        return {"object": "list", "data": [{"id": settings.served_name, "object": "model", "created": 0,
                                            "owned_by": "stbllm"}]}

    @v1.post("/completions")
    async def completions(body: CompletionRequest, http: Request):
        server.check_model(body)
        body.check_supported()
        prompt = server.completion_prompt(body)
        request = server.generation_request(body, prompt, "prompt", body.max_tokens, DEFAULT_COMPLETION_TOKENS)
        return await server.answer(body, request, http, _Output(False, settings.served_name))

    @v1.post("/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, http: Request):
        server.check_model(body)
        body.check_supported()
        prompt = server.chat_prompt(body)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        request = server.generation_request(body, prompt, "messages", max_tokens, None)
        return await server.answer(body, request, http, _Output(True, settings.served_name))

    app.include_router(v1)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": settings.served_name, "running": server.engine.running,
                "queued": server.engine.queue_depth}

    @app.get("/metrics")
    async def metrics():
        return Response(server.metrics.render(), media_type=server.metrics.content_type)

    return app
