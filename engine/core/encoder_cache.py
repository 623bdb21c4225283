"""Encoder outputs shared across requests by image hash (vLLM's encoder cache, simplified)."""

from __future__ import annotations

from collections import OrderedDict


class EncoderCache:
    """Up to `size` tokens of encoder outputs, keyed by image hash; least recently used evicted first.

    `size` 0 keeps nothing: every image is encoded when its placeholder tokens are first scheduled.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._entries: OrderedDict[str, int] = OrderedDict()  # image hash -> tokens
        self._used = 0

    def lookup_or_add(self, mm_hash: str, num_tokens: int) -> bool:
        """True if the image's encoder output is cached; else cache it (if it fits) and return False."""
        entries = self._entries
        if mm_hash in entries:
            entries.move_to_end(mm_hash)
            return True
        if num_tokens <= self.size:
            while self._used + num_tokens > self.size:
                self._used -= entries.popitem(last=False)[1]
            entries[mm_hash] = num_tokens
            self._used += num_tokens
        return False
