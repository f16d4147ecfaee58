"""Writes the golden mesh datagrams in this folder. Run once when the format changes on purpose:

python tests/mesh/data/make_golden.py
"""

from __future__ import annotations

from pathlib import Path

from lmcache_mesh.mesh.messages import Kind, Message, MsgType, News

HERE = Path(__file__).parent


def golden_messages() -> dict[str, Message]:
    alive = News(Kind.ALIVE, "n1", 3, "tcp://127.0.0.1:7701", "z1", 2.5, "n1")
    suspect = News(Kind.SUSPECT, "n2", 1, "", "", 1.0, "n1")
    return {
        "ping": Message(
            MsgType.PING, "n1", "tcp://127.0.0.1:7701", seq=7, target="n2", gossip=[alive, suspect]
        ),
        "ping_req": Message(
            MsgType.PING_REQ,
            "n1",
            "tcp://127.0.0.1:7701",
            seq=8,
            target="n3",
            target_addr="tcp://127.0.0.1:7703",
        ),
        "push_pull": Message(MsgType.PUSH_PULL, "n1", "tcp://127.0.0.1:7701", state=[alive], reply=True),
    }


def main() -> None:
    for name, msg in golden_messages().items():
        (HERE / f"{name}_v1.bin").write_bytes(msg.encode())


if __name__ == "__main__":
    main()
