"""`ToolRegistry`: the contract authority — versions, compatibility, access,
validated and deduplicated invocation.

Plain class, no gRPC: the servicer adapts it, tests drive it directly.
"""

from __future__ import annotations

import asyncio
import builtins
import json
import logging
from collections.abc import Iterable
from typing import Any

from opentelemetry import trace

from agentplex.contract import agent_tool, argument_policy, lineage
from agentplex.contract.reasons import Reason, ToolErrorCode
from agentplex.registry import compat, schemas
from agentplex.registry.backends import BackendRouter, Invocation, Progress
from agentplex.registry.ledger import Claim, IdempotencyLedger, fingerprint
from agentplex.registry.store import Grant, RegistryStore
from agentplex.runtime.clients import Deadline
from agentplex.runtime.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from agentplex.v1 import tool_pb2
from agentplex.v1 import tool_registry_service_pb2 as pb

log = logging.getLogger(__name__)
tracer = trace.get_tracer("agentplex.registry")

# A call of these must carry an idempotency key, so a retry cannot repeat its effect.
NEEDS_KEY = (tool_pb2.SIDE_EFFECT_SIDE_EFFECTING, tool_pb2.SIDE_EFFECT_UNSPECIFIED)
ACTIVE = tool_pb2.TOOL_STATE_ACTIVE
DEPRECATED = tool_pb2.TOOL_STATE_DEPRECATED
RETIRED = tool_pb2.TOOL_STATE_RETIRED


def contract(tool: tool_pb2.ToolDefinition) -> bytes:
    """The parts of a definition that callers depend on (not endpoint or state)."""
    core = tool_pb2.ToolDefinition(
        name=tool.name,
        version=tool.version,
        description=tool.description,
        input_schema_json=json.dumps(json.loads(tool.input_schema_json), sort_keys=True),
        output_schema_json=json.dumps(json.loads(tool.output_schema_json), sort_keys=True),
        side_effect=tool.side_effect,
        argument_policies=tool.argument_policies,
        requires_approval=tool.requires_approval,
    )
    return core.SerializeToString(deterministic=True)


def outcome_unknown(tool: tool_pb2.ToolDefinition) -> pb.InvokeToolResponse:
    """What a key remembers when a side-effecting call ended without an answer."""
    return pb.InvokeToolResponse(
        tool_name=tool.name,
        tool_version=tool.version,
        error=tool_pb2.ToolError(
            code=ToolErrorCode.OUTCOME_UNKNOWN,
            message=f"{tool.name} was interrupted and may or may not have taken effect; it "
            "will not run again under this idempotency key",
        ),
    )


def major(tool: tool_pb2.ToolDefinition) -> int:
    return schemas.semver(tool.version)[0]


def resolve(
    name: str,
    versions: list[tool_pb2.ToolDefinition],
    version: str,
    *,
    include_retired: bool = False,
) -> tool_pb2.ToolDefinition:
    """Pick the version a spec asks for from all versions of a tool (no I/O)."""
    if not versions:
        raise NotFound(f"tool {name!r} is not registered", reason=Reason.TOOL_NOT_FOUND)
    if version.isdigit():
        matching = [v for v in versions if major(v) == int(version)]
    elif version:
        schemas.semver(version)
        matching = [v for v in versions if v.version == version]
    else:
        matching = versions
    usable = matching if include_retired else [v for v in matching if v.state != RETIRED]
    if usable:
        return usable[-1]
    wanted = f"{name}@{version}" if version else name
    if matching:
        retired = matching[-1]
        raise NotFound(
            f"{wanted} ({retired.version}) is retired; use {retired.replacement}",
            reason=Reason.TOOL_RETIRED,
        )
    raise NotFound(f"no version of {name!r} matches {version!r}", reason=Reason.TOOL_NOT_FOUND)


class ToolRegistry:
    def __init__(
        self,
        *,
        store: RegistryStore,
        ledger: IdempotencyLedger,
        router: BackendRouter,
        max_delegation_depth: int = 3,
        resolver: argument_policy.Resolver = argument_policy.system_resolver,
    ) -> None:
        self._store = store
        self._ledger = ledger
        self._router = router
        self._max_depth = max_delegation_depth
        # How argument policies resolve host names (tests answer without DNS).
        self._resolver = resolver

    # --- contracts -------------------------------------------------------------------

    async def register(self, tool: tool_pb2.ToolDefinition) -> bool:
        """Publish a version; False when that exact contract was already published."""
        schemas.check_definition(tool)
        versions = await self._store.versions(tool.name)
        for existing in versions:
            if existing.version != tool.version:
                continue
            if contract(existing) != contract(tool):
                raise FailedPrecondition(
                    f"{tool.name} {tool.version} is already published with a different "
                    "contract; versions are immutable, publish a new version",
                    reason=Reason.VERSION_EXISTS,
                )
            if tool.endpoint:
                # The same contract served from one more place: another backend
                # (or a restarted one). It joins the others; none is replaced.
                await self._store.add_endpoint(tool.name, tool.version, tool.endpoint)
            return False
        same_major = [v for v in versions if major(v) == major(tool)]
        if same_major:
            latest = same_major[-1]
            if schemas.semver(tool.version) < schemas.semver(latest.version):
                raise FailedPrecondition(
                    f"{tool.name} {tool.version} is older than the published {latest.version}; "
                    "a new version must be the newest of its major",
                    reason=Reason.VERSION_NOT_NEWER,
                )
            breaks = compat.input_breaks(
                json.loads(latest.input_schema_json), json.loads(tool.input_schema_json)
            )
            breaks += [
                f"output {b}"
                for b in compat.output_breaks(
                    json.loads(latest.output_schema_json), json.loads(tool.output_schema_json)
                )
            ]
            if latest.side_effect != tool.side_effect:
                breaks.append("side effect class changed")
            if breaks:
                raise FailedPrecondition(
                    f"{tool.name} {tool.version} would break callers of {latest.version}: "
                    + "; ".join(breaks)
                    + f". Publish it as {major(tool) + 1}.0.0 instead.",
                    reason=Reason.BREAKING_CHANGE,
                )
        published = tool_pb2.ToolDefinition()
        published.CopyFrom(tool)
        published.state, published.replacement = ACTIVE, ""
        if not published.backend_kind:
            published.backend_kind = tool_pb2.BACKEND_KIND_EXECUTOR
        if not await self._store.add_version(published):
            # Someone published this version between our read and our write:
            # decide again against what is there now.
            return await self.register(tool)
        if tool.endpoint:
            await self._store.add_endpoint(tool.name, tool.version, tool.endpoint)
        log.info("published tool", extra={"tool": tool.name, "version": tool.version})
        return True

    async def withdraw_endpoint(self, name: str, version: str, endpoint: str) -> int:
        tool = await self.get(name, version, include_retired=True)
        if tool.version != version:
            raise InvalidArgument(f"version must be exact (e.g. {tool.version}), got {version!r}")
        return await self._store.remove_endpoint(name, version, endpoint)

    async def with_endpoints(self, tool: tool_pb2.ToolDefinition) -> tool_pb2.ToolDefinition:
        tool.endpoints[:] = await self._store.endpoints(tool.name, tool.version)
        return tool

    async def set_state(
        self, name: str, version: str, state: tool_pb2.ToolState, replacement: str
    ) -> tool_pb2.ToolDefinition:
        if state not in (ACTIVE, DEPRECATED, RETIRED):
            raise InvalidArgument("state must be ACTIVE, DEPRECATED or RETIRED")
        if state != ACTIVE and not replacement:
            raise InvalidArgument("deprecating or retiring needs a replacement, e.g. 'name@2'")
        tool = await self.get(name, version, include_retired=True)
        if tool.version != version:
            raise InvalidArgument(f"version must be exact (e.g. {tool.version}), got {version!r}")
        tool.state, tool.replacement = state, replacement if state != ACTIVE else ""
        await self._store.put_version(tool)
        return tool

    # --- discovery -------------------------------------------------------------------

    async def get(
        self, name: str, version: str = "", *, include_retired: bool = False
    ) -> tool_pb2.ToolDefinition:
        """Resolve '' (newest), '2' (newest 2.x) or '2.1.0' (exact) to one version."""
        schemas.check_version_spec(version)
        return resolve(
            name, await self._store.versions(name), version, include_retired=include_retired
        )

    async def list_with_revision(
        self, agent: str = "", *, all_versions: bool = False
    ) -> tuple[list[tool_pb2.ToolDefinition], int]:
        """The list and the revision it is at (read first, so never newer than the list)."""
        revision = await self._store.revision()
        return await self.list(agent, all_versions=all_versions), revision

    async def list(
        self, agent: str = "", *, all_versions: bool = False
    ) -> list[tool_pb2.ToolDefinition]:
        if agent:
            grants = await self._grants(agent)
            by_name = await self._store.versions_of([grant.name for grant in grants])
            return [
                tool
                for grant in grants
                if (tool := _resolve_quietly(grant, by_name[grant.name])) is not None
            ]
        tools: list[tool_pb2.ToolDefinition] = []
        names = await self._store.names()
        by_name = await self._store.versions_of(names)
        for name in names:
            versions = by_name[name]
            if all_versions:
                tools.extend(versions)
            else:
                live = [v for v in versions if v.state != RETIRED]
                tools.extend(live[-1:])
        return tools

    # Below `list` (the method), annotations name the builtin as `builtins.list`.
    async def _grants(self, agent: str) -> builtins.list[Grant]:
        grants = await self._store.grants(agent)
        if grants is None:
            raise NotFound(
                f"agent {agent!r} is not known to the registry", reason=Reason.AGENT_NOT_FOUND
            )
        return grants

    async def set_agent_tools(
        self, agent: str, grants: Iterable[Grant], *, only_if_unset: bool = False
    ) -> tuple[builtins.list[Grant], bool]:
        """Store an agent's access list; (the list now stored, whether it is this one).

        `only_if_unset` is how an agent publishes its own default list when it
        starts: it replaces an earlier default (the agent's spec changed) but never
        a list an operator set, which is kept across the agent's restarts."""
        grants = list(grants)
        for grant in grants:
            if not schemas.TOOL_NAME_PATTERN.fullmatch(grant.name):
                raise InvalidArgument(f"{grant.name!r} is not a tool name")
        names = [grant.name for grant in grants]
        if len(set(names)) != len(names):
            raise InvalidArgument("each tool may be granted once, at one major version")
        if await self._store.set_grants(agent, grants, as_default=only_if_unset):
            return grants, True
        return await self._grants(agent), False

    # --- invocation ------------------------------------------------------------------

    async def invoke(
        self,
        request: pb.InvokeToolRequest,
        deadline: Deadline,
        *,
        progress: Progress | None = None,
    ) -> pb.InvokeToolResponse:
        """Check, validate and run one invocation; `progress` receives what a
        streamed invocation relays (an agent tool's sub-task and its events).

        authorize → resolve → approval → validate → policies → claim → dispatch:
        every refusal comes before the ledger, so a refused call leaves nothing behind.
        """
        with tracer.start_as_current_span("registry.invoke") as span:
            span.set_attribute("tool.name", request.tool_name)
            schemas.check_version_spec(request.version)
            grants, versions, revision = await self._store.grants_and_versions(
                request.caller.agent, request.tool_name
            )
            version = authorize(request, grants)
            tool = resolve(request.tool_name, versions, version)
            span.set_attribute("tool.version", tool.version)
            require_no_approval(tool)
            arguments = self._validate(request, tool)
            await self._check_policies(tool, arguments)
            invocation = Invocation(
                tool=tool,
                arguments=arguments,
                caller=request.caller,
                deadline=deadline,
                idempotency_key=request.idempotency_key,
                token_budget=request.token_budget,
                progress=progress,
            )
            return _at(revision, await self._claim(invocation))

    def _validate(
        self, request: pb.InvokeToolRequest, tool: tool_pb2.ToolDefinition
    ) -> dict[str, Any]:
        """The arguments, parsed and checked against the version's input schema; and
        what must hold before the ledger: a delegation within depth and without a
        cycle, a key for a call that must not run twice."""
        arguments = schemas.parse_arguments(request.arguments_json)
        violation = schemas.schema_violation(tool.input_schema_json, arguments)
        if violation:
            raise InvalidArgument(
                f"arguments for {tool.name} {tool.version} do not match its input schema: "
                f"{violation}"
            )
        if tool.backend_kind == tool_pb2.BACKEND_KIND_AGENT:
            lineage.check_delegation(
                caller_agent=request.caller.agent,
                caller=request.caller.lineage,
                target=agent_tool.agent_of_tool(tool.name),
                max_depth=self._max_depth,
            )
        if tool.side_effect in NEEDS_KEY and not request.idempotency_key:
            raise InvalidArgument(
                f"{tool.name} has side effects: invoke it with an idempotency_key, so a "
                "retry cannot repeat them",
                reason=Reason.IDEMPOTENCY_KEY_REQUIRED,
            )
        return arguments

    async def _check_policies(
        self, tool: tool_pb2.ToolDefinition, arguments: dict[str, Any]
    ) -> None:
        """The contract's argument policies: a call naming a host that is not public,
        or a path leaving the tool's root, is refused like schema-invalid arguments."""
        if not tool.argument_policies:
            return
        try:
            await argument_policy.check(tool, arguments, resolver=self._resolver)
        except argument_policy.PolicyDenied as exc:
            trace.get_current_span().set_attribute("tool.policy_denied", True)
            raise InvalidArgument(exc.message, reason=Reason.POLICY_DENIED) from None

    async def _claim(self, invocation: Invocation) -> pb.InvokeToolResponse:
        """Dispatch at most once per idempotency key: a repeat gets the stored response.

        A call that ends without an answer gives its key back when the tool is
        safe to repeat; otherwise the key remembers OUTCOME_UNKNOWN, since it may
        have happened and at most once means never running it again. An answer
        that is not the tool's (see `_leaves_key_free`) gives the key back too:
        stored, it would be replayed to the very retry meant to get the answer.
        A claim this process cannot settle (it is killed mid-call, or its Redis
        fails as the answer is stored) is settled by the next call for the key
        once the claim's hold runs out, by the same rule: run again if the call
        may be (`_may_run_again`), else OUTCOME_UNKNOWN.
        """
        key = invocation.idempotency_key
        if not key:
            return await self._dispatch(invocation)
        tool = invocation.tool
        # The tool, not its version: a retry after a compatible release is a replay.
        fp = fingerprint(tool.name, invocation.arguments)
        claim = await self._ledger.claim(
            invocation.caller,
            key,
            fp,
            invocation.deadline,
            rerun=_may_run_again(invocation),
            abandoned=outcome_unknown(tool),
        )
        if claim.replay is not None:
            trace.get_current_span().set_attribute("tool.replayed", True)
            return claim.replay
        try:
            response = await self._dispatch(invocation)
        except BaseException:
            await asyncio.shield(self._abandon(claim, fp, invocation))
            raise
        if _leaves_key_free(invocation, response):
            await self._ledger.release(claim)  # the retry runs it again
        else:
            await self._ledger.complete(claim, fp, response)
        return response

    async def _abandon(self, claim: Claim, fp: str, invocation: Invocation) -> None:
        """Settle the claim of a call that ended without an answer."""
        if invocation.safe_to_repeat:
            await self._ledger.release(claim)
        else:
            await self._ledger.complete(claim, fp, outcome_unknown(invocation.tool))

    async def _dispatch(self, invocation: Invocation) -> pb.InvokeToolResponse:
        """Run it on a backend of its version and check the result against the output schema."""
        tool = invocation.tool
        response = pb.InvokeToolResponse(tool_name=tool.name, tool_version=tool.version)
        if tool.state == DEPRECATED:
            response.warning = (
                f"{tool.name} {tool.version} is deprecated; move to {tool.replacement}"
            )
        endpoints = await self._store.endpoints(tool.name, tool.version)
        executed = await self._router.execute(invocation, endpoints)
        if executed.HasField("error"):
            response.error.CopyFrom(executed.error)
            return response
        result, violation = checked_result(tool, executed.result_json)
        if violation:
            log.error("%s returned a result outside its output schema: %s", tool.name, violation)
            response.error.CopyFrom(
                tool_pb2.ToolError(
                    code=ToolErrorCode.INVALID_RESULT,
                    message=f"{tool.name} returned a result outside its output schema: {violation}",
                )
            )
            return response
        response.result_json = json.dumps(result, sort_keys=True)
        return response


def authorize(request: pb.InvokeToolRequest, grants: list[Grant] | None) -> str:
    """Check the calling agent's grant and major pin; the version spec to resolve
    (the pinned major when the call named none). An operator (no agent) may call
    any tool."""
    agent, name, version = request.caller.agent, request.tool_name, request.version
    if not agent:
        return version
    grant = next((g for g in grants or () if g.name == name), None)
    if grant is None:
        raise PermissionDenied(
            f"agent {agent!r} may not use tool {name!r}", reason=Reason.TOOL_NOT_ALLOWED
        )
    if not version and grant.major:
        return str(grant.major)
    if version and grant.major and int(version.split(".")[0]) != grant.major:
        raise PermissionDenied(
            f"agent {agent!r} is pinned to {name}@{grant.major}",
            reason=Reason.TOOL_VERSION_NOT_ALLOWED,
        )
    return version


def require_no_approval(tool: tool_pb2.ToolDefinition) -> None:
    """Refuse a tool that needs a person's approval: no call can get one yet."""
    if tool.requires_approval:
        raise PermissionDenied(
            f"calling {tool.name} needs a person's approval, and this task runs "
            "unattended; approvals are not available yet",
            reason=Reason.APPROVAL_REQUIRED,
        )


def checked_result(tool: tool_pb2.ToolDefinition, result_json: str) -> tuple[object, str | None]:
    """A backend's result, parsed, and why it breaks the output schema (None: it does not)."""
    try:
        result = json.loads(result_json)
    except json.JSONDecodeError:
        result = None
    if not isinstance(result, dict):
        return result, "the result is not a JSON object"
    return result, schemas.schema_violation(tool.output_schema_json, result)


# Failures after which no call ran (or none that a repeat under the key would
# duplicate): whatever the tool's side effect class, there is nothing to remember.
NOTHING_RAN = frozenset({ToolErrorCode.MESH_UNAVAILABLE, ToolErrorCode.CIRCUIT_OPEN})
# Failures that say nothing of the tool's result: the call may have run, but a
# tool safe to repeat is simply run again rather than told of an old failure.
NO_RESULT = frozenset({ToolErrorCode.TIMEOUT, ToolErrorCode.UNAVAILABLE})


def _leaves_key_free(invocation: Invocation, response: pb.InvokeToolResponse) -> bool:
    """Whether the response is no outcome to replay for 24 h: nothing ran, or a tool
    safe to repeat gave no result. A side-effecting call that may have run keeps
    its outcome (OUTCOME_UNKNOWN, TIMEOUT): at most once means not running it again."""
    if not response.HasField("error"):
        return False
    code = response.error.code
    return code in NOTHING_RAN or (invocation.safe_to_repeat and code in NO_RESULT)


def _may_run_again(invocation: Invocation) -> bool:
    """Whether a call whose claim was abandoned (its registry gone mid-call) may run
    again under its key: a tool safe to repeat, or a delegation, whose sub-task id
    comes from the key, so running it again re-attaches to the sub-task it may
    have started. Any other may have taken effect: it is OUTCOME_UNKNOWN."""
    return invocation.safe_to_repeat or invocation.tool.backend_kind == tool_pb2.BACKEND_KIND_AGENT


def _resolve_quietly(
    grant: Grant, versions: list[tool_pb2.ToolDefinition]
) -> tool_pb2.ToolDefinition | None:
    try:
        return resolve(grant.name, versions, str(grant.major) if grant.major else "")
    except NotFound:
        return None  # granted but not (or no longer) published: the model is not shown it


def _at(revision: int, response: pb.InvokeToolResponse) -> pb.InvokeToolResponse:
    response.registry_revision = revision
    return response
