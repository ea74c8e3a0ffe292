#!/usr/bin/env bash
# The whole test suite, on a fresh machine: installs the host packages it needs (QEMU 10,
# busybox-static, ...), builds the test guest from Debian packages (cached), then runs every
# test of the workspace, doc tests included. Real QEMU guests are booted (TCG when KVM cannot
# run guests).
#
# It also builds the Debian 12 guest that boots from its own disk (scripts/build-debian-guest.sh;
# cached, the first build takes a few minutes), which the real-guest tests run.
# CLOUDLET_DEBIAN_GUEST=0 skips that build and those tests.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup-host.sh
if [ -x scripts/build-guest.sh ]; then
  scripts/build-guest.sh >/dev/null
fi
if [ "${CLOUDLET_DEBIAN_GUEST:-1}" != 0 ]; then
  scripts/build-debian-guest.sh >/dev/null
fi

if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast "$@"
else
  cargo test --workspace --no-fail-fast "$@"
fi
cargo test --workspace --doc --quiet
