#!/bin/sh
# setup_debian.sh: installs the Debian 12 packages that building and testing tptrain need.
#
#   sh scripts/setup_debian.sh              # build and test dependencies
#   sh scripts/setup_debian.sh --with-torch # also python3-torch, which only regenerating the
#                                           # PyTorch reference vectors in tests/data needs
#
# Runs without questions; as root directly, otherwise through sudo. The CUDA toolkit (and NCCL,
# for the CUDA backend) is not a Debian package: install it from NVIDIA into /usr/local/cuda.
# Without it the build still succeeds with the CPU backend only.
set -eu

packages="meson ninja-build pkg-config gcc g++ libyaml-dev libjansson-dev libcriterion-dev mpich libmpich-dev python3-yaml
python3 python3-numpy"
# g++: nvcc compiles the host side of the .cu files with it.

for arg in "$@"; do
    case "$arg" in
    --with-torch) packages="$packages python3-torch" ;;
    -h | --help)
        sed -n '2,10s/^# \{0,1\}//p' "$0"
        exit 0
        ;;
    *)
        echo "setup_debian.sh: unknown argument '$arg' (only --with-torch is known)" >&2
        exit 2
        ;;
    esac
done

if [ "$(id -u)" -eq 0 ]; then
    as_root=""
elif command -v sudo >/dev/null 2>&1; then
    as_root="sudo"
else
    echo "setup_debian.sh: needs root to install packages; run it as root or install sudo" >&2
    exit 1
fi

# sudo drops most of the environment, so the non-interactive setting goes on its command line.
$as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q
# shellcheck disable=SC2086 # the package list is meant to split into words
$as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $packages
