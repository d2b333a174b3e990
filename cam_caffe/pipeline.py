"""Worker processes for a batch's per-image steps (``--workers N``).

``process_chunk`` (batch.py) decodes each image and renders, encodes and writes
its outputs on an executor, and runs the forward pass itself. With
``ProcessPool`` as that executor those steps run in N worker processes, so
they use N cores whatever the GIL does, while the forward pass keeps the
main process (and the GPU, or the cores given to ``--threads``) busy.

Each worker holds its own copy of the net without its backend (decoding and
rendering need the net's settings, never a forward pass), sent once when it
starts; a call that names the net (``net.load``, ``process(net, …)``) sends
a reference to it, not the net. Images cross the process boundary pickled
(``benchmarks/bench_cores.py`` measures what that costs).

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
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from typing import Any, Callable

from .api import CAMNet
from .backends import cpu_threads, usable_cores

PARENT_POLL_S = 0.5        # how often a worker checks that its parent is alive


class ProcessPool(Executor):
    """An executor of ``workers`` processes, each holding a copy of ``net``
    (without its backend); ``net`` in a call's arguments stands for that copy."""

    def __init__(self, net: CAMNet, workers: int) -> None:
        self.net = net
        worker_net = copy.copy(net)
        worker_net.backend = None             # loaded libraries and buffers stay here
        self._pool = ProcessPoolExecutor(workers, multiprocessing.get_context("spawn"),
                                         initializer=_start_worker,
                                         initargs=(worker_net, os.getpid()))
        # Start every worker now, from this thread: the pool would start them one
        # by one on the first calls, from whichever thread made them.
        for future in [self._pool.submit(int) for _ in range(workers)]:
            future.result()

    def submit(self, fn: Callable, /, *args: Any, **kwargs: Any) -> Future:
        buffer = io.BytesIO()
        _NetPickler(buffer, self.net).dump((fn, args, kwargs))
        return self._pool.submit(_call, buffer.getvalue())

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop the workers; calls already running finish first when ``wait``."""
        self._pool.shutdown(wait, cancel_futures=cancel_futures)


class _NetPickler(pickle.Pickler):
    """Pickles ``net`` as a reference to the worker's copy."""

    def __init__(self, file: io.BytesIO, net: CAMNet) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.net = net

    def persistent_id(self, obj: object) -> str | None:
        return "net" if obj is self.net else None


class _NetUnpickler(pickle.Unpickler):
    def persistent_load(self, pid: str) -> CAMNet:
        return _worker_net


_worker_net: CAMNet | None = None
_calling = threading.Lock()           # held by a worker while it runs a call


def _start_worker(net: CAMNet, parent: int) -> None:
    """A worker's set-up: its copy of the net, signals left to the parent, and a
    watch on the parent."""
    global _worker_net
    _worker_net = net
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
        fn, args, kwargs = _NetUnpickler(io.BytesIO(payload)).load()
        return fn(*args, **kwargs)


def default_workers(gpu: int | None, threads: int | None) -> int:
    """``--workers`` when not given: the cores the forward pass leaves free (all but
    one with a GPU, all but ``--threads`` on the CPU)."""
    cores = usable_cores()
    return max(0, cores - 1 if gpu is not None else cores - cpu_threads(threads))
