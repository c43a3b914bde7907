#!/usr/bin/env bash
# Check an aarch64 build of onnxopt/TVM for correctness under user-mode emulation (qemu-aarch64).
#
#   tools/arm_check/arm_check.sh [MODEL.onnx] [--input-shape NAME:1,3,32,32]
#
# Without MODEL it checks the bundled demo CNN compressed 2x by onnxopt (low-rank layers).
# 1. an arm64 Debian root (debootstrap --foreign, minbase + python3; the downloaded .debs are
#    unpacked with dpkg-deb, nothing is configured or executed at setup time),
# 2. the aarch64 wheels of apache-tvm, apache-tvm-ffi, numpy, ml_dtypes, typing_extensions
#    (pip download --platform manylinux_2_28_aarch64 --python-version 3.11) unpacked into a site folder,
# 3. `onnxopt build --target aarch64`, then `qemu-aarch64 -L ROOT ROOT/usr/bin/python3.11 run.py`
#    on random inputs, compared with onnxruntime on this machine (fails above 1e-4).
# Root and wheels are cached in .cache/arm/ (gitignored; ARM_CHECK_CACHE overrides); a second
# run only builds and runs. The host Python is .venv/bin/python (ARM_CHECK_PYTHON overrides).
# Needs: qemu-user, debootstrap, g++-aarch64-linux-gnu (tools/install_cross_toolchains.sh), and
# the onnxopt venv with the tvm extra. Emulated timings say nothing about speed on a board.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
CACHE="${ARM_CHECK_CACHE:-$REPO/.cache/arm}"
ROOT="$CACHE/root"
WHEELS="$CACHE/wheels"
SITE="$CACHE/site"
PYTHON="${ARM_CHECK_PYTHON:-$REPO/.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON="$(command -v python3)"

TVM_VERSION="0.27.0.post1"
TVM_FFI_VERSION="0.1.14.post0"

MODEL="${1:-}"
shift || true
if [ -z "$MODEL" ]; then
    # Default: a compressed model that needs nothing outside the repository — the bundled
    # Fashion-MNIST CNN, compressed 2x on its bundled calibration images (a few seconds).
    MODEL="$CACHE/fmnist_cnn_2x.onnx"
    mkdir -p "$CACHE"
    "$PYTHON" -m onnxopt -q compress "$REPO/models/demo/fmnist_cnn.onnx" -o "$MODEL" --speedup 2 \
        --calib "$REPO/models/demo/fashion-mnist/calib" --preset fashion-mnist
fi

need() {
    command -v "$1" >/dev/null 2>&1 || { echo "arm-check: $1 not found: $2" >&2; exit 2; }
}
need qemu-aarch64 "apt-get install qemu-user (or tools/install_cross_toolchains.sh)"
need debootstrap "apt-get install debootstrap (or tools/install_cross_toolchains.sh)"
need aarch64-linux-gnu-g++ "apt-get install g++-aarch64-linux-gnu (or tools/install_cross_toolchains.sh)"
need dpkg-deb "run on Debian/Ubuntu"

debian_mirror() {
    # The Debian mirror this machine's apt uses (deb822 .sources first, then one-line .list).
    local uri=""
    if ls /etc/apt/sources.list.d/*.sources >/dev/null 2>&1; then
        uri="$(awk '/^URIs:/ {for (i = 2; i <= NF; i++) print $i}' /etc/apt/sources.list.d/*.sources \
               | grep -E '/debian/?$' | head -n1 || true)"
    fi
    if [ -z "$uri" ] && ls /etc/apt/sources.list /etc/apt/sources.list.d/*.list >/dev/null 2>&1; then
        uri="$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
               | awk '$1 == "deb" {for (i = 2; i <= NF; i++) if ($i ~ /^https?:/) {print $i; break}}' \
               | grep -E '/debian/?$' | head -n1 || true)"
    fi
    echo "${uri:-http://deb.debian.org/debian}"
}

if [ ! -x "$ROOT/usr/bin/python3.11" ]; then
    MIRROR="$(debian_mirror)"
    echo "arm-check: creating the arm64 root in $ROOT from $MIRROR (debootstrap --foreign)"
    rm -rf "$ROOT.partial"
    mkdir -p "$CACHE"
    debootstrap --arch=arm64 --foreign --variant=minbase --include=python3 bookworm "$ROOT.partial" "$MIRROR"
    echo "arm-check: unpacking $(ls "$ROOT.partial"/var/cache/apt/archives/*.deb | wc -l) packages"
    for deb in "$ROOT.partial"/var/cache/apt/archives/*.deb; do
        dpkg-deb -x "$deb" "$ROOT.partial"
    done
    [ -x "$ROOT.partial/usr/bin/python3.11" ] || { echo "arm-check: python3.11 missing from the arm64 root" >&2; exit 1; }
    rm -rf "$ROOT"
    mv "$ROOT.partial" "$ROOT"
fi

if [ ! -f "$SITE/.complete" ]; then
    NUMPY_VERSION="$("$PYTHON" -c 'import numpy; print(numpy.__version__)')"
    echo "arm-check: downloading aarch64 wheels into $WHEELS"
    mkdir -p "$WHEELS"
    "$PYTHON" -m pip download --quiet --only-binary=:all: --no-deps \
        --platform manylinux_2_28_aarch64 --python-version 3.11 --implementation cp --abi cp311 --abi abi3 --abi none \
        --dest "$WHEELS" \
        "apache-tvm==$TVM_VERSION" "apache-tvm-ffi==$TVM_FFI_VERSION" "numpy==$NUMPY_VERSION" ml_dtypes typing_extensions
    rm -rf "$SITE"
    mkdir -p "$SITE"
    for wheel in "$WHEELS"/*.whl; do
        "$PYTHON" -m zipfile -e "$wheel" "$SITE"
    done
    touch "$SITE/.complete"
fi

exec "$PYTHON" "$REPO/tools/arm_check/check.py" "$MODEL" --root "$ROOT" --site "$SITE" --work "$CACHE/work" "$@"
