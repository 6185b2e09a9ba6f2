"""Which idle conversation gives up its process when the pool needs room: frequency first, then recency.

Pure and small, like ``bot.fairness``. Pure LRU evicts a conversation people return to all day as
soon as a burst of one-off conversations passes through (a scan). ``Frequency`` counts messages per
conversation, evicted or not, and halves every count each ``window`` messages (TinyLFU's reset), so
the count follows what is busy *now* and the table holds at most ``window`` conversations. The
victim is the idle process with the lowest count, the least recently used among equals.
"""

from __future__ import annotations


class Frequency:
    def __init__(self, window: int) -> None:
        self.window = max(window, 1)
        self._counts: dict[str, int] = {}
        self._since_reset = 0

    def touch(self, conversation_id: str) -> None:
        self._counts[conversation_id] = self._counts.get(conversation_id, 0) + 1
        self._since_reset += 1
        if self._since_reset >= self.window:
            self._age()

    def count(self, conversation_id: str) -> int:
        return self._counts.get(conversation_id, 0)

    def __len__(self) -> int:
        return len(self._counts)

    def _age(self) -> None:
        self._since_reset = 0
        self._counts = {cid: n // 2 for cid, n in self._counts.items() if n > 1}
