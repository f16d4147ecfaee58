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
"""

from __future__ import annotations

import functools
import random
import statistics
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from lmcache_mesh.transports.base import Scheduler
from lmcache_mesh.transports.inproc import InProcNetwork

from .agent import MeshAgent
from .config import MeshConfig
from .membership import Member, Membership, State
from .messages import Message, MsgType

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
    ) -> None:
        self.n = n
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
        return MeshAgent(membership, self.net.transport(address_of(name)), self.net)

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
