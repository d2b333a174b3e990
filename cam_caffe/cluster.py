"""Run a batch on a Dask cluster (``--dask ADDRESS``, ``run_batch(client=…)``).

The client (the ``cam-caffe`` process) plans the run as in one process — the
inputs, their output names, ``--skip-existing`` — and submits one task per
chunk of ``--batch-size`` inputs. Each worker process builds the net once from
the client's arguments and keeps it; a task decodes its images, runs the
forward pass and the CAMs, and writes the outputs (``batch.process_chunk``, the
function a single-process run uses). The client streams the records as tasks
complete. A task whose worker dies runs again on another one (Dask retries it);
once it has killed more workers than Dask allows (``allowed-failures``, 3), its
images are reported as failed.

Workers must have cam-caffe installed and see the model files, the inputs and
the output directory under the same absolute paths (a shared filesystem): the
client sends absolute paths.

ADDRESS is ``local`` or ``local:N`` (a ``LocalCluster`` of N processes with one
thread each, default one per core, started and stopped here), a scheduler
address such as ``tcp://host:8786``, or a scheduler file (``dask scheduler
--scheduler-file``, ``dask-mpi``, ``dask-jobqueue``).
"""
from __future__ import annotations

import functools
import logging
import os
import re
import threading
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import CancelledError, Executor, Future
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from .api import CAMNet, absolute
from .batch import ChunkResult, Options, output_paths, process_chunk
from .budget import ENV as MEMORY_ENV
from .budget import MemoryBudget, memory_budget
from .errors import BackendError, CamError, ClusterError
from .inputs import Input
from .output import remove_temporaries

if TYPE_CHECKING:
    import distributed

LOCAL = re.compile(r"local(?::(\d+))?")
ADDRESS_HELP = "local, local:N, a scheduler address like tcp://host:8786, or a scheduler file"


# An embedded cluster goes without diagnostics that nobody sees here and that cost
# CPU in every process: the worker's statistical profiler (its stack sampled every
# 10 ms), the 20 ms event-loop tick and the 0.5 s system monitor. Measured with
# GoogLeNet-CAM chunks of 16: 1.04-1.10 → 0.95-1.00 CPU seconds per chunk.
# Nor do its workers get Dask's MALLOC_TRIM_THRESHOLD_: setting it turns off
# glibc's adaptive mmap threshold, so every array over 128 KiB (each image, each
# blob) is mapped, faulted in and unmapped again. Measured on one local worker:
# 60-63 → 53-54 CPU ms per image (one process: 51-53).
LOCAL_CONFIG = {"distributed.worker.profile.enabled": False,
                "distributed.admin.tick.interval": "1s",
                "distributed.admin.system-monitor.interval": "2s",
                "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}


def check_address(address: str) -> str:
    """``address`` if it has one of the ``--dask`` forms, else CamError."""
    local = LOCAL.fullmatch(address)
    if local and (local.group(1) is None or int(local.group(1)) > 0):
        return address
    if "://" in address or Path(address).is_file():
        return address
    raise CamError(f"--dask {address!r}: expected {ADDRESS_HELP}")


def import_distributed():
    """The ``distributed`` module, or a clear error naming the extra to install."""
    try:
        import distributed
    except ImportError:
        raise ClusterError("--dask needs Dask: pip install 'cam-caffe[dask]'") from None
    return distributed


@contextmanager
def dask_client(address: str, quiet: bool = False) -> Iterator[distributed.Client]:
    """A client of the cluster ``address`` names; an embedded ``local`` cluster is
    started here and shut down on exit. ``quiet`` silences Dask's own log."""
    distributed = import_distributed()
    import dask
    check_address(address)
    logged = logging.root.manager.disable
    if quiet:                 # Dask logs a lost connection as a multi-line traceback
        logging.disable(logging.CRITICAL)
    local = LOCAL.fullmatch(address)
    cluster = None
    try:
        if local:
            workers = int(local.group(1) or len(os.sched_getaffinity(0)))
            with dask.config.set(LOCAL_CONFIG):       # the workers get it at spawn
                cluster = distributed.LocalCluster(
                    n_workers=workers, threads_per_worker=1, processes=True,
                    host="127.0.0.1", dashboard_address="127.0.0.1:0",
                    silence_logs=logging.CRITICAL if quiet else logging.WARN)
            client = distributed.Client(cluster)
        elif "://" in address:
            client = distributed.Client(address)
        else:
            client = distributed.Client(scheduler_file=address)
    except (OSError, TimeoutError, ValueError, KeyError, RuntimeError) as e:
        if cluster is not None:
            cluster.close()
        logging.disable(logged)
        # RuntimeError: a local worker process did not start, typically a script's
        # code that the fresh Python of a worker runs again when it imports the script.
        hint = (" (a Python script that starts a local cluster needs the "
                "'if __name__ == \"__main__\":' guard)" if isinstance(e, RuntimeError) else "")
        raise ClusterError(f"--dask {address}: cannot start or reach the cluster: "
                           f"{str(e).splitlines()[0] if str(e) else type(e).__name__}"
                           f"{hint}") from None
    try:
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
        logging.disable(logged)


class InlineExecutor(Executor):
    """Runs each call at once in the calling thread: a worker process's parallelism
    is its Dask threads (one per core), not more threads inside a task."""

    def submit(self, fn: Callable, /, *args, **kwargs) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except Exception as e:
            future.set_exception(e)
        return future


@functools.lru_cache(maxsize=1)
def cached_net(arguments: tuple) -> tuple[CAMNet, threading.Lock]:
    return CAMNet(**dict(arguments)), threading.Lock()


_building = threading.Lock()


def worker_net(arguments: tuple) -> tuple[CAMNet, threading.Lock]:
    """This process's net for ``arguments`` (built on first use, then kept: the
    latest model only) and the lock its forward passes take turns with."""
    with _building:
        return cached_net(arguments)


@functools.cache
def worker_budget() -> MemoryBudget:
    """This worker process's budget for decoding images: $CAM_CAFFE_MEMORY, else half
    the memory limit Dask gives the worker, else half the memory available."""
    from distributed import get_worker
    limit = get_worker().memory_manager.memory_limit
    return MemoryBudget(limit // 2 if limit and not os.environ.get(MEMORY_ENV)
                        else memory_budget())


def run_chunk(arguments: tuple, chunk: list[Input], options: Options) -> ChunkResult:
    """The Dask task: one chunk on this worker process's net and memory budget (the
    images that do not fit now come back postponed, for the client's next round)."""
    from distributed import get_worker
    try:
        net, forward_lock = worker_net(arguments)
    except CamError as e:
        raise type(e)(f"on Dask worker {get_worker().address}: {e}", e.exit_code) from None
    return process_chunk(net, chunk, options, InlineExecutor(), forward_lock,
                         budget=worker_budget())


def net_arguments(net: CAMNet) -> tuple:
    """The net's construction arguments as a hashable key; the backend is the one
    ``auto`` chose here, so that every worker runs the same."""
    return tuple(sorted(dict(net.arguments, backend=net.backend_name).items()))


def cluster_chunks(client: distributed.Client | str, net: CAMNet, chunks: list[list[Input]],
                   options: Options) -> Generator[ChunkResult, None, None]:
    """Each chunk's result as its task completes on the cluster ``client`` (a
    ``distributed.Client``, or an address for :func:`dask_client`)."""
    if isinstance(client, str):
        with dask_client(client) as connected:
            yield from cluster_chunks(connected, net, chunks, options)
        return
    distributed = import_distributed()
    if options.output_dir is not None:
        options = replace(options, output_dir=absolute(options.output_dir))
    chunks = [[item if item.data is not None else replace(item, path=absolute(item.path))
               for item in chunk] for chunk in chunks]      # image bytes on stdin travel
    arguments = net_arguments(net)
    futures = {client.submit(run_chunk, arguments, chunk, options, pure=False): chunk
               for chunk in chunks}
    try:
        for future in distributed.as_completed(list(futures)):
            chunk = futures.pop(future)
            try:
                result = future.result()
            except distributed.KilledWorker:
                result = ChunkResult(len(chunk), failed=[(item.path, BackendError(
                    f"{item.path}: the Dask workers running its chunk died")) for item in chunk])
            except (CancelledError, distributed.comm.CommClosedError):
                raise ClusterError("lost the Dask scheduler; rerun with --skip-existing to "
                                   "finish the work") from None
            future.release()                      # the cluster forgets the result
            yield result
    finally:
        client.cancel(list(futures))              # stopped early: the chunks not done
    if options.output_dir is not None:     # left by a killed worker, now that none writes
        remove_temporaries(path for chunk in chunks for item in chunk
                           for path in output_paths(item, options, options.maps).values())
