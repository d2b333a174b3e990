#!/usr/bin/env bash
# Build pycaffe (Caffe's Python module, CPU only by default) from the
# `brocolli-caffe` sdist on PyPI and install it into a Python environment as
# a small wheel named `pycaffe`.
#
# Usage: scripts/install_pycaffe.sh [--python PATH] [--jobs N] [--verbose]
#                                   [--cuda [--cuda-arch "90 120"] [--no-cudnn]]
#                                   [--wheel-only]
#
#   --python PATH  target interpreter (default: <project root>/.venv/bin/python;
#                  that venv is created with `python3 -m venv` if missing)
#   --jobs N       parallel make jobs (default: $JOBS, else nproc)
#   --verbose      stream the CMake/make output instead of logging it
#   --cuda         build the CUDA variant instead (see below)
#   --cuda-arch A  GPU architectures to compile for, e.g. "90" or "90 120"
#                  (sm_XY; implies --cuda; default: 90 plus the compute
#                  capability of every GPU that nvidia-smi shows). Machine
#                  code (SASS) for each, plus PTX of the highest one, which
#                  newer GPUs JIT-compile at first use.
#   --cuda-home D  the CUDA toolkit (default: $CUDA_HOME, else /usr/local/cuda)
#   --no-cudnn     CUDA variant without cuDNN (Caffe's own im2col + cuBLAS
#                  convolutions: slower, but no libcudnn.so.9 needed at run time)
#   --wheel-only   build (or find in the cache) the wheel, print its path as
#                  a last line `WHEEL_PATH=...`, and install nothing
#
# CUDA variant (--cuda): needs the CUDA 13 toolkit's nvcc (no GPU needed to
# build). The same source plus patches/pycaffe-cuda/*.patch (07 ports Caffe's
# cuDNN layers to cuDNN 9); cuBLAS, cuRAND and cuDNN headers/libraries come
# from the PyPI wheels pinned in the CUDA section below (downloaded once,
# unpacked into the cache under cuda-libs/). The wheel is `pycaffe` with the
# local version +brocolli<ver>.cuda13[.cudnn9].sm<arch>..., cached under its
# own key. It replaces a CPU pycaffe in the target environment. At runtime
# _caffe.so also needs libcudart.so.13, libcublas.so.13 (+ libcublasLt.so.13),
# libcurand.so.10 and (unless --no-cudnn) libcudnn.so.9 with its sub-libraries:
# on a GPU host from the CUDA toolkit (/usr/local/cuda/lib64) and cuDNN, or
# from <cache>/cuda-libs/*/lib via LD_LIBRARY_PATH (the script prints it);
# and a GPU driver to use GPU mode. The build takes 7-16 min on 2 cores (sm_90).
#
# Works on Debian 12 / Ubuntu with apt (as root, or via sudo) and PyPI.
# The build dependencies listed in APT_PACKAGES are installed with apt only
# when one of them is missing. The built wheel is cached in
#   ${XDG_CACHE_HOME:-$HOME/.cache}/cam-caffe/pycaffe/<key>/
# where <key> hashes the source version, patches/pycaffe/*.patch, the build
# section of this script (incl. BUILD_VERSION), the Python version/ABI and
# the NumPy major version; a second run with the same key only reinstalls
# the cached wheel.
#
# At runtime _caffe.so needs these shared libraries (Debian 12 packages;
# the -dev packages pull them in): libboost-python1.74.0,
# libboost-filesystem1.74.0, libboost-thread1.74.0, libgoogle-glog0v6
# (+ libgflags2.2, libunwind8), libprotobuf32, libhdf5-103-1, libhdf5-hl-100,
# libopenblas0 (libopenblas0-pthread). It is linked with --as-needed, so
# boost-system/-regex are not needed.
set -Eeuo pipefail

STEP="startup"
step() { STEP="$1"; echo "==> $1"; }
die() {
  echo "install_pycaffe: error: $*" >&2
  echo "install_pycaffe: FAILED at step: $STEP" >&2
  exit 1
}
MAIN_PID=$$
# (errtrace also runs this in subshells; only the main shell reports)
trap 'rc=$?; [ "$BASHPID" != "$MAIN_PID" ] || echo "install_pycaffe: FAILED at step: $STEP" >&2; exit $rc' ERR

T_START=$(date +%s)
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SCRIPT="$ROOT/scripts/install_pycaffe.sh"
PATCH_DIR="$ROOT/patches/pycaffe"

PY=""
JOBS="${JOBS:-}"
VERBOSE=0
CUDA=0
CUDA_ARCH_ARG=""
CUDA_HOME_ARG=""
CUDNN=1
WHEEL_ONLY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --python) [ $# -ge 2 ] || die "--python needs a path"; PY="$2"; shift 2 ;;
    --python=*) PY="${1#*=}"; shift ;;
    --jobs|-j) [ $# -ge 2 ] || die "--jobs needs a number"; JOBS="$2"; shift 2 ;;
    --jobs=*) JOBS="${1#*=}"; shift ;;
    --verbose|-v) VERBOSE=1; shift ;;
    --cuda) CUDA=1; shift ;;
    --cuda-arch) [ $# -ge 2 ] || die "--cuda-arch needs a list, e.g. \"90 120\""; CUDA=1; CUDA_ARCH_ARG="$2"; shift 2 ;;
    --cuda-arch=*) CUDA=1; CUDA_ARCH_ARG="${1#*=}"; shift ;;
    --cuda-home) [ $# -ge 2 ] || die "--cuda-home needs a directory"; CUDA=1; CUDA_HOME_ARG="$2"; shift 2 ;;
    --cuda-home=*) CUDA=1; CUDA_HOME_ARG="${1#*=}"; shift ;;
    --no-cudnn) CUDA=1; CUDNN=0; shift ;;
    --wheel-only) WHEEL_ONLY=1; shift ;;
    -h|--help) sed -n '2,/^set -Eeuo/{/^set -Eeuo/d;s/^# \{0,1\}//;p}' "$SCRIPT"; exit 0 ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
done
[ -n "$JOBS" ] || JOBS="$(nproc 2>/dev/null || echo 2)"
case "$JOBS" in ''|*[!0-9]*|0) die "--jobs must be a positive integer, got '$JOBS'" ;; esac

CACHE_ROOT="${XDG_CACHE_HOME:-$HOME/.cache}/cam-caffe/pycaffe"

# ----------------------------------------------------------------------------
step "select python"
if [ -z "$PY" ]; then
  PY="$ROOT/.venv/bin/python"
  if [ ! -x "$PY" ]; then
    echo "    creating $ROOT/.venv"
    command -v python3 >/dev/null || die "python3 not found (needed to create $ROOT/.venv)"
    python3 -m venv "$ROOT/.venv"
  fi
fi
[ -x "$PY" ] || die "python not found or not executable: $PY"
# key=value lines describing the target interpreter
PYINFO="$("$PY" - <<'EOF'
import os, shlex, sys, sysconfig
def out(k, v): print("%s=%s" % (k, shlex.quote(str(v))))
v = sys.version_info
print("PY_MM=%d.%d" % (v[0], v[1]))
out("PY_MAJ", v[0])
out("PY_MIN", v[1])
out("PY_IMPL", sys.implementation.name)
out("PY_CACHE_TAG", sys.implementation.cache_tag)
out("PY_INCLUDE", sysconfig.get_paths()["include"])
ld = sysconfig.get_config_var("LDLIBRARY") or ""
libdir = sysconfig.get_config_var("LIBDIR") or ""
p = os.path.join(libdir, ld)
out("PY_LIBRARY", (p if ld and os.path.exists(p) else ""))
out("PY_PLATFORM", sysconfig.get_platform())
out("PY_MULTIARCH", (sysconfig.get_config_var("MULTIARCH") or ""))
EOF
)"
eval "$PYINFO"
[ "$PY_IMPL" = cpython ] || die "only CPython is supported (got $PY_IMPL)"
[ "$PY_MAJ" = 3 ] || die "Python 3 required (got $PY_MM)"
echo "    $PY (Python $PY_MM, $PY_PLATFORM)"

# ----------------------------------------------------------------------------
step "python packages (numpy>=2, protobuf, six)"
py_deps_ok() {
  "$PY" - <<'EOF' 2>/dev/null
import importlib.metadata as md, sys
try:
    np_major = int(md.version("numpy").split(".")[0])
    md.version("protobuf"); md.version("six")
except md.PackageNotFoundError:
    sys.exit(1)
sys.exit(0 if np_major >= 2 else 1)
EOF
}
if py_deps_ok; then
  echo "    already installed"
else
  "$PY" -m pip install --disable-pip-version-check "numpy>=2" protobuf six
fi
NUMPY_MAJOR="$("$PY" -c 'import numpy; print(numpy.__version__.split(".")[0])')"
NUMPY_INCLUDE="$("$PY" -c 'import numpy; print(numpy.get_include())')"

# ----------------------------------------------------------------------------
# Everything between the BUILD BEGIN/END markers is hashed into the cache key:
# editing it (or bumping BUILD_VERSION) forces a rebuild.
# --- BUILD BEGIN ---
BUILD_VERSION="1"
SRC_NAME="brocolli-caffe"
SRC_VERSION="9.0.2"
SRC_SHA256="c6410cc60bdd6db685d441b66be7df05410f8850ac88d6b75d48ef9b2315c08a"
WHEEL_NAME="pycaffe"
WHEEL_VERSION="1.0.0+brocolli${SRC_VERSION}"
APT_PACKAGES=(
  cmake g++ make patch
  libboost-python-dev libboost-system-dev libboost-filesystem-dev
  libboost-thread-dev libboost-regex-dev
  libprotobuf-dev protobuf-compiler
  libgoogle-glog-dev libgflags-dev libhdf5-dev libopenblas-dev
)
CMAKE_FIXED_ARGS=(
  -DCMAKE_BUILD_TYPE=Release
  -DCMAKE_SKIP_RPATH=ON
  -DCPU_ONLY=ON
  -DUSE_CUDNN=OFF
  -DBUILD_python=ON
  -DBUILD_docs=OFF
  -DBUILD_matlab=OFF
  -DUSE_OPENCV=OFF
  -DUSE_LMDB=OFF
  -DUSE_LEVELDB=OFF
  -DBLAS=Open
)
# Files in the sdist that are stale generated output (protoc 3.x era) or
# compiled for another Python; the stale caffe.pb.h shadows the fresh one.
STALE_FILES=(
  include/caffe/proto/caffe.pb.h
  src/caffe/proto/caffe.pb.cc
  python/caffe/proto/caffe_pb2.py
  python/caffe/__pycache__
)

# Builds the wheel into $KEY_DIR and sets WHEEL.
build_wheel() {
  # --------------------------------------------------------------------------
  step "check toolchain"
  [ -n "$MULTIARCH" ] || die "cannot determine the multiarch triplet (gcc -print-multiarch)"
  LIBDIR="/usr/lib/$MULTIARCH"
  BOOST_PYTHON_LIBNAME="boost_python${PY_MAJ}${PY_MIN}"
  if [ ! -e "$LIBDIR/lib$BOOST_PYTHON_LIBNAME.so" ]; then
    have="$(cd "$LIBDIR" 2>/dev/null && ls libboost_python3*.so 2>/dev/null | tr '\n' ' ' || true)"
    die "$LIBDIR/lib$BOOST_PYTHON_LIBNAME.so not found: this distro's boost-python is built for another Python (found: ${have:-none}); use --python with a matching Python version"
  fi
  HDF5_INC="/usr/include/hdf5/serial"
  HDF5_LIB="$LIBDIR/hdf5/serial"
  [ -f "$HDF5_INC/hdf5.h" ] || die "$HDF5_INC/hdf5.h not found (libhdf5-dev)"
  [ -d "$HDF5_LIB" ] || die "$HDF5_LIB not found (libhdf5-dev)"
  command -v protoc >/dev/null || die "protoc not found (protobuf-compiler)"
  echo "    multiarch=$MULTIARCH boost-python=$BOOST_PYTHON_LIBNAME $(protoc --version)"

  # --------------------------------------------------------------------------
  step "fetch source $SRC_NAME==$SRC_VERSION"
  SRC_DIR_CACHE="$CACHE_ROOT/src"
  TARBALL="$SRC_DIR_CACHE/$SRC_NAME-$SRC_VERSION.tar.gz"
  mkdir -p "$SRC_DIR_CACHE"
  if [ -f "$TARBALL" ] && echo "$SRC_SHA256  $TARBALL" | sha256sum -c --quiet - 2>/dev/null; then
    echo "    cached: $TARBALL"
  else
    DL_DIR="$(mktemp -d "$SRC_DIR_CACHE/dl.XXXXXX")"
    "$PY" -m pip download --disable-pip-version-check --no-deps \
      --no-binary :all: -d "$DL_DIR" "$SRC_NAME==$SRC_VERSION"
    echo "$SRC_SHA256  $DL_DIR/$SRC_NAME-$SRC_VERSION.tar.gz" | sha256sum -c --quiet - \
      || die "sha256 mismatch for the downloaded $SRC_NAME-$SRC_VERSION.tar.gz"
    mv -f "$DL_DIR/$SRC_NAME-$SRC_VERSION.tar.gz" "$TARBALL"
    rm -rf "$DL_DIR"
  fi

  # --------------------------------------------------------------------------
  step "unpack and patch"
  WORK="$(mktemp -d "$CACHE_ROOT/build.XXXXXX")"
  cleanup_work() { rm -rf "$WORK"; }
  trap cleanup_work EXIT
  LOG="$WORK/build.log"
  run_logged() {
    if [ "$VERBOSE" = 1 ]; then
      "$@" 2>&1 | tee -a "$LOG"
    else
      "$@" >>"$LOG" 2>&1 || {
        rc=$?
        echo "---- last lines of the build log ----" >&2
        tail -n 40 "$LOG" >&2
        cp -f "$LOG" "$CACHE_ROOT/last-failed-build.log" || true
        echo "---- full log: $CACHE_ROOT/last-failed-build.log" >&2
        return $rc
      }
    fi
  }
  tar -xzf "$TARBALL" -C "$WORK"
  SRC="$WORK/$SRC_NAME-$SRC_VERSION"
  [ -f "$SRC/CMakeLists.txt" ] || die "unexpected sdist layout"
  for p in "$PATCH_DIR"/*.patch; do
    [ -e "$p" ] || continue
    echo "    $(basename "$p")"
    patch -p1 -s -N --batch -d "$SRC" < "$p"
  done
  for f in "${STALE_FILES[@]}"; do rm -rf "${SRC:?}/$f"; done

  # --------------------------------------------------------------------------
  step "cmake configure"
  BUILD="$WORK/build"
  mkdir -p "$BUILD"
  # Notes: this fork's CMake ignores PYTHON_LIBRARIES (an extension module
  # must not link libpython) and BLAS (it links -lopenblas); they are passed
  # for explicitness. ANACONDA_HOME points at nothing so that no conda tree
  # (its default is /root/miniconda3) leaks into the include/link paths.
  run_logged cmake -S "$SRC" -B "$BUILD" \
    "${CMAKE_FIXED_ARGS[@]}" \
    -DANACONDA_HOME="$WORK/no-conda" \
    -DPYTHON_VERSION="python$PY_MM" \
    -Dpython_version="$PY_MAJ" \
    -DPYTHON_EXECUTABLE="$PY" \
    -DPYTHON_INCLUDE_DIRS="$PY_INCLUDE" \
    -DPYTHON_LIBRARIES="$PY_LIBRARY" \
    -DNUMPY_INCLUDE_DIR="$NUMPY_INCLUDE" \
    -DBOOST_PYTHON_LIBNAME="$BOOST_PYTHON_LIBNAME" \
    -DCMAKE_CXX_FLAGS="-DWITH_PYTHON_LAYER -I$HDF5_INC" \
    -DCMAKE_SHARED_LINKER_FLAGS="-L$HDF5_LIB -Wl,--as-needed"

  # --------------------------------------------------------------------------
  step "make pycaffe (-j$JOBS; a few minutes)"
  T_MAKE=$(date +%s)
  run_logged make -C "$BUILD" -j"$JOBS" pycaffe
  echo "    compiled in $(( $(date +%s) - T_MAKE ))s"

  # --------------------------------------------------------------------------
  step "build wheel"
  STAGE="$WORK/stage"
  mkdir -p "$STAGE"
  SO="$BUILD/lib/_caffe.so"
  PB2="$BUILD/include/caffe/proto/caffe_pb2.py"
  [ -f "$SO" ] || die "$SO was not built"
  [ -f "$PB2" ] || die "$PB2 was not generated"
  # The caffe package: upstream's python/caffe minus tests, C++ source, the
  # build's symlink and stale bytecode; plus the fresh _caffe.so and proto.
  mkdir -p "$STAGE/caffe"
  (cd "$SRC/python/caffe" && tar -cf - \
      --exclude=test --exclude=__pycache__ --exclude='*.pyc' \
      --exclude='*.cpp' --exclude='_caffe*.so' --exclude=proto .) \
    | tar -xf - -C "$STAGE/caffe"
  mkdir -p "$STAGE/caffe/proto"
  : > "$STAGE/caffe/proto/__init__.py"
  cp "$PB2" "$STAGE/caffe/proto/caffe_pb2.py"
  cp "$SO" "$STAGE/caffe/_caffe.so"
  strip --strip-unneeded "$STAGE/caffe/_caffe.so" 2>/dev/null || true
  cp "$SRC/LICENSE" "$STAGE/LICENSE"
  OUT="$WORK/out"
  mkdir -p "$OUT"
  WHEEL_FILE="$(
    "$PY" - "$STAGE" "$OUT" "$WHEEL_NAME" "$WHEEL_VERSION" "$SRC_NAME" "$SRC_VERSION" <<'EOF'
# Writes a binary wheel (PEP 427) of the staged `caffe` package, by hand:
# setuptools would tag a package-data-only project as pure "py3-none-any".
import base64, hashlib, os, sys, sysconfig, zipfile
stage, out, name, version, src_name, src_version = sys.argv[1:7]
v = sys.version_info
py_tag = "cp%d%d" % (v[0], v[1])
abi_tag = py_tag + getattr(sys, "abiflags", "")
plat_tag = sysconfig.get_platform().replace("-", "_").replace(".", "_")
tag = "%s-%s-%s" % (py_tag, abi_tag, plat_tag)
dist_info = "%s-%s.dist-info" % (name, version)
whl = os.path.join(out, "%s-%s-%s.whl" % (name, version, tag))
metadata = "\n".join([
    "Metadata-Version: 2.1",
    "Name: %s" % name,
    "Version: %s" % version,
    "Summary: Caffe's Python module (pycaffe, CPU only), built from the %s==%s sdist" % (src_name, src_version),
    "License: BSD-2-Clause",
    "Requires-Python: ==%d.%d.*" % (v[0], v[1]),
    "Requires-Dist: numpy>=1.26",
    "Requires-Dist: protobuf>=3.20",
    "Requires-Dist: six",
    "Provides-Extra: io",
    'Requires-Dist: scikit-image; extra == "io"',
    'Requires-Dist: scipy; extra == "io"',
    "", "",
])
wheel_meta = "Wheel-Version: 1.0\nGenerator: cam-caffe install_pycaffe.sh\nRoot-Is-Purelib: false\nTag: %s\n\n" % tag
records = []
def digest(data):
    h = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return "sha256=" + h
def zinfo(arcname, mode):
    zi = zipfile.ZipInfo(arcname, date_time=(1980, 1, 1, 0, 0, 0))
    zi.compress_type = zipfile.ZIP_DEFLATED
    zi.external_attr = (mode & 0xFFFF) << 16
    return zi
with zipfile.ZipFile(whl, "w") as zf:
    def add(arcname, data, mode=0o644):
        zf.writestr(zinfo(arcname, mode), data)
        records.append("%s,%s,%d" % (arcname, digest(data), len(data)))
    files = []
    for d, dirs, fs in os.walk(os.path.join(stage, "caffe")):
        dirs.sort()
        for f in sorted(fs):
            files.append(os.path.join(d, f))
    for path in files:
        arc = os.path.relpath(path, stage).replace(os.sep, "/")
        with open(path, "rb") as fh:
            data = fh.read()
        add(arc, data, 0o755 if arc.endswith(".so") else 0o644)
    with open(os.path.join(stage, "LICENSE"), "rb") as fh:
        add(dist_info + "/LICENSE", fh.read())
    add(dist_info + "/METADATA", metadata.encode())
    add(dist_info + "/WHEEL", wheel_meta.encode())
    add(dist_info + "/top_level.txt", b"caffe\n")
    records.append(dist_info + "/RECORD,,")
    zf.writestr(zinfo(dist_info + "/RECORD", 0o644), "\n".join(records) + "\n")
print(whl)
EOF
  )"
  [ -f "$WHEEL_FILE" ] || die "wheel was not written"

  # Publish atomically: rename within the cache filesystem.
  mkdir -p "$KEY_DIR"
  cp -f "$LOG" "$KEY_DIR/build.log" 2>/dev/null || true
  mv -f "$WHEEL_FILE" "$KEY_DIR/.$(basename "$WHEEL_FILE").part"
  mv -f "$KEY_DIR/.$(basename "$WHEEL_FILE").part" "$KEY_DIR/$(basename "$WHEEL_FILE")"
  WHEEL="$KEY_DIR/$(basename "$WHEEL_FILE")"
  echo "    $WHEEL ($(du -h "$WHEEL" | cut -f1))"
  cleanup_work
  trap - EXIT
}
# --- BUILD END ---

# ----------------------------------------------------------------------------
# The CUDA variant (--cuda). Everything between the CUDA BUILD BEGIN/END
# markers, plus patches/pycaffe-cuda/*.patch, the nvcc version and the GPU
# architectures, is hashed into the CUDA wheel's cache key (on top of what
# the CPU key hashes). The CPU build section above is reused unchanged: the
# CUDA variant only overrides its settings (patch list, CMake arguments,
# wheel version) before calling build_wheel.
# --- CUDA BUILD BEGIN ---
CUDA_BUILD_VERSION="2"
CUDA_MAJOR_SUPPORTED="13"
# cuBLAS/cuRAND for CUDA 13.0 (the toolkit here has nvcc and cudart only).
# The wheels put everything under nvidia/cu13/{include,lib}.
CUDA_PY_WHEELS=(nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35)
CUDA_LIB_FILES=(libcublas.so.13 libcublasLt.so.13 libcurand.so.10)
# cuDNN 9 (the first release for CUDA 13: a newer 9.x at run time works):
# libcudnn.so.9 loads its sub-libraries (cnn, ops, graph, engines,
# heuristic) from its own folder when first used.
CUDNN_PY_WHEELS=(nvidia-cudnn-cu13==9.12.0.46)
CUDNN_LIB_FILES=('libcudnn*.so.9')
CUDA_MIN_ARCH=75   # CUDA 13 dropped Maxwell, Pascal and Volta

# Downloads NVIDIA's wheels (name of an array of pins, then of an array of
# library file patterns) once and unpacks their headers and libraries into
# <cache>/cuda-libs/<pins>/{include,lib} (with the unversioned .so names the
# linker wants). Sets LIBS_DIR.
cuda_fetch_libs() {
  local -n wheels="$1" lib_files="$2"
  local name dl tmp
  name="$(printf '%s_' "${wheels[@]}" | tr -c 'A-Za-z0-9._\n-' '-')"
  LIBS_DIR="$CACHE_ROOT/cuda-libs/${name%_}"
  if [ -f "$LIBS_DIR/.complete" ]; then
    echo "    cached: $LIBS_DIR"
    return 0
  fi
  dl="$(mktemp -d "$CACHE_ROOT/cuda-libs.dl.XXXXXX")"
  echo "    pip download ${wheels[*]} (once)"
  "$PY" -m pip download --disable-pip-version-check --no-deps --only-binary :all: \
    -q -d "$dl" "${wheels[@]}"
  tmp="$dl/unpacked"
  "$PY" - "$dl" "$tmp" "${lib_files[@]}" <<'EOF'
# Unpack nvidia/*/include/** and the libraries matching the patterns of every
# wheel in argv[1] into argv[2]/{include,lib,licenses}.
import fnmatch, glob, os, re, shutil, sys, zipfile
src, dst, patterns = sys.argv[1], sys.argv[2], sys.argv[3:]
found, matched = set(), set()
for whl in sorted(glob.glob(os.path.join(src, "*.whl"))):
    with zipfile.ZipFile(whl) as zf:
        for name in zf.namelist():
            m = re.match(r"nvidia/[^/]+/(include|lib)/(.+)$", name)
            hits = {p for p in patterns if m and fnmatch.fnmatch(m.group(2), p)}
            matched |= hits
            if m and (m.group(1) == "include" or hits):
                out = os.path.join(dst, m.group(1), m.group(2))
            elif re.search(r"\.dist-info/licenses?/", name) or name.endswith("/License.txt"):
                out = os.path.join(dst, "licenses", os.path.basename(whl).split("-")[0] + "-License.txt")
            else:
                continue
            if name.endswith("/"):
                continue
            os.makedirs(os.path.dirname(out), exist_ok=True)
            with zf.open(name) as fi, open(out, "wb") as fo:
                shutil.copyfileobj(fi, fo)
            if m and m.group(1) == "lib":
                os.chmod(out, 0o755)
                found.add(m.group(2))
missing = set(patterns) - matched
if missing:
    sys.exit("missing in the wheels: %s" % " ".join(sorted(missing)))
for lib in sorted(found):               # libcublas.so -> libcublas.so.13
    os.symlink(lib, os.path.join(dst, "lib", lib.split(".so")[0] + ".so"))
EOF
  [ -n "$(ls "$tmp/include" 2>/dev/null)" ] || die "no headers in ${wheels[*]}"
  : > "$tmp/.complete"
  rm -rf "$LIBS_DIR"
  mkdir -p "$(dirname "$LIBS_DIR")"
  mv "$tmp" "$LIBS_DIR"
  rm -rf "$dl"
  echo "    $LIBS_DIR ($(du -sh "$LIBS_DIR" | cut -f1))"
}

# Sets CUDA_LIBS_DIR (cuBLAS/cuRAND) and, with cuDNN, CUDNN_LIBS_DIR.
cuda_fetch_all_libs() {
  cuda_fetch_libs CUDA_PY_WHEELS CUDA_LIB_FILES
  CUDA_LIBS_DIR="$LIBS_DIR"
  [ -f "$CUDA_LIBS_DIR/include/cublas_v2.h" ] && [ -f "$CUDA_LIBS_DIR/include/curand.h" ] \
    || die "the cuBLAS/cuRAND wheels have no cublas_v2.h / curand.h"
  CUDNN_LIBS_DIR=""
  if [ "$CUDNN" = 1 ]; then
    cuda_fetch_libs CUDNN_PY_WHEELS CUDNN_LIB_FILES
    CUDNN_LIBS_DIR="$LIBS_DIR"
    [ -f "$CUDNN_LIBS_DIR/include/cudnn.h" ] || die "the cuDNN wheel has no cudnn.h"
  fi
}

# Turns build_wheel into the CUDA build: CPU patches then CUDA patches, CUDA
# on in CMake (later -D options override the CPU ones), the wheel's version.
cuda_setup_build() {
  local p
  CUDA_MERGED_PATCHES="$CACHE_ROOT/cuda-patches"
  rm -rf "$CUDA_MERGED_PATCHES"
  mkdir -p "$CUDA_MERGED_PATCHES"
  for p in "$PATCH_DIR"/*.patch; do
    [ -e "$p" ] && cp "$p" "$CUDA_MERGED_PATCHES/cpu-$(basename "$p")"
  done
  for p in "$CUDA_PATCH_DIR"/*.patch; do
    [ -e "$p" ] && cp "$p" "$CUDA_MERGED_PATCHES/cuda-$(basename "$p")"
  done
  PATCH_DIR="$CUDA_MERGED_PATCHES"
  CMAKE_FIXED_ARGS+=(
    -DCPU_ONLY=OFF
    -DCUDA_TOOLKIT_ROOT_DIR="$CUDA_HOME"
    -DCUDA_NVCC_EXECUTABLE="$CUDA_HOME/bin/nvcc"
    -DCUDA_ARCH_NAME=Manual
    -DCUDA_ARCH_BIN="$CUDA_ARCH_BIN"
    -DCUDA_ARCH_PTX="$CUDA_ARCH_PTX"
  )
  if [ "$CUDNN" = 1 ]; then
    CMAKE_FIXED_ARGS+=(
      -DUSE_CUDNN=ON
      -DCMAKE_INCLUDE_PATH="$CUDA_LIBS_DIR/include;$CUDNN_LIBS_DIR/include"
      -DCMAKE_LIBRARY_PATH="$CUDA_LIBS_DIR/lib;$CUDNN_LIBS_DIR/lib"
    )
  else
    CMAKE_FIXED_ARGS+=(
      -DUSE_CUDNN=OFF
      -DCMAKE_INCLUDE_PATH="$CUDA_LIBS_DIR/include"
      -DCMAKE_LIBRARY_PATH="$CUDA_LIBS_DIR/lib"
    )
  fi
}

# The wheel's version and summary say what it was built for.
cuda_wheel_version() {
  local a tag="cuda$CUDA_MAJOR"
  [ "$CUDNN" = 0 ] || tag="$tag.cudnn9"
  for a in $CUDA_ARCH_BIN; do tag="$tag.sm$a"; done
  echo "${WHEEL_VERSION}.$tag"
}
cuda_fix_wheel_summary() {
  local cudnn="no cuDNN"
  [ "$CUDNN" = 0 ] || cudnn="cuDNN ${CUDNN_PY_WHEELS[0]##*==}"
  "$PY" - "$1" "Caffe's Python module (pycaffe) with CUDA $CUDA_VERSION (sm_${CUDA_ARCH_BIN// /, sm_}; PTX compute_$CUDA_ARCH_PTX; $cudnn), built from the $SRC_NAME==$SRC_VERSION sdist" <<'EOF'
# Rewrite the Summary line of the wheel's METADATA (and its RECORD entry).
import base64, hashlib, os, sys, zipfile
path, summary = sys.argv[1], sys.argv[2]
tmp = path + ".part"
with zipfile.ZipFile(path) as zin, zipfile.ZipFile(tmp, "w") as zout:
    items = [(zi, zin.read(zi.filename)) for zi in zin.infolist()]
    meta_name = next(zi.filename for zi, _ in items if zi.filename.endswith(".dist-info/METADATA"))
    meta = next(data for zi, data in items if zi.filename == meta_name).decode()
    meta = "\n".join("Summary: " + summary if line.startswith("Summary: ") else line
                     for line in meta.split("\n")).encode()
    digest = "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(meta).digest()).rstrip(b"=").decode()
    for zi, data in items:
        if zi.filename == meta_name:
            data = meta
        elif zi.filename.endswith(".dist-info/RECORD"):
            data = "\n".join("%s,%s,%d" % (meta_name, digest, len(meta))
                             if line.startswith(meta_name + ",") else line
                             for line in data.decode().split("\n")).encode()
        zout.writestr(zi, data)
os.replace(tmp, path)
EOF
}
# --- CUDA BUILD END ---

CUDA_PATCH_DIR="$ROOT/patches/pycaffe-cuda"

# ----------------------------------------------------------------------------
if [ "$CUDA" = 1 ]; then
  step "CUDA toolkit"
  CUDA_HOME="${CUDA_HOME_ARG:-${CUDA_HOME:-/usr/local/cuda}}"
  NVCC="$CUDA_HOME/bin/nvcc"
  [ -x "$NVCC" ] || die "$NVCC not found: install the CUDA $CUDA_MAJOR_SUPPORTED toolkit (nvcc) or give --cuda-home"
  NVCC_RELEASE="$("$NVCC" --version | sed -n 's/.*release \([0-9][0-9.]*\), V\([0-9.]*\).*/\1 \2/p')"
  CUDA_VERSION="${NVCC_RELEASE%% *}"         # 13.0
  NVCC_FULL_VERSION="${NVCC_RELEASE##* }"    # 13.0.88
  CUDA_MAJOR="${CUDA_VERSION%%.*}"
  [ -n "$CUDA_VERSION" ] || die "cannot read the CUDA version from '$NVCC --version'"
  [ "$CUDA_MAJOR" = "$CUDA_MAJOR_SUPPORTED" ] \
    || die "CUDA $CUDA_VERSION found; this script pins cuBLAS/cuRAND for CUDA $CUDA_MAJOR_SUPPORTED (edit CUDA_PY_WHEELS to port it)"
  [ -f "$CUDA_HOME/include/cuda_runtime.h" ] || die "$CUDA_HOME/include/cuda_runtime.h not found"
  ls "$CUDA_HOME"/lib64/libcudart.so* >/dev/null 2>&1 || die "$CUDA_HOME/lib64/libcudart.so not found"

  # GPU architectures: the given list, else sm_90 plus the visible GPUs'.
  if [ -n "$CUDA_ARCH_ARG" ]; then
    ARCHS="$CUDA_ARCH_ARG"
  else
    ARCHS="90"
    if command -v nvidia-smi >/dev/null; then
      GPU_CAPS="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null || true)"
      [ -z "$GPU_CAPS" ] || echo "    visible GPU compute capabilities: $(echo $GPU_CAPS)"
      ARCHS="$ARCHS $GPU_CAPS"
    fi
  fi
  CUDA_ARCH_BIN=""
  for a in $(echo "$ARCHS" | tr ',;' '  '); do
    a="${a#sm_}"; a="${a#compute_}"; a="${a//./}"
    case "$a" in ''|*[!0-9]*) die "bad GPU architecture '$a' in '$ARCHS' (want e.g. 90 or 12.0)" ;; esac
    [ "$a" -ge "$CUDA_MIN_ARCH" ] || die "sm_$a is not supported by CUDA $CUDA_MAJOR (sm_$CUDA_MIN_ARCH or newer)"
    CUDA_ARCH_BIN="$CUDA_ARCH_BIN $a"
  done
  CUDA_ARCH_BIN="$(echo $CUDA_ARCH_BIN | tr ' ' '\n' | sort -n -u | tr '\n' ' ' | sed 's/ $//')"
  [ -n "$CUDA_ARCH_BIN" ] || die "no GPU architecture given"
  CUDA_ARCH_PTX="${CUDA_ARCH_BIN##* }"
  echo "    $NVCC: CUDA $NVCC_FULL_VERSION; SASS for sm_${CUDA_ARCH_BIN// /, sm_}, PTX for compute_$CUDA_ARCH_PTX"
  WHEEL_VERSION="$(cuda_wheel_version)"
fi

# ----------------------------------------------------------------------------
step "cache key"
# (the CPU key's input is kept byte for byte: the cached CPU wheels stay valid)
# Every patch of a folder, each after a "--- <label> <name>" line.
patches_key_input() {
  local p
  for p in "$1"/*.patch; do
    [ -e "$p" ] || continue
    echo "--- $2 $(basename "$p")"
    cat "$p"
  done
}
cpu_key_input() {
  echo "source=$SRC_NAME==$SRC_VERSION sha256=$SRC_SHA256"
  echo "python=$PY_MM tag=$PY_CACHE_TAG platform=$PY_PLATFORM"
  echo "numpy_major=$NUMPY_MAJOR"
  echo "--- script build section"
  sed -n '/^# --- BUILD BEGIN ---$/,/^# --- BUILD END ---$/p' "$SCRIPT"
  patches_key_input "$PATCH_DIR" patch
}
cuda_key_input() {
  echo "--- cuda nvcc=$NVCC_FULL_VERSION arch_bin=$CUDA_ARCH_BIN arch_ptx=$CUDA_ARCH_PTX cudnn=$CUDNN"
  sed -n '/^# --- CUDA BUILD BEGIN ---$/,/^# --- CUDA BUILD END ---$/p' "$SCRIPT"
  patches_key_input "$CUDA_PATCH_DIR" "cuda patch"
}
KEY="$(
  {
    cpu_key_input
    if [ "$CUDA" = 1 ]; then cuda_key_input; fi
  } | sha256sum | cut -c1-16
)"
if [ "$CUDA" = 1 ]; then KEY="cuda-$KEY"; fi
KEY_DIR="$CACHE_ROOT/$KEY"
echo "    $KEY_DIR"
mkdir -p "$CACHE_ROOT"

# One build at a time per cache (a second run waits here).
if command -v flock >/dev/null; then
  exec 9>"$CACHE_ROOT/.lock"
  flock 9
fi

find_cached_wheel() {
  local w
  for w in "$KEY_DIR/$WHEEL_NAME-"*.whl; do
    [ -f "$w" ] && { echo "$w"; return 0; }
  done
  return 0
}
WHEEL="$(find_cached_wheel)"

# ----------------------------------------------------------------------------
step "apt build dependencies"
MULTIARCH="$(gcc -print-multiarch 2>/dev/null || true)"
[ -n "$MULTIARCH" ] || MULTIARCH="$(dpkg-architecture -qDEB_HOST_MULTIARCH 2>/dev/null || true)"
[ -n "$MULTIARCH" ] || MULTIARCH="$PY_MULTIARCH"
NEED_PKGS=("${APT_PACKAGES[@]}")
if [ ! -f "$PY_INCLUDE/Python.h" ]; then
  # A distro python without headers (a venv over /usr/bin/python3.X).
  NEED_PKGS+=("python$PY_MM-dev")
fi
MISSING=()
for p in "${NEED_PKGS[@]}"; do
  st="$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)"
  [ "$st" = installed ] || MISSING+=("$p")
done
if [ ${#MISSING[@]} -eq 0 ]; then
  echo "    all ${#NEED_PKGS[@]} packages installed, skipping apt"
else
  echo "    missing: ${MISSING[*]}"
  command -v apt-get >/dev/null || die "apt-get not found; install these packages by hand: ${MISSING[*]}"
  SUDO=()
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || die "not root and no sudo; install: ${MISSING[*]}"
    SUDO=(sudo)
  fi
  "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q
  "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -q --no-install-recommends "${MISSING[@]}"
fi
[ -f "$PY_INCLUDE/Python.h" ] || die "Python.h not found in $PY_INCLUDE"

if [ "$CUDA" = 1 ]; then
  step "cuBLAS/cuRAND/cuDNN (PyPI wheels)"
  rm -rf "$CACHE_ROOT"/cuda-libs.dl.*     # left by a failed download (we hold the lock)
  cuda_fetch_all_libs
fi

if [ -n "$WHEEL" ]; then
  echo "==> cached wheel found, skipping the build: $WHEEL"
elif [ "$CUDA" = 1 ]; then
  cuda_setup_build
  build_wheel
  rm -rf "$CUDA_MERGED_PATCHES"
  cuda_fix_wheel_summary "$WHEEL"
else
  build_wheel
fi

if [ "$WHEEL_ONLY" = 1 ]; then
  echo "==> done in $(( $(date +%s) - T_START ))s (not installed)"
  echo "WHEEL_PATH=$WHEEL"
  exit 0
fi

# ----------------------------------------------------------------------------
step "install wheel"
"$PY" -m pip install --disable-pip-version-check --no-index --no-deps \
  --force-reinstall -q "$WHEEL"

# The checks run without PYTHONPATH and the caller's LD_LIBRARY_PATH; the
# CUDA variant gets the directories of its CUDA libraries instead.
CHECK_ENV=(env -u PYTHONPATH -u LD_LIBRARY_PATH)
if [ "$CUDA" = 1 ]; then
  CUDA_RUNTIME_PATH="$CUDA_LIBS_DIR/lib${CUDNN_LIBS_DIR:+:$CUDNN_LIBS_DIR/lib}:$CUDA_HOME/lib64"
  CHECK_ENV=(env -u PYTHONPATH LD_LIBRARY_PATH="$CUDA_RUNTIME_PATH")
  step "shared libraries (ldd)"
  SO_PATH="$("$PY" -c 'import importlib.util, os; print(os.path.join(os.path.dirname(importlib.util.find_spec("caffe").origin), "_caffe.so"))')"
  LDD_OUT="$("${CHECK_ENV[@]}" ldd "$SO_PATH")"
  if echo "$LDD_OUT" | grep -q "not found"; then
    echo "$LDD_OUT" >&2
    die "$SO_PATH: unresolved shared libraries"
  fi
  echo "$LDD_OUT" | grep -E "libcudart|libcublas|libcurand|libcudnn" | sed 's/^\s*/    /'
fi

# ----------------------------------------------------------------------------
step "verify import"
CHECK_DIR="$(mktemp -d)"
trap 'rm -rf "$CHECK_DIR"' EXIT
(cd "$CHECK_DIR" && "${CHECK_ENV[@]}" "$PY" -c \
  "import caffe; caffe.set_mode_cpu(); print(caffe.__file__)")

step "smoke test (1-layer net forward)"
cat > "$CHECK_DIR/smoke.prototxt" <<'EOF'
name: "smoke"
layer { name: "data" type: "Input" top: "data"
        input_param { shape { dim: 1 dim: 3 dim: 4 dim: 4 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 2 kernel_size: 3
                            weight_filler { type: "constant" value: 1 } } }
EOF
cat > "$CHECK_DIR/smoke.py" <<'EOF'
import sys
import numpy as np
import caffe
if sys.argv[1:] == ["gpu"]:
    caffe.set_mode_gpu()
    caffe.set_device(0)
else:
    caffe.set_mode_cpu()
net = caffe.Net("smoke.prototxt", caffe.TEST)
net.blobs["data"].data[...] = 1.0
out = net.forward()["conv"]
assert out.shape == (1, 2, 2, 2), out.shape
assert np.allclose(out, 27.0), out   # 3x3x3 ones * weight 1, bias 0
print("OK")
EOF
(cd "$CHECK_DIR" && "${CHECK_ENV[@]}" GLOG_minloglevel=2 "$PY" smoke.py cpu)

if [ "$CUDA" = 1 ]; then
  if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
    step "smoke test on GPU 0"
    (cd "$CHECK_DIR" && "${CHECK_ENV[@]}" GLOG_minloglevel=2 "$PY" smoke.py gpu)
  else
    echo "==> no GPU visible (nvidia-smi): GPU mode not tested"
  fi
  echo "==> CUDA build: at runtime _caffe.so needs libcudart.so.13, libcublas.so.13,"
  echo "    libcublasLt.so.13, libcurand.so.10${CUDNN_LIBS_DIR:+ and libcudnn*.so.9}, e.g. from the CUDA 13 toolkit${CUDNN_LIBS_DIR:+ and cuDNN 9}, or:"
  echo "    export LD_LIBRARY_PATH=$CUDA_RUNTIME_PATH\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
fi

echo "==> done in $(( $(date +%s) - T_START ))s: $WHEEL_NAME $WHEEL_VERSION -> $PY"
