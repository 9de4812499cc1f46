"""The ADS state machine, driven the way Envoy drives it: a stream of DiscoveryRequests.

Each test feeds requests through a queue-backed async generator and reads the
server's responses one at a time. "Nothing was sent" is asserted once the
server has handled every request sent so far (it counts them): handling a
request and queueing its responses happen in one step of the event loop, so
an empty response queue then means no response — never sleep-and-hope.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest
from envoy_data_plane.envoy.config.cluster.v3 import Cluster
from envoy_data_plane.envoy.config.core.v3 import Node
from envoy_data_plane.envoy.config.endpoint.v3 import ClusterLoadAssignment
from envoy_data_plane.envoy.config.listener.v3 import Listener
from envoy_data_plane.envoy.config.route.v3 import RouteConfiguration
from envoy_data_plane.envoy.service.discovery.v3 import DiscoveryRequest, DiscoveryResponse
from envoy_data_plane.google.rpc import Status

from agentplex.gateway import resources
from agentplex.gateway.ads import DiscoveryServer
from agentplex.gateway.resources import Directory, GatewayOptions, HostPort
from agentplex.gateway.snapshot import (
    CLUSTER,
    ENDPOINT,
    LISTENER,
    ORDER,
    ROUTE,
    Snapshot,
    SnapshotCache,
)


def snapshot_for(*agents: str, replicas: int = 1, listen_port: int = 8080) -> Snapshot:
    directory = Directory(
        agents={
            name: tuple(HostPort("127.0.0.1", 7000 + 10 * i + r) for r in range(replicas))
            for i, name in enumerate(agents)
        },
        registry=(HostPort("127.0.0.1", 6000),),
    )
    return Snapshot.of(resources.build(directory, GatewayOptions(listen_port=listen_port)))


class CountingServer(DiscoveryServer):
    """The real server, counting the requests it has handled."""

    def __init__(self, cache: SnapshotCache) -> None:
        super().__init__(cache, identifier="test-cp")
        self.sent = 0
        self.handled = 0
        self.considered: Snapshot | None = None
        self._progress = asyncio.Event()

    def _receive(self, stream, request):
        super()._receive(stream, request)
        self.handled += 1
        self._progress.set()

    def _responses(self, stream, snapshot):
        self.considered = snapshot
        self._progress.set()
        return super()._responses(stream, snapshot)

    async def until(self, condition: Callable[[], bool], timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while not condition():
                self._progress.clear()
                await self._progress.wait()


class Envoy:
    """One fake Envoy on one ADS stream."""

    def __init__(self, server: CountingServer) -> None:
        self._server = server
        self._requests: asyncio.Queue[DiscoveryRequest | None] = asyncio.Queue()
        self._responses: asyncio.Queue[DiscoveryResponse] = asyncio.Queue()
        self._task = asyncio.create_task(self._pump(server))

    async def _requests_gen(self) -> AsyncIterator[DiscoveryRequest]:
        while True:
            request = await self._requests.get()
            if request is None:
                return
            yield request

    async def _pump(self, server: CountingServer) -> None:
        async for response in server.stream_aggregated_resources(self._requests_gen()):
            await self._responses.put(response)

    def send(
        self,
        type_url: str,
        names: tuple[str, ...] = (),
        *,
        version: str = "",
        nonce: str = "",
        error: str | None = None,
        node: str | None = None,
    ) -> None:
        self._server.sent += 1
        self._requests.put_nowait(
            DiscoveryRequest(
                version_info=version,
                node=Node(id=node) if node else None,
                resource_names=list(names),
                type_url=type_url,
                response_nonce=nonce,
                error_detail=Status(code=3, message=error) if error else None,
            )
        )

    def ack(self, response: DiscoveryResponse, names: tuple[str, ...] = ()) -> None:
        self.send(response.type_url, names, version=response.version_info, nonce=response.nonce)

    def nack(
        self, response: DiscoveryResponse, kept: str = "", names: tuple[str, ...] = ()
    ) -> None:
        self.send(response.type_url, names, version=kept, nonce=response.nonce, error="bad")

    async def receive(self, timeout: float = 5.0) -> DiscoveryResponse:
        return await asyncio.wait_for(self._responses.get(), timeout)

    async def receive_all(self, count: int) -> list[DiscoveryResponse]:
        return [await self.receive() for _ in range(count)]

    async def idle(self, timeout: float = 5.0) -> None:
        """Until the server has handled (and answered) every request sent so far."""
        await self._server.until(lambda: self._server.handled >= self._server.sent, timeout)

    async def considered(self, snapshot: Snapshot, timeout: float = 5.0) -> None:
        """Until the server has decided what `snapshot` means for this stream."""
        await self._server.until(lambda: self._server.considered is snapshot, timeout)

    def assert_nothing_sent(self) -> None:
        assert self._responses.empty(), self._responses.get_nowait()

    async def close(self) -> None:
        self._requests.put_nowait(None)
        await asyncio.wait_for(self._task, 5)


@pytest.fixture
def cache() -> SnapshotCache:
    return SnapshotCache()


@pytest.fixture
def server(cache: SnapshotCache) -> CountingServer:
    return CountingServer(cache)


@pytest.fixture
async def envoy(server: CountingServer) -> AsyncIterator[Envoy]:
    fake = Envoy(server)
    try:
        yield fake
    finally:
        await fake.close()


def resource_names(response: DiscoveryResponse) -> list[str]:
    """Each resource's name (an endpoint assignment's is its cluster's), in order."""
    names = []
    for resource in response.resources:
        message = resource.unpack()
        if isinstance(message, ClusterLoadAssignment):
            names.append(message.cluster_name)
        else:
            assert isinstance(message, Cluster | Listener | RouteConfiguration), message
            names.append(message.name)
    return names


async def subscribe_all(envoy: Envoy, snapshot: Snapshot) -> dict[str, DiscoveryResponse]:
    """What Envoy does at start: CDS and LDS wildcards, then EDS and RDS by name; ACK each."""
    got: dict[str, DiscoveryResponse] = {}
    envoy.send(CLUSTER, node="gw-1")
    envoy.send(LISTENER)
    for response in await envoy.receive_all(2):
        got[response.type_url] = response
        envoy.ack(response)
    clusters = tuple(sorted(resource_names(got[CLUSTER])))
    envoy.send(ENDPOINT, clusters)
    envoy.send(ROUTE, ("gateway",))
    for response in await envoy.receive_all(2):
        got[response.type_url] = response
        envoy.ack(response, clusters if response.type_url == ENDPOINT else ("gateway",))
    await envoy.idle()
    envoy.assert_nothing_sent()
    for type_url in ORDER:
        assert got[type_url].version_info == snapshot.version(type_url)
    return got


async def test_nothing_is_sent_before_a_snapshot_exists(
    cache: SnapshotCache, envoy: Envoy, server: CountingServer
) -> None:
    envoy.send(CLUSTER, node="gw-1")
    envoy.send(LISTENER)
    await envoy.idle()
    envoy.assert_nothing_sent()  # an empty config would replace Envoy's last good one
    assert server.connected == 1

    snap = snapshot_for("assistant")
    await cache.publish(snap)
    first, second = await envoy.receive_all(2)
    assert [first.type_url, second.type_url] == [CLUSTER, LISTENER]  # make before break
    assert first.version_info == snap.version(CLUSTER)
    assert first.control_plane is not None
    assert first.control_plane.identifier == "test-cp"


async def test_first_request_gets_the_resources(cache: SnapshotCache, envoy: Envoy) -> None:
    snap = snapshot_for("assistant", "researcher")
    await cache.publish(snap)
    envoy.send(CLUSTER, node="gw-1")
    response = await envoy.receive()
    assert response.type_url == CLUSTER
    assert response.version_info == snap.version(CLUSTER)
    assert response.nonce
    names = sorted(resource_names(response))
    assert names == ["agent.assistant", "agent.researcher", "registry"]
    assert all(r.type_url == CLUSTER for r in response.resources)


async def test_ack_sends_nothing_and_is_recorded(
    cache: SnapshotCache, envoy: Envoy, server: CountingServer
) -> None:
    snap = snapshot_for("assistant")
    await cache.publish(snap)
    await subscribe_all(envoy, snap)  # asserts that the ACKs got no answer
    assert server.acked["gw-1"] == {t: snap.version(t) for t in ORDER}


async def test_nack_is_not_resent_until_a_new_snapshot(
    cache: SnapshotCache, envoy: Envoy, server: CountingServer
) -> None:
    snap = snapshot_for("assistant")
    await cache.publish(snap)
    envoy.send(CLUSTER, node="gw-1")
    response = await envoy.receive()
    envoy.nack(response)
    await envoy.idle()
    envoy.assert_nothing_sent()
    # Envoy repeats its NACKed state on reconnect-like retries: still nothing
    envoy.nack(response)
    await envoy.idle()
    envoy.assert_nothing_sent()
    assert CLUSTER not in server.acked.get("gw-1", {})

    # republishing the same content is no change at all
    assert not await cache.publish(snapshot_for("assistant"))

    newer = snapshot_for("assistant", "researcher")
    assert await cache.publish(newer)
    again = await envoy.receive()
    assert again.type_url == CLUSTER
    assert again.version_info == newer.version(CLUSTER) != response.version_info
    assert again.nonce != response.nonce
    envoy.ack(again)

    # going back to the rejected content does not send it again either
    rejected_again = snapshot_for("assistant")
    await cache.publish(rejected_again)
    await envoy.considered(rejected_again)
    envoy.assert_nothing_sent()


async def test_new_snapshot_is_pushed_in_make_before_break_order(
    cache: SnapshotCache, envoy: Envoy
) -> None:
    snap = snapshot_for("assistant")
    await cache.publish(snap)
    await subscribe_all(envoy, snap)

    newer = snapshot_for("assistant", "researcher")  # every type but the listener changes
    await cache.publish(newer)
    pushed = [await envoy.receive() for _ in range(3)]
    assert [r.type_url for r in pushed] == [CLUSTER, ENDPOINT, ROUTE]
    for response in pushed:
        assert response.version_info == newer.version(response.type_url)
    await envoy.considered(newer)
    envoy.assert_nothing_sent()  # the listener did not change: not re-sent
    # Envoy's subscription follows the clusters it now has
    clusters = tuple(sorted(resource_names(pushed[0])))
    names = {ROUTE: ("gateway",), ENDPOINT: clusters}
    for response in pushed:
        envoy.ack(response, names.get(response.type_url, ()))
    # the wider EDS subscription is answered at once, same version, with the new names
    widened = await envoy.receive()
    assert widened.type_url == ENDPOINT and widened.version_info == newer.version(ENDPOINT)
    assert sorted(resource_names(widened)) == list(clusters)
    envoy.ack(widened, clusters)
    await envoy.idle()
    envoy.assert_nothing_sent()

    everything = snapshot_for("assistant", "researcher", "supervisor", listen_port=9)
    await cache.publish(everything)
    pushed = [await envoy.receive() for _ in range(4)]
    assert [r.type_url for r in pushed] == [CLUSTER, ENDPOINT, LISTENER, ROUTE]


async def test_only_changed_types_are_pushed(cache: SnapshotCache, envoy: Envoy) -> None:
    snap = snapshot_for("assistant")
    await cache.publish(snap)
    got = await subscribe_all(envoy, snap)
    clusters = tuple(sorted(resource_names(got[CLUSTER])))

    moved = Snapshot.of(
        resources.build(
            Directory(
                agents={"assistant": (HostPort("127.0.0.1", 7999),)},
                registry=(HostPort("127.0.0.1", 6000),),
            ),
            GatewayOptions(),
        )
    )
    await cache.publish(moved)
    response = await envoy.receive()
    assert response.type_url == ENDPOINT
    assert sorted(resource_names(response)) == list(clusters)
    envoy.ack(response, clusters)
    await envoy.idle()
    envoy.assert_nothing_sent()


async def test_stale_nonce_is_ignored(
    cache: SnapshotCache, envoy: Envoy, server: CountingServer
) -> None:
    first = snapshot_for("assistant")
    await cache.publish(first)
    envoy.send(CLUSTER, node="gw-1")
    old = await envoy.receive()

    second = snapshot_for("assistant", "researcher")
    await cache.publish(second)
    current = await envoy.receive()
    assert current.nonce != old.nonce

    # a NACK or a late ACK of the superseded response changes nothing
    envoy.nack(old)
    envoy.ack(old)
    await envoy.idle()
    envoy.assert_nothing_sent()
    assert CLUSTER not in server.acked.get("gw-1", {})

    envoy.ack(current)
    await envoy.idle()
    assert server.acked["gw-1"][CLUSTER] == second.version(CLUSTER)
    # had the stale NACK counted against the current version, it would never be sent again
    await cache.publish(first)
    back = await envoy.receive()
    assert back.version_info == first.version(CLUSTER)
    envoy.ack(back)
    await cache.publish(second)
    assert (await envoy.receive()).version_info == second.version(CLUSTER)


async def test_eds_and_rds_contain_only_the_requested_names(
    cache: SnapshotCache, envoy: Envoy
) -> None:
    snap = snapshot_for("assistant", "researcher", "supervisor")
    await cache.publish(snap)
    envoy.send(ENDPOINT, ("agent.researcher", "agent.nobody"), node="gw-1")
    response = await envoy.receive()
    assert resource_names(response) == ["agent.researcher"]

    # a changed subscription is answered even at the same version
    envoy.send(
        ENDPOINT,
        ("agent.assistant", "registry"),
        version=response.version_info,
        nonce=response.nonce,
    )
    changed = await envoy.receive()
    assert sorted(resource_names(changed)) == [
        "agent.assistant",
        "registry",
    ]
    assert changed.version_info == response.version_info

    envoy.send(ROUTE, ("gateway",))
    routes = await envoy.receive()
    assert resource_names(routes) == ["gateway"]
    envoy.send(ROUTE, ("other",), version=routes.version_info, nonce=routes.nonce)
    assert (await envoy.receive()).resources == []


async def test_streams_are_independent(cache: SnapshotCache, server: CountingServer) -> None:
    snap = snapshot_for("assistant")
    await cache.publish(snap)
    first, second = Envoy(server), Envoy(server)
    try:
        first.send(CLUSTER, node="a")
        second.send(CLUSTER, node="b")
        one, two = await first.receive(), await second.receive()
        first.nack(one)  # one Envoy rejecting does not stop the other
        second.ack(two)
        await first.idle()
        await second.idle()
        assert server.acked.get("b", {}).get(CLUSTER) == snap.version(CLUSTER)
        assert CLUSTER not in server.acked.get("a", {})
        assert server.connected == 2
    finally:
        await first.close()
        await second.close()
    assert server.connected == 0
