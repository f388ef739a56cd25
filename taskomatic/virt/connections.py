"""libvirt connections: one per host URI, shared by every worker thread, re-opened when lost.

libvirt-python releases the GIL during calls and a connection is thread-safe, so a dispatcher
needs exactly one connection per host. It must never open a second one by accident: on
`test:///path/node.xml` every `open()` builds a fresh copy of the host, so a second connection
would be a different host. libvirt errors leave this module as `HostError`s carrying libvirt's
code, error domain and message, classified transient or permanent.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import libvirt

from taskomatic import defaults, errors

log = logging.getLogger(__name__)

T = TypeVar("T")


def _quiet(_ctx: object, _err: object) -> None:
    """libvirt prints every error to stderr by default; ours are raised as exceptions."""


libvirt.registerErrorHandler(_quiet, None)


# --- errors ------------------------------------------------------------------------------------

# VIR_ERR_NONE/WARNING/ERROR are error *levels* that share values with codes 0-2.
_LEVELS = {"VIR_ERR_NONE", "VIR_ERR_WARNING", "VIR_ERR_ERROR"}
_CODE_NAMES = {
    value: name
    for name, value in sorted(vars(libvirt).items(), reverse=True)
    if name.startswith("VIR_ERR_") and name not in _LEVELS and isinstance(value, int)
}
_DOMAIN_NAMES = {
    value: name
    for name, value in sorted(vars(libvirt).items(), reverse=True)
    if name.startswith("VIR_FROM_") and isinstance(value, int)
}

TRANSIENT_CODES = frozenset(
    {
        libvirt.VIR_ERR_NO_CONNECT,
        libvirt.VIR_ERR_INVALID_CONN,
        libvirt.VIR_ERR_RPC,
        libvirt.VIR_ERR_OPERATION_TIMEOUT,
        libvirt.VIR_ERR_AGENT_UNRESPONSIVE,
        libvirt.VIR_ERR_AUTH_UNAVAILABLE,
    }
)
"""libvirt codes after which another attempt may succeed: the host or the link is the problem."""

_NETWORK_DOMAINS = frozenset({libvirt.VIR_FROM_RPC, libvirt.VIR_FROM_REMOTE})
"""A system error in these domains is a broken socket, not a refused operation."""


def code_name(exc: libvirt.libvirtError) -> str | None:
    """libvirt's name for the error's code, e.g. 'VIR_ERR_NO_DOMAIN'."""
    code = exc.get_error_code()
    return _CODE_NAMES.get(code, f"VIR_ERR_{code}") if code is not None else None


def host_error(
    exc: libvirt.libvirtError, host: str, doing: str, *, transient: bool | None = None
) -> errors.HostError:
    """A HostError for a libvirt error met while `doing` something on `host`."""
    code = exc.get_error_code()
    domain = exc.get_error_domain()
    if transient is None:
        transient = code in TRANSIENT_CODES or (
            code == libvirt.VIR_ERR_SYSTEM_ERROR and domain in _NETWORK_DOMAINS
        )
    name = code_name(exc)
    message = (exc.get_error_message() or str(exc)).strip()
    return errors.HostError(
        f"{doing} on host {host!r} failed: {message} ({name})",
        host=host,
        libvirt_code=name,
        libvirt_domain=_DOMAIN_NAMES.get(domain) if domain is not None else None,
        transient=transient,
    )


def is_error(exc: libvirt.libvirtError, *codes: int) -> bool:
    """Whether a libvirt error has one of `codes`."""
    return exc.get_error_code() in codes


# --- the event loop ----------------------------------------------------------------------------

_event_loop_lock = threading.Lock()
_event_loop_started = False


def start_event_loop() -> None:
    """Register and run libvirt's default event loop (once per process).

    It must be registered before the first connection is opened: keepalives, lifecycle events
    and the embedded QEMU driver all need it.
    """
    global _event_loop_started
    with _event_loop_lock:
        if _event_loop_started:
            return
        libvirt.virEventRegisterDefaultImpl()
        threading.Thread(target=_run_event_loop, name="libvirt-events", daemon=True).start()
        _event_loop_started = True


def _run_event_loop() -> None:
    while True:
        libvirt.virEventRunDefaultImpl()


# --- connections -------------------------------------------------------------------------------


@dataclass
class _Slot:
    """The connection to one URI, or when it may next be tried after failing."""

    lock: threading.Lock
    conn: libvirt.virConnect | None = None
    failures: int = 0
    retry_at: float = 0.0  # time.monotonic() before which a failed URI is not re-opened
    last_error: errors.HostError | None = None


Opener = Callable[[str], libvirt.virConnect]
Listener = Callable[[str, libvirt.virConnect], None]


class Connections:
    """One shared libvirt connection per URI, opened on first use and re-opened when lost.

    `get` hands out the connection; a connection found dead (closed by the peer, failed
    keepalive) is dropped and re-opened, at most once per backoff interval while the host
    stays unreachable, so a dead host costs one connection attempt per interval, not one per
    task.
    """

    def __init__(self, opener: Opener | None = None) -> None:
        start_event_loop()
        self._open = opener or _open
        self._slots: dict[str, _Slot] = {}
        self._lock = threading.Lock()
        self._listeners: list[Listener] = []

    def add_listener(self, listener: Listener) -> None:
        """Call `listener(uri, conn)` after each (re-)open of a connection, in the opening
        thread: a new connection has none of the event callbacks the old one had."""
        with self._lock:
            self._listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        with self._lock:
            if listener in self._listeners:
                self._listeners.remove(listener)

    def get(self, uri: str, host: str) -> libvirt.virConnect:
        """The live connection to `uri` (named `host` in errors); HostError if unreachable."""
        slot = self._slot(uri)
        with slot.lock:
            if slot.conn is not None and alive(slot.conn):
                return slot.conn
            if slot.conn is not None:
                log.warning("connection to host %s (%s) was lost; re-opening", host, uri)
                _close_quietly(slot.conn)
                slot.conn = None
            now = time.monotonic()
            if now < slot.retry_at and slot.last_error is not None:
                raise errors.HostError(
                    f"host {host!r} is unreachable (next attempt in "
                    f"{slot.retry_at - now:.1f}s): {slot.last_error.message}",
                    host=host,
                    libvirt_code=slot.last_error.libvirt_code,
                    transient=True,
                )
            try:
                conn = self._open(uri)
            except libvirt.libvirtError as exc:
                slot.failures += 1
                delay = min(
                    defaults.HOST_RETRY_BASE_SECONDS * 2 ** (slot.failures - 1),
                    defaults.HOST_RETRY_MAX_SECONDS,
                )
                slot.retry_at = now + delay
                slot.last_error = host_error(exc, host, f"connecting to {uri}", transient=True)
                raise slot.last_error from None
            slot.conn, slot.failures, slot.retry_at, slot.last_error = conn, 0, 0.0, None
            log.info("connected to host %s (%s)", host, uri)
            with self._lock:
                listeners = list(self._listeners)
            for listener in listeners:
                try:
                    listener(uri, conn)
                except Exception:
                    log.exception("a connection listener failed for host %s", host)
            return conn

    @contextmanager
    def call(self, uri: str, host: str, doing: str) -> Iterator[libvirt.virConnect]:
        """`with connections.call(uri, host, "starting vm a") as conn:` — libvirt errors raised
        inside become HostErrors naming the host and what was being done."""
        conn = self.get(uri, host)
        try:
            yield conn
        except libvirt.libvirtError as exc:
            raise host_error(exc, host, doing) from None

    def forget(self, uri: str) -> None:
        """Close the connection to `uri`, if open (a host that was removed)."""
        with self._lock:
            slot = self._slots.pop(uri, None)
        if slot is not None and slot.conn is not None:
            with slot.lock:
                _close_quietly(slot.conn)

    def close(self) -> None:
        """Close every connection (on `test:///` node files, that discards their state)."""
        with self._lock:
            slots, self._slots = list(self._slots.values()), {}
        for slot in slots:
            with slot.lock:
                if slot.conn is not None:
                    _close_quietly(slot.conn)
                    slot.conn = None

    def _slot(self, uri: str) -> _Slot:
        with self._lock:
            slot = self._slots.get(uri)
            if slot is None:
                slot = self._slots[uri] = _Slot(threading.Lock())
            return slot


def _open(uri: str) -> libvirt.virConnect:
    conn = libvirt.open(uri)
    # Detects a peer that stopped answering; local drivers do not support it (and need not).
    with contextlib.suppress(libvirt.libvirtError):
        conn.setKeepAlive(defaults.HOST_KEEPALIVE_SECONDS, defaults.HOST_KEEPALIVE_COUNT)
    return conn


def alive(conn: libvirt.virConnect) -> bool:
    """Whether a connection still works (a dead peer fails the keepalive, a closed one errs)."""
    try:
        return bool(conn.isAlive())
    except libvirt.libvirtError:
        return False


def _close_quietly(conn: libvirt.virConnect) -> None:
    try:
        conn.close()
    except libvirt.libvirtError as exc:
        log.debug("closing a libvirt connection: %s", exc)
