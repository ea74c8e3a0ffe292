#!/usr/bin/env bash
# The Debian guest's apps through the whole user flow, as an operator runs it: one base from the
# guest's own qcow2 disk (booted by SeaBIOS, 1 GiB of RAM, the apps disk as its second disk), then
# per app an overlay (installed from its packages, answering on its port) without and with
# --trim, and synthesis of each overlay to the app's first HTTP answer on loopback (fastest of
# RUNS). Prints a markdown table on stdout; steps and the tool's own output go to stderr.
#
#   benches/debian-apps.sh [--workdir DIR] [--runs N] [APP...]     (APP: numpy nginx redis)
#
# Needs scripts/build-debian-guest.sh and scripts/build-apps-disk.sh (built, cached, on first
# use) and a release build of cloudlet (built here).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
work="$root/target/debian-apps"
runs=3
apps=()
while [ $# -gt 0 ]; do
  case "$1" in
    --workdir) work="$2"; shift 2 ;;
    --runs) runs="$2"; shift 2 ;;
    numpy|nginx|redis) apps+=("$1"); shift ;;
    *) echo "usage: $0 [--workdir DIR] [--runs N] [numpy|nginx|redis ...]" >&2; exit 2 ;;
  esac
done
[ ${#apps[@]} -gt 0 ] || apps=(numpy nginx redis)

guest=$("$root/scripts/build-debian-guest.sh")
appsdir=$("$root/scripts/build-apps-disk.sh")
cargo build --release --quiet --manifest-path "$root/Cargo.toml" -p cloudlet-examples --bin cloudlet
cl="$root/target/release/cloudlet"
mkdir -p "$work"
reg="$work/registry"
export CLOUDLET_REGISTRY="$reg"

port_of() { case "$1" in numpy) echo 8081 ;; nginx) echo 8082 ;; redis) echo 8083 ;; esac; }
json() { python3 -c 'import json,sys; d=json.load(sys.stdin); print(eval(sys.argv[1], {}, {"d": d}))' "$1"; }
mib() { python3 -c "print(f'{$1/2**20:.1f}')"; }

# The base, once per guest build.
stamp="$(cat "$guest/stamp" "$appsdir/stamp" | tr -d '\n')"
if [ "$(cat "$work/base-stamp" 2>/dev/null)" != "$stamp" ]; then
  rm -rf "$reg" "$work"/*.overlay "$work/base.json"
  echo "debian-apps: creating the base" >&2
  "$cl" base "$guest/disk.qcow2" "$appsdir/apps.ext4" --name debian --ram-mib 1024 --ready-timeout 600 --json \
    > "$work/base.json"
  echo "$stamp" > "$work/base-stamp"
fi
base_s=$(json 'd["ms"]["boot"]/1000' < "$work/base.json")
base_b=$(json 'd["bytes_on_disk"]' < "$work/base.json")
echo "base: booted in ${base_s} s, $(mib "$base_b") MiB on disk" >&2

echo "| app | overlay | overlay MiB | snapshot + diff s | synthesis to first answer s | + transfer at 38 Mbps s |"
echo "|---|---|---|---|---|---|"
for app in "${apps[@]}"; do
  port=$(port_of "$app")
  for variant in plain trim; do
    o="$work/$app-$variant.overlay"
    extra=()
    [ "$variant" = trim ] && extra=(--trim)
    if [ ! -f "$o" ]; then
      echo "debian-apps: $app ($variant): customizing and capturing" >&2
      "$cl" overlay --base debian --name "$app" --forward "tcp:0:$port" \
        --customize "mount -o ro /dev/vdb /mnt && /mnt/$app/install.sh" \
        --wait-http "$port" --expect-status 200 ${extra[@]+"${extra[@]}"} --out "$o" --json > "$o.json"
    fi
    size=$(json 'd["overlay_bytes"]' < "$o.json")
    create=$(json '(d["ms"]["snapshot"]+d["ms"]["diff"])/1000' < "$o.json")
    best=""
    for _ in $(seq "$runs"); do
      rm -rf "$work/vm"
      t=$("$cl" synthesis --overlay "$o" --out "$work/vm" --probe "$port" --expect-status 200 --json \
        | json 'd["timeline"]["total"]/1000')
      best=$(python3 -c "print(min(x for x in [$t, ${best:-1e9}]))")
    done
    rm -rf "$work/vm"
    wifi=$(python3 -c "print(f'{$size*8/38e6 + $best:.1f}')")
    printf '| %s | %s | %s | %.1f | %.2f | %s |\n' "$app" "$variant" "$(mib "$size")" "$create" "$best" "$wifi"
  done
done
