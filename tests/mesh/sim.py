"""A simulated cluster: real Membership + MeshAgent code over the in-process network."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable

from lmcache_mesh.mesh.agent import MeshAgent
from lmcache_mesh.mesh.config import MeshConfig
from lmcache_mesh.mesh.membership import Member, Membership, State
from lmcache_mesh.transports.inproc import InProcNetwork


class Sim:
    """``n`` nodes named n0..n{n-1} at addresses a0..; n0 is the seed everyone joins through."""

    def __init__(
        self,
        n: int,
        seed: int = 0,
        loss: float = 0.0,
        config: MeshConfig | None = None,
        delay_s: tuple[float, float] = (0.001, 0.01),
    ) -> None:
        self.config = config or MeshConfig.lan()
        self.net = InProcNetwork(seed=seed, loss=loss, delay_s=delay_s)
        self.seed = seed
        self.agents: dict[str, MeshAgent] = {}
        self.deaths: list[tuple[float, str, str, State]] = []  # (time, observer, member, new state)
        for i in range(n):
            self.add(f"n{i}")

    def add(self, name: str, zone: str = "default") -> MeshAgent:
        address = "a" + name[1:]
        rng = random.Random(f"{self.seed}-{name}-{len(self.deaths)}-{self.net.time()}")

        def on_change(member: Member, old: State | None, observer: str = name) -> None:
            if member.state in (State.DEAD, State.LEFT):
                self.deaths.append((self.net.time(), observer, member.name, member.state))

        membership = Membership(self.config, name, address, zone=zone, rng=rng, on_change=on_change)
        agent = MeshAgent(membership, self.net.transport(address), self.net)
        self.agents[name] = agent
        return agent

    def start(self, names: Iterable[str] | None = None, seed_address: str = "a0") -> None:
        for name in names or list(self.agents):
            self.agents[name].start([seed_address])

    def crash(self, name: str) -> None:
        agent = self.agents.pop(name)
        agent.stop()
        self.net.detach(agent.transport.address)

    def view(self, observer: str) -> dict[str, State]:
        return {m.name: m.state for m in self.agents[observer].membership.members.values()}

    def all_see(self, name: str, state: State) -> bool:
        return all(self.view(o).get(name) is state for o in self.agents if o != name)

    def converged(self) -> bool:
        """Every running node sees every running node alive."""
        names = set(self.agents)
        for agent in self.agents.values():
            alive = {m.name for m in agent.membership.members.values() if m.state is State.ALIVE}
            if not names <= alive:
                return False
        return True

    def run_until(self, predicate: Callable[[], bool], timeout_s: float, step_s: float = 0.1) -> float | None:
        """Virtual seconds until ``predicate`` holds (checked every ``step_s``), or None."""
        start = self.net.time()
        while self.net.time() - start <= timeout_s:
            if predicate():
                return self.net.time() - start
            self.net.run_for(step_s)
        return None
