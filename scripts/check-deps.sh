#!/usr/bin/env bash
# Refuses crates we must not depend on: unmaintained or withdrawn ones the RustSec database
# flags (bincode: RUSTSEC-2025-0141; xz2/lzma-sys: unmaintained, use liblzma). This is the
# offline part of what `cargo deny check advisories` would catch; our CI cannot reach the
# advisory database.
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
exit $bad
