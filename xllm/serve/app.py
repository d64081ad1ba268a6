"""The OpenAI-compatible HTTP API over an :class:`xllm.engine.scheduler.Engine`.

FastAPI (on Starlette, served by uvicorn) was chosen because it is what the field's Python
servers use (vLLM, llama-cpp-python), it parses and validates JSON with pydantic, and its
streaming responses carry server-sent events without another dependency. The layer is thin: it
turns a request into engine requests (one per choice) and engine events into OpenAI's JSON.

The same application serves one engine in this process (``python -m xllm.serve``) and Ray Serve
replicas of it (xllm/serve/ray.py, docs/scaling.rst): it needs of its engine only the caller's
side of :class:`xllm.engine.scheduler.Engine`: ``submit(request)`` (raising QueueFullError,
EngineClosedError, ContextLengthError or ValueError), ``wake()``, ``model`` (the tokenizer, chat
template and config), and the gauges ``running``, ``waiting``, ``kv_bytes`` and
``prefix_cache.nbytes``. Events reach ``request.emit`` from any thread."""
import asyncio
import collections
import contextlib
import hashlib
import hmac
import json
import logging
import secrets
import time
import uuid
from dataclasses import dataclass, replace
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.datastructures import Headers
from pydantic import ValidationError

from ..engine.sampling import SamplingParams
from ..engine.scheduler import (EngineClosedError, FinishEvent, QueueFullError,
                                Request as EngineRequest, TokenEvent)
from ..errors import ChatTemplateError, ContextLengthError
from . import structured
from .metrics import Metrics
from .protocol import (APIError, ChatRequest, CompletionRequest, DetokenizeRequest,
                       TokenizeRequest, validation_error)

log = logging.getLogger("xllm.serve")

DEFAULT_TEMPERATURE = 1.0  # OpenAI's default
DISCONNECT_POLL = 0.25  # seconds between checks that a waiting client is still there


class ServerSettings:
    """What the server needs besides the engine. `echo_request_id`: whether responses get the
    ``X-Request-ID`` header (False behind a proxy that adds it itself, as Ray Serve's does)."""

    def __init__(self, *, served_model_name, api_key=None, max_body_bytes=4 << 20,
                 log_prompts=False, echo_request_id=True):
        self.served_model_name = served_model_name
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
        self.log_prompts = log_prompts
        self.echo_request_id = echo_request_id


@dataclass
class APIRequest(EngineRequest):
    """An engine request and what a router in front of several engines may use: `affinity`,
    a key shared by the requests of one conversation (None: no preference). An engine in this
    process ignores it."""
    affinity: Optional[str] = None


def create_app(engine, settings: ServerSettings, on_shutdown=None, health=None) -> FastAPI:
    """The FastAPI application serving `engine`'s model; `on_shutdown()` runs when the server
    stops (after its connections are closed). `health`, if given, is an async function that
    answers ``GET /health``: (HTTP status, JSON body); without it the answer is 200
    ``{"status": "ok"}`` while the server runs."""
    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        if on_shutdown is not None:
            on_shutdown()

    app = FastAPI(title="xllm", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)
    app.state.engine = engine
    app.state.settings = settings
    app.state.metrics = Metrics(engine)
    api = _API(engine, settings, app.state.metrics)
    _add_middleware(app, api)
    _add_routes(app, api, health)
    return app


def _add_middleware(app, api):
    app.add_middleware(_AroundEveryRequest, api=api)

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError):
        return error_response(error)


class _AroundEveryRequest:
    """Around every HTTP request: its id, the API key check, the metrics and one log line
    when the response has been sent. A plain ASGI middleware: it passes a stream's chunks
    through untouched (Starlette's BaseHTTPMiddleware would relay each through a queue)."""

    def __init__(self, app, api):
        self.app = app
        self.api = api

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        request_id = headers.get("x-request-id") or uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        state["tokens"] = (0, 0)
        started = time.perf_counter()
        status = 500

        async def send_with_id(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            if message["type"] == "http.response.start" and self.api.settings.echo_request_id:
                message = dict(message)
                message["headers"] = [*message.get("headers", []),
                                      (b"x-request-id", request_id.encode("latin-1"))]
            await send(message)
        try:
            try:
                self.api.authorize(scope["path"], headers)
            except APIError as error:
                await error_response(error)(scope, receive, send_with_id)
                return
            await self.app(scope, receive, send_with_id)
        finally:
            self.api.metrics.requests.labels(scope["path"], str(status)).inc()
            prompt_tokens, completion_tokens = state["tokens"]
            log.info("%s %s %d %.3fs prompt_tokens=%d completion_tokens=%d id=%s",
                     scope["method"], scope["path"], status, time.perf_counter() - started,
                     prompt_tokens, completion_tokens, request_id)


def _add_routes(app, api, health_check):
    @app.get("/health")
    async def health():
        if health_check is None:
            return {"status": "ok"}
        status, body = await health_check()
        return JSONResponse(body, status_code=status)

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(api.metrics.render(),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [api.model_card()]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await api.parse(request, ChatRequest)
        return await api.generate(request, body, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await api.parse(request, CompletionRequest)
        return await api.generate(request, body, chat=False)

    @app.post("/tokenize")
    async def tokenize(request: Request):
        body = await api.parse(request, TokenizeRequest)
        return api.tokenize(body)

    @app.post("/detokenize")
    async def detokenize(request: Request):
        body = await api.parse(request, DetokenizeRequest)
        return api.detokenize(body)


def refusal(error) -> APIError:
    """The API's answer when an engine's ``submit`` refuses a request with `error`."""
    if isinstance(error, QueueFullError):
        return APIError(429, str(error), type="rate_limit_error", headers={"Retry-After": "1"})
    if isinstance(error, EngineClosedError):
        return APIError(503, str(error), type="server_error")
    if isinstance(error, (ContextLengthError, ValueError)):
        return APIError(400, str(error))
    return APIError(500, f"the request could not start: {error!r}", type="server_error")


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


class _Choice:
    """One engine request of an API call: a choice (and, for completions, its prompt)."""

    def __init__(self, index, prompt_ids):
        self.index = index
        self.prompt_ids = prompt_ids
        self.engine_request = None
        self.text = []
        self.tokens = []
        self.logprobs = []  # (token, logprob, [(id, logprob)])
        self.finish = None
        self.last_token_time = None


class EventRelay:
    """Hands events from the engine's thread to asyncio queues on the event loop, waking the
    loop once for all the events of an engine step rather than once per event."""

    def __init__(self, loop):
        self.loop = loop
        self.items = collections.deque()
        self.scheduled = False

    def post(self, queue, item):  # on the engine's thread
        self.items.append((queue, item))
        if not self.scheduled:
            self.scheduled = True
            self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self):  # on the event loop
        self.scheduled = False  # an event posted from now on schedules another delivery
        while self.items:
            queue, item = self.items.popleft()
            queue.put_nowait(item)


class _API:
    """The endpoints' logic, apart from the web framework's routing."""

    def __init__(self, engine, settings, metrics):
        self.engine = engine
        self.model = engine.model
        self.settings = settings
        self.metrics = metrics
        self.created = int(time.time())
        self._relay = None

    def relay(self) -> EventRelay:
        """The relay of the running event loop (made on first use)."""
        loop = asyncio.get_running_loop()
        if self._relay is None or self._relay.loop is not loop:
            self._relay = EventRelay(loop)
        return self._relay

    # ---- request handling common to every endpoint ----

    def authorize(self, path, headers):
        """APIError 401 unless the request carries the API key (if the server has one)."""
        key = self.settings.api_key
        if key is None or path == "/health":
            return
        given = headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), key.encode()):
            raise APIError(401, "invalid or missing API key (Authorization: Bearer ...)",
                           type="authentication_error", code="invalid_api_key")

    async def parse(self, request: Request, model_class):
        """The request body as `model_class`, read within the size limit; APIError 400/413."""
        declared = request.headers.get("content-length")
        limit = self.settings.max_body_bytes
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise APIError(413, f"the request body is larger than {limit} bytes")
        chunks = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise APIError(413, f"the request body is larger than {limit} bytes")
            chunks.append(chunk)
        try:
            data = json.loads(b"".join(chunks))
        except (ValueError, UnicodeDecodeError) as error:
            raise APIError(400, f"the body is not valid JSON: {error}") from None
        if not isinstance(data, dict):
            raise APIError(400, "the body must be a JSON object")
        try:
            body = model_class.model_validate(data)
        except ValidationError as error:
            raise validation_error(error) from None
        if body.model is not None and body.model != self.settings.served_model_name:
            raise APIError(404, f"the model {body.model!r} does not exist; this server serves "
                                f"{self.settings.served_model_name!r}", param="model",
                           code="model_not_found")
        return body

    def model_card(self):
        return {"id": self.settings.served_model_name, "object": "model",
                "created": self.created, "owned_by": "xllm",
                "max_model_len": self.model.config.max_seq_len}

    # ---- generation ----

    def _prompt_ids(self, body, chat, tools=structured.NO_TOOLS):
        """The token ids of each prompt of the call (a chat's with the tools `tools` offers)."""
        if chat:
            return [self._chat_ids(body.messages, tools)]
        prompts = []
        for i, prompt in enumerate(body.prompts()):
            try:
                prompts.append(self.model.encode_prompt(prompt, name=f"prompt[{i}]"))
            except (TypeError, ValueError) as error:
                raise APIError(400, str(error), param="prompt") from None
            if not prompts[-1]:
                raise APIError(400, f"prompt[{i}] is empty", param="prompt")
        return prompts

    def _chat_ids(self, messages, tools=structured.NO_TOOLS):
        """The token ids of chat `messages` rendered with the model's template (tool calls,
        tool messages and the tools `tools` offers included); 400 if it fails."""
        try:
            plain, extra = structured.chat_messages(messages, self.model.chat_template, tools)
            return self.model.chat_ids(plain, **extra)
        except (ChatTemplateError, ValueError) as error:
            raise APIError(400, str(error), param="messages") from None

    def _affinity(self, body, chat):
        """The routing key of a chat: a hash of its opening (the messages up to the first
        user message), which every later turn of the conversation repeats and whose KV the
        replica that answered it keeps. A system prompt alone is no key (requests sharing one
        would all go to one replica). None for completions: no turns to tell apart."""
        if not chat:
            return None
        digest = hashlib.sha256()
        for message in body.messages:
            digest.update(json.dumps([message.role, message.text()]).encode("utf-8"))
            if message.role == "user":
                return digest.hexdigest()
        return None

    def _max_tokens(self, body, prompt_ids):
        context = self.model.config.max_seq_len
        longest = max(len(ids) for ids in prompt_ids)
        limit = body.token_limit()
        if longest >= context:
            raise APIError(400, f"the prompt has {longest} tokens; the model's context is "
                                f"{context}", param="messages" if hasattr(body, "messages")
                           else "prompt", code="context_length_exceeded")
        if limit is None:
            return context - longest  # the rest of the context
        if longest + limit > context:
            raise APIError(400, f"the prompt ({longest} tokens) and max_tokens ({limit}) pass "
                                f"the model's context of {context} tokens",
                           param="max_tokens", code="context_length_exceeded")
        return limit

    def _params(self, body):
        temperature = DEFAULT_TEMPERATURE if body.temperature is None else body.temperature
        seed = body.seed
        if seed is None and temperature > 0:
            seed = secrets.randbits(62)  # choice i samples with seed + i
        try:
            return SamplingParams(temperature=temperature, top_k=body.top_k,
                                  top_p=1.0 if body.top_p is None else body.top_p,
                                  min_p=body.min_p, repetition_penalty=body.repetition_penalty,
                                  seed=seed, presence_penalty=body.presence_penalty,
                                  frequency_penalty=body.frequency_penalty)
        except (TypeError, ValueError) as error:
            raise APIError(400, str(error)) from None

    async def generate(self, request: Request, body, chat):
        body.check_supported()
        if self.settings.log_prompts:  # off by default: prompts may be private
            prompt = [m.model_dump() for m in body.messages] if chat else body.prompt
            log.info("prompt id=%s %s", request.state.request_id,
                     json.dumps(prompt, ensure_ascii=False))
        tools = structured.tool_plan(body) if chat else structured.NO_TOOLS
        constraint, field = structured.request_constraint(body, tools)
        prompt_ids = self._prompt_ids(body, chat, tools)
        max_tokens = self._max_tokens(body, prompt_ids)
        params = self._params(body)
        choices = []
        for ids in prompt_ids:
            for _ in range(body.n):
                choices.append(_Choice(len(choices), ids))
        matchers = None
        if constraint is not None:  # compiled off the event loop
            matchers = await asyncio.get_running_loop().run_in_executor(
                None, structured.matchers, self.model, constraint, max_tokens, field,
                len(choices))
        call = _Call(self, request, body, chat, choices, tools)
        call.submit(max_tokens, params, self._affinity(body, chat), constraint, matchers)
        if body.stream:
            return StreamingResponse(call.stream(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return JSONResponse(await call.complete())

    # ---- tokenizer endpoints ----

    def tokenize(self, body: TokenizeRequest):
        if self.model.tokenizer is None:
            raise APIError(400, "this model has no tokenizer")
        if body.messages is not None:
            ids = self._chat_ids(body.messages)
        else:
            text = body.prompt if body.prompt is not None else body.content
            if text is None:
                raise APIError(400, "give prompt (or content, or messages)", param="prompt")
            add_bos = None if body.add_special_tokens else False
            ids = self.model.encode_prompt(text, add_bos)
        return {"tokens": ids, "count": len(ids),
                "max_model_len": self.model.config.max_seq_len}

    def detokenize(self, body: DetokenizeRequest):
        if self.model.tokenizer is None:
            raise APIError(400, "this model has no tokenizer")
        vocab = self.model.vocab_limit
        for token in body.tokens:
            if not 0 <= token < vocab:
                raise APIError(400, f"token {token} is not in [0, {vocab})", param="tokens")
        return {"prompt": self.model.tokenizer.decode(body.tokens)}


class _Call:
    """One generation call: its choices in the engine, their events, and its answer."""

    def __init__(self, api, request, body, chat, choices, tools=structured.NO_TOOLS):
        self.api = api
        self.request = request
        self.body = body
        self.chat = chat
        self.choices = choices
        self.tools = tools  # a chat's ToolPlan: whether replies are read for tool calls
        self.arrived = time.perf_counter()
        self.queue = asyncio.Queue()
        self.relay = api.relay()
        self.id = ("chatcmpl-" if chat else "cmpl-") + request.state.request_id
        self.prompt_tokens = sum(len(ids) for ids in {id(c.prompt_ids): c.prompt_ids
                                                      for c in choices}.values())

    def submit(self, max_tokens, params, affinity, constraint=None, matchers=None):
        """Submit every choice to the engine (with `constraint`, and its compiled matcher
        `matchers[i]` for choice i if given); APIError if the engine refuses one."""
        logprobs = self.body.logprobs_count()
        try:
            for choice in self.choices:
                seed = None if params.seed is None else params.seed + choice.index % self.body.n
                choice.engine_request = APIRequest(
                    choice.prompt_ids, max_tokens, replace(params, seed=seed),
                    self._emitter(choice), stop=self.body.stop_strings(), logprobs=logprobs,
                    ignore_eos=self.body.ignore_eos, affinity=affinity, constraint=constraint,
                    matcher=None if matchers is None else matchers[choice.index])
                self.api.engine.submit(choice.engine_request)
        except (QueueFullError, EngineClosedError, ContextLengthError, ValueError) as error:
            self.cancel()
            raise refusal(error) from None

    def _emitter(self, choice):
        def emit(event):  # called on the engine's thread
            self.relay.post(self.queue, (choice, event))
        return emit

    def cancel(self):
        for choice in self.choices:
            if choice.engine_request is not None and choice.finish is None:
                choice.engine_request.cancel()
        self.api.engine.wake()

    async def events(self):
        """(choice, event) until every choice has finished; cancels them all if the client
        goes away or the consumer stops early."""
        unfinished = len(self.choices)
        # a stream learns of a disconnect from Starlette, which cancels it; a call that answers
        # at the end has to look for itself
        watcher = None
        if not self.body.stream:
            watcher = asyncio.ensure_future(self._watch_disconnect())
        try:
            while unfinished:
                choice, event = await self.queue.get()
                if choice is None:  # the client went away
                    return
                self._observe(choice, event)
                if isinstance(event, FinishEvent):
                    unfinished -= 1
                yield choice, event
        finally:
            if watcher is not None:
                watcher.cancel()
            if unfinished:
                self.cancel()

    async def _watch_disconnect(self):
        """Put (None, None) in the queue once the client has gone."""
        while not await self.request.is_disconnected():
            await asyncio.sleep(DISCONNECT_POLL)
        self.queue.put_nowait((None, None))

    def _observe(self, choice, event):
        now = time.perf_counter()
        metrics = self.api.metrics
        if isinstance(event, TokenEvent):
            if choice.last_token_time is None:
                metrics.time_to_first_token.observe(now - self.arrived)
            else:
                metrics.inter_token_latency.observe(now - choice.last_token_time)
            choice.last_token_time = now
            choice.tokens.append(event.token)
            choice.text.append(event.text)
            if event.logprob is not None:
                choice.logprobs.append((event.token, event.logprob, event.top_logprobs))
        else:
            choice.text.append(event.text)
            choice.finish = event
            metrics.completion_tokens.inc(event.completion_tokens)

    def _usage(self):
        completion = sum(c.finish.completion_tokens for c in self.choices if c.finish)
        self.request.state.tokens = (self.prompt_tokens, completion)
        self.api.metrics.prompt_tokens.inc(self.prompt_tokens)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}

    def _check_error(self, event):
        """APIError if `event` ends its choice with an error: the error itself when it is one
        (a replica that failed, in xllm/serve/ray.py), else a 500."""
        if event.reason != "error":
            return
        if isinstance(event.error, APIError):
            raise event.error
        raise APIError(500, f"generation failed: {event.error!r}", type="server_error")

    async def complete(self) -> dict:
        async for _, event in self.events():
            if isinstance(event, FinishEvent):
                self._check_error(event)
        if any(c.finish is None for c in self.choices):
            raise APIError(499, "the client closed the request")
        answers = [self._choice_json(choice) for choice in self.choices]
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": int(time.time()), "model": self.api.settings.served_model_name,
                "choices": answers, "usage": self._usage()}

    def _choice_json(self, choice):
        text = "".join(choice.text)
        finish = _finish_reason(choice.finish.reason)
        if self.chat:
            logprobs = None
            if choice.logprobs:
                logprobs = {"content": [self._chat_logprob(*item) for item in choice.logprobs]}
            message, called = structured.reply_message(text, self.tools)
            if called and finish == "stop":
                finish = "tool_calls"
            return {"index": choice.index, "message": message, "logprobs": logprobs,
                    "finish_reason": finish}
        return {"index": choice.index, "text": text,
                "logprobs": self._completion_logprobs(choice.logprobs) if choice.logprobs
                else None, "finish_reason": finish}

    async def stream(self):
        """Server-sent events: OpenAI's chunks, then ``data: [DONE]``."""
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        created = int(time.time())
        name = self.api.settings.served_model_name

        def chunk(choices, **extra):
            data = {"id": self.id, "object": kind, "created": created, "model": name,
                    "choices": choices, **extra}
            return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

        # a chat read for tool calls holds back each choice's text from a call's mark on
        calls = {c.index: structured.ToolCallStream() for c in self.choices
                 if self.tools.parse}
        try:
            if self.chat:
                yield chunk([{"index": c.index, "delta": {"role": "assistant", "content": ""},
                              "logprobs": None, "finish_reason": None} for c in self.choices])
            async for choice, event in self.events():
                reader = calls.get(choice.index)
                text = event.text if reader is None else reader.push(event.text)
                if isinstance(event, FinishEvent):
                    self._check_error(event)
                    for delta in self._last_deltas(choice, event, text, reader):
                        yield chunk([delta])
                    continue
                logprob = None
                if event.logprob is not None:
                    logprob = (event.token, event.logprob, event.top_logprobs)
                if text or logprob is not None:
                    yield chunk([self._delta(choice, text, logprob, None)])
            if self.body.include_usage():
                yield chunk([], usage=self._usage())
            else:
                self._usage()
            yield "data: [DONE]\n\n"
        except APIError as error:
            yield f"data: {json.dumps(error.body())}\n\n"
        except Exception as error:  # after the headers went out: report it in the stream
            log.exception("stream %s failed", self.id)
            body = APIError(500, f"generation failed: {error!r}", type="server_error").body()
            yield f"data: {json.dumps(body)}\n\n"

    def _last_deltas(self, choice, event, text, reader):
        """The chunk choices that end a streamed choice: its last text and finish reason,
        and the tool calls `reader` (a ToolCallStream, or None) found in it."""
        finish = _finish_reason(event.reason)
        if reader is None:
            return [self._delta(choice, text, None, finish)]
        rest, tool_calls = reader.finish()
        text += rest
        if not tool_calls:
            return [self._delta(choice, text, None, finish)]
        deltas = []
        if text:
            deltas.append(self._delta(choice, text, None, None))
        deltas.append(_tool_calls_delta(choice, tool_calls))
        if finish == "stop":
            finish = "tool_calls"
        deltas.append(self._delta(choice, "", None, finish))
        return deltas

    def _delta(self, choice, text, logprob, finish):
        if self.chat:
            logprobs = None
            if logprob is not None:
                logprobs = {"content": [self._chat_logprob(*logprob)]}
            return {"index": choice.index, "delta": {"content": text} if text or not finish
                    else {}, "logprobs": logprobs, "finish_reason": finish}
        logprobs = self._completion_logprobs([logprob]) if logprob is not None else None
        return {"index": choice.index, "text": text, "logprobs": logprobs,
                "finish_reason": finish}

    # ---- log-probabilities in OpenAI's two shapes ----

    def _token_text(self, token):
        tokenizer = self.api.model.tokenizer
        if tokenizer is None:
            return str(token)
        decoder = tokenizer.decoder(strip_leading_space=False)
        return decoder.push(token) + decoder.flush()

    def _chat_logprob(self, token, logprob, top):
        def entry(t, lp):
            text = self._token_text(t)
            return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}
        item = entry(token, logprob)
        item["top_logprobs"] = [entry(t, lp) for t, lp in top or []]
        return item

    def _completion_logprobs(self, items):
        tokens = []
        token_logprobs = []
        top_logprobs = []
        offsets = []
        offset = 0
        for token, logprob, top in items:
            text = self._token_text(token)
            tokens.append(text)
            token_logprobs.append(logprob)
            top_logprobs.append({self._token_text(t): lp for t, lp in top or []})
            offsets.append(offset)
            offset += len(text)
        return {"tokens": tokens, "token_logprobs": token_logprobs,
                "top_logprobs": top_logprobs, "text_offset": offsets}


def _tool_calls_delta(choice, tool_calls):
    """A stream's chunk choice carrying whole tool calls (OpenAI's delta.tool_calls)."""
    deltas = [{"index": k, **call} for k, call in enumerate(tool_calls)]
    return {"index": choice.index, "delta": {"tool_calls": deltas}, "logprobs": None,
            "finish_reason": None}


def _finish_reason(reason):
    """OpenAI's finish_reason for an engine's reason: "constraint" (the request's grammar
    allowed no token: docs/structured.rst) stays itself."""
    if reason in ("stop", "constraint"):
        return reason
    return "length"
