#!/usr/bin/env bash
# Runs the README's test command (make test) in a fresh clone of this
# repository, as a new user outside the team would: in an empty directory
# with no ../shared beside it, no $KVGATE_TEST_MODELS, and an empty model
# cache, so every test model is fetched from the Go module proxy or written
# by mkmodel. make test fails when a test skips for a missing file or tool.
#
# The Go build and module caches are reused: they hold compiled code, not
# test models (kvgate's test models live in $KVGATE_CACHE_DIR, which is a
# new empty directory here).
#
# Usage: scripts/fresh-clone-test.sh [make variables...]
set -euo pipefail
src=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/kvgate-fresh-XXXXXX")
trap 'chmod -R u+w "$work" 2>/dev/null; rm -rf "$work"' EXIT

if git -C "$src" rev-parse --git-dir >/dev/null 2>&1; then
  git clone --quiet --no-hardlinks "$src" "$work/kvgate"
  echo "fresh clone of $(git -C "$work/kvgate" rev-parse --short HEAD) in $work/kvgate"
else
  # Not a git checkout: copy the tree without build outputs.
  mkdir "$work/kvgate"
  tar -C "$src" --exclude=./.bin -cf - . | tar -C "$work/kvgate" -xf -
  echo "fresh copy of $src in $work/kvgate"
fi
if [ -e "$work/shared" ]; then
  echo "fresh-clone-test: $work/shared exists" >&2
  exit 1
fi
mkdir "$work/model-cache"
cd "$work/kvgate"
start=$(date +%s)
env -u KVGATE_TEST_MODELS KVGATE_CACHE_DIR="$work/model-cache" make test "$@"
echo "fresh-clone make test passed in $(( $(date +%s) - start )) s; test models fetched into an empty cache:"
ls -l "$work/model-cache"
