"""The principal's wire form and the rules for honouring it (runtime/principal.py)."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from agentplex.runtime import principal as principals
from agentplex.runtime.principal import Principal, PrincipalError

TABLE = {"/agentplex.v1.AgentService/RunTask": "tasks:run"}
RUN = "/agentplex.v1.AgentService/RunTask"


def headers(**values: str) -> list[tuple[str, str]]:
    names = {
        "tenant": principals.TENANT_HEADER,
        "subject": principals.SUBJECT_HEADER,
        "scope": principals.SCOPE_HEADER,
        "by": principals.PRINCIPAL_HEADER,
    }
    return [(names[key], value) for key, value in values.items()]


def test_no_principal_headers_mean_the_mesh_itself() -> None:
    assert principals.from_metadata([("traceparent", "00-…"), ("user-agent", "x")]) is None
    assert principals.current() is principals.MESH
    assert principals.outgoing_metadata() == ()


def test_the_edge_s_headers_become_a_principal() -> None:
    asserted = principals.from_metadata(
        headers(tenant="acme", subject="ann", scope="tasks:run tasks:read", by="edge")
    )
    assert asserted is not None
    assert asserted.vouched_by == principals.EDGE
    assert asserted.principal == Principal("acme", "ann", frozenset({"tasks:run", "tasks:read"}))
    assert asserted.principal.allows("tasks:run")
    assert not asserted.principal.allows("tools:admin")


@pytest.mark.parametrize(
    ("metadata", "complaint"),
    [
        (headers(by="edge"), "needs a 'tenant' claim"),
        (headers(subject="ann", scope="tasks:run"), "needs a 'tenant' claim"),
        (headers(tenant="a b"), "is not a tenant name"),
        (headers(tenant="acme@x"), "is not a tenant name"),
        (headers(tenant="x" * 65), "is not a tenant name"),
        (headers(tenant="acme", by="trust-me"), "must be 'edge' or 'delegated'"),
    ],
)
def test_headers_that_name_no_usable_tenant_are_unauthenticated(
    metadata: list[tuple[str, str]], complaint: str
) -> None:
    with pytest.raises(PrincipalError, match=complaint) as caught:
        principals.from_metadata(metadata)
    assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_no_token_may_act_in_the_mesh_s_own_tenant() -> None:
    with pytest.raises(PrincipalError, match="is the mesh's own") as caught:
        principals.from_metadata(headers(tenant="default", scope="tasks:read", by="edge"))
    assert caught.value.code == grpc.StatusCode.PERMISSION_DENIED


def check(metadata: list[tuple[str, str]], *, peer: str | None = None, mtls: bool = False):
    return principals.refusal(
        principals.from_metadata(metadata),
        method=RUN,
        peer_identity=peer,
        mtls=mtls,
        asserters={"gateway", "agent"},
        scopes=TABLE,
    )


def test_scopes_are_checked_on_calls_from_the_edge_only() -> None:
    assert check(headers(tenant="acme", scope="tasks:run")) is None
    code, reason = check(headers(tenant="acme", scope="tasks:read")) or (None, "")
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert reason == "RunTask needs the scope 'tasks:run'; the token grants tasks:read"
    # A service doing the work carries the principal for tenancy; the caller table
    # authorized the hop.
    assert check(headers(tenant="acme", scope="", by="delegated")) is None
    # A method the table does not name is open to no token at all.
    closed = principals.refusal(
        principals.from_metadata(headers(tenant="acme", scope="tasks:run")),
        method="/agentplex.v1.AgentService/Unknown",
        peer_identity=None,
        mtls=False,
        asserters=(),
        scopes=TABLE,
    )
    assert closed == (
        grpc.StatusCode.PERMISSION_DENIED,
        "/agentplex.v1.AgentService/Unknown is not open to tokens",
    )


def test_with_mtls_only_the_asserting_identities_may_name_a_principal() -> None:
    allowed = headers(tenant="acme", scope="tasks:run")
    assert check(allowed, peer="gateway", mtls=True) is None
    assert check(allowed, peer="cli", mtls=True) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "identity 'cli' may not act for a principal",
    )
    assert check([], peer="cli", mtls=True) is None  # acting as itself is fine


def test_tenants_key_spaces_never_overlap() -> None:
    assert principals.tenant_prefix("ap", "default") == "ap"
    assert principals.tenant_prefix("ap", "acme") == "ap@acme"
    # "@" is in no tenant, agent, session or task name: no key of one tenant can be
    # spelled by another, whatever names either picks.
    assert "@" not in principals.TENANT_PATTERN.pattern


async def test_a_bound_principal_is_carried_on_and_ends_with_its_task() -> None:
    acme = Principal("acme", "ann", frozenset({"tasks:run"}))

    async def job() -> tuple[tuple[str, str], ...]:
        principals.bind(acme)
        assert principals.tenant_prefix("ap") == "ap@acme"
        return principals.outgoing_metadata()

    carried = await asyncio.create_task(job())
    assert dict(carried) == {
        principals.TENANT_HEADER: "acme",
        principals.SUBJECT_HEADER: "ann",
        principals.SCOPE_HEADER: "tasks:run",
        principals.PRINCIPAL_HEADER: principals.DELEGATED,
    }
    assert principals.current() is principals.MESH  # the job's binding stayed in the job


def test_audit_lines_go_to_their_own_file_as_json(tmp_path) -> None:
    import json
    import logging

    from agentplex.runtime import audit

    trail = tmp_path / "logs" / "audit.log"
    audit.write_to(trail, "registry")
    try:
        logging.getLogger("agentplex.other").warning("not an audit line")
        audit.record(
            "/agentplex.v1.ToolRegistryService/SetAgentTools",
            "agent=assistant",
            outcome=audit.DENIED,
            reason="needs tools:admin",
            principal=Principal("acme", "ann", frozenset({"tasks:run"})),
            peer="gateway",
        )
    finally:
        for handler in list(audit.log.handlers):
            audit.log.removeHandler(handler)
            handler.close()
    (line,) = trail.read_text().splitlines()
    entry = json.loads(line)
    assert entry["audit"] is True
    assert entry["service"] == "registry"
    assert (entry["outcome"], entry["tenant"], entry["subject"]) == ("denied", "acme", "ann")
    assert entry["resource"] == "agent=assistant"
    assert entry["scopes"] == "tasks:run"
    assert entry["peer_identity"] == "gateway"
