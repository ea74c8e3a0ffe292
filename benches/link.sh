#!/usr/bin/env bash
# Synthesis over an emulated link: `cloudlet serve` in one network namespace, `cloudlet client`
# in another, joined by a veth pair shaped with tc on both ends (netem, or where the kernel has
# none a delaying relay: half the RTT each way; tbf: the rate). For each rate, the client uploads the overlay and the server answers once the
# app answered its probe; prints a markdown table of the client's wall time (request to the
# app's first answer, fastest of RUNS) next to the overlay's pure transfer time at that rate.
#
#   benches/link.sh --registry DIR --overlay FILE --probe GUEST_PORT [--rates "10 38 100"]
#                   [--rtt-ms 20] [--runs 3] [--early SEGMENTED_FILE | --handoff]
#
# With --early, also an early start at each rate: `cloudlet share` serves the segmented overlay
# (`cloudlet segment`) in the client's namespace, and `cloudlet synthesis --early-start` in the
# server's reads it by range; the table gets the time from its start to the app's first answer
# (as it measures it), the overlay bytes fetched by then, and the time until all had arrived.
#
# With --handoff, instead: a second server in the client's namespace is the destination. For
# each rate, the VM is synthesized on the first server (no link involved), then moved with
# `cloudlet handoff` (its residue crosses the link); the table gets the residue's size, the
# downtime (from the pause at the source until the destination's app answered its probe, as
# the source measures it) and the whole handoff.
#
# LINK_VERBOSE=1 prints each early start's JSON and keeps its log in $TMPDIR (with
# RUST_LOG=synthesis=debug: every segment's arrival and every wait of the VM, in ms).
#
# Needs root (namespaces, tc) and a release build of cloudlet (built here). The namespaces,
# the veth pair and the server are removed on exit, whatever happens.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
rates="10 38 100"
rtt=20
runs=3
reg="" overlay="" probe="" early="" early_args="" handoff=""
while [ $# -gt 0 ]; do
  case "$1" in
    --registry) reg="$2"; shift 2 ;;
    --overlay) overlay="$2"; shift 2 ;;
    --probe) probe="$2"; shift 2 ;;
    --rates) rates="$2"; shift 2 ;;
    --rtt-ms) rtt="$2"; shift 2 ;;
    --runs) runs="$2"; shift 2 ;;
    --early) early="$2"; shift 2 ;;
    --early-args) early_args="$2"; shift 2 ;;
    --handoff) handoff=1; shift ;;
    *) echo "usage: $0 --registry DIR --overlay FILE --probe GUEST_PORT [--rates \"10 38 100\"] [--rtt-ms 20] [--runs 3]" >&2; exit 2 ;;
  esac
done
[ -n "$reg" ] && [ -n "$overlay" ] && [ -n "$probe" ] || { echo "link.sh: --registry, --overlay and --probe are needed" >&2; exit 2; }
reg="$(realpath "$reg")" overlay="$(realpath "$overlay")"
[ -z "$early" ] || early="$(realpath "$early")"
cargo build --release --quiet --manifest-path "$root/Cargo.toml" -p cloudlet-examples --bin cloudlet
cargo build --release --quiet --manifest-path "$root/Cargo.toml" -p cloudlet-benches --bin delay-relay
relay="$root/target/release/delay-relay"
cl="$root/target/release/cloudlet"

srv="cl-srv-$$" cli="cl-cli-$$" vs="clvs$$" vc="clvc$$"
work="$(mktemp -d "${TMPDIR:-/tmp}/cloudlet-link.XXXXXX")"
server_pid="" share_pid="" relay_pids="" dest_pid=""
cleanup() {
  for p in $relay_pids; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null || true
  [ -n "$share_pid" ] && kill "$share_pid" 2>/dev/null && wait "$share_pid" 2>/dev/null || true
  [ -n "$dest_pid" ] && kill "$dest_pid" 2>/dev/null && wait "$dest_pid" 2>/dev/null || true
  ip netns del "$srv" 2>/dev/null || true
  ip netns del "$cli" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

ip netns add "$srv"
ip netns add "$cli"
ip link add "$vs" type veth peer name "$vc"
ip link set "$vs" netns "$srv"
ip link set "$vc" netns "$cli"
ip -n "$srv" addr add 10.77.0.1/24 dev "$vs"
ip -n "$cli" addr add 10.77.0.2/24 dev "$vc"
for ns in "$srv" "$cli"; do ip -n "$ns" link set lo up; done
ip -n "$srv" link set "$vs" up
ip -n "$cli" link set "$vc" up

# The delay needs the kernel's netem qdisc; kernels without it (no sch_netem, no modules) get
# it from delay-relay instead: a TCP relay on each receiving end of the link that delays every
# byte by half the RTT (benches/src/bin/delay-relay.rs says what that does not emulate).
# the rate alone, and the table says so.
if ip netns exec "$srv" tc qdisc add dev "$vs" root handle 1: netem delay 1ms 2>/dev/null; then
  ip netns exec "$srv" tc qdisc del dev "$vs" root
  delay="$rtt ms RTT"
else
  if [ "$rtt" = 0 ]; then
    delay="no added delay"
  else
    echo "link.sh: this kernel has no netem qdisc: the delay comes from a relay (delay-relay)" >&2
    delay="$rtt ms RTT (relay)"
  fi
  relay_half=$(python3 -c "print(int($rtt / 2))")
  rtt=0
fi
srv_url=http://10.77.0.1:7878 share_host=10.77.0.2:8000
# Through a relay in the receiving namespace: $1 namespace, $2 local port, $3 target.
start_relay() {
  ip netns exec "$1" "$relay" --listen "127.0.0.1:$2" --to "$3" --delay-ms "$relay_half" >/dev/null &
  relay_pids="$relay_pids $!"
  for _ in $(seq 100); do
    ip netns exec "$1" bash -c "exec 3<>/dev/tcp/127.0.0.1/$2" 2>/dev/null && return 0
    sleep 0.1
  done
  echo "link.sh: the relay did not listen on 127.0.0.1:$2 in 10 s" >&2
  exit 1
}
shape() { # rate in Mbit/s, on both ends: delay rtt/2 (netem), then the rate (tbf)
  local half end
  half=$(python3 -c "print($rtt / 2)")
  for end in "$srv:$vs" "$cli:$vc"; do
    local ns="${end%%:*}" dev="${end##*:}"
    ip netns exec "$ns" tc qdisc del dev "$dev" root 2>/dev/null || true
    if [ "$rtt" != 0 ]; then
      ip netns exec "$ns" tc qdisc add dev "$dev" root handle 1: netem delay "${half}ms" limit 100000
      ip netns exec "$ns" tc qdisc add dev "$dev" parent 1: handle 2: tbf rate "${1}mbit" burst 64kb latency 1s
    else
      ip netns exec "$ns" tc qdisc add dev "$dev" root handle 1: tbf rate "${1}mbit" burst 64kb latency 1s
    fi
  done
}

ip netns exec "$srv" "$cl" serve --listen 10.77.0.1:7878 --insecure --registry "$reg" --work "$work/vms" \
  >"$work/serve.log" 2>&1 &
server_pid=$!
for _ in $(seq 100); do
  ip netns exec "$cli" bash -c 'exec 3<>/dev/tcp/10.77.0.1/7878' 2>/dev/null && break
  kill -0 "$server_pid" 2>/dev/null || { echo "link.sh: the server exited:" >&2; cat "$work/serve.log" >&2; exit 1; }
  sleep 0.1
done
ip netns exec "$cli" bash -c 'exec 3<>/dev/tcp/10.77.0.1/7878' 2>/dev/null \
  || { echo "link.sh: the server did not listen on 10.77.0.1:7878 in 10 s" >&2; cat "$work/serve.log" >&2; exit 1; }
if [ "${relay_half:-0}" != 0 ]; then
  start_relay "$cli" 7879 10.77.0.1:7878
  srv_url=http://127.0.0.1:7879
fi

if [ -n "$handoff" ]; then
  ip netns exec "$cli" "$cl" serve --listen 10.77.0.2:7878 --insecure --registry "$reg" --work "$work/vms-dest" \
    >"$work/dest.log" 2>&1 &
  dest_pid=$!
  for _ in $(seq 100); do
    ip netns exec "$srv" bash -c 'exec 3<>/dev/tcp/10.77.0.2/7878' 2>/dev/null && break
    sleep 0.1
  done
  ip netns exec "$srv" bash -c 'exec 3<>/dev/tcp/10.77.0.2/7878' 2>/dev/null \
    || { echo "link.sh: the destination did not listen on 10.77.0.2:7878 in 10 s" >&2; cat "$work/dest.log" >&2; exit 1; }
  dest_url=http://10.77.0.2:7878
  if [ "${relay_half:-0}" != 0 ]; then
    start_relay "$srv" 7880 10.77.0.2:7878
    dest_url=http://127.0.0.1:7880
  fi
  # QEMU's own live migration of the same VM crosses the link through a relay in the other
  # namespace, back to a destination QEMU in this one.
  cargo build --release --quiet --manifest-path "$root/Cargo.toml" -p cloudlet-benches --bin qemu-migrate
  ip netns exec "$cli" "$relay" --listen 10.77.0.2:4444 --to 10.77.0.1:4445 --delay-ms "${relay_half:-0}" >/dev/null &
  relay_pids="$relay_pids $!"
  migrate() { # rate, extra args: prints "bytes downtime_ms total_ms first_answer_ms" (downtime: stop to run)
    local out
    out=$(timeout 1800 ip netns exec "$srv" "$root/target/release/qemu-migrate" --registry "$reg" --overlay "$overlay" \
      --probe "$probe" --listen 10.77.0.1:4445 --connect 10.77.0.2:4444 "${@:2}" 2>"$work/migrate.log") \
      || { echo "link.sh: QEMU's migration at $1 Mbit/s failed:" >&2; tail -20 "$work/migrate.log" >&2; exit 1; }
    python3 -c 'import json,sys; j=json.loads(sys.argv[1]); print(j["bytes"], j["downtime_ms"], j["total_ms"], j["first_answer_ms"])' "$out"
  }
  echo "| link | moved by | sent | of it while paused | its transfer alone | downtime (best of $runs) | whole move |"
  echo "| --- | --- | ---: | ---: | ---: | ---: | ---: |"
  for rate in $rates; do
    shape "$rate"
    for mode in "" "--no-precopy"; do
      best=""
      for _ in $(seq "$runs"); do
        out=$(timeout 900 ip netns exec "$srv" "$cl" client --server http://10.77.0.1:7878 --overlay "$overlay" \
          --probe "$probe" --json) || { echo "link.sh: synthesis failed: $out" >&2; tail -20 "$work/serve.log" >&2; exit 1; }
        id=$(python3 -c 'import json,sys; print(json.loads(sys.stdin.read())["id"])' <<<"$out")
        # shellcheck disable=SC2086
        out=$(timeout 900 ip netns exec "$srv" "$cl" handoff --from http://10.77.0.1:7878 --vm "$id" --to "$dest_url" \
          --probe "$probe" --json $mode) \
          || { echo "link.sh: handoff at $rate Mbit/s failed: $out" >&2; tail -20 "$work/serve.log" >&2; exit 1; }
        r=$(python3 -c 'import json,sys; j=json.loads(sys.stdin.read()); print(j["vm"]["id"], j["precopy_bytes"], j["final_bytes"], j["downtime_ms"], j["total_ms"])' <<<"$out")
        ip netns exec "$cli" "$cl" client --server http://10.77.0.2:7878 --stop "${r%% *}" >/dev/null
        best=$(python3 -c "
a = '$r'.split(); b = '${best:-$r}'.split()
print(' '.join(a if int(a[3]) <= int(b[3]) else b))")
      done
      python3 -c "
rate, how = $rate, 'pre-copy, then a patch' if '$mode' == '' else 'stop and copy'
_, pre, last, down, total = '$best'.split()
size = int(pre) + int(last)
print(f'| {rate} Mbit/s, $delay | cloudlet handoff, {how} | {size / 2**20:.2f} MiB | {int(last) / 2**20:.2f} MiB | {size * 8 / (rate * 1e6):.2f} s | {int(down) / 1e3:.2f} s | {int(total) / 1e3:.2f} s |')"
    done
    [ -z "${LINK_NO_QEMU:-}" ] || continue
    for how in "" "--multifd 4 --zstd"; do
      best=""
      for _ in $(seq "$runs"); do
        # shellcheck disable=SC2086
        r=$(migrate "$rate" $how)
        best=$(python3 -c "
a = '$r'.split(); b = '${best:-$r}'.split()
print(' '.join(a if int(a[2]) <= int(b[2]) else b))")
      done
      python3 -c "
rate, how = $rate, '${how:-one stream}'
size, down, total, answer = (int(x) for x in '$best'.split())
print(f'| {rate} Mbit/s, $delay | QEMU migrate, {how} | {size / 2**20:.2f} MiB | - | {size * 8 / (rate * 1e6):.2f} s | {down / 1e3:.2f} s | {answer / 1e3:.2f} s |')"
    done
  done
  exit 0
fi

if [ -n "$early" ]; then
  ip netns exec "$cli" "$cl" share "$early" --listen 10.77.0.2:8000 >"$work/share.log" 2>&1 &
  share_pid=$!
  for _ in $(seq 100); do
    ip netns exec "$srv" bash -c 'exec 3<>/dev/tcp/10.77.0.2/8000' 2>/dev/null && break
    sleep 0.1
  done
  if [ "${relay_half:-0}" != 0 ]; then
    start_relay "$srv" 8001 10.77.0.2:8000
    share_host=127.0.0.1:8001
  fi
fi
early_run() { # rate: prints "first_answer_s bytes_before_answer total_s"
  local out t0 t1
  rm -rf "$work/early-vm"
  t0=$(date +%s.%N)
  out=$(timeout 900 ip netns exec "$srv" "$cl" --registry "$reg" synthesis --early-start --json $early_args \
    --overlay "http://$share_host/$(basename "$early")" --probe "$probe" --out "$work/early-vm" 2>"$work/early.log") \
    || { echo "link.sh: early start at $1 Mbit/s failed:" >&2; tail -20 "$work/early.log" >&2; exit 1; }
  t1=$(date +%s.%N)
  [ -z "${LINK_VERBOSE:-}" ] || { echo "$out" >&2; cp "$work/early.log" "${TMPDIR:-/tmp}/link-early-$1-$(date +%s%N).log"; }
  python3 -c "
import json, sys
j = json.loads(sys.argv[1])
print(j['first_answer_ms'] / 1000, j['bytes_before_answer'], $t1 - $t0)" "$out"
}

size=$(stat -c %s "$overlay")
if [ -n "$early" ]; then
  esize=$(stat -c %s "$early")
  echo "| link | overlay | its transfer alone | request to the app's first answer (best of $runs) | early start: first answer | fetched by then | all arrived |"
  echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"
else
  echo "| link | overlay | its transfer alone | request to the app's first answer (best of $runs) |"
  echo "| --- | ---: | ---: | ---: |"
fi
for rate in $rates; do
  shape "$rate"
  best=""
  for _ in $(seq "$runs"); do
    t0=$(date +%s.%N)
    out=$(timeout 900 ip netns exec "$cli" "$cl" client --server "$srv_url" --overlay "$overlay" \
      --probe "$probe" --json) || { echo "link.sh: synthesis at $rate Mbit/s failed: $out" >&2; tail -20 "$work/serve.log" >&2; exit 1; }
    t1=$(date +%s.%N)
    id=$(python3 -c 'import json,sys; print(json.loads(sys.stdin.read())["id"])' <<<"$out")
    ip netns exec "$cli" "$cl" client --server "$srv_url" --stop "$id" >/dev/null
    took=$(python3 -c "print($t1 - $t0)")
    best=$(python3 -c "print(min(x for x in [$took, ${best:-$took}]))")
  done
  if [ -z "$early" ]; then
    python3 -c "
size, rate, best = $size, $rate, $best
print(f'| {rate} Mbit/s, $delay | {size / 2**20:.1f} MiB | {size * 8 / (rate * 1e6):.2f} s | {best:.2f} s |')"
    continue
  fi
  ebest=""
  for _ in $(seq "$runs"); do
    r=$(early_run "$rate")
    ebest=$(python3 -c "
a = '$r'.split(); b = '${ebest:-$r}'.split()
print(' '.join(a if float(a[0]) <= float(b[0]) else b))")
  done
  python3 -c "
size, esize, rate, best = $size, $esize, $rate, $best
first, fetched, total = '$ebest'.split()
print(f'| {rate} Mbit/s, $delay | {size / 2**20:.1f} MiB (segmented {esize / 2**20:.1f} MiB) | {size * 8 / (rate * 1e6):.2f} s | {best:.2f} s | {float(first):.2f} s | {int(fetched) / 2**20:.1f} MiB | {float(total):.2f} s |')"
done
