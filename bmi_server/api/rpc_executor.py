"""The gRPC server's threads, in two lanes.

grpcio's sync server runs every call, streams included, on a thread of the one executor
it is given. ``RpcExecutor`` is that executor, and sends each call where admission
control (``admission.py``) said when it admitted it, in grpcio's polling thread just
before grpcio submits the call:

- unary calls to a fixed pool of ``workers`` threads, queued (in C, no thread each)
  while all are busy: the fewest threads that keep the cores busy, as before;
- streams, and refusals (which must not wait behind queued calls), to an elastic pool
  whose threads are made as they are needed and end when idle for ``idle_seconds``, so
  a burst of streams leaves no threads behind.

A call's admission slot is given back when its work on the lane has ended: grpcio may
end a call without ever calling its handler (the client went away first).
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

    @property
    def threads(self) -> int:
        return self._threads

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> futures.Future:
        future: futures.Future = futures.Future()
        with self._cond:
            if self._shutdown:
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


class RpcExecutor(futures.Executor):
    def __init__(self, workers: int, stream_threads: int, idle_seconds: float = 10.0) -> None:
        self.unary = futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rpc")
        self.streams = ElasticExecutor(stream_threads, idle_seconds, name="rpc-stream")
        self._route = threading.local()

    def route_next(self, unary: bool, release: Callable[[], None] | None = None) -> None:
        """Send the next call this thread submits to the unary lane (else the stream
        lane), and run ``release`` once its work there has ended."""
        stale = getattr(self._route, "next", None)
        if stale is not None and stale[1] is not None:
            stale[1]()  # admitted but never submitted: give its slot back
        self._route.next = (unary, release)

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> futures.Future:
        unary, release = getattr(self._route, "next", None) or (False, None)
        self._route.next = None
        try:
            future = (self.unary if unary else self.streams).submit(fn, *args, **kwargs)
        except BaseException:
            if release is not None:
                release()
            raise
        if release is not None:
            future.add_done_callback(lambda _: release())
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self.unary.shutdown(wait, cancel_futures=cancel_futures)
        self.streams.shutdown(wait, cancel_futures=cancel_futures)
