#!/usr/bin/env bash
# The main flow on a fresh machine: installs what it needs, builds the test guest, then runs
# base -> overlay -> synthesis and prints sizes and timings. Extra arguments go to
# `cloudlet demo` (e.g. --work DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-host.sh
guest=$(scripts/build-guest.sh)
cargo build --release --quiet -p cloudlet-examples --bin cloudlet
CLOUDLET_GUEST_DIR="$guest" cargo run --release --quiet -p cloudlet-examples --bin cloudlet -- demo "$@"
