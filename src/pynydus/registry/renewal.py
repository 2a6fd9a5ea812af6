"""Background renewal of bearer tokens, as nydusd does.

Without it, the first read after a token's refresh margin pays a token-server round
trip inline (and every thread reading at that moment waits on it). The renewer is
one daemon thread per client, started when the first bearer token is fetched (so
anonymous, Basic and static-token clients never have one) and owned by the client:
``close()`` stops and joins it. It renews only tokens used since they were issued,
so an idle client stops talking to the token server; a failed renewal is left to
the inline path.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

IDLE_WAIT = 60.0  # seconds between checks when nothing is due


class TokenRenewer:
    """Runs ``renew_due() -> seconds until the next renewal is due`` in a thread."""

    def __init__(self, renew_due: Callable[[], float | None], name: str) -> None:
        self._renew_due = renew_due
        self._name = name
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def notify(self) -> None:
        """A token was stored: start the thread if needed and recompute the wait."""
        with self._lock:
            if self._stop.is_set():
                return
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name,
                                                daemon=True)
                self._thread.start()
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            try:
                wait = self._renew_due()
            except Exception as err:  # noqa: BLE001 - the inline path still works
                log.warning("%s: token renewal failed: %s", self._name, err)
                wait = IDLE_WAIT
            self._wake.wait(IDLE_WAIT if wait is None else max(0.05, min(wait, IDLE_WAIT)))

    def stop(self) -> None:
        """Stop and join the thread; idempotent."""
        with self._lock:
            self._stop.set()
            t, self._thread = self._thread, None
        self._wake.set()
        if t is not None and t is not threading.current_thread():
            t.join(5)
