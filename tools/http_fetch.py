"""`http.fetch`: GET a public web page or text document, read-only.

Its contract declares a URL policy (http and https, default ports, public hosts
only), which the registry checks before this backend is called. The backend
checks it again, and more: it resolves the host itself, checks every address,
and connects only to an address it checked (the URL's host travels as the
Host header and as TLS SNI, so certificates are verified against the name).
A name that resolved to a public address for the registry and to 127.0.0.1
a moment later (DNS rebinding) is refused here. Redirects are followed only
to URLs that pass the same checks, hop by hop.

Bounded: one overall time limit, at most `MAX_BYTES` of text (the rest cut,
`truncated` set), text content types only, no cookies, no proxies from the
environment.
"""

from __future__ import annotations

import asyncio
import codecs
import functools
import ssl
from typing import Any
from urllib.parse import urljoin

import httpx

from agentplex.contract import argument_policy
from agentplex.contract.argument_policy import AddressCheck, PolicyDenied, Resolver, Target
from agentplex.contract.reasons import Reason, ToolErrorCode
from agentplex.contract.tool_definition import define
from agentplex.tools.base import ToolContext, ToolFailure
from agentplex.v1 import tool_pb2

MAX_BYTES = 256 * 1024
# Below the registry's default tool limit (10 s), so the model gets this tool's
# own answer rather than the registry's TIMEOUT.
TIMEOUT_SECONDS = 8.0
MAX_REDIRECTS = 5
REDIRECTS = frozenset({301, 302, 303, 307, 308})
TEXT_TYPES = frozenset(
    {"application/json", "application/xml", "application/xhtml+xml", "application/javascript"}
)
URL_POLICY = tool_pb2.UrlPolicy(allowed_schemes=["http", "https"])


def definition() -> tool_pb2.ToolDefinition:
    tool = define(
        name="http.fetch",
        version="1.0.0",
        description=(
            "Fetches a public web page or text document with an HTTP GET and returns its "
            f"text (at most {MAX_BYTES // 1024} KiB; longer text is cut and marked "
            "truncated). Only http and https URLs of public hosts on their default ports."
        ),
        input_schema={
            "type": "object",
            "properties": {
                "url": {"type": "string", "minLength": 1, "maxLength": 2048},
            },
            "required": ["url"],
            "additionalProperties": False,
        },
        output_schema={
            "type": "object",
            "properties": {
                "url": {"type": "string"},
                "status": {"type": "integer"},
                "content_type": {"type": "string"},
                "text": {"type": "string"},
                "truncated": {"type": "boolean"},
            },
            "required": ["url", "status", "content_type", "text", "truncated"],
        },
        side_effect=tool_pb2.SIDE_EFFECT_READ_ONLY,
    )
    tool.argument_policies.append(tool_pb2.ArgumentPolicy(argument="url", url=URL_POLICY))
    return tool


class HttpFetch:
    definition = definition()

    def __init__(
        self,
        *,
        resolver: Resolver = argument_policy.system_resolver,
        address_check: AddressCheck = argument_policy.address_problem,
        policy: tool_pb2.UrlPolicy = URL_POLICY,
        max_bytes: int = MAX_BYTES,
        timeout_seconds: float = TIMEOUT_SECONDS,
    ) -> None:
        # Every parameter is the contract's unless a test supplies its own.
        self._resolver = resolver
        self._address_check = address_check
        self._policy = policy
        self._max_bytes = max_bytes
        self._timeout = timeout_seconds

    async def run(self, arguments: dict[str, Any], context: ToolContext) -> dict[str, Any]:
        url = str(arguments["url"])
        try:
            async with asyncio.timeout(self._timeout):
                return await self._fetch(url)
        except TimeoutError:
            raise ToolFailure(
                f"{url} did not answer within {self._timeout:g} s", code=ToolErrorCode.TIMEOUT
            ) from None

    async def _fetch(self, url: str) -> dict[str, Any]:
        for _ in range(MAX_REDIRECTS + 1):
            target = await self._checked(url)
            status, headers, body, truncated = await self._get(target)
            location = headers.get("location")
            if status in REDIRECTS and location:
                url = urljoin(url, location)
                continue
            content_type = headers.get("content-type", "")
            media_type = content_type.split(";", 1)[0].strip().lower()
            if not _is_text(media_type):
                raise ToolFailure(f"{url} is {media_type or 'of no stated type'}, not text")
            return {
                "url": url,
                "status": status,
                "content_type": content_type,
                "text": _decode(body, headers),
                "truncated": truncated,
            }
        raise ToolFailure(f"more than {MAX_REDIRECTS} redirects, the last to {url}")

    async def _checked(self, url: str) -> Target:
        try:
            return await argument_policy.check_url(
                "url",
                url,
                self._policy,
                resolver=self._resolver,
                address_check=self._address_check,
            )
        except PolicyDenied as exc:
            raise ToolFailure(exc.message, code=Reason.POLICY_DENIED) from None

    async def _get(self, target: Target) -> tuple[int, httpx.Headers, bytes, bool]:
        """GET from a checked address of the target (the next if one refuses)."""
        failure: httpx.TransportError | None = None
        for address in target.addresses:
            literal = f"[{address}]" if address.version == 6 else str(address)
            host = f"[{target.host}]" if ":" in target.host else target.host
            default = argument_policy.DEFAULT_PORTS.get(target.scheme)
            authority = host if target.port == default else f"{host}:{target.port}"
            try:
                # No proxies or netrc from the environment: the connection must go
                # to the checked address and nowhere else.
                async with (
                    httpx.AsyncClient(
                        trust_env=False, follow_redirects=False, verify=_tls_context()
                    ) as client,
                    client.stream(
                        "GET",
                        f"{target.scheme}://{literal}:{target.port}{target.path}",
                        headers={
                            "Host": authority,
                            "User-Agent": "agentplex-http.fetch/1",
                            "Accept": "text/*, application/json, application/xml;q=0.9",
                            # Uncompressed: a small gzip body can inflate far past the cap
                            # before the cap sees it.
                            "Accept-Encoding": "identity",
                        },
                        extensions={"sni_hostname": target.host},
                    ) as response,
                ):
                    body, truncated = await self._read(response)
                    return response.status_code, response.headers, body, truncated
            except httpx.ConnectError as exc:
                failure = exc  # nothing was sent: the next address may answer
            except httpx.HTTPError as exc:
                raise ToolFailure(f"fetching {target.url} failed: {exc}") from None
        raise ToolFailure(f"could not connect to {target.url}: {failure}")

    async def _read(self, response: httpx.Response) -> tuple[bytes, bool]:
        body = bytearray()
        async for chunk in response.aiter_bytes():
            body += chunk
            if len(body) > self._max_bytes:
                return bytes(body[: self._max_bytes]), True
        return bytes(body), False


@functools.cache
def _tls_context() -> ssl.SSLContext:
    """One verifying context for every fetch: building one loads the CA bundle, tens of
    milliseconds on the event loop. A client (and its connections) stays per request:
    connections are keyed by address, and each was verified for one name."""
    return ssl.create_default_context()


def _is_text(media_type: str) -> bool:
    return (
        media_type.startswith("text/")
        or media_type in TEXT_TYPES
        or media_type.endswith(("+json", "+xml"))
    )


def _decode(body: bytes, headers: httpx.Headers) -> str:
    charset = httpx.Response(200, headers=headers).charset_encoding or "utf-8"
    try:
        codecs.lookup(charset)
    except LookupError:
        charset = "utf-8"
    # A cut body may end inside a character: replaced, not an error.
    return body.decode(charset, errors="replace")
