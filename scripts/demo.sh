#!/usr/bin/env bash
# The main flow on a fresh machine: installs what it needs, builds the test guest, then runs
# base -> overlay -> synthesis and prints sizes and timings. `--guest debian` runs it on the
# Debian guest instead (systemd booted from its own disk, 1 GiB of RAM: its first build takes
# minutes, the demo a few more under TCG). Other arguments go to `cloudlet demo` (e.g. --work DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
kind=busybox
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --guest) kind="${2:-}"; shift 2 || { echo "demo.sh: --guest busybox|debian" >&2; exit 2; } ;;
    --guest=*) kind="${1#--guest=}"; shift ;;
    *) args+=("$1"); shift ;;
  esac
done
scripts/setup-host.sh
cargo build --release --quiet -p cloudlet-examples --bin cloudlet
case "$kind" in
  busybox)
    guest=$(scripts/build-guest.sh)
    CLOUDLET_GUEST_DIR="$guest" cargo run --release --quiet -p cloudlet-examples --bin cloudlet -- demo ${args[@]+"${args[@]}"} ;;
  debian)
    guest=$(scripts/build-debian-guest.sh)
    CLOUDLET_DEBIAN_DIR="$guest" cargo run --release --quiet -p cloudlet-examples --bin cloudlet -- demo --debian ${args[@]+"${args[@]}"} ;;
  *) echo "demo.sh: --guest takes busybox or debian, not '$kind'" >&2; exit 2 ;;
esac
