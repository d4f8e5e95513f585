"""Bounding a call's wall time in any thread: `run_with_timeout(work, timeout_s, default)`.

In the main thread a SIGALRM interval timer, started inside the protected region (any previous timer and
handler are restored afterwards, also when the limit is tiny); elsewhere the work runs in a daemon thread that
is abandoned when it overruns. Either way an overrun, or an exception raised by the work, returns `default`.
Both mechanisms interrupt Python code only: C-level work (e.g. sympy on a power tower) runs on until it
returns, so callers keep such inputs away from it.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from interp.errors import UserError

T = TypeVar("T")


def check_timeout(timeout_s: float) -> float:
    number = isinstance(timeout_s, (int, float)) and not isinstance(timeout_s, bool)
    if not number or not math.isfinite(timeout_s) or not timeout_s > 0:
        raise UserError(f"timeout_s must be a finite positive number of seconds, got {timeout_s!r}")
    return float(timeout_s)


class _Timeout(BaseException):
    """Raised by our SIGALRM handler; a BaseException so a library's `except Exception` cannot swallow it."""


def run_with_timeout(work: Callable[[], T], timeout_s: float, default: T, thread_name: str = "bounded") -> T:
    """work() if it finishes within timeout_s seconds and does not raise, else `default`. `thread_name` names
    the worker thread outside the main thread (an abandoned one stays visible in `threading.enumerate()`)."""
    if threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer"):
        return _bounded_by_alarm(work, timeout_s, default)
    result: list = []

    def run() -> None:
        try:
            result.append(work())
        except BaseException:  # noqa: BLE001 - any failure of the work returns `default`, never raises
            pass

    worker = threading.Thread(target=run, name=thread_name, daemon=True)
    worker.start()
    worker.join(timeout_s)
    return result[0] if result else default


def _bounded_by_alarm(work: Callable[[], T], timeout_s: float, default: T) -> T:
    """The SIGALRM variant. Our handler raises _Timeout at most once and only while armed, and arming,
    work and disarming all happen inside the `try`, so the timeout can only surface there; a signal that
    arrives before arming is the caller's (its timer ran out meanwhile) and goes to its handler."""
    state = {"phase": "before"}
    previous_handler = signal.getsignal(signal.SIGALRM)

    def on_alarm(signum, frame):
        if state["phase"] == "armed":
            state["phase"] = "done"
            raise _Timeout
        if state["phase"] == "before" and callable(previous_handler):
            previous_handler(signum, frame)

    start = time.monotonic()
    previous_delay, previous_interval = signal.setitimer(signal.ITIMER_REAL, 0)  # pause the caller's timer
    signal.signal(signal.SIGALRM, on_alarm)
    try:
        try:
            state["phase"] = "armed"
            signal.setitimer(signal.ITIMER_REAL, timeout_s)
            return work()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            state["phase"] = "done"
    except (_Timeout, Exception):  # a timeout, or an error in the work: `default` either way
        return default
    finally:
        signal.signal(signal.SIGALRM, previous_handler)
        if previous_delay > 0:  # re-arm a caller's timer with what was left of it
            remaining = max(previous_delay - (time.monotonic() - start), 1e-3)
            signal.setitimer(signal.ITIMER_REAL, remaining, previous_interval)
