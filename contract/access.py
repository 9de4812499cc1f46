"""The mesh's access policy in one value, as every service's server enforces it:
who may call each service (`callers`), who may assert a principal, and which
scope each method needs from a token (`scopes`)."""

from __future__ import annotations

from agentplex.contract.callers import CALLERS, PRINCIPAL_ASSERTERS
from agentplex.contract.scopes import SCOPES
from agentplex.runtime.peer_auth import Access

ACCESS = Access(callers=CALLERS, asserters=PRINCIPAL_ASSERTERS, scopes=SCOPES)
