#!/usr/bin/env bash
# Installs every Debian 12 package hesse needs to build, test and run its
# examples. Idempotent: packages already present are left as they are.
set -euo pipefail

packages=(
  g++                  # C++17 compiler
  meson ninja-build    # build
  pkg-config           # finds xtensor.pc, openblas.pc (and hesse.pc for consumers)
  xtensor-dev xtl-dev  # tensors
  libxtensor-blas-dev  # BLAS/LAPACK bindings for xtensor (header-only)
  libopenblas-dev      # BLAS + LAPACK
  libboost-test-dev    # Boost.Test for the test suites
  python3              # scripts/count_tests.py, used by .ci/run
  python3-numpy        # test_io checks that numpy reads and writes the same .npy files
)

if [ "$(id -u)" -eq 0 ]; then
  as_root=()
elif command -v sudo >/dev/null 2>&1; then
  as_root=(sudo)
else
  echo "install_deps.sh: run as root or install sudo" >&2
  exit 1
fi

# Nothing to do when every package is already installed.
missing=()
for p in "${packages[@]}"; do
  status=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
  [ "$status" = "install ok installed" ] || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "install_deps.sh: all ${#packages[@]} packages already installed"
  exit 0
fi

export DEBIAN_FRONTEND=noninteractive
echo "install_deps.sh: installing ${missing[*]}"
"${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
"${as_root[@]}" env DEBIAN_FRONTEND=noninteractive \
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "install_deps.sh: done"
