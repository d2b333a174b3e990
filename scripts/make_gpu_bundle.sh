#!/usr/bin/env bash
# Build a relocatable tarball that runs cam-caffe with the CUDA pycaffe on a
# GPU host that has an NVIDIA driver and the CUDA 13 runtime libraries
# (libcudart.so.13, libcublas.so.13, libcublasLt.so.13, libcurand.so.10) but
# no build tools, no Python 3.11 and no network. cuDNN 9 (for the default,
# cuDNN build of pycaffe) is in the bundle.
#
# Usage: scripts/make_gpu_bundle.sh [--wheel PYCAFFE_CUDA.whl] [--cuda-arch "90 120"]
#                                   [--no-cudnn] [--slim] [--out DIR] [--no-test] [--xz]
#
#   --wheel W      the CUDA pycaffe wheel to bundle (default: build it, or take
#                  it from the cache, with install_pycaffe.sh --cuda --wheel-only,
#                  against Debian's /usr/bin/python3.11 in a private venv)
#   --cuda-arch A  passed on to install_pycaffe.sh (default: its default, sm_90)
#   --no-cudnn     bundle the pycaffe built without cuDNN (install_pycaffe.sh
#                  --no-cudnn): slower, 400 MB less unpacked
#   --slim         leave out what a GPU host with a Python ML stack already has,
#                  for small transfers: cuDNN (then libcudnn*.so.9 must be in
#                  $CAM_CAFFE_CUDA_LIBS or the loader's path), opencv-python-
#                  headless (run.sh takes cv2 from the folder in
#                  $CAM_CAFFE_HOST_CV2, e.g. a Python 3.x site-packages: its
#                  wheels are abi3) and matplotlib (only --colormap names
#                  other than jet, --style seed and --show need it)
#   --out DIR      where the tarball goes (default: <project>/build/gpu-bundle)
#   --no-test      skip the self-test of the extracted tarball
#   --xz           .tar.xz instead of .tar.gz (about 90 instead of 130 MB,
#                  but minutes more to pack on 2 cores)
#
# Runs on Debian 12 (what pycaffe is built on). Contents, all under one
# folder cam-caffe-gpu/:
#   cudnn/ libcudnn*.so.9 from the nvidia-cudnn-cu13 wheel (not with --slim or
#          --no-cudnn)
#   root/  Debian 12 packages unpacked with `apt-get download` + `dpkg -x`:
#          python3.11 (minimal + stdlib), boost-python/filesystem/thread 1.74,
#          glog, gflags, libunwind, protobuf 3.21, hdf5 1.10.8, openblas, and
#          every other library that _caffe.so, python3.11 and its stdlib
#          extension modules need (found with ldd, mapped to packages with
#          dpkg -S), except glibc, libstdc++ and libgcc_s (the host's) and the
#          CUDA libraries (the host's). Docs, man pages, locales, Python's
#          test suite, idlelib, tkinter, lib2to3 and ensurepip are pruned.
#   site/  cp311 manylinux wheels, installed with pip --target: numpy,
#          protobuf, six, isal, tqdm, opencv-python-headless, pillow, matplotlib (+ its
#          dependencies), and the CUDA pycaffe wheel (the `caffe` package);
#          their tests/ folders are pruned.
#   app/   the cam_caffe package (this checkout's), prototxt/,
#          scripts/gpu_check.py + scripts/bundle_check.py, tests/synthetic.py, and
#          benchmarks/bench_cores.py + common.py (GPU end to end vs forward),
#          bench_pycaffe_threads.py (pycaffe's CPU forward by cores).
#   run.sh sets LD_LIBRARY_PATH/PYTHONPATH/PYTHONHOME and runs
#          `python3.11 -m cam_caffe "$@"` (see `run.sh --bundle-help`).
# The host needs glibc >= 2.36 (Debian 12's python), e.g. Ubuntu 24.04.
set -Eeuo pipefail

STEP="startup"
step() { STEP="$1"; echo "==> $1"; }
die() {
  echo "make_gpu_bundle: error: $*" >&2
  echo "make_gpu_bundle: FAILED at step: $STEP" >&2
  exit 1
}
MAIN_PID=$$
trap 'rc=$?; [ "$BASHPID" != "$MAIN_PID" ] || echo "make_gpu_bundle: FAILED at step: $STEP" >&2; exit $rc' ERR

T_START=$(date +%s)
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SCRIPT="$ROOT/scripts/make_gpu_bundle.sh"
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/cam-caffe/gpu-bundle"

WHEEL=""
CUDA_ARCH_ARGS=()
CUDNN_ARGS=()
SLIM=0
OUT_DIR="$ROOT/build/gpu-bundle"
TEST=1
COMPRESS=gz
while [ $# -gt 0 ]; do
  case "$1" in
    --wheel) [ $# -ge 2 ] || die "--wheel needs a path"; WHEEL="$2"; shift 2 ;;
    --wheel=*) WHEEL="${1#*=}"; shift ;;
    --cuda-arch) [ $# -ge 2 ] || die "--cuda-arch needs a list"; CUDA_ARCH_ARGS=(--cuda-arch "$2"); shift 2 ;;
    --cuda-arch=*) CUDA_ARCH_ARGS=(--cuda-arch "${1#*=}"); shift ;;
    --out) [ $# -ge 2 ] || die "--out needs a directory"; OUT_DIR="$2"; shift 2 ;;
    --out=*) OUT_DIR="${1#*=}"; shift ;;
    --no-cudnn) CUDNN_ARGS=(--no-cudnn); shift ;;
    --slim) SLIM=1; shift ;;
    --no-test) TEST=0; shift ;;
    --xz) COMPRESS=xz; shift ;;
    -h|--help) sed -n '2,/^set -Eeuo/{/^set -Eeuo/d;s/^# \{0,1\}//;p}' "$SCRIPT"; exit 0 ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
done

# Debian 12 packages unpacked into root/ (their library dependencies are
# added from ldd below).
BASE_DEBS=(
  python3.11-minimal libpython3.11-minimal libpython3.11-stdlib
  libboost-python1.74.0 libboost-filesystem1.74.0 libboost-thread1.74.0
  libgoogle-glog0v6 libgflags2.2 libunwind8 libprotobuf32
  libhdf5-103-1 libhdf5-hl-100 libopenblas0-pthread
)
# Packages never bundled: the host's C/C++ runtime.
HOST_DEBS=(libc6 libstdc++6 libgcc-s1)
# Libraries taken from the host at run time (ldd names).
HOST_LIBS_RE='^(linux-vdso\.so|ld-linux-x86-64\.so|libc\.so|libm\.so|libpthread\.so|libdl\.so|librt\.so|libutil\.so|libresolv\.so|libstdc\+\+\.so|libgcc_s\.so|libcuda\.so|libcudart\.so|libcublas\.so|libcublasLt\.so|libcurand\.so|libcudnn\.so)'
# Python wheels (cp311, manylinux); their dependencies are resolved by pip.
PY_WHEELS=("numpy==2.4.6" "protobuf==7.36.2" "six==1.17.0" "pillow==13.0.0" "isal==1.9.1" "tqdm==4.70.1")
OPENCV_WHEEL="opencv-python-headless==4.14.0.94"
[ "$SLIM" = 1 ] || PY_WHEELS+=("$OPENCV_WHEEL" "matplotlib==3.11.2")
# manylinux tags up to glibc 2.36 (Debian 12's, which the bundled python needs anyway)
PLATFORM_ARGS=()
for minor in $(seq 36 -1 17); do PLATFORM_ARGS+=(--platform "manylinux_2_${minor}_x86_64"); done
PLATFORM_ARGS+=(--platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64)
MULTIARCH="x86_64-linux-gnu"
NAME="cam-caffe-gpu"

command -v apt-get >/dev/null && command -v dpkg >/dev/null || die "needs apt-get and dpkg (Debian 12)"
[ -x /usr/bin/python3.11 ] || die "/usr/bin/python3.11 not found (apt-get install python3.11 python3.11-venv)"
mkdir -p "$CACHE" "$OUT_DIR"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/cam-caffe-bundle.XXXXXX")"
cleanup() { rm -rf "$WORK"; }
trap cleanup EXIT
STAGE="$WORK/$NAME"
mkdir -p "$STAGE/root" "$STAGE/site" "$STAGE/app/scripts" "$STAGE/cudnn"

# A venv over Debian's python3.11 (the bundled interpreter): it builds the
# wheel and runs pip for the bundle.
BUILD_VENV="$CACHE/build-venv"
if [ ! -x "$BUILD_VENV/bin/python" ]; then
  /usr/bin/python3.11 -m venv "$BUILD_VENV" || die "python3.11 -m venv failed (apt-get install python3.11-venv)"
fi
PIP=("$BUILD_VENV/bin/python" -m pip --disable-pip-version-check)

# ----------------------------------------------------------------------------
step "CUDA pycaffe wheel"
if [ -z "$WHEEL" ]; then
  "$ROOT/scripts/install_pycaffe.sh" --cuda "${CUDA_ARCH_ARGS[@]}" "${CUDNN_ARGS[@]}" --wheel-only \
    --python "$BUILD_VENV/bin/python" | tee "$WORK/install.log"
  WHEEL="$(sed -n 's/^WHEEL_PATH=//p' "$WORK/install.log" | tail -n 1)"
fi
[ -f "$WHEEL" ] || die "wheel not found: $WHEEL"
case "$(basename "$WHEEL")" in
  pycaffe-*cuda*-cp311-*.whl) ;;
  *) die "$WHEEL: not a CUDA pycaffe wheel for CPython 3.11" ;;
esac
echo "    $WHEEL"
"${PIP[@]}" install -q --no-index --no-deps --no-compile --target "$STAGE/site" "$WHEEL"
SO="$STAGE/site/caffe/_caffe.so"
[ -f "$SO" ] || die "$SO missing from the wheel"
CUDA_LIBS_CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/cam-caffe/pycaffe/cuda-libs"   # install_pycaffe.sh's
CUDA_LIBS_DIRS="$(ls -d "$CUDA_LIBS_CACHE"/*/lib 2>/dev/null | tr '\n' ':')"
case "$(basename "$WHEEL")" in
  *cudnn*) CUDNN_WHEEL=1 ;;
  *) CUDNN_WHEEL=0 ;;
esac
if [ "$CUDNN_WHEEL" = 1 ] && [ "$SLIM" = 0 ]; then
  CUDNN_LIB="$(ls -d "$CUDA_LIBS_CACHE"/nvidia-cudnn-*/lib | tail -n 1)"
  [ -e "$CUDNN_LIB/libcudnn.so.9" ] || die "no cuDNN libraries in the cache (run install_pycaffe.sh --cuda)"
  cp -a "$CUDNN_LIB"/libcudnn*.so.9 "$STAGE/cudnn/"
fi

# ----------------------------------------------------------------------------
step "Debian packages (ldd closure)"
# Every library that _caffe.so, python3.11 and the stdlib extension modules
# load, as resolved on this (build) machine, mapped to its package.
LDD_TARGETS=("$SO" /usr/bin/python3.11 /usr/lib/python3.11/lib-dynload/*.so)
mapfile -t LIBS < <(
  for f in "${LDD_TARGETS[@]}"; do
    LD_LIBRARY_PATH="$CUDA_LIBS_DIRS" ldd "$f" 2>/dev/null || true
  done | awk '$2 == "=>" && $3 ~ /^\// {print $1 " " $3} $2 == "=>" && $3 == "not" {print $1 " NOTFOUND"}' | sort -u
)
DEBS=("${BASE_DEBS[@]}")
for entry in "${LIBS[@]}"; do
  lib="${entry%% *}"; path="${entry#* }"
  if [[ "$lib" =~ $HOST_LIBS_RE ]]; then continue; fi
  [ "$path" != NOTFOUND ] || die "$lib: not found on this machine (needed by the bundle)"
  real="$(readlink -f "$path")"
  pkg=""
  for cand in "$real" "/usr${real#/usr}" "${real#/usr}" "$path"; do
    pkg="$(dpkg -S "$cand" 2>/dev/null | head -n 1 | cut -d: -f1 || true)"
    [ -z "$pkg" ] || break
  done
  [ -n "$pkg" ] || die "$path: no Debian package owns it"
  DEBS+=("$pkg")
done
mapfile -t DEBS < <(printf '%s\n' "${DEBS[@]}" | sort -u)
for h in "${HOST_DEBS[@]}"; do
  mapfile -t DEBS < <(printf '%s\n' "${DEBS[@]}" | grep -vx -- "$h")
done
echo "    ${#DEBS[@]} packages: ${DEBS[*]}"

DEB_DIR="$CACHE/debs"
mkdir -p "$DEB_DIR"
download_debs() { (cd "$DEB_DIR" && apt-get download -q "$@" >/dev/null); }
if ! download_debs "${DEBS[@]}" 2>"$WORK/apt.err"; then
  echo "    apt-get download failed; running apt-get update once"
  apt-get update -q >/dev/null || die "apt-get update failed: $(tail -n 3 "$WORK/apt.err")"
  download_debs "${DEBS[@]}" || die "apt-get download failed"
fi
for pkg in "${DEBS[@]}"; do
  deb="$(ls -t "$DEB_DIR/${pkg}_"*.deb 2>/dev/null | head -n 1)"
  [ -n "$deb" ] || die "no .deb for $pkg in $DEB_DIR"
  dpkg -x "$deb" "$STAGE/root"
  echo "$(basename "$deb")" >> "$WORK/debs.txt"
done
# prune what a headless run never reads
rm -rf "$STAGE/root/usr/share/doc" "$STAGE/root/usr/share/man" "$STAGE/root/usr/share/locale" \
  "$STAGE/root/usr/share/lintian" "$STAGE/root/usr/share/binfmts" "$STAGE/root/usr/share/info" \
  "$STAGE/root/usr/share/applications" "$STAGE/root/usr/share/pixmaps" \
  "$STAGE/root/usr/share/bug" "$STAGE/root/usr/share/gdb" "$STAGE/root/etc"
PYLIB="$STAGE/root/usr/lib/python3.11"
rm -rf "$PYLIB/test" "$PYLIB/idlelib" "$PYLIB/tkinter" "$PYLIB/turtledemo" \
  "$PYLIB/lib2to3" "$PYLIB/ensurepip" "$PYLIB/pydoc_data" "$PYLIB"/config-3.11-*
find "$STAGE/root" -name __pycache__ -type d -prune -exec rm -rf {} +
# Debian's alternatives are not set up by dpkg -x: link libopenblas.so.0
# from the pthread variant's private folder (its libblas/liblapack.so.3,
# 7 MB, are used by nothing here).
OB="$STAGE/root/usr/lib/$MULTIARCH/openblas-pthread"
[ -e "$OB/libopenblas.so.0" ] || die "libopenblas.so.0 missing after dpkg -x"
rm -f "$OB/libblas.so.3" "$OB/liblapack.so.3"
ln -s openblas-pthread/libopenblas.so.0 "$STAGE/root/usr/lib/$MULTIARCH/libopenblas.so.0"
# Debian's python links sitecustomize.py to /etc/python3.11/: on the target
# that would be the host's file, if any.
rm -f "$PYLIB/sitecustomize.py"
BAD_LINKS="$(cd "$STAGE" && find . -type l -lname '/*' -printf '%p -> %l\n')"
[ -z "$BAD_LINKS" ] || die "absolute symlinks would point into the host: $BAD_LINKS"
[ -x "$STAGE/root/usr/bin/python3.11" ] || die "python3.11 missing after dpkg -x"

# ----------------------------------------------------------------------------
step "Python wheels (cp311 manylinux)"
WHEEL_DIR="$CACHE/wheels"
mkdir -p "$WHEEL_DIR"
TARGET_ARGS=(--only-binary :all: "${PLATFORM_ARGS[@]}" --python-version 3.11
             --implementation cp --abi cp311)
"${PIP[@]}" download -q "${TARGET_ARGS[@]}" -d "$WHEEL_DIR" "${PY_WHEELS[@]}"
# install the resolved set from there (pip download also fetched the dependencies)
"${PIP[@]}" install -q --no-index --find-links "$WHEEL_DIR" "${TARGET_ARGS[@]}" \
  --no-compile --target "$STAGE/site" "${PY_WHEELS[@]}"
rm -rf "$STAGE/site/bin"
find "$STAGE/site" -depth -type d \( -name tests -o -name __pycache__ \) -exec rm -rf {} +
find "$STAGE/site" -name '*.pyi' -delete
(cd "$STAGE/site" && ls -d *.dist-info | sed 's/\.dist-info$//' | sort) > "$WORK/wheels.txt"

# ----------------------------------------------------------------------------
step "cam_caffe and scripts"
(cd "$ROOT" && tar -cf - --exclude=__pycache__ --exclude='*.pyc' cam_caffe prototxt) \
  | tar -xf - -C "$STAGE/app"
cp "$ROOT/scripts/gpu_check.py" "$STAGE/app/scripts/"
mkdir -p "$STAGE/app/tests"
cp "$ROOT/tests/synthetic.py" "$STAGE/app/tests/"       # gpu_check's random weights
mkdir -p "$STAGE/app/benchmarks"
cp "$ROOT/benchmarks/bench_cores.py" "$ROOT/benchmarks/bench_pycaffe_threads.py" \
  "$ROOT/benchmarks/common.py" "$STAGE/app/benchmarks/"
cat > "$STAGE/app/scripts/bundle_check.py" <<'EOF'
"""Bundle self-check: import everything, then list every shared library this
process mapped that is neither inside the bundle nor an expected host
library (glibc, libstdc++, libgcc_s, the CUDA/driver libraries; with a
--slim bundle cuDNN and the cv2 named by $CAM_CAFFE_HOST_CV2)."""
import os, re, sys
bundle = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import numpy, google.protobuf, six, cv2, PIL.Image, isal.isal_zlib, tqdm  # noqa
import caffe, cam_caffe, cam_caffe.commands.run, cam_caffe.backends.caffe  # noqa
import ssl, hashlib, sqlite3, ctypes, decimal, lzma, bz2, zlib, json, xml.etree.ElementTree  # noqa
try:
    import matplotlib, matplotlib.pyplot  # noqa
    mpl = matplotlib.__version__
except ImportError:
    mpl = "not bundled"
host = re.compile(r"/(ld-linux-x86-64|libc|libm|libpthread|libdl|librt|libutil|libresolv|libstdc\+\+|"
                  r"libgcc_s|libcuda|libcudart|libcublas|libcublasLt|libcurand|libcudnn\w*|"
                  r"libnvidia-[\w-]+)\.so")
host_cv2 = os.environ.get("CAM_CAFFE_HOST_CV2")
if host_cv2 and not os.path.isdir(os.path.join(bundle, "site", "cv2")):
    host = re.compile(host.pattern + "|^" + re.escape(os.path.realpath(host_cv2)) + "/")
mapped = set()
with open("/proc/self/maps") as f:
    for line in f:
        path = line.split(maxsplit=5)[-1].strip()
        if ".so" in path and path.startswith("/"):
            mapped.add(path)
inside = sorted(p for p in mapped if p.startswith(bundle + "/"))
outside = sorted(p for p in mapped if not p.startswith(bundle + "/"))
unexpected = [p for p in outside if not host.search(p)]
print("python %s at %s" % (sys.version.split()[0], sys.executable))
print("numpy %s, opencv %s (%s), protobuf %s, matplotlib %s, caffe %s"
      % (numpy.__version__, cv2.__version__, os.path.dirname(cv2.__file__),
         google.protobuf.__version__, mpl, os.path.dirname(caffe.__file__)))
print("%d shared libraries from the bundle, %d from the host:" % (len(inside), len(outside)))
for p in outside:
    print("  host: " + p + ("   <-- NOT EXPECTED" if p in unexpected else ""))
if unexpected:
    sys.exit("bundle_check: %d unexpected host libraries" % len(unexpected))
print("bundle_check: OK")
EOF

# ----------------------------------------------------------------------------
step "run.sh"
cat > "$STAGE/run.sh" <<'EOF'
#!/bin/sh
# cam-caffe GPU bundle launcher.
#   ./run.sh ARGS...            python3.11 -m cam_caffe ARGS... (cam-caffe --help)
#   ./run.sh --gpu-check ARGS   app/scripts/gpu_check.py (GPU vs CPU, timings)
#   ./run.sh --bundle-check     import everything, list host libraries used
#   ./run.sh --python ARGS      the bundled python3.11 itself
#   ./run.sh --bundle-help      this text
# CUDA libraries (libcudart.so.13, libcublas.so.13, libcublasLt.so.13,
# libcurand.so.10; libcudnn*.so.9 where the bundle has no cudnn/) come from
# the host: $CAM_CAFFE_CUDA_LIBS (a colon list of folders), $CUDA_HOME/lib64,
# /usr/local/cuda/lib64, then the loader's default paths; the GPU driver
# (libcuda.so.1) from the loader's default paths. A bundle made with --slim
# has no OpenCV: $CAM_CAFFE_HOST_CV2 names a folder holding the host's cv2/
# (opencv-python-headless, abi3 wheel, e.g. a site-packages folder).
B="$(cd "$(dirname "$0")" && pwd -P)"
R="$B/root"
M=x86_64-linux-gnu
L="$R/usr/lib/$M:$R/lib/$M:$R/usr/lib/$M/openblas-pthread:$R/usr/lib/$M/hdf5/serial:$B/cudnn"
[ -z "${CAM_CAFFE_CUDA_LIBS:-}" ] || L="$L:$CAM_CAFFE_CUDA_LIBS"
[ -z "${CUDA_HOME:-}" ] || L="$L:$CUDA_HOME/lib64"
L="$L:/usr/local/cuda/lib64:/usr/local/cuda/targets/x86_64-linux/lib"
export LD_LIBRARY_PATH="$L${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PYTHONHOME="$R/usr"
export PYTHONPATH="$B/app:$B/site"
export PYTHONNOUSERSITE=1
unset PYTHONSTARTUP PYTHONEXECUTABLE PYTHONSAFEPATH
CACHE_DIR="${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/cam-caffe-gpu-bundle"
mkdir -p "$CACHE_DIR" 2>/dev/null || CACHE_DIR="/tmp/cam-caffe-gpu-bundle-$(id -u)"
mkdir -p "$CACHE_DIR" 2>/dev/null || true
if [ ! -d "$B/site/cv2" ] && [ -n "${CAM_CAFFE_HOST_CV2:-}" ]; then
  # only cv2 and its libraries from there, not the host's other packages
  # (links replaced only when they point elsewhere: runs may start in parallel)
  H="$CACHE_DIR/host-cv2"
  mkdir -p "$H"
  for d in "$CAM_CAFFE_HOST_CV2"/cv2 "$CAM_CAFFE_HOST_CV2"/opencv_python*.libs; do
    [ -e "$d" ] || continue
    [ "$(readlink "$H/${d##*/}")" = "$d" ] || ln -sfn "$d" "$H/${d##*/}"
  done
  export PYTHONPATH="$PYTHONPATH:$H"
fi
export PYTHONPYCACHEPREFIX="$CACHE_DIR/pycache"   # the bundle itself stays read-only
export MPLCONFIGDIR="$CACHE_DIR/matplotlib"
export MPLBACKEND="${MPLBACKEND:-Agg}"
export GLOG_minloglevel="${GLOG_minloglevel:-2}"
PY="$R/usr/bin/python3.11"
case "${1:-}" in
  --gpu-check) shift; exec "$PY" "$B/app/scripts/gpu_check.py" "$@" ;;
  --bundle-check) shift; exec "$PY" "$B/app/scripts/bundle_check.py" "$@" ;;
  --python) shift; exec "$PY" "$@" ;;
  --bundle-help) sed -n '2,/^B=/{/^B=/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
esac
exec "$PY" -m cam_caffe "$@"
EOF
chmod +x "$STAGE/run.sh"

# ----------------------------------------------------------------------------
step "manifest"
{
  echo "cam-caffe GPU bundle, built $(date -u +%Y-%m-%dT%H:%MZ) on $(. /etc/os-release && echo "$PRETTY_NAME")"
  echo "pycaffe wheel: $(basename "$WHEEL")"
  echo "cam_caffe: $(cd "$ROOT" && git describe --always --dirty 2>/dev/null || echo unknown)"
  echo
  echo "Debian packages (root/):"; sed 's/^/  /' "$WORK/debs.txt"
  echo
  echo "Python wheels (site/):"; sed 's/^/  /' "$WORK/wheels.txt"
  echo
  echo "Sizes:"
  (cd "$STAGE" && du -sh root site app cudnn | sed 's/^/  /')
  (cd "$STAGE/site" && du -s -- */ 2>/dev/null | sort -rn | head -n 12 \
     | awk '{printf "    site/%s %.1f MiB\n", $2, $1/1024}')
  echo
  echo "The host provides: glibc >= 2.36, libstdc++, libgcc_s, the NVIDIA driver"
  echo "(libcuda.so.1) and the CUDA 13 runtime libraries: libcudart.so.13,"
  echo "libcublas.so.13, libcublasLt.so.13, libcurand.so.10."
  if [ "$SLIM" = 1 ]; then
    echo "Slim bundle: also cuDNN 9 (libcudnn*.so.9, if pycaffe uses it) and cv2"
    echo "(CAM_CAFFE_HOST_CV2=<folder with cv2/>) from the host; no matplotlib."
  fi
} > "$STAGE/MANIFEST.txt"

# ----------------------------------------------------------------------------
step "tarball"
TARBALL="$OUT_DIR/$NAME.tar.$COMPRESS"
if [ "$COMPRESS" = xz ]; then
  tar -C "$WORK" --sort=name --owner=0 --group=0 --numeric-owner -cf - "$NAME" \
    | xz -T0 -6 > "$TARBALL.part"
else
  tar -C "$WORK" --sort=name --owner=0 --group=0 --numeric-owner -czf "$TARBALL.part" "$NAME"
fi
mv -f "$TARBALL.part" "$TARBALL"
echo "    $TARBALL: $(du -h "$TARBALL" | cut -f1) packed, $(du -sh "$STAGE" | cut -f1) unpacked"

# ----------------------------------------------------------------------------
if [ "$TEST" = 1 ]; then
  step "self-test of the extracted tarball (env -i, CPU)"
  T="$WORK/test"
  mkdir -p "$T"
  tar -xf "$TARBALL" -C "$T"
  chmod -R a-w "$T/$NAME"     # the bundle must work read-only
  RUN="$T/$NAME/run.sh"
  CLEAN=(env -i PATH=/usr/bin:/bin HOME="$T/home")
  if [ "$SLIM" = 1 ]; then
    # stands in for the host's opencv-python-headless
    "${PIP[@]}" download -q "${TARGET_ARGS[@]}" --no-deps -d "$WHEEL_DIR" "$OPENCV_WHEEL"
    "${PIP[@]}" install -q --no-index --find-links "$WHEEL_DIR" "${TARGET_ARGS[@]}" --no-deps \
      --no-compile --target "$T/host-site" "$OPENCV_WHEEL"
    CLEAN+=(CAM_CAFFE_HOST_CV2="$T/host-site")
  fi
  "${CLEAN[@]}" "$RUN" --help > "$T/help.txt" || die "run.sh --help failed"
  head -n 1 "$T/help.txt" | sed 's/^/    /'
  # The CUDA libraries are not on this machine's loader path: hand over the
  # unpacked nvidia wheels (a GPU host has them in /usr/local/cuda/lib64).
  CLEAN+=(CAM_CAFFE_CUDA_LIBS="${CUDA_LIBS_DIRS%:}")
  "${CLEAN[@]}" "$RUN" --bundle-check | sed 's/^/    /'
  # a CPU forward through the CLI on a generated model
  "${CLEAN[@]}" "$RUN" --python - "$T" <<'EOF'
import sys
from pathlib import Path
import numpy as np, cv2
import cam_caffe
from cam_caffe.netdef import load_netdef
sys.path.append(str(Path(cam_caffe.__file__).parents[1] / "tests"))   # app/tests
from synthetic import random_weights, save_caffemodel
t = Path(sys.argv[1])
(t / "net.prototxt").write_text("""
name: "tiny" input: "data" input_shape { dim: 1 dim: 3 dim: 32 dim: 32 }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 4 kernel_size: 3 pad: 1 } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "gap" type: "Pooling" bottom: "conv" top: "gap"
        pooling_param { pool: AVE global_pooling: true } }
layer { name: "fc" type: "InnerProduct" bottom: "gap" top: "fc" inner_product_param { num_output: 3 } }
layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }
""")
net = load_netdef(t / "net.prototxt")
save_caffemodel(net, random_weights(net, seed=1), t / "net.caffemodel")
cv2.imwrite(str(t / "img.png"), np.random.default_rng(0).integers(0, 255, (48, 64, 3), np.uint8))
EOF
  "${CLEAN[@]}" "$RUN" "$T/img.png" --prototxt "$T/net.prototxt" --weights "$T/net.caffemodel" \
    --backend caffe --jsonl -o "$T/overlay.png" > "$T/forward.jsonl" \
    || die "CPU forward through the bundle failed"
  [ -s "$T/overlay.png" ] || die "no overlay written"
  sed 's/^/    /' "$T/forward.jsonl" | cut -c1-160
  "${CLEAN[@]}" "$RUN" --gpu-check --cpu-only --batches 1 --min-time 0 --min-repeats 1 \
    | sed 's/^/    /'
  chmod -R u+w "$T"
fi

echo "==> done in $(( $(date +%s) - T_START ))s: $TARBALL"
