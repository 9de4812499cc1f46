"""The address a part tells others to reach it at, which is not always where it listens.

A part bound to every interface (`0.0.0.0` in a container) publishes one
concrete IP: the registry dials tool backends and agents at the address they
published, and Envoy's endpoint discovery takes IPs only. In Kubernetes that
is the pod IP (`AGENTPLEX_ADVERTISE_HOST` from `status.podIP`); elsewhere,
unset, it is what this machine's hostname resolves to.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket

log = logging.getLogger(__name__)

WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::", "[::]"})


def join(host: str, port: int) -> str:
    """`host:port`, with an IPv6 host in brackets."""
    bare = host.strip("[]")
    if ":" in bare:
        return f"[{bare}]:{port}"
    return f"{bare}:{port}"


async def advertised_host(bind_host: str, advertise_host: str | None) -> str:
    """The host part of the address this part publishes."""
    if advertise_host:
        return advertise_host
    if bind_host not in WILDCARD_HOSTS:
        return bind_host
    loop = asyncio.get_running_loop()
    name = socket.gethostname()
    try:
        infos = await loop.getaddrinfo(name, None, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise OSError(
            f"bound to {bind_host or 'every interface'} but hostname {name!r} does not resolve "
            f"({exc}); set AGENTPLEX_ADVERTISE_HOST to the IP others reach this part at"
        ) from exc
    host = str(infos[0][4][0])
    if ipaddress.ip_address(host).is_loopback:
        log.warning(
            "bound to every interface but advertising %s (what hostname %r resolves to): "
            "parts on other hosts cannot reach that; set AGENTPLEX_ADVERTISE_HOST",
            host,
            name,
        )
    return host
