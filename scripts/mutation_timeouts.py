"""Run again, each in a fresh pytest process, the mutants mutmut stopped by its time limit.

    python scripts/mutation_timeouts.py build/mutation/<module> [JOBS]

mutmut forks every mutant from a process whose tests already ran, and some state does
not survive a fork: the child of a process that has run pycaffe's OpenMP forwards, or
started worker processes (pipeline.py), can block forever where a fresh process would
not, and mutmut counts that as "killed by a timeout". Each timed-out mutant is run here
with the tests mutmut maps to its function (MUTANT_UNDER_TEST set, as mutmut activates
it), under a wall-clock limit of max(60 s, 5 × their unmutated time). Writes
``timeouts.json`` in the work folder, {mutant: "killed" | "survived" | "hang" |
"error N"} ("hang": over the limit here too, a kill; "error": pytest could not run
them, not a kill), and prints one line per mutant.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

TIMEOUT_EXIT = -24          # mutmut stops a mutant with SIGXCPU


def verdict(mutants: Path, stats: dict, key: str) -> str:
    function = key.rsplit("__mutmut_", 1)[0]
    tests = sorted(stats["tests_by_mangled_function_name"].get(function, []))
    limit = max(60.0, 5 * sum(stats["duration_by_test"].get(t, 1.0) for t in tests))
    env = dict(os.environ, MUTANT_UNDER_TEST=key, OMP_NUM_THREADS="1", CI="true",
               HYPOTHESIS_PROFILE="mutation")
    try:
        child = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p",
                                "no:cacheprovider", *tests], cwd=mutants, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               timeout=limit)
    except subprocess.TimeoutExpired:
        return "hang"
    # pytest: 0 all passed, 1 a test failed; anything else (no tests, an internal
    # error) proves nothing and does not count as a kill
    return {0: "survived", 1: "killed"}.get(child.returncode, f"error {child.returncode}")


def main() -> None:
    work = Path(sys.argv[1]).resolve()
    jobs = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    mutants = work / "mutants"
    stats = json.loads((mutants / "mutmut-stats.json").read_text())
    timed_out = sorted(key for meta in mutants.rglob("*.meta")
                       for key, code in json.loads(meta.read_text())["exit_code_by_key"].items()
                       if code == TIMEOUT_EXIT)
    with ThreadPoolExecutor(jobs) as pool:
        verdicts = dict(zip(timed_out, pool.map(lambda k: verdict(mutants, stats, k), timed_out),
                            strict=True))
    for key, what in verdicts.items():
        print(f"{what:9} {key}")
    (work / "timeouts.json").write_text(json.dumps(verdicts, indent=1))


if __name__ == "__main__":
    main()
