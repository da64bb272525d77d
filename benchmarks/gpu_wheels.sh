#!/usr/bin/env bash
# Here (with network), before benchmarks/gpu_check.py runs on a lent GPU machine (no network):
# download into .whl/ (git-ignored; the device tool carries it with carry=[".whl"]) the wheels
# rxruntime needs that the machine's image lacks, for its Python 3.12 on x86-64:
# reactivex and pyzmq (runtime dependencies), setuptools>=77 (the editable install of this tree).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d .whl reactivex pyzmq "setuptools>=77"
ls -la .whl
