#!/usr/bin/env bash
# The whole test suite: the C++ tests (ctest), the same tests again under AddressSanitizer and
# UndefinedBehaviorSanitizer, native programs built against the installed CMake package (one of
# them, examples/async_client, is run by the Python tests on an exported model), and the Python
# tests (pytest, against the installed octavo: run `pip install .` first).
# GPU tests live in tests/gpu and run on a GPU machine with `pytest tests/gpu`.
# OCTAVO_SANITIZERS=0 skips the sanitizer build (it is the slowest part on a small machine).
set -euo pipefail
cd "$(dirname "$0")/.."
build=${OCTAVO_TEST_BUILD_DIR:-build/tests}
jobs=$(nproc)

cmake -S . -B "$build" -G Ninja -DOCTAVO_CUDA=OFF -DOCTAVO_BUILD_TESTS=ON -DOCTAVO_BUILD_PYTHON=OFF
cmake --build "$build" -j "$jobs"
ctest --test-dir "$build" --output-on-failure -j "$jobs"

if [ "${OCTAVO_SANITIZERS:-1}" != 0 ]; then
  # -O1: the sanitizers' usual level (fast enough to run, quicker to compile than -O3); "Sanitize"
  # is a build type with no flags of its own, so these are the only ones.
  sanitize=${OCTAVO_SANITIZE_BUILD_DIR:-build/tests-sanitize}
  start=$(date +%s)
  cmake -S . -B "$sanitize" -G Ninja -DOCTAVO_CUDA=OFF -DOCTAVO_BUILD_TESTS=ON \
    -DOCTAVO_BUILD_PYTHON=OFF -DCMAKE_BUILD_TYPE=Sanitize \
    "-DCMAKE_CXX_FLAGS=-O1 -g1 -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=all" \
    "-DCMAKE_EXE_LINKER_FLAGS=-fsanitize=address,undefined" >/dev/null
  cmake --build "$sanitize" -j "$jobs"
  ASAN_OPTIONS=detect_leaks=1:strict_string_checks=1 UBSAN_OPTIONS=print_stacktrace=1 \
    ctest --test-dir "$sanitize" --output-on-failure -j "$jobs"
  echo "run.sh: C++ tests under ASan + UBSan in $(( $(date +%s) - start )) s"
fi

cmake --install "$build" --prefix "$build/install" >/dev/null
cmake -S tests/cmake_consumer -B "$build/consumer" -G Ninja -DCMAKE_PREFIX_PATH="$PWD/$build/install"
cmake --build "$build/consumer"
"$build/consumer/consumer"
cmake -S examples/async_client -B "$build/async_client" -G Ninja -DCMAKE_PREFIX_PATH="$PWD/$build/install"
cmake --build "$build/async_client"
export OCTAVO_ASYNC_CLIENT="$PWD/$build/async_client/async_client"  # tests/python/test_export.py

python3 -m pytest tests/python -q -rs
