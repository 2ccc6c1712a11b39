"""Token ids to text, one token at a time, and stop strings: the text side of streaming.

Decoding tokens one by one and concatenating is wrong twice over: a byte-level BPE token can hold half
of a UTF-8 character (decoding it alone gives U+FFFD), and SentencePiece-style tokenizers drop or add a
leading space depending on what precedes a token. So `IncrementalDetokenizer` decodes a short window of
recent tokens with and without the new ones and emits the difference, and holds text back while it
ends in an incomplete character. The concatenation of everything it emits equals `decode(all ids)`.

`StopStrings` holds back text that could be the start of a stop string, so a streamed answer never
shows half of a stop string and then retracts it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Emits the new text of each pushed token id; `flush` emits whatever is held back at the end."""

    def __init__(self, decode: Callable[[Sequence[int]], str]) -> None:
        self._decode = decode
        self._ids: list[int] = []
        self._prefix = 0  # start of the context window, already emitted
        self._read = 0  # end of what has been emitted

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        before = self._decode(self._ids[self._prefix:self._read])
        after = self._decode(self._ids[self._prefix:])
        if len(after) <= len(before) or after.endswith(REPLACEMENT):
            return ""  # an incomplete character (or nothing visible yet): wait for more tokens
        self._prefix, self._read = self._read, len(self._ids)
        return after[len(before):]

    def flush(self) -> str:
        """Text still held back (an incomplete character at the very end is emitted as decoded)."""
        before = self._decode(self._ids[self._prefix:self._read])
        after = self._decode(self._ids[self._prefix:])
        self._prefix = self._read = len(self._ids)
        return after[len(before):] if len(after) > len(before) else ""


class StopStrings:
    """Finds the first stop string to complete in a growing text; emits only text that cannot start one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self._text = ""
        self._emitted = 0
        self.hit: str | None = None

    def feed(self, piece: str) -> str:
        """Add `piece`; return the text now safe to show. After a hit, `hit` is set and nothing follows."""
        if self.hit is not None:
            return ""
        self._text += piece
        # Search only where a match could newly end: from (emitted - longest stop) onwards.
        start = max(0, self._emitted - max((len(s) for s in self.stops), default=0))
        # The stop string that completes first wins (ties: the longer one), whatever the chunking.
        found = [(i + len(s), i, s) for s in self.stops if (i := self._text.find(s, start)) >= 0]
        if found:
            _, cut, self.hit = min(found)
            out = self._text[self._emitted:cut]
            self._emitted = len(self._text)
            return out
        safe = len(self._text) - self._held_back()
        out = self._text[self._emitted:safe]
        self._emitted = max(self._emitted, safe)
        return out

    def _held_back(self) -> int:
        """Length of the longest suffix of the text that is a proper prefix of some stop string."""
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self._text)), best, -1):
                if self._text.endswith(s[:n]):
                    best = n
                    break
        return best

    def flush(self) -> str:
        """At the end of generation, release held-back text (it turned out not to be a stop string)."""
        if self.hit is not None:
            return ""
        out = self._text[self._emitted:]
        self._emitted = len(self._text)
        return out
