#!/usr/bin/env bash
# Installs the host packages the project needs: QEMU 10 (system emulator and utils) from
# bookworm-backports, plus what the test-guest builders use (scripts/build-guest.sh, and
# scripts/build-debian-guest.sh: mmdebstrap, SYSLINUX, OVMF, mtools, dosfstools, sfdisk).
# Idempotent; quick when all is present.
#
# The backports apt source is derived from the URI of the machine's own Debian sources file,
# so no mirror host name is written here.
set -euo pipefail

need=()
have_cmd() { command -v "$1" >/dev/null 2>&1; }

qemu_major() {
  qemu-system-x86_64 --version 2>/dev/null | sed -n 's/.*version \([0-9]*\)\..*/\1/p' | head -n1
}

[ "$(qemu_major || true)" -ge 10 ] 2>/dev/null || need+=(qemu-system-x86)
have_cmd qemu-img || need+=(qemu-utils)
[ -x /bin/busybox ] && /bin/busybox --list >/dev/null 2>&1 && file /bin/busybox 2>/dev/null | grep -q static || need+=(busybox-static)
have_cmd cpio || need+=(cpio)
have_cmd mkfs.ext4 || need+=(e2fsprogs)
have_cmd file || need+=(file)
have_cmd ip || need+=(iproute2)
# The Debian 12 guest booted from its own disk (scripts/build-debian-guest.sh).
have_cmd mmdebstrap || need+=(mmdebstrap)
have_cmd syslinux || need+=(syslinux)
[ -f /usr/lib/syslinux/mbr/gptmbr.bin ] || need+=(syslinux-common)
[ -f /usr/share/OVMF/OVMF_CODE_4M.fd ] || need+=(ovmf)
have_cmd mcopy || need+=(mtools)
have_cmd mkfs.fat || need+=(dosfstools)
have_cmd sfdisk || need+=(fdisk)
have_cmd python3 || need+=(python3)
# The cloud kernel package is unpacked (not installed) by scripts/build-guest.sh; nothing to do here.

if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

add_backports() {
  local list=/etc/apt/sources.list.d/cloudlet-backports.sources
  [ -f "$list" ] && return 0
  local src=/etc/apt/sources.list.d/debian.sources uri=""
  if [ -f "$src" ]; then
    # First URIs: of a stanza whose Suites include plain 'bookworm'.
    uri=$(awk '
      /^URIs:/ {u=$2}
      /^Suites:/ { for (i=2;i<=NF;i++) if ($i=="bookworm") {print u; exit} }
    ' "$src")
  fi
  if [ -z "$uri" ] && [ -f /etc/apt/sources.list ]; then
    uri=$(awk '$1=="deb" && $3=="bookworm" {print $2; exit}' /etc/apt/sources.list)
  fi
  if [ -z "$uri" ]; then
    echo "setup-host: cannot find the Debian bookworm URI in the apt sources" >&2
    exit 1
  fi
  printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' "$uri" \
    | $SUDO tee "$list" >/dev/null
}

echo "setup-host: installing ${need[*]}" >&2
add_backports
$SUDO apt-get update -qq
export DEBIAN_FRONTEND=noninteractive
# QEMU 10 lives in backports; the rest come from the main suite.
$SUDO apt-get install -y -qq --no-install-recommends -t bookworm-backports \
  qemu-system-x86 qemu-utils >/dev/null
rest=()
for p in "${need[@]}"; do
  case "$p" in qemu-system-x86|qemu-utils) ;; *) rest+=("$p") ;; esac
done
if [ ${#rest[@]} -gt 0 ]; then
  $SUDO apt-get install -y -qq --no-install-recommends "${rest[@]}" >/dev/null
fi
qemu-system-x86_64 --version | head -n1 >&2
