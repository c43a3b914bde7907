#!/bin/sh
# Install the cross compilers and user-mode emulator used by `onnxopt build --target aarch64|armv7|rpi*`
# and by tools/arm_check. Idempotent: packages already installed are left alone.
# Needs root (or sudo) and a Debian/Ubuntu apt.
set -eu

PACKAGES="gcc-aarch64-linux-gnu g++-aarch64-linux-gnu gcc-arm-linux-gnueabihf g++-arm-linux-gnueabihf qemu-user debootstrap file"

missing=""
for pkg in $PACKAGES; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        missing="$missing $pkg"
    fi
done

if [ -z "$missing" ]; then
    echo "cross toolchains already installed:$PACKAGES"
    exit 0
fi

SUDO=""
if [ "$(id -u)" != "0" ]; then
    SUDO="sudo"
fi

echo "installing:$missing"
$SUDO apt-get update -qq
# shellcheck disable=SC2086
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends $missing
