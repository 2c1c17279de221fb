#!/usr/bin/env bash
# Fails when a C++ file differs from what clang-format (the checked-in
# .clang-format) makes of it: the tracked files and the new ones not yet
# added (not those .gitignore excludes). scripts/setup.sh test installs
# clang-format.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v clang-format >/dev/null ||
  { echo "check-format: clang-format is missing: it comes from the package clang-format (scripts/setup.sh test installs it)" >&2; exit 1; }
bad=0
while IFS= read -r f; do
  if ! clang-format --dry-run --Werror "$f" >/dev/null 2>&1; then
    echo "check-format: $f is not formatted (run: clang-format -i $f)"; bad=1
  fi
done < <(git ls-files --cached --others --exclude-standard '*.cc' '*.h')
[ "$bad" = 0 ] && echo "check-format: all files formatted"
exit "$bad"
