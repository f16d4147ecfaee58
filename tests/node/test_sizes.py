"""Human byte sizes."""

from __future__ import annotations

import pytest

from lmcache_mesh.node import format_size, parse_size


@pytest.mark.parametrize(
    "text, expected",
    [
        ("512MiB", 512 << 20),
        ("4GiB", 4 << 30),
        ("4gib", 4 << 30),
        ("1.5GiB", 3 << 29),
        ("100", 100),
        ("2KB", 2000),
        ("1 TiB", 1 << 40),
        ("0", 0),
        (1234, 1234),
    ],
)
def test_parse_size(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["", "GiB", "4 parsecs", "-1GiB", "1e3", -5, True])
def test_parse_size_rejects_with_a_message(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_size(bad)  # type: ignore[arg-type]


def test_format_size() -> None:
    assert format_size(512) == "512 B"
    assert format_size(4 << 30) == "4.0 GiB"
    assert format_size(1536 << 10) == "1.5 MiB"
