#!/usr/bin/env bash
# Builds the test guest from Debian packages only and prints its directory:
#   vmlinuz     the linux-image-*-cloud-amd64 kernel (virtio drivers are modules)
#   initrd.img  busybox-static + the virtio modules + /init (loads modules, mounts /dev/vda,
#               brings up eth0 for QEMU user networking, serves /www over HTTP on port 80,
#               root shell on ttyS0 without echo)
#   disk.raw    64 MiB ext4 image made with `mkfs.ext4 -d` (no loop devices, no mounts)
# Cached under .cache/guest; rebuilt when this script or the package versions change.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="${CLOUDLET_GUEST_DIR:-$root/.cache/guest}"
mkdir -p "$out"

kpkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-/ {print $2; exit}')
if [ -z "$kpkg" ]; then
  apt-get update -qq >/dev/null
  kpkg=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-/ {print $2; exit}')
fi
kver=$(apt-cache policy "$kpkg" | awk '/Candidate:/ {print $2}')
bbver=$(dpkg-query -W -f='${Version}' busybox-static 2>/dev/null || echo none)
stamp=$( (cat "$0"; echo "$kpkg $kver $bbver") | sha256sum | cut -c1-16)
if [ -f "$out/stamp" ] && [ "$(cat "$out/stamp")" = "$stamp" ] \
   && [ -f "$out/vmlinuz" ] && [ -f "$out/initrd.img" ] && [ -f "$out/disk.raw" ]; then
  echo "$out"
  exit 0
fi
echo "build-guest: building the test guest ($kpkg $kver) in $out" >&2

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && apt-get download "$kpkg" >/dev/null 2>&1) || {
  apt-get update -qq >/dev/null
  (cd "$work" && apt-get download "$kpkg" >/dev/null)
}
dpkg-deb -x "$work"/"$kpkg"_*.deb "$work/k"
kdir=$(ls -d "$work"/k/lib/modules/*)

# initramfs
ir="$work/initramfs"
mkdir -p "$ir"/{bin,sbin,dev,proc,sys,tmp,mnt/disk,lib/modules,etc}
cp /bin/busybox "$ir/bin/busybox"
mods="virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk failover net_failover virtio_net virtio_balloon"
for m in $mods; do
  f=$(find "$kdir" -name "$m.ko*" | head -n1)
  [ -n "$f" ] || { echo "build-guest: module $m not found in $kpkg" >&2; exit 1; }
  case "$f" in
    *.ko.xz) xz -dc "$f" > "$ir/lib/modules/$m.ko" ;;
    *.ko.zst) zstd -qdc "$f" > "$ir/lib/modules/$m.ko" ;;
    *) cp "$f" "$ir/lib/modules/$m.ko" ;;
  esac
done
cat > "$ir/init" <<INIT
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmpfs /tmp
for m in $mods; do insmod /lib/modules/\$m.ko; done
i=0
while [ ! -b /dev/vda ] && [ \$i -lt 100 ]; do sleep 0.05; i=\$((i+1)); done
mount -t ext4 -o discard /dev/vda /mnt/disk || echo "init: cannot mount /dev/vda"
ip link set lo up
ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0
ip route add default via 10.0.2.2
mkdir -p /mnt/disk/www
httpd -p 80 -h /mnt/disk/www
echo "cloudlet-guest: ready"
while true; do
  setsid sh -c 'stty -echo -F /dev/ttyS0; export PS1=; exec sh </dev/ttyS0 >/dev/ttyS0 2>&1'
done
INIT
chmod +x "$ir/init"
(cd "$ir" && find . | cpio -o -H newc --quiet | gzip -1) > "$work/initrd.img"

# disk
d="$work/disk"
mkdir -p "$d/www" "$d/etc"
echo "hello from the cloudlet base guest" > "$d/www/index.html"
echo "cloudlet test guest" > "$d/etc/motd"
rm -f "$work/disk.raw"
mkfs.ext4 -q -F -L cloudlet -d "$d" "$work/disk.raw" 64M >&2

cp "$work"/k/boot/vmlinuz-* "$out/vmlinuz.tmp" && mv "$out/vmlinuz.tmp" "$out/vmlinuz"
mv "$work/initrd.img" "$out/initrd.img"
mv "$work/disk.raw" "$out/disk.raw"
echo "$stamp" > "$out/stamp"
echo "$out"
