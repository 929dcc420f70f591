"""Runtime helpers of the nodes that need no ROS: a bounded worker thread, a rate meter and a
latency window (thread-safe, bounded memory). The nodes report them on /diagnostics."""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from typing import Any, Optional

# How long stop() waits for an item in progress before giving up on the worker thread.
WORKER_JOIN_TIMEOUT_S = 10.0


class BoundedWorker:
    """Runs ``process(item)`` on a daemon thread, oldest item first.

    The queue holds at most ``capacity`` items; submitting to a full queue drops the OLDEST one and
    counts it (capacity 1 = always process the newest input). ``min_interval_s()`` spaces the
    starts of consecutive items (a rate limit; 0 = none); while it waits, newer items may still
    replace older ones.
    """

    def __init__(self, process: Callable[[Any], None], capacity: int, name: str,
                 on_error: Callable[[Exception], None],
                 min_interval_s: Callable[[], float] = lambda: 0.0) -> None:
        if capacity < 1:
            raise ValueError(f'worker capacity must be >= 1, got {capacity}')
        self._process = process
        self._on_error = on_error
        self._min_interval_s = min_interval_s
        self._queue: collections.deque = collections.deque()
        self._capacity = capacity
        self._cond = threading.Condition()
        self._stopping = False
        self._last_start = -float('inf')
        self.dropped = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, item: Any) -> bool:
        """Queue ``item``; True when an older item was dropped to make room."""
        with self._cond:
            dropped = len(self._queue) >= self._capacity
            if dropped:
                self._queue.popleft()
                self.dropped += 1
            self._queue.append(item)
            self._cond.notify()
        return dropped

    def pending(self) -> int:
        with self._cond:
            return len(self._queue)

    def stop(self, timeout_s: float = WORKER_JOIN_TIMEOUT_S) -> None:
        with self._cond:
            self._stopping = True
            self._queue.clear()
            self._cond.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout_s)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                delay = self._last_start + self._min_interval_s() - time.monotonic()
                if delay > 0:
                    self._cond.wait(delay)   # a rate-limit pause; stop() wakes it
                    continue
                item = self._queue.popleft()
                self._last_start = time.monotonic()
            try:
                self._process(item)
            except Exception as error:  # one bad item must not kill the worker
                self._on_error(error)


class RateMeter:
    """Events per second over a sliding window of recent event times (thread-safe, bounded)."""

    def __init__(self, window_s: float = 5.0, max_events: int = 2000) -> None:
        self._times = collections.deque(maxlen=max_events)
        self._window_s = window_s
        self._lock = threading.Lock()

    def tick(self, now: Optional[float] = None) -> None:
        with self._lock:
            self._times.append(time.monotonic() if now is None else now)

    def rate(self, now: Optional[float] = None) -> float:
        now = time.monotonic() if now is None else now
        with self._lock:
            recent = [t for t in self._times if now - t <= self._window_s]
        if len(recent) < 2:
            return 0.0
        span = max(now - recent[0], 1e-9)
        return (len(recent) - 1) / span if span > 0 else 0.0


class LatencyWindow:
    """Percentiles of the last N durations (seconds)."""

    def __init__(self, size: int = 500) -> None:
        self._values = collections.deque(maxlen=size)
        self._lock = threading.Lock()

    def add(self, seconds: float) -> None:
        with self._lock:
            self._values.append(seconds)

    def percentile(self, q: float) -> float:
        with self._lock:
            values = sorted(self._values)
        if not values:
            return float('nan')
        index = min(len(values) - 1, max(0, int(round(q / 100.0 * (len(values) - 1)))))
        return values[index]
