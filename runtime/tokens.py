"""Token counting when a provider does not report usage.

The estimate is one token per four UTF-8 bytes, rounded up, plus four tokens
of per-message overhead: close to what BPE tokenizers give for English text,
and deliberately pessimistic for code. Provider-reported usage always wins.
"""

from __future__ import annotations

MESSAGE_OVERHEAD_TOKENS = 4


def estimate_tokens(text: str) -> int:
    """Estimated tokens of a piece of text (0 for the empty string)."""
    size = len(text.encode("utf-8"))
    return (size + 3) // 4


def estimate_message_tokens(text: str) -> int:
    """Estimated tokens of one chat message, including its framing overhead."""
    return estimate_tokens(text) + MESSAGE_OVERHEAD_TOKENS
