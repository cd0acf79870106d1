#!/usr/bin/env bash
# The whole test suite: the C++ tests (ctest), a native program built against the installed CMake
# package, and the Python tests (pytest, against the installed octavo: run `pip install .` first).
# GPU tests live in tests/gpu and run on a GPU machine with `pytest tests/gpu`.
set -euo pipefail
cd "$(dirname "$0")/.."
build=${OCTAVO_TEST_BUILD_DIR:-build/tests}
jobs=$(nproc)

cmake -S . -B "$build" -G Ninja -DOCTAVO_CUDA=OFF -DOCTAVO_BUILD_TESTS=ON -DOCTAVO_BUILD_PYTHON=OFF
cmake --build "$build" -j "$jobs"
ctest --test-dir "$build" --output-on-failure -j "$jobs"

cmake --install "$build" --prefix "$build/install" >/dev/null
cmake -S tests/cmake_consumer -B "$build/consumer" -G Ninja -DCMAKE_PREFIX_PATH="$PWD/$build/install"
cmake --build "$build/consumer"
"$build/consumer/consumer"

python3 -m pytest tests/python -q -rs
