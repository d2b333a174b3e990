#!/usr/bin/env bash
# Mutation testing of the modules that compute what users get (mutmut 3).
#
#   scripts/mutation.sh [MODULE…]     e.g. scripts/mutation.sh cam tencrop boxes
#
# Not run in CI: on 2 cores a module takes minutes to an hour. Each MODULE (a
# name from TARGETS below; default: all of them, in that order) is mutated in
# its own scratch copy of the working tree, build/mutation/<module>/, with
# ../shared linked beside it, against the test files that exercise it (mutmut
# then runs, for each mutant, only those of them that reach the mutated
# function). Hypothesis tests run with fewer examples there
# (HYPOTHESIS_PROFILE=mutation, see tests/conftest.py). The tests that run the
# command in a child process (test_end_to_end) fail under mutmut even without a
# mutant: they are left out. mutmut stops a mutant whose tests run longer than
# 3 × (what they took unmutated + 1) seconds of wall-clock time, or use twice that in
# CPU seconds (timeout_multiplier 3; mutmut's default 15 let an endless loop hold a
# shared core for ten minutes), and counts it as killed by a timeout. Under load, or in
# a forked child that blocks where a fresh process would not, that is not always the
# mutant's doing: each timed-out mutant is run again in a fresh pytest process
# (scripts/mutation_timeouts.py), and counts as killed only if a test fails there or
# it runs over the limit there too.
#
# Prints one line per module — mutants, killed, survived, equivalent (survivors
# listed with a reason in scripts/mutation-equivalent.txt) and the score,
# killed / (mutants - equivalent) — and the survivors that are not listed as
# equivalent. Inspect one with: cd build/mutation/<module> && mutmut show NAME
# Environment: JOBS (parallel mutants, default 2), PYTHON (default .venv/bin/python).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
JOBS="${JOBS:-2}"
SHARED="$(cd "$ROOT/.." && pwd)/shared"
EQUIVALENT="$ROOT/scripts/mutation-equivalent.txt"
MUTMUT_VERSION="3.8.1"

# module (file under cam_caffe/, without .py) → the test files that exercise it
declare -A TARGETS=(
  [cam]="test_cam test_properties test_golden test_batch_equivalence"
  [tencrop]="test_properties test_tencrop test_batch_equivalence"
  [boxes]="test_boxes test_properties test_output_files"
  [preprocess]="test_preprocess_render test_batch_equivalence test_upgrade_parity"
  [render]="test_preprocess_render test_output_files"
  [api]="test_api test_api_results test_caffe_backend test_methods test_batch_equivalence test_output_files test_golden test_batch"
  [methods]="test_methods test_api_results"
  [camspec]="test_netdef test_cam_branches test_methods test_model_failures test_upgrade_parity test_golden"
  [backends/__init__]="test_backends test_caffe_backend test_model_failures test_methods test_parity test_golden test_batch_equivalence test_upgrade_parity"
  [backends/caffe]="test_caffe_backend test_methods test_model_failures test_parity test_golden test_batch_equivalence test_upgrade_parity"
  [batch]="test_batch test_output_files test_batch_equivalence test_result test_limits test_report test_batch_run"
  [output]="test_output_safety test_output_files test_preprocess_render test_bad_inputs test_batch test_global_state test_limits test_report test_onnx_cache"
  [inputs]="test_inputs test_batch test_limits"
  [netdef/read]="test_netdef test_upgrade_parity test_netdef_read"
  [netdef/normalize]="test_netdef test_upgrade_parity test_netdef_normalize test_netdef_shapes"
  [netdef/shapes]="test_netdef test_model_limits test_netdef_shapes"
  [netdef/weights]="test_netdef test_model_limits test_bad_inputs test_upgrade_parity test_weights_check test_netdef_read"
  [backends/onnxruntime]="test_onnx test_onnx_cache test_backends test_methods test_golden test_model_failures test_batch_equivalence test_upgrade_parity test_limits"
  [backends/opencv]="test_onnx test_parity test_backends test_methods test_golden test_model_failures test_model_limits test_batch_equivalence test_upgrade_parity"
  [onnx_export/__init__]="test_onnx test_onnx_layers test_methods"
  [onnx_export/converter]="test_onnx test_onnx_layers test_methods"
  [onnx_export/linear]="test_onnx test_onnx_layers test_methods"
  [onnx_export/pool]="test_onnx test_onnx_layers test_methods"
  [onnx_export/elementwise]="test_onnx test_onnx_layers test_methods"
  [onnx_export/norm]="test_onnx test_onnx_layers test_methods"
  [onnx_export/shape]="test_onnx test_onnx_layers test_methods"
)
ORDER=(cam tencrop boxes preprocess render api methods camspec backends/__init__
       backends/caffe backends/onnxruntime backends/opencv batch output inputs netdef/read
       netdef/normalize netdef/shapes netdef/weights onnx_export/__init__ onnx_export/converter onnx_export/linear
       onnx_export/pool onnx_export/elementwise onnx_export/norm onnx_export/shape)

if ! "$PYTHON" -c "import mutmut" 2>/dev/null \
    || [ "$("$PYTHON" -c 'import importlib.metadata as m; print(m.version("mutmut"))')" != "$MUTMUT_VERSION" ]; then
  "$PYTHON" -m pip install --quiet --disable-pip-version-check "mutmut==$MUTMUT_VERSION"
fi
[ -d "$SHARED" ] || { echo "mutation.sh: $SHARED is missing (the tests need it)" >&2; exit 2; }

modules=("$@")
[ ${#modules[@]} -gt 0 ] || modules=("${ORDER[@]}")
for module in "${modules[@]}"; do
  [ -n "${TARGETS[$module]:-}" ] || { echo "mutation.sh: unknown module '$module'; one of: ${ORDER[*]}" >&2; exit 2; }
done

run_module() {
  local module="$1" work="$ROOT/build/mutation/${1//\//.}" tests=""
  rm -rf "$work"
  mkdir -p "$work"
  # the working tree as it is (tracked and new files), without build outputs
  (cd "$ROOT" && git ls-files -co --exclude-standard -z | grep -zv '^build/' \
     | tar --null -cf - -T -) | tar -xf - -C "$work"
  ln -s "$SHARED" "$work/shared"
  for t in ${TARGETS[$module]}; do tests+=$'\n'"    tests/$t.py"; done
  cat > "$work/setup.cfg" <<CFG
[mutmut]
source_paths=cam_caffe
only_mutate=cam_caffe/$module.py
also_copy=
    prototxt
    models
    scripts
    images
pytest_add_cli_args=-p no:cacheprovider
timeout_multiplier=3
pytest_add_cli_args_test_selection=$tests
CFG
  local start=$SECONDS
  # OMP_NUM_THREADS=1: mutmut forks each mutant from a process whose tests already ran
  # forwards, and GNU OpenMP's thread pool does not survive a fork (the child's next
  # parallel region waits forever: every such mutant was a "timeout"); one thread per
  # forward gives the same results (tests/test_pycaffe_threads.py) and spawns no pool
  (cd "$work" && CI=true HYPOTHESIS_PROFILE=mutation OMP_NUM_THREADS=1 "$PYTHON" -m mutmut run \
     --max-children "$JOBS" > "$work/mutmut.log" 2>&1) || true
  (cd "$work" && "$PYTHON" -m mutmut export-cicd-stats > /dev/null 2>&1 \
     && "$PYTHON" -m mutmut results > "$work/survivors.txt" 2>&1) || true
  # a timeout in mutmut's forked child is not always the mutant's doing: each is run
  # again in a fresh process (scripts/mutation_timeouts.py)
  [ -f "$work/mutants/mutmut-stats.json" ] \
    && "$PYTHON" "$ROOT/scripts/mutation_timeouts.py" "$work" "$JOBS" > "$work/timeouts.txt" 2>&1
  "$PYTHON" - "$module" "$work" "$EQUIVALENT" $((SECONDS - start)) <<'PY'
import json, re, sys
from pathlib import Path
module, work, equivalent_file, seconds = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
stats_file = work / "mutants" / "mutmut-cicd-stats.json"
if not stats_file.exists():
    print(f"{module:18} no result: see {work / 'mutmut.log'}")
    sys.exit()
stats = json.loads(stats_file.read_text())
if stats["total"] and not sum(v for k, v in stats.items() if k != "total"):
    print(f"{module:18} no result: the tests failed without mutants, see {work / 'mutmut.log'}")
    sys.exit()
equivalent = {line.split()[0] for line in equivalent_file.read_text().splitlines()
              if line.strip() and not line.startswith("#")} if equivalent_file.exists() else set()
survivors = [m.group(1) for m in re.finditer(r"^\s*(\S+): (survived|no tests|suspicious)",
                                             (work / "survivors.txt").read_text(), re.M)]
timeouts_file = work / "timeouts.json"
verdicts = json.loads(timeouts_file.read_text()) if timeouts_file.exists() else {}
false_timeouts = [k for k, v in verdicts.items() if v not in ("killed", "hang")]
survivors += false_timeouts
killed = stats["killed"] + stats["timeout"] - len(false_timeouts) + stats["segfault"]
equiv = [s for s in survivors if s in equivalent]
others = [s for s in survivors if s not in equivalent]
scored = stats["total"] - len(equiv)
score = 100.0 * killed / scored if scored else 100.0
print(f"{module:18} {stats['total']:5d} mutants {killed:5d} killed {len(survivors):4d} survived "
      f"{len(equiv):4d} equivalent  score {score:5.1f}%  ({stats['timeout']} timeouts, run "
      f"again in a fresh process: {sum(v == 'killed' for v in verdicts.values())} failed a "
      f"test, {sum(v == 'hang' for v in verdicts.values())} hung again, "
      f"{len(false_timeouts)} survived; {seconds} s)")
for name in others:
    print(f"    survived: {name}")
PY
}

printf '%-18s %s\n' module "mutants, killed, survived, equivalent, score = killed / (mutants - equivalent)"
for module in "${modules[@]}"; do
  run_module "$module"
done
