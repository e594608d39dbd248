"""Stop strings: text that ends a reply (a base model's next `User:` line, a batch request's
`stop`), found in a stream of text pieces without ever showing a part of one."""

from __future__ import annotations

from collections.abc import Callable


def stop_index(text: str, stops: tuple[str, ...]) -> int | None:
    """Where the first stop string in `text` begins, if any does."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def tokens_before(token_bytes: Callable[[int], bytes], tokens: list[int], text: str) -> int:
    """How many of `tokens` lie wholly within `text` (a reply cut at a stop string)."""
    target = len(text.encode("utf-8"))
    size = 0
    for count, token in enumerate(tokens):
        size += len(token_bytes(token))
        if size > target:
            return count
    return len(tokens)


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that a stop string begins with: it may yet become
    one, so it is not shown."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest


class StopFilter:
    """Text pieces in, the part safe to show out; `stopped` once a stop string appeared (the
    text is then cut where it begins)."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = tuple(s for s in stops if s)
        self.text = ""
        self.shown = 0
        self.stopped = False

    def push(self, piece: str) -> str:
        """Add a piece; returns the newly showable text."""
        if self.stopped:
            return ""
        self.text += piece
        cut = stop_index(self.text, self.stops)
        if cut is not None:
            self.text, self.stopped = self.text[:cut], True
            end = len(self.text)
        else:
            end = len(self.text) - _held_back(self.text, self.stops)
        shown, self.shown = self.text[self.shown : end], max(self.shown, end)
        return shown

    def flush(self) -> str:
        """The reply ended without a stop string: what was held back is text after all."""
        rest, self.shown = self.text[self.shown :], len(self.text)
        return rest
