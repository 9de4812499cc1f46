"""OpenAIProvider against a real local HTTP server speaking the chat-completions wire format.

The fake server runs in a daemon thread, answers each request with the next scripted
reply, and records what it received, so the tests exercise httpx, chunked transfer and
SSE parsing for real instead of mocking the client.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from agentplex.agents.llm.base import (
    ChatMessage,
    Completion,
    CompletionRequest,
    LLMError,
    TextDelta,
    ToolCall,
    ToolSpec,
    TransientLLMError,
)
from agentplex.agents.llm.openai import OpenAIProvider
from agentplex.runtime.tokens import estimate_message_tokens, estimate_tokens

MODEL = "test-model"
# Far longer than any test's timeout: a stalled handler only ends when teardown releases it.
STALL_SECONDS = 10.0

Reply = Callable[["_Handler"], None]


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]


class FakeOpenAI:
    """A scriptable OpenAI-compatible server on 127.0.0.1, on a free port."""

    def __init__(self) -> None:
        self.replies: list[Reply] = []
        self.received: list[Received] = []
        # Set at teardown so handlers stalled to provoke timeouts exit promptly.
        self.release = threading.Event()
        handler = type("BoundHandler", (_Handler,), {"fake": self})
        self._server = _QuietServer(("127.0.0.1", 0), handler)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def script(self, *replies: Reply) -> None:
        self.replies.extend(replies)

    def close(self) -> None:
        self.release.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients dropping connections is what several tests provoke on purpose.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive and chunked transfer, as real servers do
    fake: FakeOpenAI

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        headers = {key.lower(): value for key, value in self.headers.items()}
        self.fake.received.append(Received(self.path, headers, json.loads(raw)))
        reply = self.fake.replies.pop(0) if self.fake.replies else json_reply(500, {})
        try:
            reply(self)
        except ConnectionError:
            self.close_connection = True  # the client gave up first (timeout tests)

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def write_chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()


def sse(
    *events: dict[str, Any] | str, done: bool = True, cut: bool = False, stall: bool = False
) -> Reply:
    """A streamed reply. Dict events become `data:` lines; strings are sent verbatim.

    done: end with `data: [DONE]`. cut: drop the connection mid-body. stall: stop
    sending (but keep the connection open) after the events.
    """

    def reply(handler: _Handler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "text/event-stream")
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        for event in events:
            line = event if isinstance(event, str) else f"data: {json.dumps(event)}\n\n"
            handler.write_chunk(line.encode())
        if stall:
            handler.fake.release.wait(STALL_SECONDS)
            handler.close_connection = True
            return
        if done:
            handler.write_chunk(b"data: [DONE]\n\n")
        if cut:
            handler.close_connection = True
            return
        handler.wfile.write(b"0\r\n\r\n")

    return reply


def json_reply(status: int, body: Any, content_type: str = "application/json") -> Reply:
    def reply(handler: _Handler) -> None:
        data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    return reply


def stall_before_headers() -> Reply:
    def reply(handler: _Handler) -> None:
        handler.fake.release.wait(STALL_SECONDS)
        handler.close_connection = True

    return reply


def chunk(
    content: str | None = None,
    *,
    tool_calls: list[dict[str, Any]] | None = None,
    finish_reason: str | None = None,
) -> dict[str, Any]:
    delta: dict[str, Any] = {}
    if content is not None:
        delta["content"] = content
    if tool_calls is not None:
        delta["tool_calls"] = tool_calls
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "model": MODEL,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        "usage": None,
    }


def usage_chunk(prompt: int, completion: int) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "model": MODEL,
        "choices": [],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        },
    }


def error_body(message: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": "invalid_request_error", "code": None}}


HELLO = CompletionRequest(messages=[ChatMessage(role="user", content="Say hello")])
TOOLS = (
    ToolSpec(
        name="notes.write",
        description="Write a note.",
        parameters_json='{"type": "object", "properties": {"title": {"type": "string"}}}',
    ),
    ToolSpec(
        name="memory.search",
        description="Search memory.",
        parameters_json='{"type": "object", "properties": {"q": {"type": "integer"}}}',
    ),
)


@pytest.fixture
def server() -> Iterator[FakeOpenAI]:
    fake = FakeOpenAI()
    yield fake
    fake.close()


@pytest.fixture
async def provider(server: FakeOpenAI) -> AsyncIterator[OpenAIProvider]:
    llm = OpenAIProvider(base_url=server.base_url, api_key="", model=MODEL, timeout_seconds=0.2)
    yield llm
    await llm.aclose()


async def collect(
    provider: OpenAIProvider, request: CompletionRequest
) -> tuple[list[str], Completion]:
    events = [event async for event in provider.stream(request)]
    *deltas, last = events
    assert all(isinstance(event, TextDelta) for event in deltas)
    assert isinstance(last, Completion)
    return [event.text for event in deltas if isinstance(event, TextDelta)], last


def test_model_is_prefixed_with_the_provider() -> None:
    llm = OpenAIProvider(base_url="http://x/v1", api_key="", model="gpt-4o", timeout_seconds=1)
    assert llm.model == "openai/gpt-4o"


async def test_streams_text_deltas_then_one_completion_with_usage(
    server: FakeOpenAI, provider: OpenAIProvider
) -> None:
    server.script(
        sse(
            chunk(""),  # the role-only first chunk real servers send
            ": keep-alive\n\n",
            chunk("Hel"),
            chunk("lo"),
            chunk(" world"),
            chunk(finish_reason="stop"),
            usage_chunk(12, 3),
        )
    )

    deltas, completion = await collect(provider, HELLO)

    assert deltas == ["Hel", "lo", " world"]
    assert completion.content == "Hello world"
    assert completion.tool_calls == ()
    assert completion.finish_reason == "stop"
    assert completion.model == "openai/test-model"
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (12, 3)
    assert not completion.usage.estimated
    [request] = server.received
    assert request.path == "/v1/chat/completions"
    assert "authorization" not in request.headers
    assert request.body == {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Say hello"}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def test_request_maps_messages_tools_max_tokens_and_key(server: FakeOpenAI) -> None:
    server.script(sse(chunk("ok", finish_reason="stop"), usage_chunk(1, 1)))
    request = CompletionRequest(
        messages=[
            ChatMessage(role="system", content="Be brief."),
            ChatMessage(role="user", content="Note this."),
            ChatMessage(
                role="assistant",
                tool_calls=(ToolCall(id="call_1", name="notes.write", arguments_json="{}"),),
            ),
            ChatMessage(role="tool", content='{"ok": true}', tool_call_id="call_1"),
        ],
        tools=TOOLS,
        max_tokens=256,
    )
    # A trailing slash on base_url must not produce "//chat/completions".
    llm = OpenAIProvider(
        base_url=server.base_url + "/", api_key="sk-secret", model=MODEL, timeout_seconds=1
    )
    try:
        await collect(llm, request)
    finally:
        await llm.aclose()

    [received] = server.received
    assert received.path == "/v1/chat/completions"
    assert received.headers["authorization"] == "Bearer sk-secret"
    assert received.body["max_tokens"] == 256
    assert received.body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Note this."},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "notes__write", "arguments": "{}"},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"ok": true}'},
    ]
    assert received.body["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "notes__write",
                "description": "Write a note.",
                "parameters": {"type": "object", "properties": {"title": {"type": "string"}}},
            },
        },
        {
            "type": "function",
            "function": {
                "name": "memory__search",
                "description": "Search memory.",
                "parameters": {"type": "object", "properties": {"q": {"type": "integer"}}},
            },
        },
    ]


async def test_parallel_tool_calls_are_assembled_from_fragments(
    server: FakeOpenAI, provider: OpenAIProvider
) -> None:
    def call(index: int, *, id: str = "", name: str = "", args: str = "") -> dict[str, Any]:
        fragment: dict[str, Any] = {"index": index, "function": {"arguments": args}}
        if id:
            fragment["id"] = id
            fragment["type"] = "function"
            fragment["function"]["name"] = name
        return fragment

    server.script(
        sse(
            chunk(tool_calls=[call(0, id="call_a", name="notes__write")]),
            chunk(tool_calls=[call(0, args='{"ti')]),
            chunk(tool_calls=[call(1, id="call_b", name="memory__search", args="")]),
            chunk(tool_calls=[call(0, args='tle": ')]),
            chunk(tool_calls=[call(1, args='{"q"')]),
            chunk(tool_calls=[call(0, args='"a"}')]),
            chunk(tool_calls=[call(1, args=": 1}")]),
            chunk(finish_reason="tool_calls"),
            usage_chunk(40, 20),
        )
    )

    deltas, completion = await collect(provider, CompletionRequest(messages=[], tools=TOOLS))

    assert deltas == []
    assert completion.content == ""
    assert completion.finish_reason == "tool_calls"
    assert completion.tool_calls == (
        ToolCall(id="call_a", name="notes.write", arguments_json='{"title": "a"}'),
        ToolCall(id="call_b", name="memory.search", arguments_json='{"q": 1}'),
    )


async def test_tool_names_map_back_exactly_even_when_underscores_are_ambiguous(
    server: FakeOpenAI, provider: OpenAIProvider
) -> None:
    # "a_.b" goes out as "a___b"; a blind "__" -> "." would bring back "a._b".
    tools = (ToolSpec(name="a_.b", description="", parameters_json=""),)
    wire = [{"index": 0, "id": "c1", "function": {"name": "a___b", "arguments": ""}}]
    hallucinated = [{"index": 1, "id": "c2", "function": {"name": "web__fetch", "arguments": ""}}]
    server.script(
        sse(chunk(tool_calls=wire), chunk(tool_calls=hallucinated, finish_reason="tool_calls"))
    )

    _, completion = await collect(provider, CompletionRequest(messages=[], tools=tools))

    assert server.received[0].body["tools"][0]["function"]["name"] == "a___b"
    assert server.received[0].body["tools"][0]["function"]["parameters"] == {
        "type": "object",
        "properties": {},
    }
    assert [call.name for call in completion.tool_calls] == ["a_.b", "web.fetch"]
    # No streamed arguments still yields parseable JSON.
    assert [call.arguments_json for call in completion.tool_calls] == ["{}", "{}"]


async def test_colliding_tool_names_are_refused_before_sending(
    server: FakeOpenAI, provider: OpenAIProvider
) -> None:
    tools = (
        ToolSpec(name="a.b", description="", parameters_json="{}"),
        ToolSpec(name="a__b", description="", parameters_json="{}"),
    )
    with pytest.raises(LLMError, match="collide") as raised:
        await collect(provider, CompletionRequest(messages=[], tools=tools))
    assert not isinstance(raised.value, TransientLLMError)
    assert server.received == []


async def test_missing_usage_is_estimated(server: FakeOpenAI, provider: OpenAIProvider) -> None:
    server.script(
        sse(
            chunk("Hi"),
            chunk(
                tool_calls=[
                    {"index": 0, "id": "c1", "function": {"name": "notes__write", "arguments": ""}}
                ]
            ),
            chunk(tool_calls=[{"index": 0, "function": {"arguments": '{"title": "x"}'}}]),
            chunk(finish_reason="tool_calls"),
        )
    )
    request = CompletionRequest(
        messages=[
            ChatMessage(role="system", content="You are terse."),
            ChatMessage(role="user", content="Write a note titled x, please."),
        ],
        tools=TOOLS,
    )

    _, completion = await collect(provider, request)

    assert completion.usage.estimated
    assert completion.usage.prompt_tokens == estimate_message_tokens(
        "You are terse."
    ) + estimate_message_tokens("Write a note titled x, please.")
    assert completion.usage.completion_tokens == estimate_tokens('Hi{"title": "x"}')


async def test_non_streaming_json_reply_is_accepted(
    server: FakeOpenAI, provider: OpenAIProvider
) -> None:
    server.script(
        json_reply(
            200,
            {
                "id": "chatcmpl-2",
                "object": "chat.completion",
                "model": MODEL,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "Hello there"},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
            },
        )
    )

    deltas, completion = await collect(provider, HELLO)

    assert deltas == ["Hello there"]
    assert completion.content == "Hello there"
    assert completion.finish_reason == "stop"
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (5, 2)
    assert not completion.usage.estimated


async def test_non_streaming_json_tool_calls(server: FakeOpenAI, provider: OpenAIProvider) -> None:
    message = {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_x",
                "type": "function",
                # Ollama sends arguments as an object rather than a JSON string.
                "function": {"name": "memory__search", "arguments": {"q": 3}},
            }
        ],
    }
    server.script(
        json_reply(
            200,
            {"choices": [{"index": 0, "message": message, "finish_reason": "tool_calls"}]},
            content_type="application/json; charset=utf-8",
        )
    )

    deltas, completion = await collect(provider, CompletionRequest(messages=[], tools=TOOLS))

    assert deltas == []
    assert completion.tool_calls == (
        ToolCall(id="call_x", name="memory.search", arguments_json='{"q": 3}'),
    )
    assert completion.usage.estimated


@pytest.mark.parametrize("status", [408, 429, 500, 503])
async def test_retryable_statuses_are_transient(
    server: FakeOpenAI, provider: OpenAIProvider, status: int
) -> None:
    server.script(json_reply(status, error_body("Slow down, please")))
    with pytest.raises(TransientLLMError, match=f"HTTP {status}.*Slow down, please"):
        await collect(provider, HELLO)


@pytest.mark.parametrize(
    ("status", "message"),
    [(400, "Invalid 'messages'"), (401, "Incorrect API key"), (404, "model not found")],
)
async def test_client_errors_are_permanent_and_carry_the_server_message(
    server: FakeOpenAI, provider: OpenAIProvider, status: int, message: str
) -> None:
    server.script(json_reply(status, error_body(message)))
    with pytest.raises(LLMError, match=f"HTTP {status}.*{message}") as raised:
        await collect(provider, HELLO)
    assert not isinstance(raised.value, TransientLLMError)


async def test_error_messages_never_contain_the_api_key(server: FakeOpenAI) -> None:
    server.script(json_reply(401, error_body("Incorrect API key provided: sk-secret-123.")))
    llm = OpenAIProvider(
        base_url=server.base_url, api_key="sk-secret-123", model=MODEL, timeout_seconds=1
    )
    try:
        with pytest.raises(LLMError) as raised:
            await collect(llm, HELLO)
    finally:
        await llm.aclose()
    assert "sk-secret-123" not in str(raised.value)
    assert "Incorrect API key provided" in str(raised.value)


async def test_long_and_non_json_error_bodies_are_truncated(
    server: FakeOpenAI, provider: OpenAIProvider
) -> None:
    server.script(json_reply(400, "x" * 5000, content_type="text/plain"))
    with pytest.raises(LLMError) as raised:
        await collect(provider, HELLO)
    assert "x" * 300 in str(raised.value)
    assert "x" * 301 not in str(raised.value)


async def test_connection_refused_is_transient() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    llm = OpenAIProvider(
        base_url=f"http://127.0.0.1:{port}/v1", api_key="", model=MODEL, timeout_seconds=1
    )
    try:
        with pytest.raises(TransientLLMError, match="connection"):
            await collect(llm, HELLO)
    finally:
        await llm.aclose()


async def test_connection_dropped_mid_stream_is_transient(
    server: FakeOpenAI, provider: OpenAIProvider
) -> None:
    server.script(sse(chunk("Hel"), chunk("lo"), done=False, cut=True))
    seen: list[object] = []
    with pytest.raises(TransientLLMError):
        async for event in provider.stream(HELLO):
            seen.append(event)
    assert seen == [TextDelta("Hel"), TextDelta("lo")]


async def test_stream_ending_without_done_or_finish_reason_is_transient(
    server: FakeOpenAI, provider: OpenAIProvider
) -> None:
    server.script(sse(chunk("Hel"), done=False))
    with pytest.raises(TransientLLMError, match="before the completion finished"):
        await collect(provider, HELLO)


async def test_stream_with_finish_reason_but_no_done_completes(server: FakeOpenAI) -> None:
    # What is checked is that a body ending without `[DONE]` still completes, not
    # how fast: the shared fixture's 0.2 s timeout (meant for the timeout tests)
    # failed this under load. A provider that insisted on `[DONE]` fails either way.
    server.script(sse(chunk("Hi", finish_reason="length"), done=False))
    llm = OpenAIProvider(base_url=server.base_url, api_key="", model=MODEL, timeout_seconds=30)
    try:
        deltas, completion = await collect(llm, HELLO)
    finally:
        await llm.aclose()
    assert deltas == ["Hi"]
    assert completion.finish_reason == "length"


async def test_error_event_inside_the_stream_is_raised(
    server: FakeOpenAI, provider: OpenAIProvider
) -> None:
    server.script(sse({"error": {"message": "context length exceeded", "code": 400}}))
    with pytest.raises(LLMError, match="context length exceeded") as raised:
        await collect(provider, HELLO)
    assert not isinstance(raised.value, TransientLLMError)


async def test_malformed_chunk_is_permanent(server: FakeOpenAI, provider: OpenAIProvider) -> None:
    server.script(sse("data: {not json\n\n"))
    with pytest.raises(LLMError, match="malformed") as raised:
        await collect(provider, HELLO)
    assert not isinstance(raised.value, TransientLLMError)


async def test_server_silent_beyond_the_timeout_is_transient(
    server: FakeOpenAI, provider: OpenAIProvider
) -> None:
    server.script(stall_before_headers())
    started = time.monotonic()
    with pytest.raises(TransientLLMError, match=r"no response within 0\.2s"):
        await collect(provider, HELLO)
    # The server would stall for STALL_SECONDS: only the client timeout ends this early.
    assert time.monotonic() - started < STALL_SECONDS / 2


async def test_stream_stalling_mid_way_is_transient(
    server: FakeOpenAI, provider: OpenAIProvider
) -> None:
    server.script(sse(chunk("Hel"), stall=True))
    seen: list[object] = []
    with pytest.raises(TransientLLMError):
        async for event in provider.stream(HELLO):
            seen.append(event)
    assert seen == [TextDelta("Hel")]


async def test_injected_client_is_used_and_left_open(server: FakeOpenAI) -> None:
    server.script(sse(chunk("ok", finish_reason="stop")))
    async with httpx.AsyncClient() as client:
        llm = OpenAIProvider(
            base_url=server.base_url, api_key="", model=MODEL, timeout_seconds=1, client=client
        )
        _, completion = await collect(llm, HELLO)
        await llm.aclose()
        assert completion.content == "ok"
        assert not client.is_closed


async def test_aclose_closes_the_client_it_created(server: FakeOpenAI) -> None:
    llm = OpenAIProvider(base_url=server.base_url, api_key="", model=MODEL, timeout_seconds=1)
    await llm.aclose()
    with pytest.raises(RuntimeError, match="closed"):
        await collect(llm, HELLO)


async def test_a_page_that_is_not_a_stream_is_permanent(
    server: FakeOpenAI, provider: OpenAIProvider
) -> None:
    # e.g. base_url pointing at a web UI instead of the API: retrying cannot help.
    server.script(json_reply(200, "<html>LM Studio</html>", content_type="text/html"))
    with pytest.raises(LLMError, match="did not answer with an event stream") as raised:
        await collect(provider, HELLO)
    assert not isinstance(raised.value, TransientLLMError)
