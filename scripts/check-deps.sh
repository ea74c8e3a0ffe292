#!/usr/bin/env bash
# Refuses crates we must not depend on: unmaintained or withdrawn ones the RustSec database
# flags (bincode: RUSTSEC-2025-0141; xz2/lzma-sys: unmaintained, use liblzma). This is the
# offline part of what `cargo deny check advisories` would catch; our CI cannot reach the
# advisory database.
#
# Then checks that the libraries leave their users free to pick their own blake3 1.x: only
# overlay-format's optional `simd-batch` feature pins it (through overlay-format-simd). A
# throw-away package that depends on every library and on a blake3 other than the pinned one
# must resolve (this needs the crates.io index, as `cargo package` does).
set -euo pipefail
cd "$(dirname "$0")/.."
denied=(bincode xz2 lzma-sys fs2 fs4 atty)
[ -f Cargo.lock ] || cargo generate-lockfile >/dev/null
bad=0
for crate in "${denied[@]}"; do
  if grep -qx "name = \"$crate\"" Cargo.lock; then
    echo "check-deps: denied crate '$crate' is in Cargo.lock ($(cargo tree -i "$crate" --workspace 2>/dev/null | tail -n +2 | head -3 | tr -s ' ' | tr '\n' ' '))" >&2
    bad=1
  fi
done

pin=$(sed -n 's/^blake3-exact = .*version = "=\([0-9.]*\)".*/\1/p' Cargo.toml)
if [ -z "$pin" ]; then
  echo "check-deps: no exact blake3 version (blake3-exact) in the workspace Cargo.toml" >&2
  exit 1
fi
embedder=$(mktemp -d "${TMPDIR:-/tmp}/check-deps.XXXXXX")
trap 'rm -rf "$embedder"' EXIT
mkdir "$embedder/src"
touch "$embedder/src/lib.rs"
{
  printf '[package]\nname = "embedder"\nversion = "0.0.0"\nedition = "2021"\npublish = false\n\n'
  printf '[workspace]\n\n[dependencies]\n'
  for lib in overlay-format delta-engine vm-driver lazy-image base-registry synthesis; do
    printf '%s = { path = "%s/%s" }\n' "$lib" "$PWD" "$lib"
  done
  # Not the version the feature pins: any other blake3 1.x must do.
  printf 'blake3 = ">=1, <%s"\n' "$pin"
} >"$embedder/Cargo.toml"
if ! out=$(cargo generate-lockfile --quiet --manifest-path "$embedder/Cargo.toml" 2>&1); then
  echo "check-deps: a program using another blake3 1.x cannot depend on our libraries:" >&2
  echo "$out" >&2
  bad=1
fi
exit $bad
