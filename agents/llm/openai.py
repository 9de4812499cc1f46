"""A provider for any OpenAI-compatible chat-completions endpoint.

One wire format covers most of the field: OpenAI itself, vLLM, Ollama, the
llama.cpp server and LM Studio all serve ``POST {base_url}/chat/completions``.
It is spoken directly over ``httpx`` rather than through a vendor SDK, so the
event loop never blocks, the dependency stays small, and the quirks of local
servers (no usage report, a plain JSON reply instead of a stream) are ours to
tolerate.

``timeout_seconds`` bounds connecting and each wait for the next bytes, not the
whole call: a long generation that keeps streaming is healthy, a silent one is
not. The task deadline bounds the total.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

import httpx

from agentplex.agents.llm.base import (
    ChatMessage,
    Completion,
    CompletionRequest,
    LLMError,
    LLMEvent,
    TextDelta,
    ToolCall,
    TransientLLMError,
    Usage,
)
from agentplex.runtime.tokens import estimate_message_tokens, estimate_tokens

# Statuses where the same request may succeed later: timeout, conflict, rate limit.
_TRANSIENT_STATUSES = frozenset({408, 409, 429})
_MAX_ERROR_CHARS = 300


def _wire_name(name: str) -> str:
    # agentplex tool names are dotted ("notes.write") but OpenAI function names
    # must match ^[a-zA-Z0-9_-]+$, so dots travel as "__" and are mapped back.
    return name.replace(".", "__")


@dataclass
class _PartialCall:
    id: str = ""
    name: str = ""
    arguments: list[str] = field(default_factory=list)


class _Accumulator:
    """Folds streamed chunks into one completion."""

    def __init__(self) -> None:
        self.content: list[str] = []
        self.calls: dict[int, _PartialCall] = {}
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None

    def add_chunk(self, chunk: dict[str, Any]) -> str:
        """Record one chunk; return its new text (possibly empty)."""
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        text = ""
        for choice in chunk.get("choices") or ():
            if choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            text = delta.get("content") or ""
            if text:
                self.content.append(text)
            for fragment in delta.get("tool_calls") or ():
                self._add_call_fragment(fragment)
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
        return text

    def _add_call_fragment(self, fragment: dict[str, Any]) -> None:
        index = fragment.get("index")
        if index is None:
            # Some local servers omit the index and send each call whole.
            known = {call.id for call in self.calls.values()}
            new_id = fragment.get("id")
            index = len(self.calls) if new_id and new_id not in known else len(self.calls) - 1
            index = max(index, 0)
        call = self.calls.setdefault(index, _PartialCall())
        function = fragment.get("function") or {}
        # id and name arrive whole in the first fragment; only arguments are split.
        call.id = call.id or fragment.get("id") or ""
        call.name = call.name or function.get("name") or ""
        if function.get("arguments"):
            call.arguments.append(function["arguments"])


class OpenAIProvider:
    """Streams completions from an OpenAI-compatible ``/chat/completions`` endpoint."""

    def __init__(
        self,
        *,
        base_url: str,
        api_key: str,
        model: str,
        timeout_seconds: float,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self._url = base_url.rstrip("/") + "/chat/completions"
        self._api_key = api_key
        self._model = model
        self._timeout = httpx.Timeout(timeout_seconds)
        self._owns_client = client is None
        self._client = client if client is not None else httpx.AsyncClient(timeout=self._timeout)

    @property
    def model(self) -> str:
        return f"openai/{self._model}"

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()

    async def stream(self, request: CompletionRequest) -> AsyncIterator[LLMEvent]:
        names = _name_map(request)
        body = self._body(request)
        headers = {"Accept": "text/event-stream, application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        try:
            async with self._client.stream(
                "POST", self._url, json=body, headers=headers, timeout=self._timeout
            ) as response:
                if not response.is_success:
                    await response.aread()
                    raise self._status_error(response)
                content_type = response.headers.get("content-type", "")
                if content_type.startswith("application/json"):
                    await response.aread()
                    events = self._from_json(response, request, names)
                else:
                    events = self._from_sse(response, request, names)
                # aclosing: if our caller stops early, the inner generator stops now too.
                async with aclosing(events):
                    async for event in events:
                        yield event
        except httpx.TimeoutException as exc:
            raise TransientLLMError(
                f"{self.model}: no response within {self._timeout.read}s ({type(exc).__name__})"
            ) from exc
        except httpx.UnsupportedProtocol as exc:
            raise LLMError(f"{self.model}: bad base_url: {self._redact(str(exc))}") from exc
        except httpx.TransportError as exc:
            raise TransientLLMError(
                f"{self.model}: connection to {self._url} failed: "
                f"{type(exc).__name__}: {self._redact(str(exc))}"
            ) from exc
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise LLMError(f"{self.model}: {type(exc).__name__}: {self._redact(str(exc))}") from exc

    def _body(self, request: CompletionRequest) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self._model,
            "messages": [_wire_message(message) for message in request.messages],
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if request.tools:
            body["tools"] = [
                {
                    "type": "function",
                    "function": {
                        "name": _wire_name(tool.name),
                        "description": tool.description,
                        "parameters": _parse_schema(tool.name, tool.parameters_json),
                    },
                }
                for tool in request.tools
            ]
        if request.max_tokens is not None:
            body["max_tokens"] = request.max_tokens
        return body

    async def _from_sse(
        self, response: httpx.Response, request: CompletionRequest, names: dict[str, str]
    ) -> AsyncGenerator[LLMEvent, None]:
        acc = _Accumulator()
        done = False
        seen_data = False
        async for line in response.aiter_lines():
            # Each event is one "data:" line in every server we target, so lines are
            # handled one by one; comments (":") and other SSE fields carry nothing.
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            seen_data = True
            if data == "[DONE]":
                done = True
                break
            try:
                chunk = json.loads(data)
            except ValueError as exc:
                raise LLMError(f"{self.model}: malformed stream chunk: {data[:80]!r}") from exc
            if not isinstance(chunk, dict):
                raise LLMError(f"{self.model}: malformed stream chunk: {data[:80]!r}")
            if "error" in chunk:
                raise self._embedded_error(chunk["error"])
            text = acc.add_chunk(chunk)
            if text:
                yield TextDelta(text)
        if not done and acc.finish_reason is None:
            if not seen_data and "text/event-stream" not in response.headers.get(
                "content-type", ""
            ):
                # Nothing stream-like at all (an HTML page, a proxy banner): retrying won't fix it.
                raise LLMError(f"{self.model}: {self._url} did not answer with an event stream")
            raise TransientLLMError(f"{self.model}: stream ended before the completion finished")
        calls = [
            _finish_call(call.id, call.name, "".join(call.arguments), names, self.model)
            for _, call in sorted(acc.calls.items())
        ]
        yield self._completion("".join(acc.content), calls, acc.finish_reason, acc.usage, request)

    async def _from_json(
        self, response: httpx.Response, request: CompletionRequest, names: dict[str, str]
    ) -> AsyncGenerator[LLMEvent, None]:
        # Some local servers ignore "stream" and answer with one JSON body.
        try:
            payload = response.json()
        except ValueError as exc:
            raise LLMError(f"{self.model}: response is not valid JSON") from exc
        if not isinstance(payload, dict):
            raise LLMError(f"{self.model}: malformed response")
        if "error" in payload:
            raise self._embedded_error(payload["error"])
        try:
            choice = payload["choices"][0]
            message = choice["message"]
            content = message.get("content") or ""
            calls = []
            for raw in message.get("tool_calls") or ():
                arguments = raw["function"].get("arguments") or ""
                if not isinstance(arguments, str):
                    arguments = json.dumps(arguments)  # Ollama may send an object
                calls.append(
                    _finish_call(
                        raw.get("id") or "", raw["function"]["name"], arguments, names, self.model
                    )
                )
            finish_reason = choice.get("finish_reason")
        except (KeyError, IndexError, TypeError, AttributeError) as exc:
            raise LLMError(f"{self.model}: malformed response: missing {exc}") from exc
        usage = payload.get("usage")
        if content:
            yield TextDelta(content)
        yield self._completion(
            content, calls, finish_reason, usage if isinstance(usage, dict) else None, request
        )

    def _completion(
        self,
        content: str,
        calls: list[ToolCall],
        finish_reason: str | None,
        usage: dict[str, Any] | None,
        request: CompletionRequest,
    ) -> Completion:
        if finish_reason is None:
            # [DONE] without a finish_reason: the outcome still tells us why it stopped.
            finish_reason = "tool_calls" if calls else "stop"
        return Completion(
            content=content,
            tool_calls=tuple(calls),
            finish_reason=finish_reason,
            usage=_usage(usage, request, content, calls),
            model=self.model,
        )

    def _status_error(self, response: httpx.Response) -> LLMError:
        status = response.status_code
        # Redact before truncating, so a cut can't leave a prefix of the key behind.
        detail = self._redact(_error_message(response))[:_MAX_ERROR_CHARS]
        message = f"{self.model}: HTTP {status} from {self._url}"
        if detail:
            message += f": {detail}"
        if status in _TRANSIENT_STATUSES or status >= 500:
            return TransientLLMError(message)
        return LLMError(message)

    def _embedded_error(self, error: Any) -> LLMError:
        # vLLM and llama.cpp report failures after a 200 as {"error": {...}} in the body.
        if isinstance(error, dict):
            code = error.get("code")
            transient = error.get("type") == "server_error" or (
                isinstance(code, int) and (code in _TRANSIENT_STATUSES or code >= 500)
            )
            error = error.get("message") or error
        else:
            transient = False
        message = f"{self.model}: server error: {self._redact(str(error))[:_MAX_ERROR_CHARS]}"
        return TransientLLMError(message) if transient else LLMError(message)

    def _redact(self, text: str) -> str:
        # Servers sometimes echo the key back in "invalid key" errors.
        return text.replace(self._api_key, "***") if self._api_key else text


def _wire_message(message: ChatMessage) -> dict[str, Any]:
    if message.role == "tool":
        return {"role": "tool", "tool_call_id": message.tool_call_id, "content": message.content}
    if message.role == "assistant" and message.tool_calls:
        return {
            "role": "assistant",
            "content": message.content or None,
            "tool_calls": [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": _wire_name(call.name), "arguments": call.arguments_json},
                }
                for call in message.tool_calls
            ],
        }
    return {"role": message.role, "content": message.content}


def _name_map(request: CompletionRequest) -> dict[str, str]:
    """Wire name -> agentplex name for every tool this request can mention."""
    names: dict[str, str] = {}
    known = [tool.name for tool in request.tools] + [
        call.name for message in request.messages for call in message.tool_calls
    ]
    for name in known:
        wire = _wire_name(name)
        if names.setdefault(wire, name) != name:
            # "a.b" and "a__b" would be indistinguishable on the way back.
            raise LLMError(f"tool names {names[wire]!r} and {name!r} collide as {wire!r}")
    return names


def _parse_schema(name: str, parameters_json: str) -> Any:
    if not parameters_json.strip():
        return {"type": "object", "properties": {}}
    try:
        return json.loads(parameters_json)
    except ValueError as exc:
        raise LLMError(f"tool {name!r} has an invalid parameters schema: {exc}") from exc


def _finish_call(
    call_id: str, wire_name: str, arguments: str, names: dict[str, str], model: str
) -> ToolCall:
    if not wire_name:
        raise LLMError(f"{model}: tool call without a function name")
    return ToolCall(
        # Tool results are matched by id, so an id-less call (some local servers) gets one.
        id=call_id or f"call_{uuid.uuid4().hex[:24]}",
        # Known names map back exactly; unknown ones (a hallucinated tool) best-effort,
        # so the runner can report the bad name to the model.
        name=names.get(wire_name, wire_name.replace("__", ".")),
        # A call without arguments streams none; "{}" keeps it parseable downstream.
        arguments_json=arguments or "{}",
    )


def _usage(
    reported: dict[str, Any] | None,
    request: CompletionRequest,
    content: str,
    calls: list[ToolCall],
) -> Usage:
    if reported is not None:
        prompt = reported.get("prompt_tokens")
        completion = reported.get("completion_tokens")
        if isinstance(prompt, int) and isinstance(completion, int):
            return Usage(prompt_tokens=prompt, completion_tokens=completion)
    prompt_tokens = sum(
        estimate_message_tokens(
            message.content
            + "".join(call.name + call.arguments_json for call in message.tool_calls)
        )
        for message in request.messages
    )
    completion_tokens = estimate_tokens(content + "".join(call.arguments_json for call in calls))
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, estimated=True)


def _error_message(response: httpx.Response) -> str:
    """The server's own explanation, from the shapes OpenAI-compatible servers use."""
    try:
        payload = response.json()
    except ValueError:
        return response.text.strip()
    message: Any = payload
    if isinstance(payload, dict):
        error = payload.get("error", payload.get("detail", payload.get("message")))
        if isinstance(error, dict):
            error = error.get("message", error)
        message = error if error is not None else payload
    text = message if isinstance(message, str) else json.dumps(message)
    return text.strip()
