"""Admission: what a sender may do, in which tenant, and the request as it will run.

Each key's role says which operations it may use (:data:`CLIENT_OPS`, :data:`ADMIN_OPS`;
a node's key may use all) and its tenant which keys it sees. :func:`admit` turns a decoded
request into a :class:`Job`: its body with every chunk key scoped to the tenant
(:mod:`.tenants`), labelled records, and the party its limits count against. The request
itself is never changed.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, replace
from typing import Any, Generic

from lmcache_mesh.mesh.errors import Forbidden

from .keyring import TRUSTED, Principal, Role, Sender
from .protocol import Op
from .requests import Announce, Attach, B, Get, Put, Request
from .tenants import admit_headers, scope_body

CLIENT_OPS = frozenset(
    {Op.PING, Op.PUT, Op.GET, Op.LOOKUP, Op.DELETE, Op.RANK, Op.ANNOUNCE, Op.RESERVE, Op.RELEASE}
)
"""What an engine's key may do: chunks, in its tenant (ANNOUNCE only of its own engine)."""

ADMIN_OPS = CLIENT_OPS | {Op.STATS, Op.JOIN}
"""An operator's key adds status and joining; gossip, relaying and signaling stay with nodes."""


@dataclass(frozen=True, slots=True)
class Job(Generic[B]):
    """A request as admitted: what runs, for whom, against which limits."""

    request: Request[Any]
    body: B
    """The request's body with its keys in the node's key space."""
    tenant: str | None
    """The tenant it runs in; None for a member's request (keys and records as stored)."""
    party: Hashable
    """What its in-flight requests and bytes count against (a key, or a connection)."""
    client_keys: list[bytes] | None = None
    """A GET's keys as the client sent them: its reply carries them back."""
    local_hits: int | None = None
    """A LOOKUP's leading keys found here already (counted when deciding how to answer)."""

    @property
    def op(self) -> Op:
        return self.request.op


def allowed(principal: Principal, req: Request[Any]) -> bool:
    if principal.role is Role.NODE:
        return True
    ops = ADMIN_OPS if principal.role is Role.ADMIN else CLIENT_OPS
    return req.op in ops and (not isinstance(req.body, Announce) or req.body.route)


def _tenant(principal: Principal, req: Request[Any]) -> str:
    """The tenant a request runs in; Forbidden if the sender may not name that one."""
    asked = req.tenant
    if asked is None or asked == principal.tenant:
        return principal.tenant
    if principal.any_tenant:
        return asked
    raise Forbidden(f"key {principal.name!r} may not use tenant {asked!r}")


def admit(req: Request[Any], sender: Sender) -> Job[Any]:
    """The request as this sender may run it (keys scoped to its tenant); Forbidden if not."""
    principal = sender.principal
    body = req.body
    if not allowed(principal, req):
        raise Forbidden(f"key {principal.name!r} ({principal.role.value}) may not use {req.op.name}")
    if isinstance(body, Attach) and principal is not TRUSTED and body.name != principal.name:
        raise Forbidden(f"key {principal.name!r} may attach only under its own name")
    if req.scoped:
        # A member forwarding keys it has scoped already (and records as labelled).
        if principal.role is not Role.NODE:
            raise Forbidden(f"key {principal.name!r} may not send scoped keys")
        return Job(req, body, None, sender.conn)
    tenant = _tenant(principal, req)
    if isinstance(body, Put):
        # A client's chunks always get their replicas: only members send replicas.
        replica = body.replica and principal.role is Role.NODE
        body = replace(body, headers=admit_headers(body.headers, tenant), replica=replica)
    client_keys = body.keys if isinstance(body, Get) else None
    return Job(req, scope_body(body, tenant), tenant, sender.conn, client_keys)
