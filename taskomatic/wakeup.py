"""Wake-ups: a generation counter that every change bumps, in-process and from other processes."""

from __future__ import annotations

import logging
import threading

from taskomatic.store.base import Store

log = logging.getLogger(__name__)


class Signal:
    """Bumped on every change to the queue; waiters sleep until it moves past what they saw.

    Read `generation` *before* looking at the queue, then `wait(seen)`: a change that lands
    while you look is never lost (the flag is not cleared after the fact).
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._generation = 0
        self._mine = threading.local()

    @property
    def generation(self) -> int:
        with self._cond:
            return self._generation

    def fire(self) -> None:
        with self._cond:
            self._generation += 1
            self._mine.count = self.fired_here() + 1
            self._cond.notify_all()

    def fired_here(self) -> int:
        """How often the calling thread has fired (a dispatcher ignores its own changes)."""
        return getattr(self._mine, "count", 0)

    def absorb(self, seen: int, own: int) -> int:
        """`seen` moved past the calling thread's own `own` fires, if nobody else fired."""
        with self._cond:
            return self._generation if self._generation == seen + own else seen

    def wait(self, seen: int, timeout: float | None) -> bool:
        """Block until the generation differs from `seen`; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._generation != seen, timeout)


class Watcher:
    """A daemon thread turning other processes' commits into `Signal.fire()`."""

    def __init__(self, store: Store, signal: Signal, token: str) -> None:
        self._store = store
        self._signal = signal
        self._token = token
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def ensure_started(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="taskomatic-watch", daemon=True
                )
                self._thread.start()

    def _run(self) -> None:
        try:
            self._store.watch(self._stop, self._signal.fire, self._token)
        except Exception:
            log.exception("watching the database for changes failed; relying on polling")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
