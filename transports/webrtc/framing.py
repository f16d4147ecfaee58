"""Multipart messages over a data channel: cut into pieces, glued back together.

A data channel carries messages of at most 256 KiB (aiortc's advertised limit), while a
node request or reply is a list of frames of any size (a 16 MiB chunk record is one frame).
A message goes out on one ordered, reliable channel as a run of pieces; the first piece
starts with a header that gives every frame's length, so the receiver knows where the
message ends without any per-piece flag:

    b"LMW1" | u32 frame count | u64 length per frame | frame bytes ...   (little-endian)

Pieces of different messages never interleave on one channel (the sender holds the channel
for a whole message). Anything that does not parse is a :class:`FramingError`: the peer is
broken or hostile, and the link is closed.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence

from ..base import Buffer

MAGIC = b"LMW1"
_HEAD = struct.Struct("<4sI")
_LEN = struct.Struct("<Q")

MAX_PIECE_BYTES = 256 << 10
"""aiortc refuses larger messages (``a=max-message-size:262144``)."""

MAX_FRAMES = 8192
"""Frames per message we accept (a GET of 4096 keys is 4097 frames)."""


class FramingError(Exception):
    """A peer sent pieces that do not form a valid message."""


def pieces(frames: Sequence[Buffer], piece_bytes: int) -> Iterator[bytes]:
    """The pieces of one message, each at most ``piece_bytes`` (copies, as aiortc wants bytes)."""
    if not 0 < piece_bytes <= MAX_PIECE_BYTES:
        raise ValueError(f"piece size must be in (0, {MAX_PIECE_BYTES}], got {piece_bytes}")
    views = [memoryview(f).cast("B") for f in frames]
    head = _HEAD.pack(MAGIC, len(views)) + b"".join(_LEN.pack(len(v)) for v in views)
    parts = [memoryview(head), *views]
    out: list[memoryview] = []
    room = piece_bytes
    for part in parts:
        while len(part):
            take = part[:room]
            out.append(take)
            part = part[len(take) :]
            room -= len(take)
            if room == 0:
                yield b"".join(out)
                out, room = [], piece_bytes
    if out:
        yield b"".join(out)


class Reassembler:
    """Turns the pieces arriving on one channel back into messages (lists of frames)."""

    def __init__(self, max_message_bytes: int) -> None:
        self.max_message_bytes = max_message_bytes
        self._buf: bytearray | None = None
        self._want = 0

    @property
    def busy(self) -> bool:
        """A message is partly received."""
        return self._buf is not None

    def feed(self, piece: bytes) -> list[memoryview] | None:
        """Add one piece; returns the message's frames (views of one buffer) once complete."""
        if not piece:
            raise FramingError("empty piece")
        if self._buf is None:
            self._buf = bytearray()
        self._buf += piece
        if not self._want:
            self._want = self._total()
            if not self._want:
                return None  # the header itself continues in the next piece
        if len(self._buf) < self._want:
            return None
        if len(self._buf) > self._want:
            raise FramingError(f"message longer than its header says ({len(self._buf)} > {self._want} bytes)")
        data, self._buf, self._want = memoryview(self._buf), None, 0
        count = _HEAD.unpack_from(data)[1]
        offset = _HEAD.size + count * _LEN.size
        frames = []
        for i in range(count):
            n = _LEN.unpack_from(data, _HEAD.size + i * _LEN.size)[0]
            frames.append(data[offset : offset + n])
            offset += n
        return frames

    def _total(self) -> int:
        """The whole message's length once its header is in; 0 while it is not."""
        assert self._buf is not None
        if len(self._buf) < _HEAD.size:
            return 0
        magic, raw_count = _HEAD.unpack_from(self._buf)
        count = int(raw_count)
        if magic != MAGIC:
            raise FramingError(
                f"bad message magic {bytes(magic)!r} (expected {MAGIC!r}: not an lmcache-mesh peer?)"
            )
        if not 0 < count <= MAX_FRAMES:
            raise FramingError(f"message of {count} frames (must be 1..{MAX_FRAMES})")
        head = _HEAD.size + count * _LEN.size
        if len(self._buf) < head:
            return 0
        body = int(sum(_LEN.unpack_from(self._buf, _HEAD.size + i * _LEN.size)[0] for i in range(count)))
        if body > self.max_message_bytes:
            raise FramingError(f"message of {body} bytes exceeds the limit of {self.max_message_bytes}")
        return head + body
