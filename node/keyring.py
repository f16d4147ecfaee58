"""Who may talk to a node: key files, the cluster's allow-list, and what each key may do.

A key pair file (``lmcache-node keygen``) is TOML, readable by its owner only::

    name = "node-a"
    public = "<40 Z85 characters>"
    secret = "<40 Z85 characters>"

The allow-list (``authorized_keys``, the same file on every node) has one key per line::

    # public key                               name      role    [tenant=T]
    rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7  node-a    node
    Yne@$w-vo<fVvi]a<NY6T1ed:M$fCG*[IaLV{hID  engine-1  client  tenant=acme
    ...                                       ops       admin

Roles: ``node`` (a mesh member: every operation; its name is its mesh name, which peers
use to find its key), ``client`` (an engine: chunks only, in its tenant), ``admin``
(an operator: everything but mesh internals; may name a tenant per request). A client
with ``tenant=*`` may name the tenant per request (a front end serving several).
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from lmcache_mesh.transports.curve import BadKey, CurveClient, CurveKeyPair, check_key, decode_key

from .config import split_seed
from .records import TENANT_RE
from .settings import read_toml

NAME_RE = re.compile(r"^[^\s#/@]{1,255}$")
"""Names hold no '/' (engine holders are NODE/ENGINE) and no '@' (seeds are NAME@ADDR)."""
ANY_TENANT = "*"


class Role(str, Enum):
    NODE = "node"
    CLIENT = "client"
    ADMIN = "admin"


def check_tenant(tenant: str) -> str:
    if not TENANT_RE.match(tenant):
        raise ValueError(
            f"tenant {tenant!r:.80} must be 1-64 of A-Z a-z 0-9 . _ - (starting with a letter or digit)"
        )
    return tenant


@dataclass(frozen=True, slots=True)
class Principal:
    """Whoever sent a request, as far as the node can tell."""

    name: str
    role: Role
    tenant: str = ""
    """The tenant this principal's requests are in ("" = the shared default space)."""
    any_tenant: bool = False
    """May name another tenant per request (a trusted front end, the operator)."""


TRUSTED = Principal("trusted", Role.NODE, any_tenant=True)
"""A client on this machine (ipc:// socket, owner-only), a member proven by the mesh secret,
or anyone on a mesh with neither CurveZMQ nor a mesh secret."""

ANONYMOUS = Principal("anonymous", Role.ADMIN, any_tenant=True)
"""A tcp:// sender without a member's seal where the mesh has a secret (no CurveZMQ): an
engine or an operator — chunks, status, join, in any tenant; nothing only members may do
(gossip, index traffic, replicas, relaying)."""

MEMBER = Principal("member", Role.NODE)
"""A mesh member proven some other way (WebRTC membership proof, our relay)."""


@dataclass(frozen=True, slots=True)
class Sender:
    """Who a message came from, and over what."""

    principal: Principal = MEMBER
    peer: bytes | None = None
    """Its identity on the public (tcp://) ROUTER: where a relay forwards to."""
    conn: Hashable = None
    """What its in-flight requests and bytes count against (one connection or link)."""


@dataclass(frozen=True, slots=True)
class AllowedKey:
    key: str
    principal: Principal


def parse_allow_list(text: str, source: str) -> dict[str, AllowedKey]:
    """Entries by public key; raises ValueError naming ``source`` and the line."""
    entries: dict[str, AllowedKey] = {}
    names: set[str] = set()
    for number, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts or parts[0].startswith("#"):
            continue  # blank or a comment ('#' is Z85, but no 32-byte key's text starts with it)
        where = f"{source}:{number}"
        comment = next((i for i, p in enumerate(parts) if i >= 3 and p.startswith("#")), len(parts))
        parts = parts[:comment]
        if len(parts) < 3:
            raise ValueError(f"{where}: expected 'KEY NAME ROLE [tenant=T]', got {line!r:.120}")
        try:
            key = check_key(parts[0], "the key").decode("ascii")
            role = Role(parts[2])
        except BadKey as exc:
            raise ValueError(f"{where}: {exc}") from None
        except ValueError:
            raise ValueError(f"{where}: role {parts[2]!r} must be node, client or admin") from None
        name = parts[1]
        if not NAME_RE.match(name):
            raise ValueError(f"{where}: bad name {name!r}")
        tenant, any_tenant = "", role is Role.ADMIN
        for option in parts[3:]:
            opt, _, value = option.partition("=")
            if opt != "tenant" or not value:
                raise ValueError(f"{where}: unknown option {option!r}; the only option is tenant=NAME")
            if role is Role.NODE:
                raise ValueError(f"{where}: a node key serves every tenant; drop {option!r}")
            if value == ANY_TENANT:
                any_tenant = True
            else:
                try:
                    tenant = check_tenant(value)
                except ValueError as exc:
                    raise ValueError(f"{where}: {exc}") from None
        if key in entries:
            raise ValueError(
                f"{where}: key of {name!r} is already listed (as {entries[key].principal.name!r})"
            )
        if name in names:
            raise ValueError(f"{where}: name {name!r} is listed twice")
        names.add(name)
        entries[key] = AllowedKey(key, Principal(name, role, tenant, any_tenant))
    return entries


def read_key_pair(path: Path | str) -> tuple[str, CurveKeyPair]:
    """(name, key pair) from a key pair file; raises ValueError naming the file."""
    path = Path(path)
    table = read_toml(path, "key file")
    mode = path.stat().st_mode
    if mode & 0o077:
        raise ValueError(f"key file {path} is readable by others (mode {mode & 0o777:o}): chmod 600 it")
    try:
        public = check_key(str(table.get("public", "")), f"'public' in {path}").decode("ascii")
        secret = check_key(str(table.get("secret", "")), f"'secret' in {path}").decode("ascii")
    except BadKey as exc:
        raise ValueError(str(exc)) from None
    return str(table.get("name", "")), CurveKeyPair(public, secret)


def write_key_pair(path: Path | str, name: str) -> CurveKeyPair:
    """A new key pair in ``path`` (mode 600; never overwrites) and its public half in ``path``
    without ``_secret``."""
    path = Path(path)
    keys = CurveKeyPair.generate()
    path.parent.mkdir(parents=True, exist_ok=True)
    body = (
        f"# lmcache-mesh CurveZMQ key pair of {name!r}. Keep this file secret.\n"
        f'name = "{name}"\npublic = "{keys.public}"\nsecret = "{keys.secret}"\n'
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(body)
    public_path = public_key_path(path)
    if public_path != path:
        public_path.write_text(f'name = "{name}"\npublic = "{keys.public}"\n')
    return keys


def public_key_path(secret_path: Path) -> Path:
    name = secret_path.name
    return secret_path.with_name(name[: -len("_secret")]) if name.endswith("_secret") else secret_path


def read_public_key(value: str) -> str:
    """A server's public key given as Z85 text or as a key file holding ``public = "..."``."""
    try:
        return str(check_key(value, "server key").decode("ascii"))
    except BadKey:
        pass
    try:
        table = read_toml(value, "key file")
        return str(check_key(str(table.get("public", "")), f"'public' in {value}").decode("ascii"))
    except ValueError as exc:  # an unreadable file, or a bad key in it (BadKey)
        raise ValueError(
            f"server key {value!r:.60} is neither a Z85 key nor a readable key file: {exc}"
        ) from None


class Keyring:
    """A node's own key pair and the allow-list it admits (reloadable, thread-safe).

    :meth:`client_for` finds a member's key by its name: the caller says which member
    serves at an address (the membership), or the address was a ``NAME@ADDR`` seed.
    """

    def __init__(self, name: str, keys: CurveKeyPair, allow_list: Path) -> None:
        self.name = name
        self.keys = keys
        self.allow_list = allow_list
        self._seeds: dict[str, str] = {}
        self._lock = threading.Lock()
        self._entries: dict[str, AllowedKey] = {}
        self._nodes: dict[str, str] = {}
        self.reload()

    def __repr__(self) -> str:
        return f"<Keyring {self.name} {self.keys.public} allowing {len(self._entries)}>"

    def reload(self) -> int:
        """Read the allow-list again; on any error the old one stays. Returns the entry count."""
        try:
            text = self.allow_list.read_text()
            mode = self.allow_list.stat().st_mode
        except OSError as exc:
            raise ValueError(f"cannot read the allow-list {self.allow_list}: {exc.strerror}") from None
        if mode & 0o002:
            raise ValueError(f"the allow-list {self.allow_list} is writable by anyone: chmod o-w it")
        entries = parse_allow_list(text, str(self.allow_list))
        nodes = {e.principal.name: k for k, e in entries.items() if e.principal.role is Role.NODE}
        with self._lock:
            self._entries, self._nodes = entries, nodes
        return len(entries)

    def count(self) -> int:
        return len(self._entries)

    def authorize(self, key: str) -> bool:
        return key in self._entries

    def principal(self, key: str | None) -> Principal | None:
        """Who holds ``key`` now (None: not, or no longer, allowed)."""
        entry = self._entries.get(key) if key else None
        return entry.principal if entry is not None else None

    def node_principal(self, name: str) -> Principal | None:
        """The principal of member ``name`` (proven some other way, e.g. over WebRTC), if it
        still has a node key."""
        key = self._nodes.get(name)
        return self.principal(key) if key is not None else None

    def own_entry(self) -> Principal | None:
        return self.principal(self.keys.public)

    def remember_seed(self, seed: str) -> str:
        """Note the name of a ``NAME@ADDR`` seed; returns the bare address."""
        name, address = split_seed(seed)
        if name:
            with self._lock:
                self._seeds[address] = name
        return address

    def pair_secret(self, name: str) -> bytes | None:
        """A secret only we and node ``name`` can compute (X25519 of our secret key and its
        public key in the allow-list); None if it has no node key there."""
        key = self._nodes.get(name)
        if key is None:
            return None
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

        ours = X25519PrivateKey.from_private_bytes(decode_key(self.keys.secret))
        shared = ours.exchange(X25519PublicKey.from_public_bytes(decode_key(key)))
        return hashlib.sha256(b"lmcache-mesh pair secret v1\0" + shared).digest()

    def client_for(self, address: str, name_of: Callable[[str], str | None] | None = None) -> CurveClient:
        """Credentials to connect to the member at ``address`` (``name_of(address)`` names it);
        LookupError if its key is unknown."""
        name = (name_of(address) if name_of is not None else None) or self._seeds.get(address)
        key = self._nodes.get(name) if name else None
        if key is None:
            raise LookupError(
                f"no key for {address}: it is no known member, or its name ({name or 'unknown'}) has "
                f"no node key in {self.allow_list} (name a seed as NAME@{address})"
            )
        return CurveClient(self.keys, key)
