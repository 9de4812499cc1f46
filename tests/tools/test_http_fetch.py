"""`http.fetch` against a real HTTP server on loopback.

Loopback is not public, so every fetch of it is refused — by the backend itself,
called directly without the registry. The one way a test reaches the server is
to hand the tool its own resolver and address check (hooks only a test can set);
the contract's policy and the defaults are never loosened, and nothing is sent
off this machine.
"""

from __future__ import annotations

import ipaddress
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis

from agentplex.contract import argument_policy
from agentplex.contract.argument_policy import IPAddress
from agentplex.contract.reasons import Reason, ToolErrorCode
from agentplex.registry import schemas
from agentplex.runtime.interceptors import EdgeInterceptor
from agentplex.tools.base import ToolContext, ToolFailure
from agentplex.tools.executor import ToolExecutorServicer
from agentplex.tools.http_fetch import MAX_BYTES, HttpFetch
from agentplex.v1 import tool_executor_service_pb2 as ex
from agentplex.v1 import tool_executor_service_pb2_grpc as ex_grpc
from agentplex.v1 import tool_pb2, tool_registry_service_pb2

LOOPBACK = ipaddress.ip_address("127.0.0.1")
NAME = "docs.example.test"


class Site:
    """A small website on 127.0.0.1:<free port>, counting the requests it gets."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str]] = []  # (path, Host header)
        self.encodings: list[str] = []  # Accept-Encoding of each request
        site = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                site.requests.append((self.path, self.headers.get("Host", "")))
                site.encodings.append(self.headers.get("Accept-Encoding", ""))
                status, headers, body = site.page(self.path)
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    self.wfile.write(body)
                except OSError:
                    pass

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_port
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def page(self, path: str) -> tuple[int, dict[str, str], bytes]:
        text = {"Content-Type": "text/plain; charset=utf-8"}
        if path == "/page":
            return 200, text, "Grüße from the page.".encode()
        if path == "/big":
            return 200, text, b"x" * (MAX_BYTES + 50_000)
        if path == "/image":
            return 200, {"Content-Type": "image/png"}, b"\x89PNG"
        if path == "/hop":
            return 302, {"Location": "/page"}, b""
        if path == "/to-metadata":
            return 302, {"Location": "http://169.254.169.254/latest/meta-data/"}, b""
        if path == "/slow":
            time.sleep(1.5)
            return 200, text, b"late"
        return 404, text, b"no such page"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def site() -> Iterator[Site]:
    served = Site()
    try:
        yield served
    finally:
        served.close()


def context() -> ToolContext:
    return ToolContext(agent="a", session_id="s", task_id="t", redis=None, key_prefix="p")  # type: ignore[arg-type]


async def refusal(tool: HttpFetch, url: str) -> ToolFailure:
    with pytest.raises(ToolFailure) as info:
        await tool.run({"url": url}, context())
    return info.value


def test_the_contract_declares_a_public_url_policy_and_no_side_effect() -> None:
    tool = HttpFetch.definition
    schemas.check_definition(tool)
    assert tool.side_effect == tool_pb2.SIDE_EFFECT_READ_ONLY
    [policy] = tool.argument_policies
    assert policy.argument == "url" and policy.WhichOneof("kind") == "url"
    assert list(policy.url.allowed_schemes) == ["http", "https"]
    assert not policy.url.allowed_hosts and not policy.url.allowed_ports


async def test_the_backend_refuses_loopback_with_its_defaults(site: Site) -> None:
    failure = await refusal(HttpFetch(), f"http://127.0.0.1:{site.port}/page")
    assert failure.code == Reason.POLICY_DENIED
    failure = await refusal(HttpFetch(), "http://localhost/page")
    assert "localhost resolves to" in failure.message and "loopback" in failure.message
    assert site.requests == []


async def test_loopback_is_refused_even_on_an_allowed_port(site: Site) -> None:
    tool = HttpFetch(policy=tool_pb2.UrlPolicy(allowed_ports=[site.port]))
    failure = await refusal(tool, f"http://127.0.0.1:{site.port}/page")
    assert failure.message == (
        'argument "url": host 127.0.0.1 resolves to a loopback address (policy: public hosts only)'
    )
    assert site.requests == []


async def test_a_name_that_rebinds_to_loopback_is_refused_by_the_backend(site: Site) -> None:
    # The registry may have seen a public address; the backend resolves again.
    async def rebinding(host: str, port: int) -> list[IPAddress]:
        return [LOOPBACK]

    tool = HttpFetch(resolver=rebinding, policy=tool_pb2.UrlPolicy(allowed_ports=[site.port]))
    failure = await refusal(tool, f"http://{NAME}:{site.port}/page")
    assert "resolves to 127.0.0.1, a loopback address" in failure.message
    assert site.requests == []


@pytest.fixture
async def executor(redis_client: aioredis.Redis) -> AsyncIterator[ex_grpc.ToolExecutorServiceStub]:
    server = grpc.aio.server(interceptors=[EdgeInterceptor()])
    ex_grpc.add_ToolExecutorServiceServicer_to_server(
        ToolExecutorServicer([HttpFetch()], redis=redis_client, key_prefix="p"), server
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield ex_grpc.ToolExecutorServiceStub(channel)
    finally:
        await channel.close()
        await server.stop(0)


async def test_the_backend_refuses_when_called_directly_bypassing_the_registry(
    site: Site, executor: ex_grpc.ToolExecutorServiceStub
) -> None:
    for url in (
        f"http://127.0.0.1:{site.port}/page",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::ffff:127.0.0.1]/page",
        "file:///etc/shadow",
    ):
        response = await executor.ExecuteTool(
            ex.ExecuteToolRequest(
                tool_name="http.fetch",
                tool_version="1.0.0",
                arguments_json=json.dumps({"url": url}),
                caller=tool_registry_service_pb2.Caller(agent="a", session_id="s"),
            ),
            timeout=10,
        )
        assert response.error.code == Reason.POLICY_DENIED, url
        assert "(policy: " in response.error.message
    assert site.requests == []


# ------------------------------------------------------------------ through the test's own hooks


def site_tool(site: Site, **overrides: Any) -> HttpFetch:
    """The tool with hooks this test controls: NAME resolves to 127.0.0.1, which alone
    passes the address check, and the site's port is allowed."""

    async def resolve(host: str, port: int) -> list[IPAddress]:
        return [LOOPBACK] if host == NAME else await argument_policy.system_resolver(host, port)

    def only_the_site(address: IPAddress) -> str | None:
        return None if address == LOOPBACK else argument_policy.address_problem(address)

    return HttpFetch(
        resolver=resolve,
        address_check=only_the_site,
        policy=tool_pb2.UrlPolicy(allowed_ports=[site.port]),
        **overrides,
    )


async def test_a_fetch_returns_text_connecting_to_the_checked_address(site: Site) -> None:
    result = await site_tool(site).run({"url": f"http://{NAME}:{site.port}/page"}, context())
    assert result == {
        "url": f"http://{NAME}:{site.port}/page",
        "status": 200,
        "content_type": "text/plain; charset=utf-8",
        "text": "Grüße from the page.",
        "truncated": False,
    }
    # Connected to the address it checked, asking for the name it was given.
    assert site.requests == [("/page", f"{NAME}:{site.port}")]
    # Never compressed: the size cap must apply to what is actually held in memory.
    assert site.encodings == ["identity"]


async def test_errors_are_answers_and_big_bodies_are_cut(site: Site) -> None:
    tool = site_tool(site)
    missing = await tool.run({"url": f"http://{NAME}:{site.port}/nothing"}, context())
    assert (missing["status"], missing["text"]) == (404, "no such page")
    big = await tool.run({"url": f"http://{NAME}:{site.port}/big"}, context())
    assert big["truncated"] is True and len(big["text"]) == MAX_BYTES


async def test_only_text_is_returned(site: Site) -> None:
    failure = await refusal(site_tool(site), f"http://{NAME}:{site.port}/image")
    assert failure.code == ToolErrorCode.EXECUTION_FAILED
    assert "is image/png, not text" in failure.message


async def test_redirects_are_followed_only_where_the_policy_allows(site: Site) -> None:
    tool = site_tool(site)
    hop = await tool.run({"url": f"http://{NAME}:{site.port}/hop"}, context())
    assert (hop["url"], hop["text"]) == (f"http://{NAME}:{site.port}/page", "Grüße from the page.")
    site.requests.clear()
    failure = await refusal(tool, f"http://{NAME}:{site.port}/to-metadata")
    assert failure.code == Reason.POLICY_DENIED
    assert "169.254.169.254 resolves to a link-local address" in failure.message
    assert [path for path, _ in site.requests] == ["/to-metadata"]


async def test_a_slow_site_times_out(site: Site) -> None:
    failure = await refusal(site_tool(site, timeout_seconds=0.3), f"http://{NAME}:{site.port}/slow")
    assert failure.code == ToolErrorCode.TIMEOUT
