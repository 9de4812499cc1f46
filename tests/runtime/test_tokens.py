"""The documented token estimate: ceil(UTF-8 bytes / 4), plus 4 per message."""

from __future__ import annotations

import pytest

from agentplex.runtime.tokens import (
    MESSAGE_OVERHEAD_TOKENS,
    estimate_message_tokens,
    estimate_tokens,
)


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        ("", 0),
        ("a", 1),
        ("abc", 1),
        ("abcd", 1),
        ("abcde", 2),
        ("abcdefgh", 2),
        ("abcdefghi", 3),
        ("é", 1),  # 2 bytes
        ("éé", 1),  # 4 bytes
        ("ééé", 2),  # 6 bytes
        ("€€€€", 3),  # 12 bytes
        ("🙂", 1),  # 4 bytes
        ("🙂a", 2),  # 5 bytes
        ("x" * 4000, 1000),
    ],
)
def test_estimate_tokens(text: str, tokens: int) -> None:
    assert estimate_tokens(text) == tokens


def test_message_tokens_add_the_overhead() -> None:
    assert MESSAGE_OVERHEAD_TOKENS == 4
    assert estimate_message_tokens("") == 4
    assert estimate_message_tokens("hello world") == 3 + 4
    assert estimate_message_tokens("x" * 400) == 104


def test_estimate_is_monotonic_in_length() -> None:
    previous = 0
    for n in range(0, 200):
        current = estimate_tokens("y" * n)
        assert current >= previous
        assert current * 4 >= n
        assert (current - 1) * 4 < n or n == 0
        previous = current
