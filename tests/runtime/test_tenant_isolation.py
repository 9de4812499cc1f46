"""Tenants never meet: the cross-tenant matrix over every store, on real servers.

Memory, the registry, the tool backend, both agents and their workers run
in-process on loopback; each call states its principal as the gateway would
after verifying a token (`x-agentplex-principal: edge`). Each service enforces
the tenancy itself: nothing here goes through the gateway.
"""

from __future__ import annotations

import asyncio
import json
import logging

import grpc
import pytest

from agentplex.contract import scopes
from agentplex.runtime import principal as principals
from agentplex.v1 import (
    agent_service_pb2,
    agent_service_pb2_grpc,
    memory_pb2,
    memory_service_pb2,
    memory_service_pb2_grpc,
    task_pb2,
    tool_pb2,
    tool_registry_service_pb2,
    tool_registry_service_pb2_grpc,
)

WORKING = (
    *scopes.DEFAULT_SCOPES,
    scopes.TOOLS_INVOKE,
    scopes.MEMORY_READ,
    scopes.MEMORY_ADMIN,
)


def token_of(tenant: str, granted: tuple[str, ...] = WORKING) -> tuple[tuple[str, str], ...]:
    """The headers the edge stamps for a verified token of `tenant`."""
    return (
        (principals.TENANT_HEADER, tenant),
        (principals.SUBJECT_HEADER, f"user@{tenant}"),
        (principals.SCOPE_HEADER, " ".join(granted)),
        (principals.PRINCIPAL_HEADER, principals.EDGE),
    )


ACME = token_of("acme")
GLOBEX = token_of("globex")


@pytest.fixture
async def stubs(mesh, channel_to, workers):
    class Stubs:
        agent = agent_service_pb2_grpc.AgentServiceStub(channel_to(mesh.agents["assistant"]))
        memory = memory_service_pb2_grpc.MemoryServiceStub(channel_to(mesh.memory))
        registry = tool_registry_service_pb2_grpc.ToolRegistryServiceStub(channel_to(mesh.registry))

    return Stubs


async def finished(stubs, task_id: str, who, eventually) -> task_pb2.Task:
    seen: list[task_pb2.Task] = []

    async def ended() -> bool:
        reply = await stubs.agent.GetTask(
            agent_service_pb2.GetTaskRequest(task_id=task_id), metadata=who, timeout=5
        )
        seen.append(reply.task)
        return reply.task.status >= task_pb2.TASK_STATUS_COMPLETED

    await eventually(ended, timeout=30, message=f"task {task_id} ending")
    return seen[-1]


async def submit(stubs, who, prompt: str, task_id: str, session: str = "victim"):
    return await stubs.agent.SubmitTask(
        agent_service_pb2.SubmitTaskRequest(
            task=task_pb2.TaskSpec(prompt=prompt, session_id=session, task_id=task_id)
        ),
        metadata=who,
        timeout=10,
    )


async def expect(code: grpc.StatusCode, call) -> str:
    """The refusal's message, once its code is the one expected."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == code, caught.value.details()
    return caught.value.details() or ""


async def notes_of(stubs, who, session: str = "victim") -> str:
    reply = await stubs.registry.InvokeTool(
        tool_registry_service_pb2.InvokeToolRequest(
            tool_name="notes.read",
            arguments_json="{}",
            caller=tool_registry_service_pb2.Caller(agent="assistant", session_id=session),
        ),
        metadata=who,
        timeout=10,
    )
    assert not reply.HasField("error"), reply.error
    return reply.result_json


async def test_another_tenant_finds_nothing_of_a_tenant_s_task_session_notes_or_keys(
    stubs, eventually
) -> None:
    # acme keeps a secret in session "victim" through a durable task with its own id.
    submitted = await submit(stubs, ACME, "remember that my door code is 4512", "shared-id")
    task = await finished(stubs, submitted.task.task_id, ACME, eventually)
    assert task.status == task_pb2.TASK_STATUS_COMPLETED, task.result.error
    assert task.task_id == "shared-id"
    assert (task.principal.tenant, task.principal.subject) == ("acme", "user@acme")

    # Its events say whom it ran for; acme can read them...
    own = stubs.agent.WatchTask(
        agent_service_pb2.WatchTaskRequest(task_id="shared-id"), metadata=ACME, timeout=10
    )
    accepted = (await own.read()).event.task_accepted
    assert (accepted.principal.tenant, accepted.principal.subject) == ("acme", "user@acme")
    own.cancel()

    # ...but globex cannot read, watch or cancel acme's task.
    by_id = agent_service_pb2.GetTaskRequest(task_id="shared-id")
    missing = await expect(grpc.StatusCode.NOT_FOUND, stubs.agent.GetTask(by_id, metadata=GLOBEX))
    unknown = await expect(
        grpc.StatusCode.NOT_FOUND,
        stubs.agent.GetTask(agent_service_pb2.GetTaskRequest(task_id="never"), metadata=GLOBEX),
    )
    # The same answer as for an id nobody used: no existence leak.
    assert missing.replace("shared-id", "never") == unknown
    # Nor can a record id (`tenant/id`) be named, by the mesh's own callers either.
    for who in (GLOBEX, ()):
        smuggled = agent_service_pb2.GetTaskRequest(task_id="acme/shared-id")
        await expect(grpc.StatusCode.INVALID_ARGUMENT, stubs.agent.GetTask(smuggled, metadata=who))
        await expect(
            grpc.StatusCode.INVALID_ARGUMENT,
            stubs.agent.CancelTask(
                agent_service_pb2.CancelTaskRequest(task_id="acme/shared-id"), metadata=who
            ),
        )
    # And no token may act in the mesh's own tenant, where the operator's tasks live.
    await expect(
        grpc.StatusCode.PERMISSION_DENIED, stubs.agent.GetTask(by_id, metadata=token_of("default"))
    )
    watch = stubs.agent.WatchTask(
        agent_service_pb2.WatchTaskRequest(task_id="shared-id"), metadata=GLOBEX
    )
    await expect(grpc.StatusCode.NOT_FOUND, watch.read())
    await expect(
        grpc.StatusCode.NOT_FOUND,
        stubs.agent.CancelTask(
            agent_service_pb2.CancelTaskRequest(task_id="shared-id"), metadata=GLOBEX
        ),
    )

    # The task id is an idempotency key: globex reusing it gets a task of its own,
    # neither a replay of acme's nor a conflict that would say the id is taken.
    theirs = await submit(stubs, GLOBEX, "what did I ask you to remember?", "shared-id")
    assert theirs.created
    globex_task = await finished(stubs, "shared-id", GLOBEX, eventually)
    assert globex_task.status == task_pb2.TASK_STATUS_COMPLETED
    assert "4512" not in globex_task.result.output
    assert "not asked me to remember anything" in globex_task.result.output
    again = await submit(stubs, ACME, "remember that my door code is 4512", "shared-id")
    assert not again.created  # acme's own replay still finds acme's task

    # Notes: the same session name, a different tenant, nothing to read.
    assert "4512" in await notes_of(stubs, ACME)
    assert "4512" not in await notes_of(stubs, GLOBEX)

    # Memory, at the Memory service itself.
    scope = memory_pb2.SessionScope(agent="assistant", session_id="victim")
    read = memory_service_pb2.ReadMessagesRequest(scope=scope, max_messages=100)
    ours = await stubs.memory.ReadMessages(read, metadata=ACME)
    assert any("4512" in message.content for message in ours.messages)
    theirs_read = await stubs.memory.ReadMessages(read, metadata=GLOBEX)
    assert all("4512" not in message.content for message in theirs_read.messages)
    loaded = await stubs.memory.LoadContext(
        memory_service_pb2.LoadContextRequest(scope=scope), metadata=GLOBEX
    )
    assert all("4512" not in message.content for message in loaded.messages)
    cleared = await stubs.memory.ClearSession(
        memory_service_pb2.ClearSessionRequest(scope=scope), metadata=token_of("initech")
    )
    assert not cleared.existed  # initech's "victim" never held anything...
    after = await stubs.memory.ReadMessages(read, metadata=ACME)
    assert len(after.messages) == len(ours.messages)  # ...and acme's is untouched

    # Tool idempotency keys: the same key in another tenant runs anew, never replays.
    def write(text: str) -> tool_registry_service_pb2.InvokeToolRequest:
        return tool_registry_service_pb2.InvokeToolRequest(
            tool_name="notes.write",
            arguments_json=json.dumps({"text": text}),
            caller=tool_registry_service_pb2.Caller(agent="assistant", session_id="keys"),
            idempotency_key="same-key",
        )

    first = await stubs.registry.InvokeTool(write("acme's"), metadata=ACME)
    second = await stubs.registry.InvokeTool(write("globex's"), metadata=GLOBEX)
    assert not first.replayed and not second.replayed
    assert "globex's" in await notes_of(stubs, GLOBEX, "keys")
    assert "globex's" not in await notes_of(stubs, ACME, "keys")
    replay = await stubs.registry.InvokeTool(write("acme's"), metadata=ACME)
    assert replay.replayed


async def test_two_tenants_working_at_once_never_read_each_other(stubs, eventually) -> None:
    tenants = {f"tenant-{n}": token_of(f"tenant-{n}") for n in range(3)}
    sessions = ("alpha", "beta")

    async def keep(tenant: str, session: str) -> None:
        who = tenants[tenant]
        task_id = f"keep-{session}"
        await submit(
            stubs, who, f"remember that the code of {tenant} is {session}", task_id, session
        )
        done = await finished(stubs, task_id, who, eventually)
        assert done.status == task_pb2.TASK_STATUS_COMPLETED, done.result.error

    await asyncio.gather(*(keep(tenant, session) for tenant in tenants for session in sessions))

    async def recall(tenant: str, session: str) -> tuple[str, str, str]:
        who = tenants[tenant]
        await submit(stubs, who, "what did I ask you to remember?", f"recall-{session}", session)
        done = await finished(stubs, f"recall-{session}", who, eventually)
        return tenant, session, done.result.output

    answers = await asyncio.gather(
        *(recall(tenant, session) for tenant in tenants for session in sessions)
    )
    for tenant, session, output in answers:
        assert f"the code of {tenant} is {session}" in output
        for other in tenants:
            if other != tenant:
                assert other not in output, (tenant, session, output)


async def test_scopes_guard_each_function_and_admin_calls_need_admin_scopes(stubs, caplog) -> None:
    ordinary = token_of("acme", scopes.DEFAULT_SCOPES)
    admin = token_of("acme", (*scopes.DEFAULT_SCOPES, *scopes.ADMIN_SCOPES))
    caplog.set_level(logging.INFO, logger="agentplex.audit")

    set_tools = tool_registry_service_pb2.SetAgentToolsRequest(agent="assistant")
    refused = await expect(
        grpc.StatusCode.PERMISSION_DENIED,
        stubs.registry.SetAgentTools(set_tools, metadata=ordinary),
    )
    assert "needs the scope 'tools:admin'" in refused
    state = tool_registry_service_pb2.SetToolStateRequest(
        name="calculator", version="1.0.0", state=tool_pb2.TOOL_STATE_DEPRECATED
    )
    await expect(
        grpc.StatusCode.PERMISSION_DENIED, stubs.registry.SetToolState(state, metadata=ordinary)
    )
    register = tool_registry_service_pb2.RegisterToolRequest(
        tool=tool_pb2.ToolDefinition(name="evil", version="1.0.0")
    )
    await expect(
        grpc.StatusCode.PERMISSION_DENIED, stubs.registry.RegisterTool(register, metadata=ordinary)
    )
    scope = memory_pb2.SessionScope(agent="assistant", session_id="victim")
    await expect(
        grpc.StatusCode.PERMISSION_DENIED,
        stubs.memory.ClearSession(
            memory_service_pb2.ClearSessionRequest(scope=scope), metadata=ordinary
        ),
    )
    await expect(
        grpc.StatusCode.PERMISSION_DENIED,
        stubs.memory.ReadMessages(
            memory_service_pb2.ReadMessagesRequest(scope=scope, max_messages=1), metadata=ordinary
        ),
    )
    invoke = tool_registry_service_pb2.InvokeToolRequest(
        tool_name="notes.read",
        arguments_json="{}",
        caller=tool_registry_service_pb2.Caller(agent="assistant", session_id="victim"),
    )
    await expect(
        grpc.StatusCode.PERMISSION_DENIED, stubs.registry.InvokeTool(invoke, metadata=ordinary)
    )
    read_only = token_of("acme", (scopes.TASKS_READ,))
    await expect(
        grpc.StatusCode.PERMISSION_DENIED,
        stubs.agent.SubmitTask(
            agent_service_pb2.SubmitTaskRequest(task=task_pb2.TaskSpec(prompt="hi")),
            metadata=read_only,
        ),
    )
    await expect(
        grpc.StatusCode.PERMISSION_DENIED,
        stubs.agent.CancelTask(
            agent_service_pb2.CancelTaskRequest(task_id="x"), metadata=read_only
        ),
    )

    # What the ordinary token may do, it may; an admin token administers.
    listed = await stubs.registry.ListTools(
        tool_registry_service_pb2.ListToolsRequest(), metadata=ordinary
    )
    assert listed.tools
    unchanged = tool_registry_service_pb2.SetAgentToolsRequest(
        agent="assistant", only_if_unset=True
    )
    await stubs.registry.SetAgentTools(unchanged, metadata=admin)

    # Every refusal and every administrative call is one audit line.
    lines = [record for record in caplog.records if record.name == "agentplex.audit"]
    denied = [line for line in lines if line.outcome == "denied"]
    assert len(denied) == 8
    assert {line.tenant for line in denied} == {"acme"}
    assert any(
        line.action.endswith("/SetAgentTools") and "tools:admin" in line.reason for line in denied
    )
    allowed = [line for line in lines if line.outcome == "allowed"]
    assert [line.resource for line in allowed] == ["agent=assistant"]
    assert all(line.subject == "user@acme" for line in allowed)


async def test_a_token_without_a_usable_tenant_is_unauthenticated(stubs) -> None:
    run = agent_service_pb2.GetTaskRequest(task_id="x")
    no_tenant = tuple(pair for pair in ACME if pair[0] != principals.TENANT_HEADER)
    err = await expect(
        grpc.StatusCode.UNAUTHENTICATED, stubs.agent.GetTask(run, metadata=no_tenant)
    )
    assert "needs a 'tenant' claim" in err
    bad = ((principals.TENANT_HEADER, "../etc"), (principals.PRINCIPAL_HEADER, principals.EDGE))
    err = await expect(grpc.StatusCode.UNAUTHENTICATED, stubs.agent.GetTask(run, metadata=bad))
    assert "is not a tenant name" in err
    # A marker alone (a token with no claims at all) is no way around it either.
    marker = ((principals.PRINCIPAL_HEADER, principals.EDGE),)
    await expect(grpc.StatusCode.UNAUTHENTICATED, stubs.agent.GetTask(run, metadata=marker))
