"""A prompt's record chain on vLLM: its whole chunks, then its tail as whole blocks.

The mesh stores a prompt's KV as records of ``chunk_tokens`` (chained chunk keys) and, after
the last full chunk, of one engine block each (chained block keys, see
:mod:`lmcache_mesh.node.keys`), so a hit reaches down to the last whole block. Records are
numbered along the prompt; record ``i`` holds tokens ``start(i) .. end(i) - 1``.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmcache_mesh.node.keys import block_keys, chunk_keys


@dataclass(frozen=True)
class Chain:
    keys: list[bytes]
    chunks: int
    """how many of the records are whole chunks (the rest are tail blocks)"""
    chunk_tokens: int
    block_tokens: int

    @classmethod
    def of(
        cls, namespace: bytes, tokens: list[int], chunk_tokens: int, block_tokens: int, tails: bool = True
    ) -> Chain:
        """The records covering ``tokens`` (whole chunks, then with ``tails`` whole blocks)."""
        n = len(tokens) // chunk_tokens * chunk_tokens
        keys = chunk_keys(namespace, tokens[:n], chunk_tokens)
        chunks = len(keys)
        if tails:
            keys += block_keys(keys[-1] if keys else namespace, tokens[n:], block_tokens)
        return cls(keys, chunks, chunk_tokens, block_tokens)

    def __len__(self) -> int:
        return len(self.keys)

    def start(self, i: int) -> int:
        """First token of record ``i``."""
        c = min(i, self.chunks)
        return c * self.chunk_tokens + (i - c) * self.block_tokens

    def end(self, i: int) -> int:
        """Tokens held by the first ``i`` records."""
        return self.start(i)

    def tokens(self, i: int) -> int:
        """Tokens of record ``i``."""
        return self.chunk_tokens if i < self.chunks else self.block_tokens

    def within(self, n_tokens: int) -> int:
        """How many leading records lie wholly within the first ``n_tokens`` tokens."""
        whole = self.chunks * self.chunk_tokens
        if n_tokens <= whole:
            return n_tokens // self.chunk_tokens
        return min(len(self.keys), self.chunks + (n_tokens - whole) // self.block_tokens)

    def at(self, token: int) -> int:
        """The record holding token ``token``."""
        whole = self.chunks * self.chunk_tokens
        if token < whole:
            return token // self.chunk_tokens
        return self.chunks + (token - whole) // self.block_tokens
