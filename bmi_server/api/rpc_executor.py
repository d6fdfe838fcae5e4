"""The gRPC server's threads: made when calls need them, gone again when idle.

grpcio's sync server runs every call, streams included, on a thread of its executor. A
ThreadPoolExecutor keeps every thread it ever made; this one lets a thread that found no
work for ``idle_seconds`` end, so a burst of streams (bounded by admission control,
``admission.py``) leaves no threads behind once it is over.

Admission control takes a call's slot in grpcio's polling thread, which then submits the
call here at once: ``release_with_next`` hands this executor the slot's release, run
when that call's work ends. grpcio may end a call without ever calling its handler (the
client went away first), so the work's end, not the handler's, is what frees a slot.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent import futures
from typing import Any


class ElasticExecutor(futures.Executor):
    def __init__(self, max_threads: int, idle_seconds: float = 10.0, name: str = "rpc") -> None:
        if max_threads < 1 or idle_seconds <= 0:
            raise ValueError("max_threads must be at least 1 and idle_seconds positive")
        self._max = max_threads
        self._idle_seconds = idle_seconds
        self._name = name
        self._numbers = itertools.count(1)
        self._work: deque[tuple[futures.Future, Callable, tuple, dict]] = deque()
        self._cond = threading.Condition()
        self._threads = 0
        self._waiting = 0  # threads blocked waiting for work
        self._shutdown = False
        self._next_release = threading.local()

    def release_with_next(self, release: Callable[[], None]) -> None:
        """Run ``release`` when the next call this thread submits has run."""
        stale = getattr(self._next_release, "action", None)
        if stale is not None:  # never submitted (cannot happen with grpcio 1.85)
            stale()
        self._next_release.action = release

    @property
    def threads(self) -> int:
        return self._threads

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> futures.Future:
        future: futures.Future = futures.Future()
        release = getattr(self._next_release, "action", None)
        self._next_release.action = None
        if release is not None:
            future.add_done_callback(lambda _: release())
        with self._cond:
            if self._shutdown:
                if release is not None:
                    release()
                raise RuntimeError("cannot schedule new calls after shutdown")
            self._work.append((future, fn, args, kwargs))
            if self._waiting >= len(self._work):
                self._cond.notify()
            elif self._threads < self._max:
                self._threads += 1
                thread = threading.Thread(
                    target=self._run, name=f"{self._name}-{next(self._numbers)}", daemon=True
                )
                try:
                    thread.start()
                except BaseException:
                    self._threads -= 1
                    self._work.pop()
                    future.cancel()  # gives the slot back
                    raise
            # else: every thread is busy; the next one free takes it
        return future

    def _next(self) -> tuple[futures.Future, Callable, tuple, dict] | None:
        with self._cond:
            deadline = time.monotonic() + self._idle_seconds
            while not self._work:
                left = deadline - time.monotonic()
                if self._shutdown or left <= 0:
                    self._threads -= 1
                    return None
                self._waiting += 1
                try:
                    self._cond.wait(left)
                finally:
                    self._waiting -= 1
            return self._work.popleft()

    def _run(self) -> None:
        while (item := self._next()) is not None:
            future, fn, args, kwargs = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = fn(*args, **kwargs)
            except BaseException as exc:
                future.set_exception(exc)
            else:
                future.set_result(result)
            del item, future, fn, args, kwargs  # hold no call's objects while idle

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._cond:
            self._shutdown = True
            if cancel_futures:
                while self._work:
                    self._work.popleft()[0].cancel()
            self._cond.notify_all()
        while wait and self._threads:
            time.sleep(0.01)
