"""Keepalive options: our own servers and peers that may not be ours."""

from __future__ import annotations

from agentplex.runtime.clients import Keepalive
from agentplex.runtime.settings import Settings


def test_defaults_detect_a_frozen_peer_within_thirty_seconds() -> None:
    keepalive = Keepalive.from_settings(Settings())
    assert keepalive.seconds + keepalive.timeout_seconds <= 30


def test_our_channels_ping_through_long_silent_calls() -> None:
    options = dict(Keepalive(5, 3).channel_options())
    assert options["grpc.keepalive_time_ms"] == 5000
    # the answer to a PING is awaited for the keepalive timeout, not gRPC's 60 s
    assert options["grpc.keepalive_timeout_ms"] == options["grpc.http2.ping_timeout_ms"] == 3000
    assert options["grpc.http2.max_pings_without_data"] == 0
    assert options["grpc.keepalive_permit_without_calls"] == 1


def test_any_server_gets_only_pings_a_default_grpc_server_accepts() -> None:
    options = dict(Keepalive(5, 3).channel_options(any_server=True))
    assert options["grpc.keepalive_time_ms"] == 5000
    # gRPC's defaults: no pings between calls, at most two without data.
    assert "grpc.keepalive_permit_without_calls" not in options
    assert "grpc.http2.max_pings_without_data" not in options


def test_our_servers_accept_the_pings_our_channels_send() -> None:
    keepalive = Keepalive(5, 3)
    server = dict(keepalive.server_options())
    channel = dict(keepalive.channel_options())
    assert (
        server["grpc.http2.min_recv_ping_interval_without_data_ms"]
        < channel["grpc.keepalive_time_ms"]
    )
    assert server["grpc.http2.max_ping_strikes"] == 0
    assert server["grpc.keepalive_permit_without_calls"] == 1
