"""SWIM membership with Lifeguard suspicion, as a sans-I/O state machine.

The core never sends, sleeps or reads a clock: :meth:`Membership.tick` and
:meth:`Membership.on_message` take ``now`` and return the datagrams to send as
``(address, bytes)`` pairs, and :meth:`Membership.next_wakeup` says when ``tick`` is due.
:class:`~lmcache_mesh.mesh.agent.MeshAgent` drives it over any transport and scheduler.

Protocol (Das et al. 2002; Lifeguard, Dadgar et al. 2017):
- every probe interval (scaled by local health) ping the next member of a shuffled
  round-robin; no ack within the probe timeout -> ask ``indirect_checks`` others to ping it;
  still no ack by the end of the interval -> suspect it;
- a suspicion becomes death after a timeout that starts high and falls as independent
  confirmations arrive; the suspect refutes by raising its incarnation;
- news (alive/suspect/dead) is piggybacked on every message and gossiped to a few random
  members each gossip interval, each item a bounded number of times (∝ log N);
- full member tables are exchanged with one random member periodically (push-pull), which
  is also how a node joins through seed addresses and how a restarted node learns that it
  was declared dead (and refutes it).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence

from .broadcast import NEWS_WIRE_BYTES_ESTIMATE, BroadcastQueue
from .config import MeshConfig, push_pull_scale, remaining_suspicion_s, suspicion_bounds
from .errors import MalformedMessage
from .identity import IDENTITY_CHECK_SEQ, NEWCOMER_S, IdentityChecks
from .members import LIVE_STATES, Member, Probe, Relay, State, Suspicion, is_live
from .messages import MAX_INCARNATION, Kind, Message, MsgType, News

logger = logging.getLogger(__name__)

MAX_INCARNATION_STEP = 1 << 16
"""A member's incarnation rises by one per refute: news claiming a jump larger than this (over
what we know, or over 0 for a member new to us) is implausible and dropped (counted), so
nobody can push a member to the highest incarnation, where it could never refute again."""

NACK_FRACTION = 0.8
"""A relay nacks this fraction of the probe timeout after a PING_REQ (memberlist's figure)."""

Out = tuple[str, bytes]
"""A datagram to send: (address, bytes)."""


ConflictListener = Callable[[str], None]
"""Called with the address of a live node that holds our name, when we are the newcomer."""

ChangeListener = Callable[[Member, "State | None"], None]
"""Called with (member, previous state or None when new) after every state change, and with
(member, its unchanged state) when a live member's address, zone or weight changed."""


class Membership:
    """One node's view of the cluster. Not thread-safe: call it from one scheduler thread."""

    def __init__(
        self,
        config: MeshConfig,
        name: str,
        address: str,
        zone: str = "default",
        weight: float = 1.0,
        rng: random.Random | None = None,
        on_change: ChangeListener | None = None,
        on_conflict: ConflictListener | None = None,
    ) -> None:
        self.config = config
        self.me = Member(name, address, zone, weight)
        self.members: dict[str, Member] = {name: self.me}
        self.rng = rng or random.Random()
        self.on_change = on_change
        self.on_conflict = on_conflict
        self.conflict: str | None = None
        """The address of a live node holding our name, found while we were new: we must not join."""
        self.counters: dict[str, int] = {
            "messages_in": 0,
            "messages_out": 0,
            "bytes_in": 0,
            "bytes_out": 0,
            "malformed": 0,
            "probes": 0,
            "probe_failures": 0,
            "refutes": 0,
            "implausible_news": 0,
            "name_conflicts": 0,
        }
        self._alive_count = 1
        self._queue = BroadcastQueue(config.retransmit_mult, self.num_alive)
        self._awareness = 0
        self._seq = 0
        self._probe: Probe | None = None
        self._probe_order: list[str] = []
        self._suspicions: dict[str, Suspicion] = {}
        self._relays: dict[int, Relay] = {}
        self._identity = IdentityChecks()
        self._outbox: list[Out] = []
        """datagrams that applying news asked for, sent with the next batch"""
        self._seeds: list[str] = []
        self._next_join_at = float("inf")
        self._next_probe_at = float("inf")
        self._next_gossip_at = float("inf")
        self._next_push_pull_at = float("inf")
        self._next_reclaim_at = float("inf")
        self._next_reconnect_at = float("inf")
        self._leaving = False

    def __repr__(self) -> str:
        counts = {s: 0 for s in State}
        for m in self.members.values():
            counts[m.state] += 1
        summary = " ".join(f"{s.value}={n}" for s, n in counts.items() if n)
        return f"<Membership {self.me.name} inc={self.me.incarnation} {summary}>"

    # queries

    def num_alive(self) -> int:
        """Members alive or suspect, ourselves included (kept up to date by _transition)."""
        return self._alive_count

    def alive_members(self) -> list[Member]:
        return [m for m in self.members.values() if is_live(m.state)]

    @property
    def awareness(self) -> int:
        """Lifeguard local health: 0 is healthy; each step slows our own probing."""
        return self._awareness

    def next_wakeup(self) -> float:
        if self.conflict is not None:
            return float("inf")
        times = [
            self._next_probe_at,
            self._next_gossip_at,
            self._next_push_pull_at,
            self._next_reclaim_at,
            self._next_join_at,
            self._next_reconnect_at,
        ]
        if self._probe is not None:
            times.append(self._probe.ends_at)
            if not self._probe.indirect_sent and not self._probe.acked:
                times.append(self._probe.indirect_at)
        times.extend(min(s.deadline, s.regossip_at) for s in self._suspicions.values())
        times.extend(r.nack_at for r in self._relays.values())
        times.append(self._identity.next_deadline())
        return min(times)

    # lifecycle

    def start(self, now: float, seeds: Sequence[str] = ()) -> list[Out]:
        """Begin probing and gossiping; join through ``seeds`` (addresses) if given."""
        cfg = self.config
        self.me.since = now
        self._next_probe_at = now + self.rng.uniform(0, cfg.probe_interval_s)
        self._next_gossip_at = now + self.rng.uniform(0, cfg.gossip_interval_s)
        # Random phases: nodes started together must not sync full tables in lockstep.
        self._next_push_pull_at = now + self.rng.uniform(0.5, 1.0) * cfg.push_pull_interval_s
        self._next_reclaim_at = now + cfg.dead_reclaim_s
        self._next_reconnect_at = now + self.rng.uniform(0.5, 1.0) * cfg.reconnect_interval_s
        self._queue.queue(self.me.news())  # gossip our own arrival, not only through push-pull
        self._seeds = [s for s in seeds if s != self.me.address]
        out: list[Out] = []
        if self._seeds:
            out = self._join(now)
        return out

    def join(self, now: float, seeds: Sequence[str]) -> list[Out]:
        """Join the cluster that ``seeds`` belong to (also on a running node)."""
        self._seeds = [s for s in seeds if s != self.me.address]
        return self._join(now)

    def leave(self, now: float) -> list[Out]:
        """Announce a graceful leave to several members at once (they spread it further)."""
        if self.conflict is not None:
            return []  # the name is another node's: a leave would read as that node's
        self._leaving = True
        news = News(
            Kind.DEAD,
            self.me.name,
            self.me.incarnation,
            self.me.address,
            self.me.zone,
            self.me.weight,
            self.me.name,
        )
        peers = self._random_members(max(self.config.gossip_nodes, 5), include_dead=False)
        return [
            self._send(m.address, Message(MsgType.GOSSIP, self.me.name, self.me.address, gossip=[news]))
            for m in peers
        ]

    # the protocol

    def tick(self, now: float) -> list[Out]:
        if self.conflict is not None:
            return []  # another node holds our name: we take no part
        out: list[Out] = []
        cfg = self.config
        if self._seeds and now >= self._next_join_at:
            out += self._join(now)  # until a seed's full table arrives (see PUSH_PULL below)
        out += self._tick_probe(now)
        for name, s in list(self._suspicions.items()):
            member = self.members.get(name)
            if now >= s.deadline:
                if member is not None and member.state is State.SUSPECT:
                    self._apply(News(Kind.DEAD, name, member.incarnation, origin=self.me.name), now)
                self._suspicions.pop(name, None)
            elif now >= s.regossip_at and member is not None:
                s.regossip_at = now + suspicion_bounds(cfg, self.num_alive())[0] / 2
                self._queue.queue(News(Kind.SUSPECT, name, member.incarnation, origin=self.me.name))
        for check in self._identity.expired(now):  # silent: an earlier life of ours
            if check.incarnation >= self.me.incarnation:
                self._refute(check.incarnation)
        for seq, relay in list(self._relays.items()):
            if now >= relay.nack_at:
                del self._relays[seq]
                out.append(
                    self._send(
                        relay.requester_addr,
                        Message(MsgType.NACK, self.me.name, self.me.address, seq=relay.requester_seq),
                    )
                )
        if now >= self._next_gossip_at:
            self._next_gossip_at = now + cfg.gossip_interval_s
            if len(self._queue):
                for m in self._random_members(cfg.gossip_nodes, include_dead=True, now=now):
                    gossip = self._queue.take(cfg.max_datagram_bytes)
                    if not gossip:
                        break
                    out.append(
                        self._send(
                            m.address, Message(MsgType.GOSSIP, self.me.name, self.me.address, gossip=gossip)
                        )
                    )
        if now >= self._next_push_pull_at:
            interval = push_pull_scale(cfg.push_pull_interval_s, self.num_alive())
            self._next_push_pull_at = now + self.rng.uniform(0.75, 1.25) * interval
            peers = self._random_members(1, include_dead=False)
            if peers:
                out.append(self._send(peers[0].address, self._push_pull(reply=False)))
        if now >= self._next_reconnect_at:
            self._next_reconnect_at = now + cfg.reconnect_interval_s
            dead = [m for m in self.members.values() if m.state is State.DEAD]
            if dead:
                out.append(self._send(self.rng.choice(dead).address, self._push_pull(reply=False)))
        if now >= self._next_reclaim_at:
            self._next_reclaim_at = now + cfg.dead_reclaim_s / 4
            for name, m in list(self.members.items()):
                keep_s = cfg.dead_reclaim_s if m.state is State.LEFT else cfg.reconnect_timeout_s
                if m.state in (State.DEAD, State.LEFT) and now - m.since >= keep_s:
                    del self.members[name]
        return self._drain(out)

    def on_message(self, src_addr: str, data: bytes, now: float) -> list[Out]:
        """Handle one datagram; malformed input is counted and dropped, never raised."""
        if self.conflict is not None:
            return []
        self.counters["messages_in"] += 1
        self.counters["bytes_in"] += len(data)
        try:
            msg = Message.decode(data)
        except MalformedMessage as exc:
            self.counters["malformed"] += 1
            logger.debug("x %s: malformed datagram from %s: %s", self.me.name, src_addr, exc)
            return []
        if msg.src == self.me.name:
            return self._same_name(msg, now)
        for news in msg.gossip:
            self._apply(news, now)
        out: list[Out] = []
        if msg.type is MsgType.PING:
            if not msg.target or msg.target == self.me.name:
                out.append(
                    self._send(
                        msg.src_addr,
                        self._with_gossip(Message(MsgType.ACK, self.me.name, self.me.address, seq=msg.seq)),
                    )
                )
        elif msg.type is MsgType.NACK:
            if self._probe is not None and self._probe.seq == msg.seq:
                self._probe.nacks += 1  # the helper is fine; the target did not answer it either
        elif msg.type is MsgType.ACK:
            if self._probe is not None and self._probe.seq == msg.seq:
                if not self._probe.acked:
                    self._probe.acked = True
                    self._awareness = max(0, self._awareness - 1)
            elif msg.seq in self._relays:
                relay = self._relays.pop(msg.seq)
                out.append(
                    self._send(
                        relay.requester_addr,
                        Message(MsgType.ACK, self.me.name, self.me.address, seq=relay.requester_seq),
                    )
                )
        elif msg.type is MsgType.PING_REQ:
            seq = self._next_seq()
            # Nack before the requester's probe window closes, or it counts against its health.
            self._relays[seq] = Relay(
                msg.src_addr, msg.seq, now + NACK_FRACTION * self.config.probe_timeout_s
            )
            ping = Message(MsgType.PING, self.me.name, self.me.address, seq=seq, target=msg.target)
            out.append(self._send(msg.target_addr, self._with_gossip(ping)))
        elif msg.type is MsgType.PUSH_PULL:
            if msg.reply:
                self._next_join_at = float("inf")  # we hold someone's full table: joined
            for news in msg.state:
                self._apply(news, now, relayed=True)
            if not msg.reply:
                out.append(self._send(msg.src_addr, self._push_pull(reply=True)))
        return self._drain(out)

    # internals

    def _join(self, now: float) -> list[Out]:
        if not self._seeds:  # no seed but ourselves: nothing to retry (and no timer to spin on)
            self._next_join_at = float("inf")
            return []
        self._next_join_at = now + max(self.config.probe_interval_s, 0.5)
        return [self._send(seed, self._push_pull(reply=False)) for seed in self._seeds]

    def _tick_probe(self, now: float) -> list[Out]:
        out: list[Out] = []
        cfg = self.config
        scale = self._awareness + 1
        probe = self._probe
        if probe is not None:
            target = self.members.get(probe.target)
            if (
                not probe.acked
                and not probe.indirect_sent
                and now >= probe.indirect_at
                and target is not None
            ):
                probe.indirect_sent = True
                helpers = [
                    m
                    for m in self._random_members(cfg.indirect_checks + 1, include_dead=False)
                    if m.name != probe.target
                ]
                probe.helpers = len(helpers[: cfg.indirect_checks])
                for helper in helpers[: cfg.indirect_checks]:
                    req = Message(
                        MsgType.PING_REQ,
                        self.me.name,
                        self.me.address,
                        seq=probe.seq,
                        target=target.name,
                        target_addr=target.address,
                    )
                    out.append(self._send(helper.address, req))
            if now >= probe.ends_at:
                self._probe = None
                if not probe.acked:
                    self.counters["probe_failures"] += 1
                    # Lifeguard: helpers that did not even send a nack suggest *we* are the problem.
                    missing_nacks = max(0, probe.helpers - probe.nacks) if probe.indirect_sent else 0
                    self._awareness = min(
                        cfg.awareness_max_multiplier - 1, self._awareness + 1 + missing_nacks
                    )
                    if target is not None and is_live(target.state):
                        # A new suspicion, or an independent confirmation of one that shortens it.
                        self._apply(
                            News(Kind.SUSPECT, target.name, target.incarnation, origin=self.me.name), now
                        )
        if self._probe is None and now >= self._next_probe_at:
            self._next_probe_at = now + cfg.probe_interval_s * scale
            target = self._next_probe_target()
            if target is not None:
                self.counters["probes"] += 1
                seq = self._next_seq()
                self._probe = Probe(
                    target.name, seq, now + cfg.probe_timeout_s * scale, now + cfg.probe_interval_s * scale
                )
                ping = self._with_gossip(
                    Message(MsgType.PING, self.me.name, self.me.address, seq=seq, target=target.name)
                )
                if target.state is State.SUSPECT:
                    # Lifeguard's buddy system: tell a suspect it is suspected, so it can refute.
                    ping.gossip.insert(0, target.news(origin=self.me.name))
                out.append(self._send(target.address, ping))
        return out

    def _next_probe_target(self) -> Member | None:
        for _ in range(2):
            while self._probe_order:
                m = self.members.get(self._probe_order.pop())
                if m is not None and m is not self.me and is_live(m.state):
                    return m
            self._probe_order = [m.name for m in self.alive_members() if m is not self.me]
            self.rng.shuffle(self._probe_order)
        return None

    def _random_members(self, k: int, include_dead: bool, now: float = 0.0) -> list[Member]:
        pool = [
            m
            for m in self.members.values()
            if m is not self.me
            and (
                is_live(m.state)
                or (include_dead and m.state is State.DEAD and now - m.since < self.config.gossip_to_dead_s)
            )
        ]
        return self.rng.sample(pool, min(k, len(pool)))

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _push_pull(self, reply: bool) -> Message:
        state = [m.news(origin=self.me.name) for m in self.members.values()]
        return Message(MsgType.PUSH_PULL, self.me.name, self.me.address, state=state, reply=reply)

    def _with_gossip(self, msg: Message) -> Message:
        msg.gossip = self._queue.take(self.config.max_datagram_bytes // 4)
        return msg

    def _send(self, address: str, msg: Message) -> Out:
        data = msg.encode()
        self.counters["messages_out"] += 1
        self.counters["bytes_out"] += len(data)
        return address, data

    def _transition(self, member: Member, new: State, now: float, reason: str, is_new: bool = False) -> None:
        old = None if is_new else member.state
        self._alive_count += is_live(new) - is_live(old)
        member.state = new
        member.since = now
        if new is not State.SUSPECT:
            self._suspicions.pop(member.name, None)
        logger.debug(
            "- %s: %s %s -> %s (%s)",
            self.me.name,
            member.name,
            old.value if old else "new",
            new.value,
            reason,
        )
        if self.on_change is not None:
            self.on_change(member, old)

    def readdress(self, address: str) -> None:
        """Our own address changed: a higher incarnation carries the new one to everyone."""
        self.me.address = address
        self.me.incarnation += 1
        self._queue.queue(self.me.news())

    def _refute(self, incarnation: int) -> None:
        self.counters["refutes"] += 1
        # Lifeguard: being suspected hints that our own messages are late; probe more gently.
        self._awareness = min(self.config.awareness_max_multiplier - 1, self._awareness + 1)
        # Capped where decoders stop accepting: what we send must stay valid.
        self.me.incarnation = min(max(self.me.incarnation, incarnation) + 1, MAX_INCARNATION)
        self._queue.queue(self.me.news())

    def _apply(self, news: News, now: float, relayed: bool = False) -> None:
        """Apply one membership fact, queueing it for further gossip if it changed anything.

        ``relayed``: the fact comes from someone's member table (push-pull), not from the
        member that observed it, so it may start a suspicion but never confirms one.
        """
        known = self.members.get(news.name)
        if news.incarnation > (known.incarnation if known is not None else 0) + MAX_INCARNATION_STEP:
            self.counters["implausible_news"] += 1
            logger.debug(
                "x %s: dropped news of %s at incarnation %d", self.me.name, news.name, news.incarnation
            )
            return
        if news.name == self.me.name:
            if news.kind is Kind.ALIVE and news.address and news.address != self.me.address:
                self._check_identity(news, now)
            elif news.kind is Kind.ALIVE:
                if news.incarnation > self.me.incarnation:
                    self._refute(news.incarnation)  # a view of an earlier life of ours
            elif (
                not (self._leaving and news.origin == self.me.name)
                and news.incarnation >= self.me.incarnation
            ):
                self._refute(news.incarnation)
            return
        member = self.members.get(news.name)
        if news.kind is Kind.ALIVE:
            if member is None:
                member = Member(
                    news.name, news.address, news.zone, news.weight, news.incarnation, State.ALIVE, now
                )
                self.members[news.name] = member
                self._queue.queue(news)
                self._transition(member, State.ALIVE, now, "joined", is_new=True)
            elif news.incarnation > member.incarnation:
                before = (member.address, member.zone, member.weight)
                member.incarnation = news.incarnation
                member.address, member.zone, member.weight = (
                    news.address or member.address,
                    news.zone or member.zone,
                    news.weight,
                )
                self._queue.queue(news)
                if member.state is not State.ALIVE:
                    self._transition(member, State.ALIVE, now, f"alive at inc {news.incarnation}")
                elif before != (member.address, member.zone, member.weight) and self.on_change is not None:
                    self.on_change(member, State.ALIVE)  # same state, new address/zone/weight
            return
        if (
            member is None
            or news.incarnation < member.incarnation
            or member.state in (State.DEAD, State.LEFT)
        ):
            return
        if news.kind is Kind.SUSPECT:
            if member.state is State.SUSPECT and news.incarnation == member.incarnation:
                if not relayed:
                    self._confirm(member.name, news.origin, now)
                return
            member.incarnation = news.incarnation
            low, high = suspicion_bounds(self.config, self.num_alive())
            self._suspicions[member.name] = Suspicion(
                now, now + high, {news.origin}, regossip_at=now + low / 2
            )
            self._transition(member, State.SUSPECT, now, f"suspected by {news.origin}")
            self._confirm(member.name, news.origin, now, first=True)
            self._queue.queue(news)
            return
        member.incarnation = news.incarnation
        left = news.origin == news.name
        self._transition(
            member,
            State.LEFT if left else State.DEAD,
            now,
            "left" if left else f"declared dead by {news.origin}",
        )
        self._queue.queue(news)

    def _check_identity(self, news: News, now: float) -> None:
        """News of us alive at another address: an earlier life of ours there (refute it), or
        another node started under our name (ask it, with our name, before refuting)."""
        if self._identity.cleared(news.address, now):
            if news.incarnation >= self.me.incarnation:
                self._refute(news.incarnation)
            return
        seq = IDENTITY_CHECK_SEQ + self._next_seq()
        if self._identity.begin(seq, news.address, news.incarnation, now + 2 * self.config.probe_timeout_s):
            ping = Message(MsgType.PING, self.me.name, self.me.address, seq=seq, target=self.me.name)
            self._outbox.append(self._send(news.address, ping))

    def _same_name(self, msg: Message, now: float) -> list[Out]:
        """A datagram sent under our own name: our identity check come back to us, another
        node's check of us, or its answer to ours."""
        check = self._identity.answered(msg.seq)
        if msg.src_addr == self.me.address:  # ours, come back: the address leads to us
            if check is None:
                return []
            self._identity.clear(check.address, now)
            if check.incarnation >= self.me.incarnation:
                self._refute(check.incarnation)
            return []
        name, there = self.me.name, msg.src_addr
        if msg.type is MsgType.PING and msg.target == name:
            self.counters["name_conflicts"] += 1
            logger.warning(
                "x %s: a node at %s runs under our name: it must not join (another --name)", name, there
            )
            return [self._send(there, Message(MsgType.ACK, name, self.me.address, seq=msg.seq))]
        if msg.type is MsgType.ACK and check is not None:
            self.counters["name_conflicts"] += 1
            if now - self.me.since < NEWCOMER_S and self.conflict is None:
                self.conflict = there
                logger.error("x %s: the name belongs to a live member at %s: refusing to join", name, there)
                if self.on_conflict is not None:
                    self.on_conflict(there)
            else:  # we were here first: keep the name (a higher incarnation at our address)
                logger.warning("x %s: a node at %s also answers to our name; keeping it", name, there)
                self._refute(max(check.incarnation, self.me.incarnation))
        return []

    def _drain(self, out: list[Out]) -> list[Out]:
        if self._outbox:
            out = [*self._outbox, *out]
            self._outbox = []
        return out

    def _confirm(self, name: str, origin: str, now: float, first: bool = False) -> None:
        s = self._suspicions.get(name)
        if s is None or (origin in s.confirmations and not first):
            return
        s.confirmations.add(origin)
        n = self.num_alive()
        expected = max(0, min(int(self.config.suspicion_mult) - 2, n - 2))
        low, high = suspicion_bounds(self.config, n)
        remaining = remaining_suspicion_s(len(s.confirmations) - 1, expected, now - s.started, low, high)
        s.deadline = now + max(remaining, 0.0)
        if not first:
            member = self.members[name]
            self._queue.queue(News(Kind.SUSPECT, name, member.incarnation, origin=origin))


__all__ = ["LIVE_STATES", "NEWS_WIRE_BYTES_ESTIMATE", "Member", "Membership", "Out", "State", "is_live"]
