"""Seeded simulations of larger clusters (the same code as the daemons, on a virtual clock)."""

from __future__ import annotations

from lmcache_mesh.mesh.config import MeshConfig
from lmcache_mesh.mesh.membership import State
from lmcache_mesh.mesh.simulation import Simulation


def test_one_hundred_nodes_converge() -> None:
    sim = Simulation(100, seed=11)
    sim.start()
    took = sim.run_until(sim.converged, timeout_s=30, step_s=0.5)
    assert took is not None and took < 30
    assert not sim.deaths


def test_no_healthy_node_is_declared_dead_under_five_percent_loss() -> None:
    """100 nodes, 5% of all datagrams lost, ten simulated minutes: no false deaths."""
    sim = Simulation(100, seed=12, loss=0.05, config=MeshConfig.lan())
    sim.start()
    assert sim.run_until(sim.converged, timeout_s=60, step_s=0.5) is not None
    sim.net.run_for(600)
    assert sim.deaths == []
    assert sim.net.stats.lost > 1000  # the loss really happened
    suspects = sim.in_state(State.SUSPECT)
    assert suspects <= 5  # a few may be in flight right now, none stuck


def test_the_same_seed_replays_the_same_run() -> None:
    """Everything random is drawn from the seed: a crash under loss plays out identically again."""

    def run(seed: int) -> tuple[object, ...]:
        sim = Simulation(10, seed=seed, loss=0.05)
        took = sim.converge(timeout_s=30)
        assert took is not None and sim.converged()
        sim.crash("n4")
        assert sim.run_until(lambda: sim.all_see("n4", State.DEAD), timeout_s=60) is not None
        return took, sim.transitions, sim.bytes_sent(), sim.counter("probes"), repr(sim)

    first = run(21)
    assert run(21) == first
    assert run(22) != first
