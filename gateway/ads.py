"""The Aggregated Discovery Service: ships snapshots to Envoy over one stream per Envoy.

State-of-the-world xDS, as Envoy's protocol describes it: each response
carries a version and a nonce; Envoy answers with an ACK (the version it
applied) or a NACK (the version it kept, plus an error). A NACKed version is
never re-sent — only a newer snapshot is — and until the control plane has
read the directory once it sends nothing at all, so a restarted control plane
never replaces Envoy's last good config with an empty one.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from envoy_data_plane.envoy.config.core.v3 import ControlPlane
from envoy_data_plane.envoy.service.discovery.v3 import (
    AggregatedDiscoveryServiceBase,
    DiscoveryRequest,
    DiscoveryResponse,
)

from agentplex.gateway.snapshot import ORDER, Snapshot, SnapshotCache

log = logging.getLogger(__name__)


@dataclass
class _Subscription:
    names: tuple[str, ...] = ()
    sent_version: str = ""
    sent_names: tuple[str, ...] | None = None
    nonce: str = ""
    acked_version: str = ""
    nacked_version: str = ""


@dataclass
class _Stream:
    """One Envoy's view: what it subscribed to and what it has been sent."""

    node: str = ""
    subscriptions: dict[str, _Subscription] = field(default_factory=dict)


class DiscoveryServer(AggregatedDiscoveryServiceBase):
    def __init__(self, cache: SnapshotCache, *, identifier: str = "agentplex-gateway") -> None:
        self._cache = cache
        self._identifier = identifier
        self._nonces = itertools.count(1)
        self.connected = 0
        # node id → type URL → last version Envoy acknowledged (for tests and /status).
        self.acked: dict[str, dict[str, str]] = {}

    async def stream_aggregated_resources(
        self, messages: AsyncIterator[DiscoveryRequest]
    ) -> AsyncIterator[DiscoveryResponse]:
        requests: asyncio.Queue[DiscoveryRequest | None] = asyncio.Queue()

        async def read() -> None:
            try:
                async for request in messages:
                    await requests.put(request)
            finally:
                await requests.put(None)

        reader = asyncio.create_task(read())
        stream = _Stream()
        self.connected += 1
        snapshot = self._cache.current
        # Both waits persist across turns, so nothing that arrives is dropped.
        next_request: asyncio.Future[DiscoveryRequest | None] | None = None
        next_snapshot: asyncio.Future[Snapshot] | None = None
        try:
            while True:
                if next_request is None:
                    next_request = asyncio.ensure_future(requests.get())
                if next_snapshot is None:
                    next_snapshot = asyncio.ensure_future(self._cache.wait_for_change(snapshot))
                either: set[asyncio.Future[Any]] = {next_request, next_snapshot}
                done, _ = await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
                if next_snapshot in done:
                    snapshot, next_snapshot = next_snapshot.result(), None
                if next_request in done:
                    request, next_request = next_request.result(), None
                    if request is None:
                        return
                    self._receive(stream, request)
                if snapshot is not None:
                    for response in self._responses(stream, snapshot):
                        yield response
        finally:
            self.connected -= 1
            for waiting in (next_request, next_snapshot, reader):
                if waiting is not None:
                    waiting.cancel()

    def _receive(self, stream: _Stream, request: DiscoveryRequest) -> None:
        if request.node is not None and request.node.id:
            stream.node = request.node.id
        subscription = stream.subscriptions.setdefault(request.type_url, _Subscription())
        if request.response_nonce and request.response_nonce != subscription.nonce:
            return  # answers a response that has since been superseded
        subscription.names = tuple(request.resource_names)
        if request.error_detail is not None and request.error_detail.code:
            subscription.nacked_version = subscription.sent_version
            log.error(
                "envoy rejected gateway config",
                extra={
                    "node": stream.node,
                    "type_url": request.type_url,
                    "version": subscription.sent_version,
                    "error": request.error_detail.message,
                },
            )
        elif request.response_nonce:
            subscription.acked_version = request.version_info
            self.acked.setdefault(stream.node, {})[request.type_url] = request.version_info

    def _responses(self, stream: _Stream, snapshot: Snapshot) -> list[DiscoveryResponse]:
        responses = []
        for type_url in ORDER:
            subscription = stream.subscriptions.get(type_url)
            if subscription is None:
                continue
            version = snapshot.version(type_url)
            unchanged = (
                subscription.sent_version == version
                and subscription.sent_names == subscription.names
            )
            # A rejected version is not offered again, unless Envoy now asks for other names.
            rejected = (
                version == subscription.nacked_version
                and subscription.sent_names == subscription.names
            )
            if unchanged or rejected:
                continue
            subscription.sent_version = version
            subscription.sent_names = subscription.names
            subscription.nonce = str(next(self._nonces))
            responses.append(
                DiscoveryResponse(
                    version_info=version,
                    type_url=type_url,
                    resources=snapshot.resources(type_url, subscription.names),
                    nonce=subscription.nonce,
                    control_plane=ControlPlane(identifier=self._identifier),
                )
            )
        return responses
