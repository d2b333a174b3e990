"""Throughput of a batch run in one process and on an embedded Dask cluster
(``--dask local:N``), and Dask's cost per task.

Each configuration runs in its own child process on the same JPEGs of 500×375
with GoogLeNet-CAM (random weights, the default backend, ``--batch-size``
images per task) and the default outputs (one PNG overlay per image). Every
configuration first runs one untimed pass (net loaded, caches warm, workers
started), then ``--repeat`` timed passes; the table gives the median.

- ``one process, 1 core``: ``run_batch`` pinned to one core
  (``sched_setaffinity``) with one forward thread (``OMP_NUM_THREADS=1``) — the
  reference the issue's target names (``local:N`` ≥ 0.9 × N × this);
- ``one process, all cores``: ``run_batch`` as ``cam-caffe`` runs it by default;
- ``N × one process, 1 core each``: N of the one-core runs at once, each
  pinned to its own core, no Dask: what N independent processes get from this
  machine's cores and memory, the ceiling for ``local:N`` here;
- ``local:N``: ``run_batch(client=…)`` on a ``LocalCluster`` of N worker
  processes with one thread each, as ``--dask local:N`` starts it.

Besides images/s (wall clock), the table gives the CPU time per image of all
the processes of a run (client and workers): on a machine that other jobs
share, wall-clock ratios depend on the load, but the CPU spent per image shows
what Dask costs (CPU efficiency = one core's CPU per image ÷ this run's).

The per-task overhead is measured on a warm ``local:2`` cluster with tasks of
an empty chunk (the same task function, no image): the round trip of one task
at a time, and the rate of many tasks in flight.

    python benchmarks/bench_dask.py [--images 96] [--repeat 3] [--batch-size 16]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

from common import (
    PROTOTXT,
    PYTHON,
    WORK,
    googlenet_weights,
    make_images,
    median,
    run_json,
    table,
    title,
    wait_for_quiet,
)

FOLDER = WORK / "photos_375x500"


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and its children so far: the
    worker processes of a local cluster are children of the client process."""
    import psutil
    me = psutil.Process()
    total = 0.0
    for process in [me, *me.children(recursive=True)]:
        try:
            times = process.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def passes(run, repeat: int) -> dict[str, list[float]]:
    """Wall and CPU seconds of ``repeat`` calls of ``run`` after one untimed call."""
    run()
    seconds, cpu = [], []
    for _ in range(repeat):
        start, start_cpu = time.perf_counter(), cpu_seconds()
        run()
        seconds.append(time.perf_counter() - start)
        cpu.append(cpu_seconds() - start_cpu)
    return {"seconds": seconds, "cpu": cpu}


def child(config: str, count: int, repeat: int, batch_size: int) -> dict:
    from cam_caffe import CAMNet
    from cam_caffe.batch import Options, run_batch
    from cam_caffe.inputs import collect
    out = WORK / "dask_out" / config.replace(" ", "_").replace(":", "")   # one folder per child
    shutil.rmtree(out, ignore_errors=True)     # the repeats then rewrite this run's own files
    inputs = collect([str(p) for p in sorted(FOLDER.glob("*.jpg"))[:count]], out)
    options = Options(output_dir=out, batch_size=batch_size, quiet=True)
    started = time.perf_counter()
    net = CAMNet(PROTOTXT, googlenet_weights())

    def run(client=None) -> None:
        report = run_batch(net, inputs, options, client=client)
        assert report.done == len(inputs), report

    if not config.startswith("local"):
        return {**passes(run, repeat), "backend": net.backend_name}
    from cam_caffe.cluster import dask_client
    with dask_client(config, quiet=True) as client:
        client.wait_for_workers(int(config.split(":")[1]))
        run(client)
        start_up = time.perf_counter() - started          # cluster up, every net loaded
        result = {**passes(lambda: run(client), repeat), "start_up": start_up,
                  "backend": net.backend_name}
        if config == "local:2":
            result.update(task_overhead(client, net, options))
    return result


def task_overhead(client, net, options, sequential: int = 50, many: int = 400) -> dict:
    """Round trip of one empty-chunk task at a time, and the rate of ``many`` at once."""
    from distributed import wait

    from cam_caffe.cluster import net_arguments, run_chunk
    arguments = net_arguments(net)
    rounds = []
    for _ in range(sequential):
        start = time.perf_counter()
        client.submit(run_chunk, arguments, [], options, pure=False).result()
        rounds.append(time.perf_counter() - start)
    start = time.perf_counter()
    wait([client.submit(run_chunk, arguments, [], options, pure=False) for _ in range(many)])
    return {"round_trip": median(rounds), "in_flight": (time.perf_counter() - start) / many}


def independent(cores: int, args: argparse.Namespace) -> dict:
    """``cores`` one-core runs started together, each pinned to its own core: their
    summed images/s and mean CPU per image (the child's medians)."""
    import subprocess
    children = [subprocess.Popen(
        ["taskset", "-c", str(core), PYTHON, __file__, "--child", f"one-core-{core}",
         "--images", str(args.images), "--repeat", str(args.repeat),
         "--batch-size", str(args.batch_size)],
        env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE, text=True)
        for core in sorted(os.sched_getaffinity(0))[:cores]]
    results = [json.loads(child.communicate()[0].strip().splitlines()[-1]) for child in children]
    return {"seconds": [median(r["seconds"]) for r in results],
            "cpu": [median(r["cpu"]) for r in results], "backend": results[0]["backend"],
            "images/s": sum(args.images / median(r["seconds"]) for r in results)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.images, args.repeat, args.batch_size)))
        return
    if len(list(FOLDER.glob("*.jpg"))) < args.images:
        make_images(FOLDER, args.images)
    googlenet_weights()
    cores = len(os.sched_getaffinity(0))
    configs = [("one process, 1 core", "one-core", {"OMP_NUM_THREADS": "1"}),
               ("one process, all cores", "all-cores", {}),
               *[(f"local:{n}", f"local:{n}", {}) for n in sorted({1, 2, cores})]]
    wait_for_quiet()
    results = {}
    for label, config, env in configs:
        command = [PYTHON, __file__, "--child", config, "--images", str(args.images),
                   "--repeat", str(args.repeat), "--batch-size", str(args.batch_size)]
        if config == "one-core":
            command = ["taskset", "-c", str(min(os.sched_getaffinity(0))), *command]
        results[label] = run_json(command, dict(os.environ, **env))
    if cores > 1:
        results[f"{cores} × one process, 1 core each"] = independent(cores, args)
    one_core = args.images / median(results["one process, 1 core"]["seconds"])
    one_core_cpu = median(results["one process, 1 core"]["cpu"]) / args.images
    rows = []
    for label, result in results.items():
        rate = result.get("images/s") or args.images / median(result["seconds"])
        cpu = median(result["cpu"]) / args.images
        workers = (int(label.split(":")[1]) if label.startswith("local")
                   else cores if "images/s" in result else None)
        target = f"{rate / (workers * one_core):.2f}" if workers else ""
        start_up = f"{result['start_up']:.1f}" if "start_up" in result else ""
        rows.append([label, result["backend"], f"{rate:.1f}", f"{rate / one_core:.2f}×",
                     target, f"{cpu * 1000:.0f}", f"{one_core_cpu / cpu:.2f}", start_up])
    title(f"Batch throughput, one process vs --dask local:N: GoogLeNet-CAM, {args.images} "
          f"JPEGs of 500×375 → PNG overlays, batch {args.batch_size} (median of {args.repeat})")
    print(table(["run", "backend", "images/s", "÷ one process on 1 core",
                 "÷ (N × one core), target ≥ 0.9", "CPU ms per image (all processes)",
                 "CPU efficiency vs 1 core", "start-up s (cluster + nets)"], rows))
    overhead = results["local:2"]
    print(f"\nPer task (local:2, an empty chunk): {overhead['round_trip'] * 1000:.1f} ms "
          f"round trip one at a time, {overhead['in_flight'] * 1000:.2f} ms each with "
          f"many in flight; a chunk of {args.batch_size} images takes "
          f"{args.batch_size / one_core * 1000:.0f} ms on one core.")


if __name__ == "__main__":
    sys.exit(main())
