#!/usr/bin/env bash
# Sets everything up and runs all tests (unit and integration, with ASan and
# UBSan), then checks formatting. This is the README's test command; CI runs it.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
# No locale, as on a minimal machine: nothing may depend on one.
unset LANG LANGUAGE ${!LC_@}
ctest --test-dir build-test --output-on-failure -j"$(nproc)" --timeout 900
scripts/check-format.sh
