"""Argument policies: what a tool's string arguments may name, beyond their schema.

A JSON Schema can say that an argument is a string shaped like a URL; it cannot
say that the URL must not reach the cloud metadata service, Redis on loopback
or `file:///etc/shadow`. A tool's contract declares `ArgumentPolicy` rules for
that; the registry checks them (`check`) before any backend runs, and a backend
that connects to what an argument names checks again (`check_url`) and connects
only to the addresses it checked, since a name may resolve elsewhere a moment
later (DNS rebinding).

Every refusal names the argument and the rule it broke, so the model can
correct itself and a person can tell why.
"""

from __future__ import annotations

import asyncio
import ipaddress
import posixpath
import re
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from agentplex.v1 import tool_pb2

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Awaitable[list[IPAddress]]]
"""(host name, port) → every address it resolves to; raises OSError if none."""
AddressCheck = Callable[[IPAddress], "str | None"]
"""What makes an address unacceptable ("a loopback address"), or None."""

RESOLVE_TIMEOUT_SECONDS = 5.0
DEFAULT_SCHEMES = ("http", "https")
DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443, "ftp": 21}
PUBLIC_ONLY = "public hosts only"

_SHARED = ipaddress.IPv4Network("100.64.0.0/10")  # carrier-grade NAT
_NAT64 = (ipaddress.IPv6Network("64:ff9b::/96"), ipaddress.IPv6Network("64:ff9b:1::/48"))
# Whitespace, controls and backslashes: urlsplit drops tabs and newlines, and
# WHATWG parsers read "\" as "/", so each could make two parsers see two hosts.
_UNSAFE_TEXT = re.compile(r"[\x00-\x20\x7f\\]")
_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_HOST_NAME = re.compile(rf"(?=.{{1,253}}\Z){_LABEL}(?:\.{_LABEL})*")
_NUMERIC_LABEL = re.compile(r"0x[0-9a-f]*|[0-9]+")
_PORT = re.compile(r"[0-9]{1,5}")
_SCHEME = re.compile(r"[a-z][a-z0-9+.-]*")


class PolicyDenied(Exception):
    """An argument broke a policy; `message` names the argument and the rule."""

    def __init__(self, argument: str, problem: str, rule: str) -> None:
        self.message = f'argument "{argument}": {problem} (policy: {rule})'
        super().__init__(self.message)


@dataclass(frozen=True)
class Target:
    """A URL that passed its policy, with the addresses to connect to (and only those)."""

    url: str
    scheme: str
    host: str  # a DNS name, or the normalized literal address
    port: int
    addresses: tuple[IPAddress, ...]
    path: str  # path and query, never empty


# --- addresses ------------------------------------------------------------------------


def address_problem(address: IPAddress) -> str | None:
    """What keeps an address from being public ("a link-local address"), or None."""
    if isinstance(address, ipaddress.IPv6Address):
        # An IPv4 address inside an IPv6 one reaches that IPv4 host.
        embedded = address.ipv4_mapped or address.sixtofour or _nat64(address)
        if embedded is not None and (problem := address_problem(embedded)) is not None:
            return f"{problem} ({embedded}, inside {address})"
    checks: list[tuple[bool, str]] = [
        (address.is_loopback, "a loopback address"),
        (address.is_link_local, "a link-local address"),
        (address.is_multicast, "a multicast address"),
        (address.is_unspecified, "an unspecified address"),
        (
            isinstance(address, ipaddress.IPv4Address) and address in _SHARED,
            "a shared (CGNAT) address",
        ),
        (address.is_private, "a private address"),
        # Deprecated site-local IPv6 (fec0::/10): still routed privately in places, and
        # not flagged by every Python's `is_private` / `is_global`.
        (
            isinstance(address, ipaddress.IPv6Address) and address.is_site_local,
            "a site-local address",
        ),
        (address.is_reserved, "a reserved address"),
        (not address.is_global, "a non-public address"),
    ]
    return next((problem for failed, problem in checks if failed), None)


def _nat64(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if any(address in network for network in _NAT64):
        return ipaddress.IPv4Address(address.packed[-4:])
    return None


async def system_resolver(host: str, port: int) -> list[IPAddress]:
    """Resolve on the event loop's executor, never blocking the loop."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    # A scoped IPv6 address ("fe80::1%eth0") keeps its scope after a "%".
    return [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]


def parse_host(host: str) -> IPAddress | str:
    """A host as the address it spells, in any spelling, or as a lowercase DNS name.

    Raises ValueError for anything else. Like WHATWG URL parsers, a host whose last
    label is a number is an IPv4 address, read as `inet_aton` does, so that
    `2130706433`, `0x7f.1`, `0177.0.0.1` and `127.1` are all 127.0.0.1.
    """
    host = host.lower()
    if "%" in host:
        raise ValueError(f"{host} has a zone id or an escape, which no public host needs")
    if host.startswith("[") and host.endswith("]"):
        return ipaddress.IPv6Address(host[1:-1])
    host = host.removesuffix(".")
    if _NUMERIC_LABEL.fullmatch(host.rsplit(".", 1)[-1]):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            raise ValueError(f"{host} is not a valid IPv4 address") from None
    if not _HOST_NAME.fullmatch(host):
        raise ValueError(f"{host} is not a valid host name (non-ASCII names in xn-- form)")
    return host


def split_host_port(text: str) -> tuple[str, int | None]:
    """'host', 'host:port', '[v6]' or '[v6]:port' → (host, port or None); ValueError if not."""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"{text} has an unclosed '['")
        host, rest = text[: end + 1], text[end + 1 :]
        if rest and not rest.startswith(":"):
            raise ValueError(f"{text} has text after its ']'")
        port_text = rest[1:] if rest else ""
    elif text.count(":") > 1:
        host, port_text = f"[{text}]", ""  # a bare IPv6 address, no port
    else:
        host, _, port_text = text.partition(":")
    if not host:
        raise ValueError("the host is empty")
    if not port_text:
        return host, None
    if not _PORT.fullmatch(port_text) or not 0 < int(port_text) < 65536:
        raise ValueError(f"port {port_text} is not a number from 1 to 65535")
    return host, int(port_text)


def host_allowed(host: IPAddress | str, allowed: Sequence[str]) -> bool:
    """Empty allows any host; "*.example.com" allows names under example.com (not itself)."""
    if not allowed:
        return True
    name = str(host)
    for pattern in allowed:
        pattern = pattern.lower().removesuffix(".")
        if pattern.startswith("*.") and isinstance(host, str):
            if name.endswith(pattern[1:]):
                return True
        elif name == _normalized_pattern(pattern):
            return True
    return False


def _normalized_pattern(pattern: str) -> str:
    try:
        parsed = parse_host(pattern if ":" not in pattern else f"[{pattern.strip('[]')}]")
    except ValueError:
        return pattern
    return str(parsed)


async def public_addresses(
    argument: str,
    host: IPAddress | str,
    port: int,
    *,
    resolver: Resolver,
    address_check: AddressCheck,
    spelled: str = "",
) -> tuple[IPAddress, ...]:
    """Every address `host` names, each one checked; PolicyDenied if any is not public.

    `spelled` is the host as the argument wrote it ("0x7f.1"), for the message."""
    spelled = spelled or str(host)
    if isinstance(host, str):
        try:
            async with asyncio.timeout(RESOLVE_TIMEOUT_SECONDS):
                addresses = list(dict.fromkeys(await resolver(host, port)))
        except TimeoutError:
            raise PolicyDenied(
                argument,
                f"host {host} did not resolve within {RESOLVE_TIMEOUT_SECONDS:g} s",
                PUBLIC_ONLY,
            ) from None
        except (OSError, UnicodeError, ValueError):
            addresses = []
        if not addresses:
            raise PolicyDenied(argument, f"host {host} does not resolve", PUBLIC_ONLY)
    else:
        addresses = [host]
    for address in addresses:
        problem = address_check(address)
        if problem is not None:
            shown = "" if str(address) == spelled else f"{address}, "
            raise PolicyDenied(
                argument, f"host {spelled} resolves to {shown}{problem}", PUBLIC_ONLY
            )
    return tuple(addresses)


# --- the policies -------------------------------------------------------------------


async def check_url(
    argument: str,
    value: str,
    policy: tool_pb2.UrlPolicy,
    *,
    resolver: Resolver = system_resolver,
    address_check: AddressCheck = address_problem,
) -> Target:
    """The URL as a `Target` if it passes `policy`; PolicyDenied naming the rule if not."""
    if _UNSAFE_TEXT.search(value):
        raise PolicyDenied(
            argument, "contains whitespace, a control character or a backslash", "a plain URL"
        )
    try:
        parts = urlsplit(value)
    except ValueError as exc:
        raise PolicyDenied(argument, f"is not a URL ({exc})", "a plain URL") from None
    scheme = parts.scheme.lower()
    schemes = [s.lower() for s in policy.allowed_schemes] or list(DEFAULT_SCHEMES)
    if scheme not in schemes:
        raise PolicyDenied(
            argument, f"scheme {scheme or '(none)'} is not allowed", f"schemes {', '.join(schemes)}"
        )
    if not parts.netloc:
        raise PolicyDenied(argument, "names no host", "a URL with a host")
    if "@" in parts.netloc:
        raise PolicyDenied(argument, "carries user info (user@host)", "no user info in URLs")
    try:
        host_text, port = split_host_port(parts.netloc)
        host = parse_host(host_text)
    except ValueError as exc:
        raise PolicyDenied(argument, str(exc), "a valid host") from None
    default = DEFAULT_PORTS.get(scheme)
    port = default if port is None else port
    if port is None or (port != default and port not in policy.allowed_ports):
        allowed = ", ".join(str(p) for p in policy.allowed_ports)
        raise PolicyDenied(
            argument,
            f"port {port if port is not None else '(none)'} is not allowed",
            f"the scheme's default port{' or ' + allowed if allowed else ' only'}",
        )
    if not host_allowed(host, policy.allowed_hosts):
        raise PolicyDenied(
            argument, f"host {host} is not allowed", f"hosts {', '.join(policy.allowed_hosts)}"
        )
    addresses = await public_addresses(
        argument,
        host,
        port,
        resolver=resolver,
        address_check=address_check,
        spelled=host_text.strip("[]"),
    )
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Target(value, scheme, str(host), port, addresses, path)


async def check_host(
    argument: str,
    value: str,
    policy: tool_pb2.HostPolicy,
    *,
    resolver: Resolver = system_resolver,
    address_check: AddressCheck = address_problem,
) -> tuple[IPAddress, ...]:
    """The addresses a 'host[:port]' argument names, if it passes `policy`."""
    if _UNSAFE_TEXT.search(value) or "@" in value or "/" in value:
        raise PolicyDenied(argument, "is not a host or host:port", "a host or host:port")
    try:
        host_text, port = split_host_port(value)
        host = parse_host(host_text)
    except ValueError as exc:
        raise PolicyDenied(argument, str(exc), "a valid host") from None
    if port is not None and policy.allowed_ports and port not in policy.allowed_ports:
        allowed = ", ".join(str(p) for p in policy.allowed_ports)
        raise PolicyDenied(argument, f"port {port} is not allowed", f"ports {allowed}")
    if not host_allowed(host, policy.allowed_hosts):
        raise PolicyDenied(
            argument, f"host {host} is not allowed", f"hosts {', '.join(policy.allowed_hosts)}"
        )
    return await public_addresses(
        argument,
        host,
        port or 0,
        resolver=resolver,
        address_check=address_check,
        spelled=host_text.strip("[]"),
    )


def check_path(argument: str, value: str, policy: tool_pb2.PathPolicy) -> str:
    """The path, normalized, if it stays inside the tool's root and passes `policy`."""
    if "\x00" in value:
        raise PolicyDenied(argument, "contains a NUL byte", "no NUL bytes")
    # Backslashes separate on Windows and in some libraries: treat them as "/".
    path = value.replace("\\", "/")
    if path.startswith(("/", "~")) or re.match(r"[A-Za-z]:", path):
        raise PolicyDenied(argument, f"{value} is absolute", "paths relative to the tool's root")
    normal = posixpath.normpath(path)
    if normal == ".." or normal.startswith("../"):
        raise PolicyDenied(argument, f"{value} leaves the tool's root", "no '..' segments")
    if policy.allowed_extensions:
        extension = posixpath.splitext(normal)[1].lower()
        allowed = [e.lower() for e in policy.allowed_extensions]
        if extension not in allowed:
            raise PolicyDenied(
                argument,
                f"extension {extension or '(none)'} is not allowed",
                f"extensions {', '.join(allowed)}",
            )
    return normal


async def check(
    tool: tool_pb2.ToolDefinition,
    arguments: dict[str, Any],
    *,
    resolver: Resolver = system_resolver,
    address_check: AddressCheck = address_problem,
) -> None:
    """Every argument policy of the tool; PolicyDenied at the first one broken."""
    for policy in tool.argument_policies:
        present, value = lookup(arguments, policy.argument)
        if not present:
            continue  # optional and not given: nothing to reach
        kind = policy.WhichOneof("kind")
        if not isinstance(value, str):
            raise PolicyDenied(policy.argument, "is not a string", f"a {kind}")
        if kind == "url":
            await check_url(
                policy.argument, value, policy.url, resolver=resolver, address_check=address_check
            )
        elif kind == "host":
            await check_host(
                policy.argument, value, policy.host, resolver=resolver, address_check=address_check
            )
        elif kind == "path":
            check_path(policy.argument, value, policy.path)


def lookup(arguments: dict[str, Any], argument: str) -> tuple[bool, Any]:
    """(present, value) of a top-level property name or a JSON pointer (RFC 6901)."""
    if not argument.startswith("/"):
        return argument in arguments, arguments.get(argument)
    value: Any = arguments
    for token in pointer_tokens(argument):
        if isinstance(value, dict) and token in value:
            value = value[token]
        elif isinstance(value, list) and token.isdigit() and int(token) < len(value):
            value = value[int(token)]
        else:
            return False, None
    return True, value


def pointer_tokens(pointer: str) -> list[str]:
    return [t.replace("~1", "/").replace("~0", "~") for t in pointer.split("/")[1:]]


# --- contracts ----------------------------------------------------------------------


def definition_problem(tool: tool_pb2.ToolDefinition, input_schema: dict[str, Any]) -> str | None:
    """Why the tool's policies could never be enforced as meant, or None.

    A policy naming no string argument of the schema would silently check nothing.
    """
    for index, policy in enumerate(tool.argument_policies):
        where = f"tool.argument_policies[{index}]"
        if not policy.argument:
            return f"{where}.argument must name an argument"
        tokens = (
            pointer_tokens(policy.argument)
            if policy.argument.startswith("/")
            else [policy.argument]
        )
        schema: Any = input_schema
        for token in tokens:
            properties = schema.get("properties") if isinstance(schema, dict) else None
            schema = properties.get(token) if isinstance(properties, dict) else None
        if not isinstance(schema, dict) or schema.get("type") != "string":
            return (
                f"{where}.argument {policy.argument!r} must name a property of the input "
                'schema with "type": "string"'
            )
        kind = policy.WhichOneof("kind")
        if kind is None:
            return f"{where} must say what the argument is (url, path or host)"
        if kind == "url":
            bad = [s for s in policy.url.allowed_schemes if not _SCHEME.fullmatch(s)]
            if bad:
                return f"{where}.url.allowed_schemes: {bad[0]!r} is not a lowercase scheme"
        hosts = policy.url.allowed_hosts if kind == "url" else policy.host.allowed_hosts
        for pattern in hosts if kind != "path" else ():
            try:
                parse_host(
                    pattern.removeprefix("*.") if ":" not in pattern else f"[{pattern.strip('[]')}]"
                )
            except ValueError:
                return f"{where}: allowed host {pattern!r} is not a host name, *.suffix or address"
        ports = policy.url.allowed_ports if kind == "url" else policy.host.allowed_ports
        if kind != "path" and any(not 0 < p < 65536 for p in ports):
            return f"{where}: allowed ports must be from 1 to 65535"
        if kind == "path" and any(
            not e.startswith(".") or "/" in e for e in policy.path.allowed_extensions
        ):
            return f"{where}.path.allowed_extensions must look like '.md'"
    return None
