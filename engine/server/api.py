"""The OpenAI-compatible HTTP API (FastAPI) over one `LLMEngine`."""

from __future__ import annotations

import asyncio
import copy
import importlib.metadata
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from contextlib import aclosing, asynccontextmanager

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel
from servebench.engine.server.async_engine import AsyncEngine, Update
from servebench.engine.server.metrics import ServerMetrics
from servebench.engine.server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatStreamChoice,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    Delta,
    ErrorInfo,
    ErrorResponse,
    GenerationRequest,
    ModelCard,
    ModelList,
    PromptTokensDetails,
    Usage,
)

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat fills the context


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 type: str = "BadRequestError") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.type = status, message, param, type


def error_response(status: int, message: str, param: str | None = None,
                   type: str = "BadRequestError") -> JSONResponse:
    body = ErrorResponse(error=ErrorInfo(message=message, type=type, param=param, code=status))
    return JSONResponse(body.model_dump(), status_code=status)


class OpenAIServer:
    """Turns API requests into engine requests and engine updates into OpenAI responses."""

    def __init__(self, engine, model_name: str, model_path: str) -> None:
        # A copy of our own: the engine thread detokenizes with its tokenizer while we encode here.
        self.tokenizer = copy.deepcopy(engine.tokenizer)
        self.model_name, self.model_path, self.max_model_len = model_name, model_path, engine.max_model_len
        self.metrics = ServerMetrics(model_name)
        self.engine = AsyncEngine(engine, self.metrics)
        self.created = int(time.time())

    async def completions(self, req: CompletionRequest) -> Response:
        if not req.prompt:
            raise APIError(400, "prompt must not be empty", "prompt")
        # Token ids go to the engine as they are; it checks their range.
        ids = self.tokenizer.encode(req.prompt) if isinstance(req.prompt, str) else req.prompt
        return await self._serve(req, ids, req.max_tokens, COMPLETIONS_DEFAULT_MAX_TOKENS, CompletionFormat)

    async def chat(self, req: ChatCompletionRequest) -> Response:
        messages = [m.template_dict() for m in req.messages]
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as e:  # a template may reject a message order with its own exception type
            raise APIError(400, f"messages: the chat template failed: {e}", "messages") from e
        # The template writes its special tokens itself, as in vLLM.
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        return await self._serve(req, ids, req.max_completion_tokens or req.max_tokens,
                                 self.max_model_len - len(ids), ChatFormat)

    async def _serve(self, req: GenerationRequest, ids: list[int], max_tokens: int | None, default: int,
                     fmt: type[CompletionFormat]) -> Response:
        if req.model is not None and req.model != self.model_name:
            raise APIError(400, f"model {req.model!r} does not exist; this server serves {self.model_name!r}",
                           "model")
        max_tokens = default if max_tokens is None else max_tokens
        if len(ids) + max_tokens > self.max_model_len:
            raise APIError(
                400, f"This model's maximum context length is {self.max_model_len} tokens. However, you "
                f"requested {len(ids) + max_tokens} tokens ({len(ids)} in the {fmt.prompt_param}, "
                f"{max_tokens} in the completion). Please reduce the length of the prompt or max_tokens.",
                fmt.prompt_param if len(ids) >= self.max_model_len else "max_tokens")
        try:
            params = req.sampling_params(max_tokens)
        except ValueError as e:
            raise APIError(400, str(e)) from e
        response = fmt(f"{fmt.prefix}-{uuid.uuid4().hex}", int(time.time()), self.model_name)
        updates = self.engine.generate(response.id, ids, params)
        try:
            first = await anext(updates)
        except ValueError as e:
            raise APIError(400, str(e), fmt.prompt_param) from e
        if req.stream:
            hold = max((len(s) - 1 for s in params.stop or ()), default=0)
            return StreamingResponse(self._sse(response, first, updates, req.include_usage, hold),
                                     media_type="text/event-stream")
        last = first
        async with aclosing(updates):
            while not last.finished:
                last = await anext(updates)
        return JSONResponse(response.final(last).model_dump())

    async def _sse(self, fmt: CompletionFormat | ChatFormat, first: Update, updates: AsyncIterator[Update],
                   include_usage: bool, hold: int) -> AsyncIterator[str]:
        """One chunk per engine update, empty text included, so that clients see one chunk per token.

        The last `hold` characters wait for the next update: they may begin a stop string, which the
        engine cuts from the text once it completes (vLLM holds back the same way)."""
        sent, update, is_first = 0, first, True
        async with aclosing(updates):
            while True:
                end = len(update.text) if update.finished else len(update.text) - hold
                yield _sse(fmt.chunk(update.text[sent:end], update.finish_reason, is_first))
                sent, is_first = max(sent, end), False
                if update.finished:
                    break
                update = await anext(updates)
        if include_usage:
            yield _sse(fmt.usage_chunk(update))
        yield "data: [DONE]\n\n"

    def models(self) -> ModelList:
        card = ModelCard(id=self.model_name, created=self.created, root=self.model_path,
                         max_model_len=self.max_model_len)
        return ModelList(data=[card])


def _sse(body: BaseModel) -> str:
    return f"data: {body.model_dump_json()}\n\n"


def _usage(u: Update) -> Usage:
    details = None if u.num_cached_tokens is None else PromptTokensDetails(cached_tokens=u.num_cached_tokens)
    return Usage(prompt_tokens=u.num_prompt_tokens, completion_tokens=u.num_output_tokens,
                 total_tokens=u.num_prompt_tokens + u.num_output_tokens, prompt_tokens_details=details)


class CompletionFormat:
    prefix, prompt_param = "cmpl", "prompt"

    def __init__(self, id: str, created: int, model: str) -> None:
        self.id, self.created, self.model = id, created, model

    def _body(self, text: str | None, reason: str | None, usage: Usage | None = None) -> CompletionResponse:
        choices = [] if text is None else [CompletionChoice(text=text, finish_reason=reason)]
        return CompletionResponse(id=self.id, created=self.created, model=self.model, choices=choices,
                                  usage=usage)

    def chunk(self, text: str, reason: str | None, first: bool) -> BaseModel:
        return self._body(text, reason)

    def usage_chunk(self, last: Update) -> BaseModel:
        return self._body(None, None, _usage(last))

    def final(self, last: Update) -> BaseModel:
        return self._body(last.text, last.finish_reason, _usage(last))


class ChatFormat(CompletionFormat):
    prefix, prompt_param = "chatcmpl", "messages"

    def chunk(self, text: str, reason: str | None, first: bool) -> BaseModel:
        # The role rides on the first token's chunk rather than an empty chunk of its own.
        delta = Delta(role="assistant" if first else None, content=text)
        return self._chunk([ChatStreamChoice(delta=delta, finish_reason=reason)])

    def usage_chunk(self, last: Update) -> BaseModel:
        return self._chunk([], _usage(last))

    def _chunk(self, choices: list[ChatStreamChoice], usage: Usage | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=choices,
                                   usage=usage)

    def final(self, last: Update) -> BaseModel:
        choice = ChatChoice(message=AssistantMessage(content=last.text), finish_reason=last.finish_reason)
        return ChatCompletionResponse(id=self.id, created=self.created, model=self.model, choices=[choice],
                                      usage=_usage(last))


async def _cancel_on_disconnect(raw: Request, work: Awaitable[Response]) -> Response:
    """Await the handler until it answers or its client goes away; cancelling it aborts the request.

    Once a streaming response is returned, Starlette watches for the disconnect itself.
    """
    async def disconnected() -> None:
        while (await raw.receive())["type"] != "http.disconnect":
            pass

    tasks = [asyncio.ensure_future(work), asyncio.ensure_future(disconnected())]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
    if tasks[0] in done:
        return tasks[0].result()
    return Response(status_code=499)  # nginx's "client closed request": nobody reads it


def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    err = exc.errors()[0]
    if err["type"] == "json_invalid":
        return error_response(400, f"malformed JSON body: {err['msg']}")
    loc = [str(p) for p in err["loc"] if p != "body"]  # e.g. messages.0.role; param: the top-level field
    return error_response(400, f"{'.'.join(loc) or 'body'}: {err['msg']}", loc[0] if loc else None)


def build_app(engine, model_name: str, model_path: str, api_key: str | None = None) -> FastAPI:
    """The app over `engine` (an `LLMEngine`), which its lifespan steps in a thread of its own."""
    server = OpenAIServer(engine, model_name, model_path)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        server.engine.start()
        yield
        server.engine.stop()

    def check_key(raw: Request) -> None:
        if api_key is not None and raw.headers.get("authorization") != f"Bearer {api_key}":
            raise APIError(401, "Incorrect or missing API key.", type="AuthenticationError")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_key)])

    @v1.post("/completions")
    async def completions(req: CompletionRequest, raw: Request) -> Response:
        return await _cancel_on_disconnect(raw, server.completions(req))

    @v1.post("/chat/completions")
    async def chat(req: ChatCompletionRequest, raw: Request) -> Response:
        return await _cancel_on_disconnect(raw, server.chat(req))

    @v1.get("/models")
    async def models() -> ModelList:
        return server.models()

    app = FastAPI(title="engine", lifespan=lifespan)
    app.include_router(v1)
    app.state.server = server

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=503 if server.engine.error is not None else 200)

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": importlib.metadata.version("servebench")}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(server.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(APIError, lambda _, e: error_response(e.status, e.message, e.param, e.type))
    app.add_exception_handler(Exception, lambda _, e: error_response(500, str(e), type="InternalServerError"))
    return app

