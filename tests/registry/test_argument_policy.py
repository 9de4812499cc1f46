"""Argument policies: hostile URLs, paths and host:port arguments are refused with
the rule named, before any backend runs and before the idempotency ledger.

Name resolution is injected (a table, never DNS) wherever a name must resolve, so
no test sends a packet off this machine; literal addresses need no resolution.
"""

from __future__ import annotations

import ipaddress
import json
import socket
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis

from agentplex.contract import argument_policy
from agentplex.contract.argument_policy import IPAddress, PolicyDenied
from agentplex.contract.reasons import Reason
from agentplex.contract.tool_definition import define
from agentplex.registry.backends import BackendRouter
from agentplex.registry.ledger import IdempotencyLedger
from agentplex.registry.service import ToolRegistry
from agentplex.registry.store import RegistryStore
from agentplex.runtime import errors
from agentplex.runtime.clients import Deadline
from agentplex.runtime.errors import from_rpc_error
from agentplex.runtime.interceptors import EdgeInterceptor
from agentplex.v1 import tool_executor_service_pb2 as ex
from agentplex.v1 import tool_executor_service_pb2_grpc as ex_grpc
from agentplex.v1 import tool_pb2, tool_registry_service_pb2_grpc
from agentplex.v1 import tool_registry_service_pb2 as pb

PUBLIC = "93.184.215.14"
NAMES = {
    "docs.example.com": [PUBLIC],
    "example.org": [PUBLIC],
    "localhost": ["127.0.0.1", "::1"],
    "metadata.example.com": ["169.254.169.254"],
    # One public address is not enough: every address must be public.
    "half.example.com": [PUBLIC, "10.0.0.7"],
    "redis.example.com": ["10.1.2.3"],
}


async def table_resolver(host: str, port: int) -> list[IPAddress]:
    if host not in NAMES:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    return [ipaddress.ip_address(a) for a in NAMES[host]]


def url_rule(**fields: Any) -> tool_pb2.UrlPolicy:
    return tool_pb2.UrlPolicy(**fields)


async def url_refusal(url: str, policy: tool_pb2.UrlPolicy | None = None) -> str:
    with pytest.raises(PolicyDenied) as info:
        await argument_policy.check_url("url", url, policy or url_rule(), resolver=table_resolver)
    return info.value.message


# ------------------------------------------------------------------ URLs, pure


async def test_cloud_metadata_is_refused_naming_the_rule() -> None:
    assert await url_refusal("http://169.254.169.254/latest/meta-data/") == (
        'argument "url": host 169.254.169.254 resolves to a link-local address '
        "(policy: public hosts only)"
    )


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("file:///etc/shadow", "scheme file is not allowed (policy: schemes http, https)"),
        ("gopher://example.org/", "scheme gopher is not allowed"),
        ("//example.org/", "scheme (none) is not allowed"),
        ("http://127.0.0.1/", "host 127.0.0.1 resolves to a loopback address"),
        ("http://2130706433/", "host 2130706433 resolves to 127.0.0.1, a loopback address"),
        ("http://0x7f.1/", "resolves to 127.0.0.1, a loopback address"),
        ("http://0177.0.0.1/", "resolves to 127.0.0.1, a loopback address"),
        ("http://127.1/", "resolves to 127.0.0.1, a loopback address"),
        ("http://127.0.0.1./", "resolves to 127.0.0.1, a loopback address"),
        ("http://[::1]/", "a loopback address"),
        ("http://[::ffff:127.0.0.1]/", "a loopback address (127.0.0.1, inside ::ffff:7f00:1)"),
        ("http://[::ffff:a9fe:a9fe]/", "a link-local address (169.254.169.254"),
        ("http://[64:ff9b::a9fe:a9fe]/", "a link-local address (169.254.169.254"),
        ("http://[2002:7f00:1::]/", "a loopback address (127.0.0.1"),
        ("http://[fe80::1]/", "a link-local address"),
        ("http://[fc00::1]/", "a private address"),
        ("http://[fec0::1]/", "a site-local address"),
        ("http://10.0.0.5/", "a private address"),
        ("http://172.16.3.4/", "a private address"),
        ("http://192.168.1.1/", "a private address"),
        ("http://100.64.1.2/", "a shared (CGNAT) address"),
        ("http://224.0.0.1/", "a multicast address"),
        ("http://0.0.0.0/", "an unspecified address"),
        ("http://240.0.0.1/", "(policy: public hosts only)"),
        ("http://198.18.0.1/", "(policy: public hosts only)"),
        ("http://localhost/", "host localhost resolves to 127.0.0.1, a loopback address"),
        ("http://metadata.example.com/", "resolves to 169.254.169.254, a link-local address"),
        ("http://half.example.com/", "resolves to 10.0.0.7, a private address"),
        ("http://nowhere.example.com/", "host nowhere.example.com does not resolve"),
        ("http://a@example.org/", "carries user info (user@host) (policy: no user info in URLs)"),
        ("http://user:pw@example.org/", "(policy: no user info in URLs)"),
        ("http://example.org:6379/", "port 6379 is not allowed (policy: the scheme's default"),
        ("https://example.org:80/", "port 80 is not allowed"),
        ("http://example.org\\@127.0.0.1/", "(policy: a plain URL)"),
        ("http://127.0.0.1\t.example.org/", "(policy: a plain URL)"),
        ("http://exa mple.org/", "(policy: a plain URL)"),
        ("http:///etc/passwd", "names no host"),
        ("http://08.0.0.1/", "08.0.0.1 is not a valid IPv4 address (policy: a valid host)"),
        ("http://[fe80::1%25eth0]/", "(policy: a valid host)"),
        ("http://exämple.org/", "not a valid host name"),
        ("http://example.org:99999/", "(policy: a valid host)"),
    ],
)
async def test_hostile_urls_are_refused_naming_the_rule(url: str, expected: str) -> None:
    message = await url_refusal(url)
    assert message.startswith('argument "url": ')
    assert expected in message


async def test_a_public_url_passes_with_the_addresses_to_connect_to() -> None:
    target = await argument_policy.check_url(
        "url", "https://docs.example.com/guide?page=2#top", url_rule(), resolver=table_resolver
    )
    assert (target.scheme, target.host, target.port) == ("https", "docs.example.com", 443)
    assert target.addresses == (ipaddress.ip_address(PUBLIC),)
    assert target.path == "/guide?page=2"
    literal = await argument_policy.check_url(
        "url", f"http://{PUBLIC}/", url_rule(), resolver=table_resolver
    )
    assert literal.addresses == (ipaddress.ip_address(PUBLIC),)


async def test_host_and_port_allow_lists() -> None:
    policy = url_rule(allowed_hosts=["*.example.com"], allowed_ports=[8443])
    ok = await argument_policy.check_url(
        "url", "https://docs.example.com:8443/", policy, resolver=table_resolver
    )
    assert ok.port == 8443
    assert "host example.org is not allowed (policy: hosts *.example.com)" in await url_refusal(
        "https://example.org/", policy
    )
    # "*.suffix" is names under the suffix, not the suffix itself.
    assert "is not allowed" in await url_refusal("https://example.com/", policy)
    # An allowed name still has to resolve to public addresses only.
    assert "link-local" in await url_refusal("https://metadata.example.com/", policy)
    assert "port 8080 is not allowed (policy: the scheme's default port or 8443)" in (
        await url_refusal("https://docs.example.com:8080/", policy)
    )


async def test_the_system_resolver_runs_on_the_loop() -> None:
    # localhost resolves from the hosts file: no packet leaves the machine.
    addresses = await argument_policy.system_resolver("localhost", 80)
    assert addresses and all(a.is_loopback for a in addresses)


# ------------------------------------------------------------------ paths and host:port


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("../../../../etc/passwd", "leaves the tool's root (policy: no '..' segments)"),
        ("notes/../../secret", "(policy: no '..' segments)"),
        ("..", "(policy: no '..' segments)"),
        ("..\\..\\windows\\win.ini", "(policy: no '..' segments)"),
        ("/etc/passwd", "/etc/passwd is absolute (policy: paths relative to the tool's root)"),
        ("\\\\server\\share", "is absolute"),
        ("C:\\Windows\\win.ini", "is absolute"),
        ("~/.ssh/id_rsa", "is absolute"),
        ("notes.md\x00.txt", "contains a NUL byte (policy: no NUL bytes)"),
        ("run.sh", "extension .sh is not allowed (policy: extensions .md, .txt)"),
        ("README", "extension (none) is not allowed"),
    ],
)
def test_hostile_paths_are_refused_naming_the_rule(path: str, expected: str) -> None:
    policy = tool_pb2.PathPolicy(allowed_extensions=[".md", ".txt"])
    with pytest.raises(PolicyDenied) as info:
        argument_policy.check_path("path", path, policy)
    assert info.value.message.startswith('argument "path": ')
    assert expected in info.value.message


def test_paths_inside_the_root_pass_normalized() -> None:
    policy = tool_pb2.PathPolicy(allowed_extensions=[".md"])
    assert argument_policy.check_path("path", "docs/./a/../TOOLS.MD", policy) == "docs/TOOLS.MD"
    assert argument_policy.check_path("path", "a..b.md", policy) == "a..b.md"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("127.0.0.1:6379", "host 127.0.0.1 resolves to a loopback address"),
        ("[::1]:6379", "a loopback address"),
        ("::1", "a loopback address"),
        ("2130706433:6379", "127.0.0.1, a loopback address"),
        ("redis.example.com:6379", "10.1.2.3, a private address"),
        ("169.254.169.254", "a link-local address"),
        ("example.org:0", "(policy: a valid host)"),
        ("a@example.org:443", "(policy: a host or host:port)"),
        ("example.org:443/x", "(policy: a host or host:port)"),
    ],
)
async def test_hostile_host_ports_are_refused(value: str, expected: str) -> None:
    with pytest.raises(PolicyDenied) as info:
        await argument_policy.check_host(
            "target", value, tool_pb2.HostPolicy(), resolver=table_resolver
        )
    assert expected in info.value.message


async def test_host_port_allow_list() -> None:
    policy = tool_pb2.HostPolicy(allowed_ports=[443, 8443])
    with pytest.raises(PolicyDenied, match=r"port 25 is not allowed \(policy: ports 443, 8443\)"):
        await argument_policy.check_host(
            "target", "example.org:25", policy, resolver=table_resolver
        )


async def test_a_public_host_port_passes() -> None:
    policy = tool_pb2.HostPolicy(allowed_ports=[443])
    addresses = await argument_policy.check_host(
        "target", "example.org:443", policy, resolver=table_resolver
    )
    assert addresses == (ipaddress.ip_address(PUBLIC),)


async def test_nested_arguments_by_json_pointer_and_non_strings() -> None:
    tool = probe(pointer="/target/url")
    await argument_policy.check(tool, {"target": {}}, resolver=table_resolver)  # absent: fine
    with pytest.raises(PolicyDenied, match="link-local"):
        await argument_policy.check(
            tool, {"target": {"url": "http://169.254.169.254/"}}, resolver=table_resolver
        )
    with pytest.raises(PolicyDenied, match='argument "url": is not a string'):
        await argument_policy.check(probe(), {"url": ["http://x/"]}, resolver=table_resolver)


# ------------------------------------------------------------------ contracts


def probe(
    *,
    name: str = "probe.fetch",
    version: str = "1.0.0",
    pointer: str = "url",
    policy: tool_pb2.UrlPolicy | None = None,
    side_effect: tool_pb2.SideEffect = tool_pb2.SIDE_EFFECT_SIDE_EFFECTING,
    endpoint: str = "",
) -> tool_pb2.ToolDefinition:
    """A tool taking a URL (or a nested one): side-effecting, so every call needs the ledger."""
    url = {"type": "string", "minLength": 1}
    properties: dict[str, Any] = (
        {"url": url}
        if pointer == "url"
        else {"target": {"type": "object", "properties": {"url": url}}}
    )
    tool = define(
        name=name,
        version=version,
        description="Fetches what a URL names.",
        input_schema={"type": "object", "properties": properties},
        output_schema={"type": "object"},
        side_effect=side_effect,
    )
    tool.argument_policies.append(
        tool_pb2.ArgumentPolicy(argument=pointer, url=policy or url_rule())
    )
    tool.endpoint = endpoint
    return tool


class RecordingBackend(ex_grpc.ToolExecutorServiceServicer):
    def __init__(self) -> None:
        self.calls: list[str] = []

    async def ExecuteTool(self, request, context):
        self.calls.append(request.arguments_json)
        return ex.ExecuteToolResponse(result_json=json.dumps({"ok": True}))


@pytest.fixture
async def backend() -> AsyncIterator[tuple[RecordingBackend, str]]:
    servicer = RecordingBackend()
    server = grpc.aio.server(interceptors=[EdgeInterceptor()])
    ex_grpc.add_ToolExecutorServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield servicer, f"127.0.0.1:{port}"
    finally:
        await server.stop(0)


@pytest.fixture
async def registry(redis_client: aioredis.Redis, key_prefix: str) -> AsyncIterator[ToolRegistry]:
    router = BackendRouter(tool_timeout_seconds=5)
    try:
        yield ToolRegistry(
            store=RegistryStore(redis_client, key_prefix=key_prefix),
            ledger=IdempotencyLedger(redis_client, key_prefix=key_prefix),
            router=router,
            resolver=table_resolver,
        )
    finally:
        await router.close()


@pytest.mark.parametrize(
    ("argument", "tool_schema", "expected"),
    [
        ("link", None, "must name a property of the input schema"),
        ("/target/link", None, "must name a property of the input schema"),
        ("count", {"count": {"type": "integer"}}, '"type": "string"'),
        ("", None, "must name an argument"),
    ],
)
async def test_a_policy_that_would_check_nothing_is_not_published(
    registry, argument: str, tool_schema: dict[str, Any] | None, expected: str
) -> None:
    tool = probe()
    if tool_schema is not None:
        tool.input_schema_json = json.dumps({"type": "object", "properties": tool_schema})
    tool.argument_policies[0].argument = argument
    with pytest.raises(errors.InvalidArgument, match=expected):
        await registry.register(tool)


async def test_a_policy_must_say_what_the_argument_is(registry) -> None:
    tool = probe()
    tool.argument_policies[0].ClearField("url")
    with pytest.raises(errors.InvalidArgument, match="url, path or host"):
        await registry.register(tool)


async def test_changing_a_policy_of_a_published_version_is_refused(registry) -> None:
    await registry.register(probe())
    with pytest.raises(errors.FailedPrecondition) as info:
        await registry.register(probe(policy=url_rule(allowed_hosts=["*.example.com"])))
    assert info.value.reason == Reason.VERSION_EXISTS


async def test_a_minor_version_may_tighten_or_loosen_a_policy(registry) -> None:
    await registry.register(probe())
    assert await registry.register(
        probe(version="1.1.0", policy=url_rule(allowed_hosts=["*.example.com"]))
    )
    assert await registry.register(
        probe(
            version="1.2.0", policy=url_rule(allowed_hosts=["*.example.com"], allowed_ports=[8443])
        )
    )
    loosened = probe(version="1.3.0")
    loosened.ClearField("argument_policies")
    assert await registry.register(loosened)


# ------------------------------------------------------------------ the registry, end to end


def invoke_request(url: str, key: str = "t-1:1:0") -> pb.InvokeToolRequest:
    return pb.InvokeToolRequest(
        tool_name="probe.fetch",
        arguments_json=json.dumps({"url": url}),
        idempotency_key=key,
        caller=pb.Caller(session_id="s-1", task_id="t-1"),
    )


async def test_the_registry_runs_a_call_that_passes_its_policy(registry, backend) -> None:
    servicer, address = backend
    await registry.register(probe(endpoint=address))
    response = await registry.invoke(
        invoke_request("https://docs.example.com/a"), Deadline.after(10)
    )
    assert json.loads(response.result_json) == {"ok": True}
    assert servicer.calls == [json.dumps({"url": "https://docs.example.com/a"})]


async def test_a_name_resolving_to_a_private_address_never_reaches_the_backend(
    registry, backend, redis_client, key_prefix
) -> None:
    servicer, address = backend
    await registry.register(probe(endpoint=address))
    with pytest.raises(errors.InvalidArgument) as info:
        await registry.invoke(invoke_request("http://half.example.com/"), Deadline.after(10))
    assert info.value.reason == Reason.POLICY_DENIED
    assert "10.0.0.7, a private address" in info.value.message
    assert servicer.calls == []
    assert await redis_client.keys(f"{key_prefix}:idempotency:*") == []


HOSTILE = [
    "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
    "file:///etc/shadow",
    "http://2130706433/",
    "http://0x7f.1:6379/",
    "http://[::ffff:127.0.0.1]/",
    "http://localhost/",
    "http://a@example.org/",
]


@pytest.fixture
def registry_stub(mesh, channel_to):
    return tool_registry_service_pb2_grpc.ToolRegistryServiceStub(channel_to(mesh.registry))


async def test_a_real_registry_refuses_hostile_urls_before_backend_and_ledger(
    registry_stub, backend, redis_client, key_prefix
) -> None:
    servicer, address = backend
    await registry_stub.RegisterTool(
        pb.RegisterToolRequest(tool=probe(endpoint=address)), timeout=10
    )
    for index, url in enumerate(HOSTILE):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await registry_stub.InvokeTool(invoke_request(url, f"t-1:1:{index}"), timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, url
        error = from_rpc_error(info.value)
        assert error.reason == Reason.POLICY_DENIED, url
        assert error.message.startswith('argument "url": ') and "(policy: " in error.message
    assert servicer.calls == []
    assert await redis_client.keys(f"{key_prefix}:idempotency:*") == []
