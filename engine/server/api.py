"""The OpenAI-compatible HTTP API (FastAPI) over one `LLMEngine`."""

from __future__ import annotations

import asyncio
import copy
import importlib.metadata
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, replace
from typing import TypeVar

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ValidationError
from servebench.engine.core.sampling_params import SamplingParams
from servebench.engine.lora import LoRARequest
from servebench.engine.outputs import PositionLogprobs
from servebench.engine.server.async_engine import AsyncEngine, EngineThread, Update
from servebench.engine.server.engine_process import EngineProcess
from servebench.engine.server.metrics import ServerMetrics
from servebench.engine.server.protocol import (
    AssistantMessage,
    Body,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatMessage,
    ChatStreamChoice,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    Delta,
    ErrorInfo,
    ErrorResponse,
    GenerationRequest,
    ModelCard,
    ModelList,
    PromptTokensDetails,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from starlette.exceptions import HTTPException

logger = logging.getLogger(__name__)

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat fills the context
MAX_ENGINE_REQUESTS = 1024  # per API request: prompts x best_of
LOGPROB_FLOOR = -9999.0  # stands in for -inf, which JSON cannot carry (as vLLM)
ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
               405: "MethodNotAllowedError", 413: "RequestTooLargeError", 500: "InternalServerError"}

B = TypeVar("B", bound=Body)


def default_max_body_bytes(max_model_len: int) -> int:
    """32 bytes a token of context (JSON-escaped text or token ids fit several times over), at least 1 MiB."""
    return max(1 << 20, 32 * max_model_len)


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


def error_response(status: int, message: str, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    info = ErrorInfo(message=message, type=ERROR_TYPES.get(status, "APIError"), param=param, code=status)
    return JSONResponse(ErrorResponse(error=info).model_dump(), status_code=status, headers=headers)


def internal_error(exc: BaseException) -> ErrorResponse:
    """A 500's body: an id to quote; the exception goes to the server log under that id, not to the client."""
    error_id = uuid.uuid4().hex[:16]
    logger.error("internal error %s", error_id, exc_info=exc)
    message = f"Internal server error (error id {error_id}); the server log has the details."
    return ErrorResponse(error=ErrorInfo(message=message, type="InternalServerError", code=500))


@dataclass(slots=True)
class Prompt:
    ids: list[int]
    text: str  # what `echo` returns ("" when not echoed and given as token ids)


class OpenAIServer:
    """Turns API requests into engine requests and engine updates into OpenAI responses."""

    def __init__(self, engine, model_name: str, model_path: str, max_body_bytes: int | None = None,
                 loras: list[LoRARequest] | None = None) -> None:
        engine_loop = engine if isinstance(engine, EngineProcess) else EngineThread(engine)
        # A copy of our own: an engine thread detokenizes with its tokenizer while we encode here.
        self.tokenizer = copy.deepcopy(engine.tokenizer)
        self.model_name, self.model_path, self.max_model_len = model_name, model_path, engine.max_model_len
        self.loras = {lora.lora_name: lora for lora in loras or ()}  # served as models under their names
        self.vocab_size = engine.vocab_size
        self.max_body_bytes = max_body_bytes or default_max_body_bytes(self.max_model_len)
        self.metrics = ServerMetrics(model_name)
        self.engine = AsyncEngine(engine_loop, self.metrics)
        self.created = int(time.time())
        # Body parsing and tokenization run here, off the event loop; one thread, so the tokenizer is never
        # used by two threads at once.
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="tokenizer")
        self._token_strs: dict[int, str] = {}

    async def _off_loop(self, fn: Callable, *args):
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    async def parse(self, raw: Request, model: type[B]) -> B:
        body = await self._read_body(raw)
        try:
            return await self._off_loop(model.model_validate_json, body)
        except ValidationError as e:
            raise RequestValidationError(e.errors(include_url=False, include_input=False)) from None

    async def _read_body(self, raw: Request) -> bytes:
        limit = self.max_body_bytes
        too_large = APIError(413, f"the request body is larger than {limit} bytes (--max-request-body-bytes)")
        declared = raw.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_large
        body = bytearray()
        async for chunk in raw.stream():
            body += chunk
            if len(body) > limit:
                raise too_large
        return bytes(body)

    def token_str(self, token_id: int) -> str:
        text = self._token_strs.get(token_id)
        if text is None:
            text = self._token_strs[token_id] = self.tokenizer.decode([token_id])
        return text

    # ---- endpoints --------------------------------------------------------------------
    async def completions(self, req: CompletionRequest) -> Response:
        if not req.prompt:
            raise APIError(400, "prompt must not be empty", "prompt")
        prompts = await self._off_loop(self._encode, req.prompts, req.echo)
        default = COMPLETIONS_DEFAULT_MAX_TOKENS
        return await self._serve(req, prompts, req.max_tokens, default, CompletionFormat)

    def _encode(self, prompts: list[str] | list[list[int]], echo: bool) -> list[Prompt]:
        encoded = []
        for p in prompts:
            if isinstance(p, str):
                encoded.append(Prompt(self.tokenizer.encode(p), p))
                continue
            if p and (min(p) < 0 or max(p) >= self.vocab_size):
                raise APIError(400, f"prompt token ids must be in [0, {self.vocab_size})", "prompt")
            encoded.append(Prompt(p, self.tokenizer.decode(p) if echo else ""))
        return encoded

    async def chat(self, req: ChatCompletionRequest) -> Response:
        prompt = await self._off_loop(self._render_chat, req.messages)
        return await self._serve(req, [prompt], req.max_completion_tokens or req.max_tokens, None, ChatFormat)

    def _render_chat(self, messages: list[ChatMessage]) -> Prompt:
        try:
            text = self.tokenizer.apply_chat_template([m.template_dict() for m in messages],
                                                      add_generation_prompt=True, tokenize=False)
        except Exception as e:  # a template may reject a message order with its own exception type
            raise APIError(400, f"messages: the chat template failed: {e}", "messages") from e
        # The template writes its special tokens itself, as in vLLM.
        return Prompt(self.tokenizer.encode(text, add_special_tokens=False), text)

    def models(self) -> ModelList:
        """The base model, then each LoRA adapter (vLLM's cards: its folder as root, the base as parent)."""
        card = ModelCard(id=self.model_name, created=self.created, root=self.model_path,
                         max_model_len=self.max_model_len)
        adapters = [ModelCard(id=name, created=self.created, root=lora.lora_path, parent=self.model_name,
                              max_model_len=self.max_model_len) for name, lora in self.loras.items()]
        return ModelList(data=[card, *adapters])

    def _lora(self, model: str | None) -> LoRARequest | None:
        """The adapter a request's `model` names; None: the base model."""
        if model is None or model == self.model_name:
            return None
        if model not in self.loras:
            served = ", ".join(repr(name) for name in (self.model_name, *self.loras))
            raise APIError(400, f"model {model!r} does not exist; this server serves {served}", "model")
        return self.loras[model]

    # ---- one API request: engine requests for each prompt x best_of -------------------------
    async def _serve(self, req: GenerationRequest, prompts: list[Prompt], max_tokens: int | None,
                     default: int | None, fmt: type[CompletionFormat]) -> Response:
        lora = self._lora(req.model)
        if req.top_k is not None and req.top_k > self.vocab_size:
            raise APIError(400, f"top_k must be -1, 0 or 1..{self.vocab_size} (the vocabulary size), got "
                           f"{req.top_k}", "top_k")
        best_of = getattr(req, "best_of", None) or req.n
        if len(prompts) * best_of > MAX_ENGINE_REQUESTS:
            raise APIError(400, f"at most {MAX_ENGINE_REQUESTS} prompts x best_of (or n) per request, got "
                           f"{len(prompts)} x {best_of}", "prompt")
        params = [self._params(req, len(p.ids), max_tokens, default, fmt.prompt_param) for p in prompts]
        response = fmt(self, req, prompts)
        rank = best_of > req.n
        streams = [self.engine.generate(f"{response.id}-{i}-{j}", p.ids, _choice_params(params[i], j, rank),
                                        lora) for i, p in enumerate(prompts) for j in range(best_of)]
        try:
            firsts = await _first_updates(streams)
        except ValueError as e:
            raise APIError(400, str(e), fmt.prompt_param) from e
        if req.stream:
            hold = max((len(s) - 1 for s in params[0].stop or ()), default=0)
            return StreamingResponse(self._sse(response, firsts, streams, req.include_usage, hold),
                                     media_type="text/event-stream")
        last = list(firsts)
        async with aclosing(_merge(firsts, streams)) as updates:
            async for k, update in updates:
                last[k] = update
        return JSONResponse(response.final(_best(last, best_of, req.n)).model_dump())

    def _params(self, req: GenerationRequest, num_ids: int, max_tokens: int | None, default: int | None,
                prompt_param: str) -> SamplingParams:
        limit = self.max_model_len
        if num_ids >= limit:
            raise APIError(400, f"This model's maximum context length is {limit} tokens. However, your "
                           f"{prompt_param} resulted in {num_ids} tokens. Please reduce its length.",
                           prompt_param)
        if max_tokens is None:
            max_tokens = limit - num_ids if default is None else default
        if num_ids + max_tokens > limit:
            raise APIError(
                400, f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{num_ids + max_tokens} tokens ({num_ids} in the {prompt_param}, {max_tokens} in the "
                "completion). Please reduce the length of the prompt or max_tokens.", "max_tokens")
        try:
            return req.sampling_params(max_tokens)
        except ValueError as e:
            raise APIError(400, str(e)) from e

    async def _sse(self, fmt: CompletionFormat, firsts: list[Update], streams: list[AsyncIterator[Update]],
                   include_usage: bool, hold: int) -> AsyncIterator[str]:
        """One chunk per engine update, empty text included, so that clients see one chunk per token.

        The last `hold` characters wait for the next update: they may begin a stop string, which the
        engine cuts from the text once it completes (vLLM holds back the same way). An error after the
        response has begun arrives as an error event, then [DONE]."""
        sent_text, sent_tokens, last = [0] * len(streams), [-1] * len(streams), list(firsts)
        try:
            async with aclosing(_merge(firsts, streams)) as updates:
                async for k, update in updates:
                    end = len(update.text) if update.finished else len(update.text) - hold
                    yield _sse(fmt.chunk(k, update, sent_text[k], end, sent_tokens[k]))
                    sent_text[k], sent_tokens[k] = max(sent_text[k], end), len(update.token_ids)
                    last[k] = update
            if include_usage:
                yield _sse(fmt.usage_chunk(last))
        except Exception as e:  # the request failed in the engine, or the engine loop died
            yield _sse(internal_error(e))
        yield "data: [DONE]\n\n"


def _choice_params(params: SamplingParams, j: int, rank: bool) -> SamplingParams:
    """Choice j of a prompt: its own seed (equal seeds would give equal choices), and the sampled tokens'
    logprobs when best_of > n ranks the choices by them."""
    seed = params.seed if params.seed is None or j == 0 else hash((params.seed, j)) & (2**63 - 1)
    logprobs = 0 if rank and params.logprobs is None else params.logprobs
    return replace(params, seed=seed, logprobs=logprobs)


async def _first_updates(streams: list[AsyncIterator[Update]]) -> list[Update]:
    """The first update of each stream, all submitted at once so that they batch together. A bad request
    (the engine's ValueError) surfaces here, before any response has begun; then every stream is aborted."""
    firsts = [asyncio.ensure_future(anext(s)) for s in streams]
    try:
        return list(await asyncio.gather(*firsts))
    except BaseException:
        for first in firsts:
            first.cancel()
        await asyncio.gather(*firsts, return_exceptions=True)
        for s in streams:
            await s.aclose()
        raise


async def _merge(firsts: list[Update],
                 streams: list[AsyncIterator[Update]]) -> AsyncIterator[tuple[int, Update]]:
    """(stream index, update) as the engine delivers them, `firsts` first, until every stream finished.
    The first error ends it; closing it aborts the streams still running."""
    if len(streams) == 1:  # the common case (n = 1): no queue and task between the stream and the client
        try:
            yield 0, firsts[0]
            if not firsts[0].finished:
                async for update in streams[0]:
                    yield 0, update
        finally:
            await streams[0].aclose()  # left early (client gone): the engine aborts the request
        return
    queue: asyncio.Queue[tuple[int, Update | Exception]] = asyncio.Queue()

    async def pump(k: int, stream: AsyncIterator[Update]) -> None:
        try:
            async for update in stream:
                queue.put_nowait((k, update))
        except Exception as e:
            queue.put_nowait((k, e))

    tasks = [asyncio.create_task(pump(k, s)) for k, s in enumerate(streams)]
    try:
        for k, update in enumerate(firsts):
            yield k, update
        left = sum(not u.finished for u in firsts)
        while left:
            k, item = await queue.get()
            if isinstance(item, Exception):
                raise item
            left -= item.finished
            yield k, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _best(updates: list[Update], best_of: int, n: int) -> list[Update]:
    """The n choices of each prompt: of its best_of, those of the highest cumulative logprob."""
    if best_of == n:
        return updates
    groups = (updates[i:i + best_of] for i in range(0, len(updates), best_of))
    return [u for g in groups for u in sorted(g, key=lambda u: u.cumulative_logprob, reverse=True)[:n]]


def _sse(body: BaseModel) -> str:
    return f"data: {body.model_dump_json()}\n\n"


def _finite(logprob: float) -> float:
    return max(logprob, LOGPROB_FLOOR)


def _usage(choices: list[Update], n: int) -> Usage:
    prompts = choices[::n]  # each prompt counts once
    num_prompt = sum(u.num_prompt_tokens for u in prompts)
    num_output = sum(u.num_output_tokens for u in choices)
    cached = [u.num_cached_tokens for u in prompts]
    details = None if None in cached else PromptTokensDetails(cached_tokens=sum(cached))
    return Usage(prompt_tokens=num_prompt, completion_tokens=num_output, total_tokens=num_prompt + num_output,
                 prompt_tokens_details=details)


class CompletionFormat:
    """The response objects of one API request; choice k belongs to prompt k // n."""

    prefix, prompt_param = "cmpl", "prompt"

    def __init__(self, server: OpenAIServer, req: GenerationRequest, prompts: list[Prompt]) -> None:
        self.id, self.created = f"{self.prefix}-{uuid.uuid4().hex}", int(time.time())
        self.model = req.model or server.model_name  # the base model's name or an adapter's
        self.server, self.prompts, self.n = server, prompts, req.n
        self.num_logprobs = req.num_logprobs  # None: no logprobs
        self.echo = getattr(req, "echo", False)

    def chunk(self, k: int, u: Update, text_from: int, text_to: int, tokens_from: int) -> BaseModel:
        """Choice k's text [text_from, text_to) and its tokens from `tokens_from` (-1: the first chunk)."""
        text, ids, positions = self._new(k, u, text_from, text_to, tokens_from)
        echoed = len(self.prompts[k // self.n].text) if self.echo else 0
        offset = 0 if tokens_from < 0 else text_from + echoed
        choice = CompletionChoice(index=k, text=text, logprobs=self._logprobs(ids, positions, offset),
                                  finish_reason=u.finish_reason)
        return self._body([choice])

    def _new(self, k: int, u: Update, text_from: int, text_to: int,
             tokens_from: int) -> tuple[str, list[int], list[PositionLogprobs | None]]:
        """Text, tokens and their logprobs since the last chunk (all of them: tokens_from <= 0); with
        echo, the prompt comes first."""
        start = max(tokens_from, 0)
        text, ids, positions = u.text[text_from:text_to], u.token_ids[start:], (u.logprobs or [])[start:]
        if self.echo and tokens_from < 0:
            prompt = self.prompts[k // self.n]
            text, ids = prompt.text + text, prompt.ids + ids
            positions = (u.prompt_logprobs or [None] * len(prompt.ids)) + positions
        return text, ids, positions

    def _logprobs(self, ids: list[int], positions: list[PositionLogprobs | None],
                  offset: int) -> CompletionLogprobs | None:
        if self.num_logprobs is None:
            return None
        out, token_str = CompletionLogprobs(), self.server.token_str
        for tok, position in zip(ids, positions):
            out.tokens.append(token_str(tok))
            out.text_offset.append(offset)
            offset += len(out.tokens[-1])
            out.token_logprobs.append(None if position is None else _finite(position[tok].logprob))
            out.top_logprobs.append(None if position is None else
                                    {token_str(t): _finite(lp.logprob) for t, lp in position.items()})
        return out

    def _body(self, choices: list[CompletionChoice], usage: Usage | None = None) -> CompletionResponse:
        return CompletionResponse(id=self.id, created=self.created, model=self.model, choices=choices,
                                  usage=usage)

    def usage_chunk(self, last: list[Update]) -> BaseModel:
        return self._body([], _usage(last, self.n))

    def final(self, choices: list[Update]) -> BaseModel:
        body = []
        for k, u in enumerate(choices):
            text, ids, positions = self._new(k, u, 0, len(u.text), -1)
            body.append(CompletionChoice(index=k, text=text, logprobs=self._logprobs(ids, positions, 0),
                                         finish_reason=u.finish_reason))
        return self._body(body, _usage(choices, self.n))


class ChatFormat(CompletionFormat):
    prefix, prompt_param = "chatcmpl", "messages"

    def chunk(self, k: int, u: Update, text_from: int, text_to: int, tokens_from: int) -> BaseModel:
        text, ids, positions = self._new(k, u, text_from, text_to, tokens_from)
        # The role rides on the first token's chunk rather than an empty chunk of its own.
        delta = Delta(role="assistant" if tokens_from < 0 else None, content=text)
        choice = ChatStreamChoice(index=k, delta=delta, logprobs=self._chat_logprobs(ids, positions),
                                  finish_reason=u.finish_reason)
        return self._chunk([choice])

    def _chat_logprobs(self, ids: list[int], positions: list[PositionLogprobs]) -> ChatLogprobs | None:
        if self.num_logprobs is None:
            return None
        token_str, k = self.server.token_str, self.num_logprobs

        def top(t: int, logprob: float) -> TopLogprob:
            s = token_str(t)
            return TopLogprob(token=s, logprob=_finite(logprob), bytes=list(s.encode()))

        content = []
        for tok, position in zip(ids, positions):
            best = sorted((lp.rank, t, lp.logprob) for t, lp in position.items() if lp.rank <= k)
            content.append(TokenLogprob(**top(tok, position[tok].logprob).model_dump(),
                                        top_logprobs=[top(t, lp) for _, t, lp in best]))
        return ChatLogprobs(content=content)

    def usage_chunk(self, last: list[Update]) -> BaseModel:
        return self._chunk([], _usage(last, self.n))

    def _chunk(self, choices: list[ChatStreamChoice], usage: Usage | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=choices,
                                   usage=usage)

    def final(self, choices: list[Update]) -> BaseModel:
        body = [ChatChoice(index=k, message=AssistantMessage(content=u.text), finish_reason=u.finish_reason,
                           logprobs=self._chat_logprobs(u.token_ids, u.logprobs or []))
                for k, u in enumerate(choices)]
        return ChatCompletionResponse(id=self.id, created=self.created, model=self.model, choices=body,
                                      usage=_usage(choices, self.n))


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
    if err["type"] == "json_invalid":  # invalid UTF-8 and lone surrogates (\ud800) included
        return error_response(400, f"malformed JSON body: {err['msg']}")
    loc = [str(p) for p in err["loc"] if p != "body"]  # e.g. messages.0.role; param: the top-level field
    msg = "not a field of this endpoint, or not supported" if err["type"] == "extra_forbidden" else err["msg"]
    return error_response(400, f"{'.'.join(loc) or 'body'}: {msg.removeprefix('Value error, ')}",
                          loc[0] if loc else None)


def build_app(engine, model_name: str, model_path: str, api_key: str | None = None,
              max_body_bytes: int | None = None, loras: list[LoRARequest] | None = None) -> FastAPI:
    """The app over `engine`: an `LLMEngine`, which its lifespan steps in a thread of this process, or an
    `EngineProcess`, whose loop it starts; `loras`: adapters the engine knows (LLMEngine.add_lora), served
    as models under their names."""
    server = OpenAIServer(engine, model_name, model_path, max_body_bytes, loras)
    expected = f"Bearer {api_key}".encode()

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        server.engine.start()
        yield
        server.engine.stop()
        server.pool.shutdown()

    def check_key(raw: Request) -> None:
        # Before the body is read (handlers parse it themselves); constant time against timing attacks.
        given = raw.headers.get("authorization", "").encode()
        if api_key is not None and not secrets.compare_digest(given, expected):
            raise APIError(401, "Incorrect or missing API key.")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_key)])

    @v1.post("/completions")
    async def completions(raw: Request) -> Response:
        req = await server.parse(raw, CompletionRequest)
        return await _cancel_on_disconnect(raw, server.completions(req))

    @v1.post("/chat/completions")
    async def chat(raw: Request) -> Response:
        req = await server.parse(raw, ChatCompletionRequest)
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
    app.add_exception_handler(APIError, lambda _, e: error_response(e.status, e.message, e.param))
    app.add_exception_handler(HTTPException, lambda _, e: error_response(e.status_code, str(e.detail),
                                                                         headers=e.headers))
    app.add_exception_handler(Exception, lambda _, e: JSONResponse(internal_error(e).model_dump(),
                                                                   status_code=500))
    return app
