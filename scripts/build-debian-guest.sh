#!/usr/bin/env bash
# Builds the Debian 12 test guest, a VM that boots from its own disk by its own bootloader,
# from Debian packages only, and prints its directory (default .cache/debian, else
# $CLOUDLET_DEBIAN_DIR):
#   disk.raw          the disk: 4 GiB, sparse, GPT
#     part 1 ESP      FAT32, 256 MiB from 1 MiB, legacy-BIOS-bootable: SYSLINUX for BIOS
#                     (gptmbr.bin in the MBR, /syslinux/syslinux.cfg) and systemd-boot as
#                     \EFI\BOOT\BOOTX64.EFI for UEFI (/loader/entries/debian.conf); both load
#                     /vmlinuz and /initrd.img from the ESP with the command line in `cmdline`
#     part 2 root     ext4 (label cloudlet-root, UUID in `root-uuid`), the rest of the disk
#   disk.qcow2        the same disk as qcow2
#   OVMF_VARS_4M.fd   a copy of the UEFI variable store template; give each VM its own copy
#                     (the code is /usr/share/OVMF/OVMF_CODE_4M.fd from the `ovmf` package)
#   vmlinuz, initrd.img, cmdline   the kernel, initrd and command line on the ESP, for
#                     direct kernel boot
#   dpkg-status       the guest's /var/lib/dpkg/status (scripts/build-apps-disk.sh reads it)
#   packages          the guest's packages and versions
#   stamp
#
# The root file system is Debian 12 (bookworm, mmdebstrap --variant=minbase) with systemd,
# udev, linux-image-cloud-amd64 (initramfs-tools, zstd initrd with virtio_blk), qemu-guest-agent,
# python3, e2fsprogs, util-linux, iproute2 and systemd-networkd (DHCP on the virtio NIC). It
# runs in 1 GiB of RAM and boots under QEMU's q35 machine with SeaBIOS (the default) or OVMF:
#   - cloudlet-www.service: `python3 -m http.server 80 --directory /srv/www`; GET / answers
#     "hello from the cloudlet debian guest".
#   - ttyS0: serial getty with root autologin; on ttyS0 root's shell is bash without echo,
#     without line editing and with an empty prompt (PS1='' PS2=''), the shell the cloudlet
#     serial console runs commands in. Once the shell is set up and the web service answers,
#     the shell prints "cloudlet-guest: ready" on ttyS0 (it waits for /run/cloudlet-ready,
#     which cloudlet-ready.service creates when port 80 answers).
#   - qemu-guest-agent starts when the virtio port org.qemu.guest_agent.0 appears.
#   - root mounted with `discard` (virtio-blk discard=unmap frees the blocks); journald keeps
#     its journal in RAM; apt timers, e2scrub, fstrim.timer, logind and the VT gettys masked;
#     default target multi-user.
#
# Needs root (mmdebstrap into a directory, device nodes in the tree) and the host packages of
# scripts/setup-host.sh (mmdebstrap, syslinux, mtools, dosfstools, fdisk, e2fsprogs, ovmf,
# qemu-utils). Cached: rebuilt when this script or the versions of the packages change.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="${CLOUDLET_DEBIAN_DIR:-$root/.cache/debian}"
mkdir -p "$out"

# What the guest gets on top of minbase.
include="systemd-sysv udev linux-image-cloud-amd64 initramfs-tools zstd qemu-guest-agent python3
  e2fsprogs util-linux iproute2 procps systemd-boot-efi"
include=$(echo $include | tr ' ' ',')

versions() {
  apt-cache policy $(echo "$include" | tr ',' ' ') 2>/dev/null \
    | awk '/^[^ ]/ {p=$1} /Candidate:/ {print p, $2}'
}
v=$(versions)
if [ -z "$v" ] || echo "$v" | grep -q '(none)'; then
  apt-get update -qq >/dev/null
  v=$(versions)
fi
host=$(dpkg-query -W -f='${Package} ${Version}\n' syslinux syslinux-common ovmf 2>/dev/null || true)
stamp=$( (cat "$0"; echo "$v"; echo "$host") | sha256sum | cut -c1-16)
if [ -f "$out/stamp" ] && [ "$(cat "$out/stamp")" = "$stamp" ] \
   && [ -f "$out/disk.raw" ] && [ -f "$out/disk.qcow2" ] && [ -f "$out/OVMF_VARS_4M.fd" ]; then
  echo "$out"
  exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
  echo "build-debian-guest: needs root (mmdebstrap into a directory, device nodes in the tree)" >&2
  exit 1
fi
for f in /usr/lib/syslinux/mbr/gptmbr.bin /usr/share/OVMF/OVMF_CODE_4M.fd /usr/share/OVMF/OVMF_VARS_4M.fd; do
  [ -f "$f" ] || { echo "build-debian-guest: $f is missing (scripts/setup-host.sh installs it)" >&2; exit 1; }
done
for c in mmdebstrap syslinux mcopy mmd mkfs.fat sfdisk mkfs.ext4 qemu-img; do
  command -v "$c" >/dev/null || { echo "build-debian-guest: $c is missing (scripts/setup-host.sh installs it)" >&2; exit 1; }
done
echo "build-debian-guest: building the Debian 12 guest in $out" >&2
t0=$(date +%s)

work=$(mktemp -d "${TMPDIR:-/tmp}/cloudlet-debian.XXXXXX")
trap 'rm -rf "$work"' EXIT
tree="$work/root"

# Fixed, so that the command line and fstab are known before the file system exists.
uuid=5c1e7b0d-7e57-4c0d-9d1e-c10d1e7a0001
cmdline="root=UUID=$uuid rw console=ttyS0,115200 quiet loglevel=3 systemd.show_status=0"

# Run inside mmdebstrap (the chroot has /proc, /sys and /dev mounted): configure the system
# and rebuild the initrd with that configuration.
cat > "$work/customize.sh" <<'CUSTOMIZE'
#!/bin/sh
set -eu
r="$1"
uuid="$2"
echo cloudlet-guest > "$r/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 cloudlet-guest\n::1 localhost ip6-localhost ip6-loopback\n' > "$r/etc/hosts"
cat > "$r/etc/fstab" <<EOF
UUID=$uuid / ext4 rw,discard,errors=remount-ro 0 0
LABEL=ESP /boot/efi vfat noauto,nofail,umask=0077 0 0
EOF
mkdir -p "$r/boot/efi"

# initrd: zstd, with the virtio block driver and ext4 whatever the build host has.
printf 'COMPRESS=zstd\n' > "$r/etc/initramfs-tools/conf.d/cloudlet"
printf 'virtio_pci\nvirtio_blk\next4\n' >> "$r/etc/initramfs-tools/modules"
chroot "$r" update-initramfs -u -k all >/dev/null

# Network: DHCP on the virtio NIC (QEMU user networking gives 10.0.2.15).
mkdir -p "$r/etc/systemd/network"
cat > "$r/etc/systemd/network/20-wired.network" <<EOF
[Match]
Name=en* eth*

[Network]
DHCP=ipv4
EOF
chroot "$r" systemctl enable systemd-networkd.service >/dev/null 2>&1

# Serial console: root autologin on ttyS0, no issue banner, no hostname prompt.
mkdir -p "$r/etc/systemd/system/serial-getty@ttyS0.service.d"
cat > "$r/etc/systemd/system/serial-getty@ttyS0.service.d/autologin.conf" <<'EOF'
[Service]
ExecStart=
ExecStart=-/sbin/agetty --autologin root --noclear --noissue --nohostname --keep-baud 115200,57600,38400,9600 - $TERM
EOF
chroot "$r" systemctl enable serial-getty@ttyS0.service >/dev/null 2>&1
: > "$r/etc/motd"
rm -f "$r"/etc/update-motd.d/*
touch "$r/root/.hushlogin"
# On ttyS0 the shell takes commands from a program: no echo, no line editing (readline would
# echo what it reads), empty prompts. It says it is ready once the web service answers.
cat > "$r/root/.bash_profile" <<'EOF'
[ -f ~/.bashrc ] && . ~/.bashrc
if [ "$(tty)" = /dev/ttyS0 ]; then
  stty -echo
  set +o emacs +o vi +H
  PS1='' PS2='' PS4='+ '
  unset PROMPT_COMMAND
  export PAGER=cat SYSTEMD_PAGER= SYSTEMD_COLORS=0 TERM=dumb
  i=0
  while [ ! -e /run/cloudlet-ready ] && [ $i -lt 1200 ]; do sleep 0.1; i=$((i + 1)); done
  if [ -e /run/cloudlet-ready ]; then
    echo "cloudlet-guest: ready"
  else
    echo "cloudlet-guest: the web service did not answer on port 80 in 120 s"
  fi
fi
EOF

# The web service that proves the guest is up, and the ready flag.
mkdir -p "$r/srv/www"
echo "hello from the cloudlet debian guest" > "$r/srv/www/index.html"
cat > "$r/etc/systemd/system/cloudlet-www.service" <<'EOF'
[Unit]
Description=cloudlet test web page on port 80

[Service]
ExecStart=/usr/bin/python3 -m http.server 80 --directory /srv/www
Restart=on-failure

[Install]
WantedBy=multi-user.target
EOF
cat > "$r/usr/local/sbin/cloudlet-ready" <<'EOF'
#!/bin/bash
# Creates /run/cloudlet-ready once port 80 answers (waits up to 120 s).
for _ in $(seq 1200); do
  if exec 3<>/dev/tcp/127.0.0.1/80 2>/dev/null; then
    exec 3>&-
    touch /run/cloudlet-ready
    exit 0
  fi
  sleep 0.1
done
echo "cloudlet-ready: nothing answers on port 80 after 120 s" >&2
exit 1
EOF
chmod 755 "$r/usr/local/sbin/cloudlet-ready"
cat > "$r/etc/systemd/system/cloudlet-ready.service" <<'EOF'
[Unit]
Description=cloudlet guest ready flag (/run/cloudlet-ready)
After=cloudlet-www.service
Wants=cloudlet-www.service

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/local/sbin/cloudlet-ready

[Install]
WantedBy=multi-user.target
EOF
chroot "$r" systemctl enable cloudlet-www.service cloudlet-ready.service >/dev/null 2>&1

# Quiet and quick: journal in RAM, no periodic jobs, nothing for absent hardware.
mkdir -p "$r/etc/systemd/journald.conf.d"
printf '[Journal]\nStorage=volatile\nRuntimeMaxUse=16M\n' > "$r/etc/systemd/journald.conf.d/cloudlet.conf"
for u in apt-daily.timer apt-daily-upgrade.timer apt-daily.service apt-daily-upgrade.service \
         dpkg-db-backup.timer e2scrub_all.timer e2scrub_reap.service fstrim.timer \
         systemd-logind.service getty@tty1.service systemd-networkd-wait-online.service \
         systemd-pstore.service getty-static.service; do
  chroot "$r" systemctl mask "$u" >/dev/null 2>&1
done
chroot "$r" systemctl set-default multi-user.target >/dev/null 2>&1
rm -f "$r/etc/machine-id" "$r/var/lib/dbus/machine-id"
: > "$r/etc/machine-id"
CUSTOMIZE
chmod +x "$work/customize.sh"

mmdebstrap --variant=minbase --include="$include" \
  --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
  --dpkgopt='path-include=/usr/share/doc/*/copyright' --dpkgopt='path-exclude=/usr/share/locale/*' \
  --dpkgopt='path-exclude=/usr/share/info/*' \
  --customize-hook="'$work/customize.sh' \"\$1\" $uuid" \
  --skip=cleanup/apt/lists --quiet \
  bookworm "$tree" >&2
rm -rf "$tree"/var/lib/apt/lists/*

cp "$tree"/var/lib/dpkg/status "$work/dpkg-status"
chroot "$tree" dpkg-query -W -f='${Package} ${Version}\n' > "$work/packages"
kernel=$(ls "$tree"/boot/vmlinuz-* | head -n1)
initrd=$(ls "$tree"/boot/initrd.img-* | head -n1)
cp "$kernel" "$work/vmlinuz"
cp "$initrd" "$work/initrd.img"

# ESP: 256 MiB FAT32 (its BPB says it starts at sector 2048), SYSLINUX and systemd-boot.
esp="$work/esp.img"
mkfs.fat -F 32 -n ESP -h 2048 -C "$esp" $((256 * 1024)) >/dev/null
cat > "$work/syslinux.cfg" <<EOF
DEFAULT debian
PROMPT 0
TIMEOUT 0
LABEL debian
  LINUX /vmlinuz
  INITRD /initrd.img
  APPEND $cmdline
EOF
cat > "$work/loader.conf" <<EOF
default debian.conf
timeout 0
editor no
EOF
cat > "$work/debian.conf" <<EOF
title Debian GNU/Linux 12 (cloudlet test guest)
linux /vmlinuz
initrd /initrd.img
options $cmdline
EOF
mmd -i "$esp" ::/syslinux ::/EFI ::/EFI/BOOT ::/loader ::/loader/entries
mcopy -i "$esp" "$work/vmlinuz" ::/vmlinuz
mcopy -i "$esp" "$work/initrd.img" ::/initrd.img
mcopy -i "$esp" "$work/syslinux.cfg" ::/syslinux/syslinux.cfg
mcopy -i "$esp" "$tree/usr/lib/systemd/boot/efi/systemd-bootx64.efi" ::/EFI/BOOT/BOOTX64.EFI
mcopy -i "$esp" "$work/loader.conf" ::/loader/loader.conf
mcopy -i "$esp" "$work/debian.conf" ::/loader/entries/debian.conf
syslinux --install --directory /syslinux "$esp"

# Root: ext4 from the tree, exactly the size of partition 2.
rm -rf "$tree/boot/efi" && mkdir -p "$tree/boot/efi"
root_start=526336                                   # sectors: 257 MiB
root_sectors=$(( 8388608 - 2048 - root_start ))      # up to 1 MiB before the end (backup GPT)
mkfs.ext4 -q -F -L cloudlet-root -U "$uuid" -m 1 -E lazy_itable_init=0,lazy_journal_init=0 \
  -d "$tree" "$work/root.img" $((root_sectors / 2))k >/dev/null
rm -rf "$tree"

# The disk: GPT, the SYSLINUX GPT MBR, then the two file systems at their offsets.
disk="$work/disk.raw"
truncate -s 4G "$disk"
sfdisk --quiet "$disk" <<EOF
label: gpt
unit: sectors
first-lba: 2048
start=2048, size=524288, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name="ESP", attrs="LegacyBIOSBootable"
start=$root_start, size=$root_sectors, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name="root"
EOF
dd if=/usr/lib/syslinux/mbr/gptmbr.bin of="$disk" bs=440 count=1 conv=notrunc status=none
dd if="$esp" of="$disk" bs=1M seek=1 conv=notrunc,sparse status=none
dd if="$work/root.img" of="$disk" bs=1M seek=257 conv=notrunc,sparse status=none
rm -f "$esp" "$work/root.img"
qemu-img convert -f raw -O qcow2 "$disk" "$work/disk.qcow2"

for f in disk.raw disk.qcow2 vmlinuz initrd.img dpkg-status packages; do
  mv "$work/$f" "$out/$f"
done
cp /usr/share/OVMF/OVMF_VARS_4M.fd "$out/OVMF_VARS_4M.fd"
echo "$cmdline" > "$out/cmdline"
echo "$uuid" > "$out/root-uuid"
echo "$stamp" > "$out/stamp"
echo "build-debian-guest: built in $(( $(date +%s) - t0 )) s" >&2
echo "$out"
