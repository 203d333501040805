"""One thread that runs calls for the event loop, one at a time, in the order they were made.

:class:`SerialThread` is what the SQLite connector runs every statement on. It does what a
one-worker :class:`~concurrent.futures.ThreadPoolExecutor` behind ``loop.run_in_executor`` did,
for about a third of the CPU per call: a call is an :class:`asyncio.Future` and a
:class:`queue.SimpleQueue` entry (no :class:`concurrent.futures.Future`, no chaining of two
futures, no lock per state change), and the results that finish while the loop is busy reach it
in one wake-up (one write to its self-pipe) rather than one each. A call whose future was
cancelled before the thread took it up is not run, as with an executor; one already running
runs to its end and its result is dropped.

It knows nothing of SQLite: errors of the call reach the awaiting caller as raised.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

# A call: its future, the function and its arguments; None asks the thread to end.
_Call = tuple["asyncio.Future[Any]", Callable[..., Any], tuple[Any, ...]] | None
# What a call came to: its future, and its result or the exception it raised.
_Outcome = tuple["asyncio.Future[Any]", Any, BaseException | None]


class SerialThread:
    """A started thread named ``name`` that runs :meth:`run`'s calls in order until
    :meth:`stop`."""

    def __init__(self, name: str) -> None:
        self._calls: queue.SimpleQueue[_Call] = queue.SimpleQueue()
        self._outcomes: collections.deque[_Outcome] = collections.deque()
        self._wake_pending = False  # a delivery is scheduled on the loop and has not begun
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def run(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:  # noqa: ANN401
        """Queue ``fn(*args)``; the future is done once it has run (``fn``'s result or error)."""
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._calls.put((future, fn, args))
        return future

    def stop(self) -> None:
        """End the thread once the calls queued so far have run, and wait for it (briefly
        blocking: the queue is short). Safe to call twice."""
        if self._thread.is_alive():
            self._calls.put(None)
            self._thread.join()

    # --- the thread -----------------------------------------------------------------------------

    def _serve(self) -> None:
        while (call := self._calls.get()) is not None:
            future, fn, args = call
            if future.cancelled():  # given up before it began
                continue
            try:
                outcome: _Outcome = (future, fn(*args), None)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller, who re-raises it
                outcome = (future, None, exc)
            self._outcomes.append(outcome)
            if not self._wake_pending:
                self._wake_pending = True
                try:
                    future.get_loop().call_soon_threadsafe(self._deliver)
                except RuntimeError:  # its loop is closed: nobody waits for this one, but
                    self._wake_pending = False  # a call from the next loop must be delivered

    # --- the loop -------------------------------------------------------------------------------

    def _deliver(self) -> None:
        """On the loop: settle every future whose call has run. The flag is lowered first, so an
        outcome appended after this pass began schedules a delivery of its own."""
        self._wake_pending = False
        loop = asyncio.get_running_loop()
        while self._outcomes:
            future, result, exc = self._outcomes.popleft()
            if future.get_loop() is loop:
                _settle(future, result, exc)
            else:  # a call made from another loop (tests run several): settled on its own
                with contextlib.suppress(RuntimeError):
                    future.get_loop().call_soon_threadsafe(_settle, future, result, exc)


def _settle(future: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:  # noqa: ANN401
    if future.done():  # cancelled while it ran
        return
    if exc is None:
        future.set_result(result)
    else:
        future.set_exception(exc)
