"""SWIM + Lifeguard membership, run on the in-process network's virtual clock."""

from __future__ import annotations

import random

import pytest

from lmcache_mesh.mesh.agent import MeshAgent
from lmcache_mesh.mesh.config import MeshConfig, suspicion_bounds
from lmcache_mesh.mesh.membership import MAX_INCARNATION_STEP, Membership, State
from lmcache_mesh.mesh.messages import MAX_INCARNATION, Kind, Message, MsgType, News
from lmcache_mesh.mesh.simulation import Simulation


def test_ten_nodes_join_through_one_seed() -> None:
    sim = Simulation(10, seed=1)
    sim.start()
    assert sim.run_until(sim.converged, timeout_s=10) is not None
    assert repr(sim.agents["n3"].membership).endswith("alive=10>")


def test_a_crashed_node_is_declared_dead_by_everyone_within_the_suspicion_bound() -> None:
    cfg = MeshConfig.lan()
    sim = Simulation(10, seed=2, config=cfg)
    sim.start()
    assert sim.run_until(sim.converged, timeout_s=10) is not None
    sim.crash("n7")
    low, high = suspicion_bounds(cfg, 10)
    # Found by a probe within a few probe intervals, then at most the maximum suspicion time.
    took = sim.run_until(lambda: sim.all_see("n7", State.DEAD), timeout_s=high + 10 * cfg.probe_interval_s)
    assert took is not None, {o: sim.view(o)["n7"] for o in sim.agents}
    assert all(member == "n7" for _, _, member, _ in sim.deaths)


def test_confirmations_shorten_the_suspicion() -> None:
    """Lifeguard: with many independent suspicions, death comes well before the maximum timeout."""
    cfg = MeshConfig.lan()
    sim = Simulation(30, seed=3, config=cfg)
    sim.start()
    assert sim.run_until(sim.converged, timeout_s=20) is not None
    sim.crash("n5")
    took = sim.run_until(lambda: sim.all_see("n5", State.DEAD), timeout_s=120)
    low, high = suspicion_bounds(cfg, 30)
    assert took is not None and took < high


def test_graceful_leave_is_seen_as_left_not_dead() -> None:
    sim = Simulation(8, seed=4)
    sim.start()
    assert sim.run_until(sim.converged, timeout_s=10) is not None
    sim.agents["n2"].leave()
    sim.net.run_for(0.5)
    sim.crash("n2")
    assert sim.run_until(lambda: sim.all_see("n2", State.LEFT), timeout_s=5) is not None
    assert {state for _, _, _, state in sim.deaths} == {State.LEFT}


def test_a_restarted_node_rejoins_and_refutes_its_death() -> None:
    sim = Simulation(6, seed=5, config=MeshConfig.local())
    sim.start()
    assert sim.run_until(sim.converged, timeout_s=10) is not None
    sim.crash("n4")
    assert sim.run_until(lambda: sim.all_see("n4", State.DEAD), timeout_s=30) is not None
    dead_inc = sim.agents["n0"].membership.members["n4"].incarnation
    sim.add("n4").start(["a0"])  # same name and address, incarnation starts from 0 again
    assert sim.run_until(sim.converged, timeout_s=10) is not None
    assert sim.agents["n0"].membership.members["n4"].incarnation > dead_inc


def test_a_partition_of_two_thirds_heals() -> None:
    sim = Simulation(9, seed=6, config=MeshConfig.local())
    sim.start()
    assert sim.run_until(sim.converged, timeout_s=10) is not None
    big = [f"a{i}" for i in range(6)]
    small = [f"a{i}" for i in range(6, 9)]
    sim.net.partition(big, small)

    def split() -> bool:  # each side has declared the other dead
        return all(
            sim.view(f"n{i}")[f"n{j}"] is State.DEAD and sim.view(f"n{j}")[f"n{i}"] is State.DEAD
            for i in range(6)
            for j in range(6, 9)
        )

    assert sim.run_until(split, timeout_s=60) is not None
    sim.net.heal()
    took = sim.run_until(sim.converged, timeout_s=30)
    assert took is not None, {o: sim.view(o) for o in ("n0", "n8")}


def test_a_short_blackout_is_refuted_not_fatal() -> None:
    """A node that misses a few probes is suspected, hears of it, refutes, and stays alive."""
    cfg = MeshConfig.lan()
    sim = Simulation(8, seed=7, config=cfg)
    sim.start()
    assert sim.run_until(sim.converged, timeout_s=10) is not None
    sim.net.partition(["a3"])  # a3 alone, shorter than the minimum suspicion timeout
    sim.net.run_for(suspicion_bounds(cfg, 8)[0] * 0.5)
    sim.net.heal()
    assert sim.run_until(sim.converged, timeout_s=30) is not None
    assert not sim.deaths
    n3 = sim.agents["n3"].membership
    assert n3.counters["refutes"] >= 1 and n3.me.incarnation >= 1  # it was suspected, and refuted


def test_malformed_datagrams_are_counted_and_change_nothing() -> None:
    m = Membership(MeshConfig.local(), "x", "ax")
    m.start(0.0)
    before = dict(m.members)
    for data in (
        b"\xc1",
        b"\x93\x01\x02\x03",
        Message(MsgType.GOSSIP, "y", "ay").encode().replace(b"\x01", b"\x09", 1),
    ):
        assert m.on_message("ay", data, 1.0) == []
    assert m.counters["malformed"] == 3 and m.members == before


def test_suspicion_of_self_is_refuted_with_a_higher_incarnation() -> None:
    m = Membership(MeshConfig.local(), "x", "ax")
    m.start(0.0)
    gossip = Message(MsgType.GOSSIP, "y", "ay", gossip=[News(Kind.SUSPECT, "x", 0, origin="y")]).encode()
    m.on_message("ay", gossip, 1.0)
    assert m.me.incarnation == 1 and m.counters["refutes"] == 1


@pytest.mark.parametrize("state_news", [Kind.SUSPECT, Kind.DEAD])
def test_news_about_unknown_members_other_than_alive_is_ignored(state_news: Kind) -> None:
    m = Membership(MeshConfig.local(), "x", "ax")
    m.start(0.0)
    m.on_message(
        "ay", Message(MsgType.GOSSIP, "y", "ay", gossip=[News(state_news, "z", 3, origin="y")]).encode(), 1.0
    )
    assert "z" not in m.members


def test_joining_through_only_our_own_address_does_not_spin() -> None:
    sim = Simulation(3, seed=8, config=MeshConfig.local())
    sim.start()
    assert sim.run_until(sim.converged, timeout_s=10) is not None
    sim.agents["n1"].join(["a1"])  # only ourselves: nothing to do, and no timer stuck in the past
    ran = sim.net.run_for(2.0)
    assert ran < 2000  # a spinning timer would run millions of events (and hit max_events)
    assert sim.agents["n1"].membership.next_wakeup() > sim.net.time()


def test_a_dead_member_does_not_hurt_the_health_of_those_probing_it() -> None:
    """Lifeguard: helpers nack in time, so probing a dead node does not look like our own fault."""
    sim = Simulation(10, seed=9, config=MeshConfig.lan())
    sim.start()
    assert sim.run_until(sim.converged, timeout_s=10) is not None
    sim.crash("n9")
    assert sim.run_until(lambda: sim.all_see("n9", State.DEAD), timeout_s=60) is not None
    assert max(a.membership.awareness for a in sim.agents.values()) <= 2


def test_a_new_zone_at_a_higher_incarnation_is_reported() -> None:
    seen: list[tuple[str, str, State | None]] = []
    m = Membership(
        MeshConfig.local(), "x", "ax", on_change=lambda mem, old: seen.append((mem.name, mem.zone, old))
    )
    m.start(0.0)
    for inc, zone in ((0, "z1"), (1, "z2")):
        news = News(Kind.ALIVE, "y", inc, "ay", zone, 1.0, "y")
        m.on_message("ay", Message(MsgType.GOSSIP, "y", "ay", gossip=[news]).encode(), 1.0)
    assert seen == [("y", "z1", None), ("y", "z2", State.ALIVE)]


def _gossip(m: Membership, *news: News) -> None:
    m.on_message("ay", Message(MsgType.GOSSIP, "y", "ay", gossip=list(news)).encode(), 1.0)


def test_an_implausible_incarnation_jump_is_dropped_and_we_can_still_refute() -> None:
    """A forged DEAD at the highest incarnation (2**62) would leave its victim unable ever to
    refute; a forged ALIVE at one would pin a member to the forger's address. Both are dropped."""
    m = Membership(MeshConfig.local(), "x", "ax")
    m.start(0.0)
    _gossip(m, News(Kind.ALIVE, "y", 3, "ay", "z", 1.0, "y"))
    _gossip(m, News(Kind.DEAD, "x", MAX_INCARNATION, origin="y"))  # about us
    _gossip(m, News(Kind.ALIVE, "y", MAX_INCARNATION, "tcp://attacker:1", "z", 1.0, "y"))  # about a peer
    _gossip(m, News(Kind.ALIVE, "new", MAX_INCARNATION_STEP + 1, "an", "z", 1.0, "new"))  # a newcomer
    assert m.counters["implausible_news"] == 3
    assert m.me.incarnation == 0 and m.members["y"].address == "ay" and "new" not in m.members
    _gossip(m, News(Kind.DEAD, "x", 5, origin="y"))  # plausible news about us is refuted as ever
    assert m.me.incarnation == 6 and m.me.state is State.ALIVE


def test_gossip_with_bad_fields_or_too_many_items_is_malformed() -> None:
    m = Membership(MeshConfig.local(), "x", "ax")
    m.start(0.0)
    too_many = [News(Kind.ALIVE, f"n{i}", 0, f"a{i}", "z", 1.0, f"n{i}") for i in range(1025)]
    _gossip(m, *too_many)
    for bad in (
        News(Kind.ALIVE, "has space", 0, "a", "z", 1.0, "y"),
        News(Kind.ALIVE, "y", 0, "a b", "z", 1.0, "y"),
        News(Kind.ALIVE, "y", 0, "a", "z", 1e5, "y"),
        News(Kind.ALIVE, "y", 0, "a", "z" * 200, 1.0, "y"),
    ):
        _gossip(m, bad)
    assert m.counters["malformed"] == 5 and list(m.members) == ["x"]


def _second(sim: Simulation, name: str, address: str) -> MeshAgent:
    """A node started under ``name`` at another address (not one of the simulation's own)."""
    m = Membership(sim.config, name, address, rng=random.Random(address))
    agent = MeshAgent(m, sim.net.transport(address), sim.net)
    agent.start(["a0"])
    return agent


def test_a_second_node_under_a_live_members_name_refuses_and_the_name_stays() -> None:
    """Issue 17 (8): the newcomer asks the holder of its name, under that name, and hears it
    answer: it refuses to join (``conflict``); the live member keeps its name and address."""
    sim = Simulation(6, seed=11, config=MeshConfig.local())
    sim.start()
    assert sim.run_until(sim.converged, timeout_s=10) is not None
    sim.agents["n3"].membership._refute(4)  # it has refuted before: its incarnation is above 0
    sim.net.run_for(1.0)
    conflicts: list[str] = []
    impostor = _second(sim, "n3", "a99")
    impostor.membership.on_conflict = conflicts.append
    assert sim.run_until(lambda: impostor.membership.conflict is not None, timeout_s=5) is not None
    assert conflicts == ["a3"] and impostor.membership.conflict == "a3"
    sim.net.run_for(5.0)
    for name, agent in sim.agents.items():
        if name != "n3":
            m = agent.membership.members["n3"]
            assert (m.address, m.state) == ("a3", State.ALIVE), name
    assert sim.agents["n3"].membership.counters["name_conflicts"] >= 1
    assert impostor.membership.tick(sim.net.time()) == []  # it takes no part any more


def test_a_node_restarted_at_a_new_address_takes_its_name_back() -> None:
    """An earlier life at the old address does not answer the check: the new life refutes."""
    sim = Simulation(5, seed=12, config=MeshConfig.local())
    sim.start()
    assert sim.run_until(sim.converged, timeout_s=10) is not None
    sim.crash("n2")
    again = _second(sim, "n2", "a77")  # before anyone noticed the old life died
    moved = sim.run_until(
        lambda: all(a.membership.members["n2"].address == "a77" for a in sim.agents.values()), timeout_s=10
    )
    assert moved is not None and again.membership.conflict is None
    assert all(a.membership.members["n2"].state is State.ALIVE for a in sim.agents.values())
