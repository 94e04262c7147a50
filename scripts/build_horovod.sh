#!/usr/bin/env bash
# Install Horovod 0.28.1 (PyTorch, MPI + Gloo controllers) into the project venv.
#
#   scripts/build_horovod.sh          (or: make horovod)
#
# Horovod ships no wheels, so it is built from source once (3 min on 2 cores with CUDA 13 and
# torch 2.14; allow 10) and the wheel is kept in a cache outside the repository; later runs (new
# venvs, CI) install it in seconds. 0.28.1 asks for C++14, but recent torch headers need C++20,
# hence the CMAKE_CXX_STANDARD patch below.
# Env knobs: VENV (default .venv), RESIST_WHEEL_CACHE (default ~/.cache/resist_mpi/wheels),
#            HOROVOD_BUILD_LOG (default $CACHE/horovod-build.log).
set -euo pipefail

VERSION=0.28.1
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY="$(cd "$VENV" 2>/dev/null && pwd || echo "$VENV")/bin/python"
CACHE=${RESIST_WHEEL_CACHE:-$HOME/.cache/resist_mpi/wheels}
mkdir -p "$CACHE" && CACHE=$(cd "$CACHE" && pwd)  # absolute: the build runs in a temp dir
LOG=${HOROVOD_BUILD_LOG:-$CACHE/horovod-build.log}

say() { echo "horovod: $*"; }
die() { echo "horovod: $*" >&2; exit 1; }
verify() { "$PY" -c "import horovod.torch as hvd; hvd.init(); assert hvd.size() >= 1" >/dev/null 2>&1; }

[ -x "$PY" ] || die "no venv at $VENV: run 'make setup' first"
# Horovod's runtime dependencies (pip is told --no-deps so it never touches torch).
"$PY" -m pip install -q packaging cloudpickle psutil pyyaml

if "$PY" -c "import horovod.torch" >/dev/null 2>&1; then
  say "already installed ($("$PY" -c 'import horovod; print(horovod.__version__)'))"; exit 0
fi

install_cached() {
  local whl
  whl=$(ls -t "$CACHE"/horovod-${VERSION}*.whl 2>/dev/null | head -1) || true
  [ -n "$whl" ] || return 1
  say "installing cached wheel $whl"
  "$PY" -m pip install -q --no-deps --force-reinstall "$whl"
  if verify; then say "ok: $whl"; return 0; fi
  # A wheel built against another torch fails to load (C++ ABI): drop it and rebuild.
  say "cached wheel does not import with this torch, rebuilding"
  "$PY" -m pip uninstall -q -y horovod || true
  rm -f "$whl"; return 1
}
install_cached && exit 0

# -- prerequisites: report everything missing in one line -------------------------------------------
missing=()
command -v cmake >/dev/null || missing+=("cmake (apt-get install cmake)")
command -v g++ >/dev/null || missing+=("a C++ compiler g++ (apt-get install g++)")
"$PY" -c "import torch" >/dev/null 2>&1 || missing+=("torch in $VENV (make setup)")
[ ${#missing[@]} -eq 0 ] || die "cannot build: missing $(printf '%s; ' "${missing[@]}" | sed 's/; $//')"

export HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1
export MAKEFLAGS=${MAKEFLAGS:--j$(nproc)}
if command -v mpicxx >/dev/null && command -v mpicc >/dev/null; then
  export HOROVOD_WITH_MPI=1; controllers="MPI+Gloo"
else
  export HOROVOD_WITHOUT_MPI=1; controllers="Gloo-only"
  say "no mpicxx/mpicc found: Gloo-only build (for the MPI controller install libopenmpi-dev and rerun)"
fi
if [ -d /usr/local/cuda ]; then
  export CUDA_HOME=/usr/local/cuda HOROVOD_CUDA_HOME=/usr/local/cuda HOROVOD_BUILD_CUDA_CC_LIST=${HOROVOD_BUILD_CUDA_CC_LIST:-90}
  flavour="CUDA"
else
  unset HOROVOD_GPU_OPERATIONS HOROVOD_CUDA_HOME; flavour="CPU-only"
fi

# -- build ----------------------------------------------------------------------------------------
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
say "building $VERSION from source ($controllers, $flavour), log: $LOG"
start=$(date +%s)
(
  "$PY" -m pip download -q --no-deps --no-binary :all: "horovod==$VERSION" -d "$work" &&
  tar -xzf "$work"/horovod-$VERSION.tar.gz -C "$work" &&
  cd "$work/horovod-$VERSION" &&
  sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 20)/' CMakeLists.txt horovod/torch/CMakeLists.txt &&
  "$PY" -m pip wheel -v --no-deps --no-build-isolation -w "$CACHE" .
) >"$LOG" 2>&1 || {
  echo "horovod: build failed after $(( $(date +%s) - start ))s; last 30 lines of $LOG:" >&2
  tail -n 30 "$LOG" >&2; exit 1; }
say "built in $(( $(date +%s) - start ))s"

install_cached || die "the freshly built wheel does not import; see $LOG"
