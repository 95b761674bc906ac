#!/usr/bin/env bash
# Prepare the one GPU call (bench/gpu_all.sh) on the CPU machine, before any device time is spent: the timm wheel that
# this checkout's tests ran with (.whl/, installed first on the GPU machine, whose own timm version is unknown) and the
# CIFAR-10 tarball (.device/), both git-ignored; then a CPU rehearsal of every stage at tiny sizes (TINY=1, a few
# minutes; skip it with REHEARSE=0). Carry both folders with the call:
#   bash bench/gpu_prepare.sh [path/to/cifar10-jpg.tar.gz]      # default: ../shared/data/cifar10-jpg.tar.gz
#   device run: carry [".whl", ".device"], command: bash bench/gpu_all.sh
set -eu
cd "$(dirname "$0")/.."
TARBALL=${1:-../shared/data/cifar10-jpg.tar.gz}
VERSION=$(python -c "import timm; print(timm.__version__)")
mkdir -p .whl .device
rm -f .whl/timm-*.whl
python -m pip download -q --no-deps --only-binary :all: -d .whl "timm==$VERSION"
if [ -f "$TARBALL" ]; then
  cp -u "$TARBALL" .device/cifar10-jpg.tar.gz
else
  echo "warning: no CIFAR-10 tarball at $TARBALL: the reproduction stage will have no data" >&2
fi
ls -l .whl .device
if [ "${REHEARSE:-1}" = 1 ]; then
  TINY=1 BUDGET=${REHEARSAL_BUDGET:-600} OUT=${OUT:-/tmp/gpu_all_rehearsal} WORK=/tmp/gpu_all_rehearsal_work bash bench/gpu_all.sh
fi
