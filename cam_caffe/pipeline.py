"""Worker processes for a batch's per-image steps (``--workers N``).

``process_chunk`` (batch.py) decodes each image and renders, encodes and writes
its outputs on an executor, and runs the forward pass itself. With
``ProcessPool`` as that executor those steps run in N worker processes, so
they use N cores whatever the GIL does, while the forward pass keeps the
main process (and the GPU, or the cores given to ``--threads``) busy.

Each worker holds its own copy of the net without its backend (decoding and
rendering need the net's settings, never a forward pass), sent once when it
starts; a call that names the net (``net.load``, ``finish_image(net, …)``) sends
a reference to it, not the net. The memory budget of the images in flight
(budget.py) is shared the same way, its count in shared memory, so a worker
reserves an image's bytes before decoding it as a thread would. Images cross
the process boundary pickled (``benchmarks/bench_cores.py`` measures what
that costs).

Workers ignore SIGINT and SIGTERM: a Ctrl-C (sent to the whole process
group) or a SIGTERM is the main process's to handle, and it lets the steps
that have started finish, so each image's files are all written or none.
A worker whose parent is gone (killed outright) exits by itself, after the
call it is running.
"""
from __future__ import annotations

import copy
import io
import multiprocessing
import os
import pickle
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from typing import Any

import cv2

from .api import CAMNet
from .backends import cpu_threads, usable_cores
from .budget import MemoryBudget
from .signals import blocked

PARENT_POLL_S = 0.5        # how often a worker checks that its parent is alive


class SharedBudget(MemoryBudget):
    """A memory budget that the worker processes share: the bytes in use live in
    shared memory, under a lock of their own."""

    def __init__(self, total: int | None) -> None:
        self.total = total
        self._used = _CONTEXT.Value("q", 0)
        self._lock = self._used.get_lock()

    @property
    def used(self) -> int:
        return self._used.value

    @used.setter
    def used(self, value: int) -> None:
        self._used.value = value


class ProcessPool(Executor):
    """An executor of ``workers`` processes, each holding a copy of ``net`` (without
    its backend) and ``budget``; ``net`` and ``budget`` in a call's arguments stand
    for those."""

    def __init__(self, net: CAMNet, workers: int, budget: SharedBudget | None = None) -> None:
        self.shared: dict[str, object] = {"net": net, "budget": budget}
        worker_net = copy.copy(net)
        worker_net.backend = None  # type: ignore[assignment]  # libraries, buffers stay here
        copies: dict[str, object] = {"net": worker_net, "budget": budget}
        self._pool = ProcessPoolExecutor(workers, _CONTEXT, initializer=_start_worker,
                                         initargs=(copies, os.getpid()))
        # Start every worker now, from this thread (the pool would start them one
        # by one on the first calls, from whichever thread made them), with the
        # signals blocked: the parent stops the workers, and a Ctrl-C to the whole
        # process group must not hit a worker still importing (a traceback).
        try:
            with blocked():
                futures = [self._pool.submit(int) for _ in range(workers)]
            for future in futures:
                future.result()
        except BaseException:
            self._pool.shutdown(wait=False, cancel_futures=True)
            raise

    def submit(self, fn: Callable, /, *args: Any, **kwargs: Any) -> Future:
        buffer = io.BytesIO()
        _SharedPickler(buffer, self.shared).dump((fn, args, kwargs))
        return self._pool.submit(_call, buffer.getvalue())

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop the workers; calls already running finish first when ``wait``."""
        self._pool.shutdown(wait, cancel_futures=cancel_futures)


class _SharedPickler(pickle.Pickler):
    """Pickles the objects of ``shared`` as references to the worker's copies."""

    def __init__(self, file: io.BytesIO, shared: dict[str, object]) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.names = {id(obj): name for name, obj in shared.items() if obj is not None}

    def persistent_id(self, obj: object) -> str | None:
        return self.names.get(id(obj))


class _SharedUnpickler(pickle.Unpickler):
    def persistent_load(self, name: str) -> object:
        return _shared[name]


_CONTEXT = multiprocessing.get_context("spawn")
_shared: dict[str, object] = {}       # a worker's copies of the pool's shared objects
_calling = threading.Lock()           # held by a worker while it runs a call


def _start_worker(shared: dict[str, object], parent: int) -> None:
    """A worker's set-up: its copies of the shared objects, one thread for OpenCV
    (a worker per core), signals left to the parent (blocked since it started;
    now also ignored), and a watch on the parent."""
    _shared.update(shared)
    cv2.setNumThreads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    threading.Thread(target=_exit_with, args=(parent,), daemon=True).start()


def _exit_with(parent: int) -> None:
    """Exit when the parent is gone (killed outright, it could not stop the workers),
    once the call running, if any, has written its files."""
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_S)
    _calling.acquire()
    os._exit(1)


def _call(payload: bytes) -> Any:
    with _calling:
        fn, args, kwargs = _SharedUnpickler(io.BytesIO(payload)).load()
        return fn(*args, **kwargs)


def default_workers(gpu: int | None, threads: int | None) -> int:
    """``--workers`` when not given: the cores the forward pass leaves free (all but
    one with a GPU, all but ``--threads`` on the CPU)."""
    cores = usable_cores()
    return max(0, cores - 1 if gpu is not None else cores - cpu_threads(threads))
