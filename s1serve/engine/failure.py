"""The first failure among parts that run apart (engine thread or process, worker ranks), told once to everyone."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger("s1serve.failure")


class FailureSignal:
    """The first failure of a set of workers, told once to every callback (also to those registered after it)."""

    def __init__(self) -> None:
        self.failure: BaseException | None = None
        self._lock = threading.Lock()
        self._reported = threading.Event()
        self._callbacks: list[Callable[[BaseException], None]] = []

    def on_failure(self, callback: Callable[[BaseException], None]) -> None:
        with self._lock:
            if self.failure is None:
                self._callbacks.append(callback)
                return
        callback(self.failure)

    def report(self, error: BaseException, notify: bool = True) -> bool:
        """Records the failure and runs the callbacks; False (and nothing done) when one was recorded before.
        `notify=False`: an end on purpose (a client closed): recorded, neither logged nor told to the callbacks."""
        with self._lock:
            if self.failure is not None:
                return False
            self.failure = error
            self._reported.set()
            callbacks, self._callbacks = self._callbacks, []
        if notify:
            log.error("%s", error)
            for callback in callbacks:
                callback(error)
        return True

    def wait(self, timeout: float) -> bool:
        """True once a failure is reported (waits up to `timeout` seconds for one)."""
        return self._reported.wait(timeout)
