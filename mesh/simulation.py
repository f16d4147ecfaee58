"""A simulated mesh: the real :class:`Membership` and :class:`MeshAgent` over the in-process network.

Every node runs the same sans-I/O membership code as a daemon, on the virtual clock of one
seeded :class:`~lmcache_mesh.transports.inproc.InProcNetwork` (delay, loss, partitions), so a
run is deterministic for a given seed and a simulated hour takes seconds. Tests and
``bench/bench_mesh.py`` build their clusters with :class:`Simulation`::

    sim = Simulation(10, seed=1, loss=0.05)
    sim.start()
    sim.run_until(sim.converged, timeout_s=10)
    sim.crash("n7")                     # churn: crash, later sim.add("n7").start(["a0"])
    sim.net.partition(["a0", "a1"])     # partitions and heal() on the network itself

:class:`DataSimulation` adds the mesh's data work: every node also runs the real
:class:`~lmcache_mesh.mesh.coordinator.MeshCoordinator` (holder index, replication, repair,
reads) over in-memory holdings and peer calls (:mod:`lmcache_mesh.mesh.simulated_ports`), and
membership, gossip and peer calls share one virtual-time asyncio loop::

    with DataSimulation(100, seed=1, config=MeshConfig.local(), replicas=2) as sim:
        sim.converge(timeout_s=30)
        sim.put("n3", [SimRecord.of("chunk-0")])
        sim.run_until(lambda: sim.replicated(keys), timeout_s=5)
        holders = sim.locate("n42", keys)

Determinism: the same seed and the same calls (``run_for`` steps included: timers due at
the same instant run in heap order) give the same run within one interpreter. Across
interpreters, the mesh's own iteration over sets of names and keys follows
``PYTHONHASHSEED``; fix it to replay a run in another process.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import statistics
from collections import Counter
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from lmcache_mesh.transports.base import DatagramTransport, Scheduler
from lmcache_mesh.transports.inproc import InProcNetwork
from lmcache_mesh.transports.seal import SealedGossip

from .agent import MeshAgent
from .cluster import Cluster
from .config import MeshConfig
from .coordinator import MeshCoordinator
from .directory import DirectoryConfig
from .membership import Member, Membership, State
from .messages import Message, MsgType
from .ring import HashRing, RingMember
from .simulated_ports import (
    CallNetwork,
    ErrorLog,
    InProcGossip,
    MemoryHoldings,
    SimNode,
    SimPeers,
    SimRecord,
    VirtualLoop,
)

T = TypeVar("T")

DEFAULT_DELAY_S = (0.001, 0.010)
"""One-way datagram delay range (seconds) unless told otherwise: a LAN with some jitter."""

_GONE = (State.DEAD, State.LEFT)

Listener = Callable[[str, Member, "State | None"], None]
"""(observer name, member, previous state or None) after every membership state change."""


@dataclass(frozen=True, slots=True)
class Transition:
    """One observer saw ``member`` leave ALIVE (SUSPECT, DEAD or LEFT) at virtual time ``at``."""

    at: float
    observer: str
    member: str
    state: State
    incarnation: int


@dataclass(frozen=True, slots=True)
class Traffic:
    """What the running nodes sent over a window of virtual time (see :meth:`Simulation.traffic`)."""

    window_s: float
    bytes_per_node_s: float
    max_node_bytes_s: float
    peak_second_over_mean: float | None


def address_of(name: str) -> str:
    """The simulated address of node ``name``: n3 is at a3."""
    return "a" + name.removeprefix("n")


class Simulation:
    """``n`` nodes named n0..n{n-1} at addresses a0..a{n-1}; n0 is the seed everyone joins through.

    Each node's membership gets its own ``random.Random`` derived from ``seed`` and its name
    (and how often that name was added, so a restarted node draws afresh), and the network
    its own: nothing reads the wall clock. ``config`` defaults to the LAN profile.

    Bookkeeping, all updated in O(1) per membership state change:

    * ``transitions``: every SUSPECT/DEAD/LEFT transition anyone saw (:class:`Transition`);
    * ``converged_at``: the first virtual time at which every one of the ``n`` nodes built
      here saw all the others ALIVE (so checking it costs nothing, even for 500 nodes);
      ``pairs99_at`` when 99% of those (observer, member) pairs were ALIVE, and
      ``bytes_at_convergence`` what the network had carried by ``converged_at``;
    * ``listeners``: called with (observer, member, previous state) after each change.
    """

    def __init__(
        self,
        n: int,
        seed: int = 0,
        loss: float = 0.0,
        config: MeshConfig | None = None,
        delay_s: tuple[float, float] = DEFAULT_DELAY_S,
        scheduler: Scheduler | None = None,
        mesh_secret: bytes = b"",
    ) -> None:
        self.n = n
        self.mesh_secret = mesh_secret
        """Non-empty: every node seals its datagrams with it, as daemons do without CurveZMQ."""
        self.seed = seed
        self.config = config or MeshConfig.lan()
        self.net = InProcNetwork(seed=seed, loss=loss, delay_s=delay_s, scheduler=scheduler)
        self.agents: dict[str, MeshAgent] = {}
        self.listeners: list[Listener] = []
        self.transitions: list[Transition] = []
        self.converged_at: float | None = None
        self.pairs99_at: float | None = None
        self.bytes_at_convergence = 0
        self._alive_seen: dict[str, int] = {}  # observer -> peers it sees ALIVE
        self._full = 0  # observers that see all n - 1 peers ALIVE
        self._pairs = 0  # (observer, peer) pairs ALIVE
        self._added: Counter[str] = Counter()
        for i in range(n):
            self.add(f"n{i}")

    def __repr__(self) -> str:
        return (
            f"<Simulation nodes={len(self.agents)}/{self.n} seed={self.seed} "
            f"loss={self.net.loss:.0%} t={self.net.time():.3f}>"
        )

    # churn

    def add(self, name: str, zone: str = "default") -> MeshAgent:
        """A node ``name`` at :func:`address_of` ``name``, not yet started (call ``.start(seeds)``)."""
        times = self._added[name]
        self._added[name] += 1
        rng = random.Random(f"{self.seed}-{name}" if times == 0 else f"{self.seed}-{name}-{times}")
        agent = self._node(name, zone, rng, functools.partial(self._on_change, name))
        self.agents[name] = agent
        self._alive_seen[name] = 0
        return agent

    def _node(
        self, name: str, zone: str, rng: random.Random, on_change: Callable[[Member, State | None], None]
    ) -> MeshAgent:
        """Build node ``name``: its membership, driven on the network's clock."""
        membership = Membership(self.config, name, address_of(name), zone=zone, rng=rng, on_change=on_change)
        transport: DatagramTransport = self.net.transport(address_of(name))
        if self.mesh_secret:
            transport = SealedGossip(InProcGossip(transport), self.mesh_secret)
        return MeshAgent(membership, transport, self.net)

    def start(self, names: Iterable[str] | None = None, seed_address: str = "a0") -> None:
        """Start ``names`` (default: every node), each joining through ``seed_address``."""
        for name in list(self.agents) if names is None else names:
            self.agents[name].start([seed_address])

    def crash(self, name: str) -> None:
        """Node ``name`` stops at once and its address vanishes; nobody is told."""
        agent = self.agents.pop(name)
        agent.stop()
        self.net.detach(agent.transport.address)
        seen = self._alive_seen.pop(name)
        self._full -= seen == self.n - 1
        self._pairs -= seen

    # running

    def run_for(self, seconds: float) -> None:
        """Run ``seconds`` of virtual time."""
        self.net.run_for(seconds)

    def run_until(self, predicate: Callable[[], bool], timeout_s: float, step_s: float = 0.1) -> float | None:
        """Virtual seconds until ``predicate`` holds (checked every ``step_s``), or None after ``timeout_s``."""
        start = self.net.time()
        deadline = start + timeout_s
        while not predicate():
            if self.net.time() >= deadline:
                return None
            self.run_for(step_s)
        return float(self.net.time() - start)

    def converge(self, timeout_s: float = 120.0, step_s: float = 0.1) -> float | None:
        """Start every node and run until ``converged_at`` (returned), or None after ``timeout_s``."""
        self.start()
        self.run_until(lambda: self.converged_at is not None, timeout_s, step_s)
        return self.converged_at

    # views

    def view(self, observer: str) -> dict[str, State]:
        return {m.name: m.state for m in self.agents[observer].membership.members.values()}

    def all_see(self, name: str, state: State) -> bool:
        """Every other running node sees ``name`` in ``state``."""
        return all(self.view(o).get(name) is state for o in self.agents if o != name)

    def converged(self) -> bool:
        """Every running node sees every running node alive."""
        names = set(self.agents)
        for agent in self.agents.values():
            alive = {m.name for m in agent.membership.members.values() if m.state is State.ALIVE}
            if not names <= alive:
                return False
        return True

    def in_state(self, state: State) -> int:
        """How many (running observer, member) pairs are in ``state`` right now."""
        return sum(m.state is state for a in self.agents.values() for m in a.membership.members.values())

    @property
    def deaths(self) -> list[tuple[float, str, str, State]]:
        """(time, observer, member, new state) of every DEAD or LEFT transition."""
        return [(t.at, t.observer, t.member, t.state) for t in self.transitions if t.state in _GONE]

    def counter(self, name: str) -> int:
        """A membership counter (``refutes``, ``probe_failures``, ...) summed over running nodes."""
        return sum(a.membership.counters[name] for a in self.agents.values())

    # measurements

    def bytes_sent(self) -> dict[str, int]:
        """Bytes each running node has sent so far (datagrams, lost ones included)."""
        sent = self.net.bytes_by_sender
        return {name: sent.get(a.transport.address, 0) for name, a in self.agents.items()}

    def traffic(self, seconds: float) -> Traffic:
        """Run ``seconds`` of virtual time, 1 s at a time, and report what each node sent:
        bytes/s per node (mean and busiest node) and the busiest second against the mean one."""
        before = self.bytes_sent()
        per_second: list[int] = []
        for _ in range(int(seconds)):
            b0 = self.net.stats.bytes_sent
            self.run_for(1.0)
            per_second.append(self.net.stats.bytes_sent - b0)
        sent = [b - before.get(name, 0) for name, b in self.bytes_sent().items()]
        mean_second = sum(per_second) / len(per_second)
        return Traffic(
            window_s=seconds,
            bytes_per_node_s=sum(sent) / len(sent) / seconds,
            max_node_bytes_s=max(sent) / seconds,
            peak_second_over_mean=max(per_second) / mean_second if mean_second else None,
        )

    def table_entries(self) -> float:
        """Mean member-table entries per running node (its memory of the cluster)."""
        return statistics.mean(len(a.membership.members) for a in self.agents.values())

    def table_wire_bytes(self, name: str = "n0") -> int:
        """Encoded size of node ``name``'s full member table (what one push-pull carries)."""
        membership = self.agents[name].membership
        me = membership.me
        state = [m.news(origin=me.name) for m in membership.members.values()]
        return len(Message(MsgType.PUSH_PULL, me.name, me.address, state=state).encode())

    # bookkeeping

    def _on_change(self, observer: str, member: Member, old: State | None) -> None:
        was, now = old is State.ALIVE, member.state is State.ALIVE
        if was != now:
            self._count_alive(observer, 1 if now else -1)
        if not now:
            t = Transition(self.net.time(), observer, member.name, member.state, member.incarnation)
            self.transitions.append(t)
        for listener in self.listeners:
            listener(observer, member, old)

    def _count_alive(self, observer: str, delta: int) -> None:
        full = self.n - 1
        before = self._alive_seen[observer]
        self._alive_seen[observer] = before + delta
        self._full += (before + delta == full) - (before == full)
        self._pairs += delta
        if self.pairs99_at is None and self._pairs >= 0.99 * self.n * full:
            self.pairs99_at = self.net.time()
        if self._full == self.n and self.converged_at is None:
            self.converged_at = self.net.time()
            self.bytes_at_convergence = self.net.stats.bytes_sent


class DataSimulation(Simulation):
    """A :class:`Simulation` whose nodes also do the mesh's data work, all on one virtual clock.

    Each node is a real :class:`Cluster` (membership driven by a :class:`MeshAgent` on the
    :class:`VirtualLoop`) and a real :class:`MeshCoordinator` over :class:`MemoryHoldings`
    and :class:`SimPeers`. ``call_loss`` (default: ``loss``) drops peer requests and replies,
    ``call_timeout_s`` is the peers' timeout, ``refuse_dead`` makes calls to a crashed node
    fail at once rather than time out; ``directory_options`` go to :class:`HolderDirectory`
    (``anti_entropy_s``, ``flush_interval_s``...). ``errors`` collects exceptions the loop
    saw and errors the mesh logged. Use as a context manager, or call :meth:`close`.
    """

    def __init__(
        self,
        n: int,
        seed: int = 0,
        *,
        loss: float = 0.0,
        call_loss: float | None = None,
        config: MeshConfig | None = None,
        delay_s: tuple[float, float] = DEFAULT_DELAY_S,
        replicas: int = 2,
        call_timeout_s: float = 2.0,
        capacity_bytes: int | None = None,
        refuse_dead: bool = False,
        **directory_options: Any,
    ) -> None:
        self.loop = VirtualLoop()
        self.errors: list[str] = []
        self.loop.set_exception_handler(self._loop_error)
        self.replicas = replicas
        self.call_timeout_s = call_timeout_s
        self.capacity_bytes = capacity_bytes
        self.directory_options = directory_options
        self.nodes: dict[str, SimNode] = {}
        self.calls = CallNetwork(
            self.loop,
            random.Random(f"{seed}-calls"),
            loss if call_loss is None else call_loss,
            delay_s,
            reachable=lambda src, dst: self.net.reachable(src, dst),
            refuse_dead=refuse_dead,
        )
        self._log = ErrorLog(self.errors)
        logging.getLogger("lmcache_mesh").addHandler(self._log)
        super().__init__(n, seed, loss, config, delay_s, scheduler=self.loop)

    def __enter__(self) -> DataSimulation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop every node's mesh work, cancel what still runs and close the loop."""
        if self.loop.is_closed():
            return

        async def stop() -> None:
            for node in self.nodes.values():
                await node.directory.aclose()
            tasks = asyncio.all_tasks() - {asyncio.current_task()}
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        self.run(stop())
        self.loop.close()
        logging.getLogger("lmcache_mesh").removeHandler(self._log)

    def _loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        self.errors.append(f"{context.get('message')}: {context.get('exception')!r}")

    def _node(
        self, name: str, zone: str, rng: random.Random, on_change: Callable[[Member, State | None], None]
    ) -> MeshAgent:
        address = address_of(name)
        transport = self.net.transport(address)
        mesh_rng = random.Random(rng.getrandbits(64))
        cluster = Cluster(name, address, zone, 1.0, self.config, InProcGossip(transport), rng=rng)
        ring_follows = cluster.membership.on_change
        assert ring_follows is not None

        def changed(member: Member, old: State | None) -> None:
            ring_follows(member, old)
            on_change(member, old)

        cluster.membership.on_change = changed
        holdings = MemoryHoldings(self.capacity_bytes)
        peers = SimPeers(self.calls, address, self.call_timeout_s)
        coordinator = MeshCoordinator(
            cluster,
            holdings,
            peers,
            replicas=self.replicas,
            clock=self.loop.time,
            rng=mesh_rng,
            directory=DirectoryConfig(**self.directory_options),
        )
        self.nodes[name] = node = SimNode(name, address, cluster, holdings, peers, coordinator)
        self.calls.attach(address, node)
        return MeshAgent(cluster.membership, transport, self.loop)

    # running: everything happens on the loop

    def run(self, work: Coroutine[Any, Any, T] | asyncio.Future[T]) -> T:
        """Run ``work`` on the loop (virtual time passes as it waits) and return its result."""
        return self.loop.run_until_complete(work)

    def run_for(self, seconds: float) -> None:
        self.run(asyncio.sleep(seconds))

    def start(self, names: Iterable[str] | None = None, seed_address: str = "a0") -> None:
        """Start ``names`` (default: every node): membership joins through ``seed_address``,
        and each node's mesh work (flushes, anti-entropy) begins."""
        chosen = list(self.agents) if names is None else list(names)

        async def start() -> None:
            for name in chosen:
                self.agents[name].start([seed_address])
                self.nodes[name].coordinator.start()

        self.run(start())

    def crash(self, name: str) -> None:
        """Node ``name`` stops at once, its holdings gone with it; nobody is told."""
        super().crash(name)
        node = self.nodes.pop(name)
        self.calls.detach(node.address)
        self.run(node.directory.aclose())

    # the data plane, as a client of node ``name`` sees it

    def put(self, name: str, records: Sequence[SimRecord]) -> None:
        """A client's PUT to node ``name``: stored there, announced and replicated."""
        node = self.nodes[name]
        node.holdings.put_records(records)
        node.directory.stored(records, replicate=True)

    def locate(self, name: str, keys: Sequence[bytes], timeout_s: float = 1.0) -> list[list[str]]:
        node = self.nodes[name]
        return self.run(node.reads.locate(keys, self.loop.time() + timeout_s))

    def lookup(self, name: str, keys: Sequence[bytes], timeout_s: float = 1.0) -> tuple[int, list[list[str]]]:
        node = self.nodes[name]
        return self.run(node.reads.lookup(keys, self.loop.time() + timeout_s))

    def get(self, name: str, keys: Sequence[bytes], timeout_s: float = 1.0) -> list[SimRecord | None]:
        """A client's GET from node ``name``: its own tiers, then the mesh."""
        node = self.nodes[name]
        return self.run(node.reads.get(keys, node.holdings.get(keys), self.loop.time() + timeout_s))

    # what is where

    def ring(self) -> HashRing:
        """The ring every running node's view converges to (all of them alive)."""
        return HashRing(
            RingMember(n.name, n.cluster.membership.me.zone, n.cluster.membership.me.weight)
            for n in self.nodes.values()
        )

    def holders_of(self, key: bytes) -> list[str]:
        """Running nodes that hold ``key``."""
        return sorted(name for name, node in self.nodes.items() if key in node.holdings.records)

    def replicated(self, keys: Iterable[bytes], ring: HashRing | None = None) -> bool:
        """Every key is held by each of its ``replicas`` owners on the converged :meth:`ring`."""
        ring = ring or self.ring()
        return all(
            key in self.nodes[o].holdings.records for key in keys for o in ring.owners(key, self.replicas)
        )

    def indexed(self, keys: Iterable[bytes], ring: HashRing | None = None) -> bool:
        """Each key's owners (on the converged :meth:`ring`) index every running node holding it."""
        ring = ring or self.ring()
        for key in keys:
            held = set(self.holders_of(key))
            for owner in ring.owners(key, self.replicas):
                if not held <= set(self.nodes[owner].directory.index.holders(key)):
                    return False
        return True

    def mesh_counters(self) -> Counter[str]:
        """The mesh's counters (``replicated``, ``repaired``, ``announced``...) summed over running nodes."""
        total: Counter[str] = Counter()
        for node in self.nodes.values():
            total.update(node.coordinator.counters)
        return total
