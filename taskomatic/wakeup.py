"""Wake-ups: a generation counter that every change bumps, in-process and from other processes."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import select
import threading
import time
from collections.abc import Sequence

from taskomatic.store.base import Listener, Store

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
        self._pipes: set[int] = set()  # see attach()

    @property
    def generation(self) -> int:
        with self._cond:
            return self._generation

    def fire(self) -> None:
        with self._cond:
            self._generation += 1
            self._mine.count = self.fired_here() + 1
            self._cond.notify_all()
            # Under the lock: a pipe detached and closed cannot leave us a reused fd.
            for fd in self._pipes:
                with contextlib.suppress(BlockingIOError):  # full: readable already
                    os.write(fd, b"!")

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

    def attach(self, fd: int, seen: int) -> bool:
        """Write a byte to `fd` at every fire from now on (until `detach`), so that a thread
        can wait for the signal in poll() along with sockets; False, and nothing attached,
        if the generation has moved past `seen` already."""
        with self._cond:
            if self._generation != seen:
                return False
            self._pipes.add(fd)
            return True

    def detach(self, fd: int) -> None:
        with self._cond:
            self._pipes.discard(fd)


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


def readable(fds: Sequence[int], timeout: float) -> set[int]:
    """Which of `fds` are readable, waiting up to `timeout` seconds (poll(): any fd number)."""
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    return {fd for fd, _ in poller.poll(math.ceil(max(timeout, 0.0) * 1000))}


class Waiter:
    """How one thread's loop waits for the Signal and, where the store has one, its
    Listener in the same poll(): another process's commit then wakes this thread itself
    rather than the watcher thread, which would have to hand over to it. The dispatcher's
    loop waits this way; where the store has no listener, it waits on the Signal alone,
    with the watcher thread running."""

    def __init__(self, signal: Signal, listener: Listener | None) -> None:
        self._signal = signal
        self._listener = listener
        self._pipe: tuple[int, int] | None = None
        if listener is not None:
            self._pipe = os.pipe()
            for fd in self._pipe:
                os.set_blocking(fd, False)

    def wait(self, seen: int, timeout: float) -> bool:
        """Block until the generation differs from `seen`; False on timeout."""
        if self._listener is None or self._pipe is None:
            return self._signal.wait(seen, timeout)
        deadline = time.monotonic() + timeout
        ours, theirs = self._pipe
        signal = self._signal
        # Attached only while we wait: a busy dispatcher costs the workers finishing tasks
        # no system call.
        if not signal.attach(theirs, seen):
            return True
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                socket = self._listener.fileno()
                fds = (ours,) if socket is None else (ours, socket)
                ready = readable(fds, min(left, self._listener.due_in()))
                if ours in ready:
                    os.read(ours, 4096)  # the generation says what happened
                if (socket in ready or not ready) and self._listener.read():
                    signal.fire()
                if signal.generation != seen:
                    return True
        finally:
            signal.detach(theirs)

    def close(self) -> None:
        if self._pipe is not None:
            for fd in self._pipe:
                os.close(fd)
            self._pipe = None
        if self._listener is not None:
            self._listener.close()
