"""Ctrl-C while a reply streams: a flag checked between tokens, not an exception."""

from __future__ import annotations

import signal
import threading
from typing import Any


class CtrlC:
    """While a reply streams, Ctrl-C sets a flag checked between tokens instead of raising.

    A KeyboardInterrupt raised while llama.cpp runs the memory tap's Python callback can land
    outside any handler (ctypes prints and drops it, and the graph stops half-way), so on the
    main thread the signal is only noted. Elsewhere (no signal handlers) this does nothing."""

    def __init__(self) -> None:
        self.pressed = False
        self._installed = False
        self._previous: Any = signal.default_int_handler

    def __enter__(self) -> CtrlC:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._note)
            self._installed = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous or signal.default_int_handler)

    def _note(self, signum: int, frame: object) -> None:
        self.pressed = True
