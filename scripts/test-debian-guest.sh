#!/usr/bin/env bash
# Boots the Debian 12 test guest (scripts/build-debian-guest.sh) from its own disk with plain
# QEMU command lines and checks it; builds the guest and the apps disk first (cached).
#   bios   SeaBIOS (QEMU's default firmware): the ready marker on ttyS0, GET / on port 80,
#          qemu-guest-agent answers guest-ping, commands on the serial console, fstrim; then
#          the apps disk as /dev/vdb: each app installs with one console command and answers
#          on its port (scripts/build-apps-disk.sh lists the ports and answers)
#   uefi   OVMF: the same without the apps
# Usage: scripts/test-debian-guest.sh [bios] [uefi]   (default: both). Prints the boot times.
# The guest's disk is never written: each boot writes to a qcow2 layer of its own.
# CLOUDLET_ACCEL (tcg, the default, or kvm) and CLOUDLET_BOOT_TIMEOUT (s, default 300).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
modes=("$@")
[ ${#modes[@]} -gt 0 ] || modes=(bios uefi)
guest=$("$root/scripts/build-debian-guest.sh")
apps=$("$root/scripts/build-apps-disk.sh")
accel="${CLOUDLET_ACCEL:-tcg}"
boot_timeout="${CLOUDLET_BOOT_TIMEOUT:-300}"

work=$(mktemp -d "${TMPDIR:-/tmp}/cloudlet-debian-test.XXXXXX")
qemu_pid=""
cleanup() {
  if [ -n "$qemu_pid" ] && kill -0 "$qemu_pid" 2>/dev/null; then kill "$qemu_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

# Talks to the guest's sockets: the serial console (as vm-driver's Console::run does), the
# guest agent, QMP, and HTTP through a forward. Every wait has a timeout and says what it waited for.
cat > "$work/vmctl.py" <<'PY'
import json, socket, sys, time, urllib.request

def fail(msg):
    print(f"test-debian-guest: {msg}", file=sys.stderr)
    sys.exit(1)

def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    print(s.getsockname()[1])

def wait_text(log, text, timeout):
    end = time.time() + timeout
    while time.time() < end:
        try:
            if text in open(log, errors="replace").read():
                return
        except FileNotFoundError:
            pass
        time.sleep(0.1)
    fail(f"waited {timeout:.0f} s for '{text}' on the serial console ({log})")

seq = int(time.time() * 1000) % 1000000

def console(sock, timeout, command):
    s = socket.socket(socket.AF_UNIX)
    s.connect(sock)
    s.settimeout(0.2)
    n = seq
    s.sendall(f"echo '__CLB''{n}__'; {command}\necho \"__CLE\"\"{n}__ $?\"\n".encode())
    buf = b""
    end = time.time() + timeout
    begin, close = f"__CLB{n}__\n", f"__CLE{n}__ "
    while time.time() < end:
        try:
            buf += s.recv(65536)
        except socket.timeout:
            pass
        t = buf.decode(errors="replace").replace("\r", "")
        b, e = t.find(begin), t.find(close)
        if b >= 0 and e > b and "\n" in t[e:]:
            sys.stdout.write(t[b + len(begin):e])
            sys.exit(int(t[e + len(close):].split("\n", 1)[0].strip()))
    fail(f"waited {timeout:.0f} s for the command '{command}' on the serial console; got {buf[-400:]!r}")

def qga(sock, timeout):
    s = socket.socket(socket.AF_UNIX)
    s.connect(sock)
    s.settimeout(timeout)
    f = s.makefile("rw")
    def ask(cmd):
        f.write(json.dumps(cmd) + "\n")
        f.flush()
        try:
            line = f.readline()
        except socket.timeout:
            fail(f"waited {timeout:.0f} s for the guest agent's answer to {cmd['execute']}")
        return json.loads(line)
    r = ask({"execute": "guest-sync", "arguments": {"id": 4242}})
    if r.get("return") != 4242:
        fail(f"guest-sync answered {r}")
    r = ask({"execute": "guest-ping"})
    if r != {"return": {}}:
        fail(f"guest-ping answered {r}")
    print("guest-ping: {\"return\": {}}")

def qmp_quit(sock):
    s = socket.socket(socket.AF_UNIX)
    s.connect(sock)
    s.settimeout(10)
    f = s.makefile("rw")
    f.readline()
    for c in ("qmp_capabilities", "quit"):
        f.write(json.dumps({"execute": c}) + "\n")
        f.flush()
        f.readline()

def http(port, timeout):
    end = time.time() + timeout
    last = "no answer"
    while time.time() < end:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30) as r:
                sys.stdout.write(r.read().decode(errors="replace"))
                return
        except Exception as e:
            last = str(e)
        time.sleep(0.2)
    fail(f"waited {timeout:.0f} s for an HTTP answer on 127.0.0.1:{port} ({last})")

cmd, args = sys.argv[1], sys.argv[2:]
if cmd == "free-port": free_port()
elif cmd == "wait-text": wait_text(args[0], args[1], float(args[2]))
elif cmd == "console": console(args[0], float(args[1]), args[2])
elif cmd == "qga": qga(args[0], float(args[1]))
elif cmd == "qmp-quit": qmp_quit(args[0])
elif cmd == "http": http(int(args[0]), float(args[1]))
PY
vmctl() { python3 "$work/vmctl.py" "$@"; }

# expect WHAT PATTERN TEXT: TEXT matches the extended regular expression PATTERN.
expect() {
  if ! printf '%s\n' "$3" | grep -Eqx -- "$2"; then
    echo "test-debian-guest: $1: expected /$2/, got: $3" >&2
    exit 1
  fi
  echo "  $1: $3"
}

summary=()
boot() {
  local mode=$1 dir="$work/$1"
  mkdir -p "$dir"
  qemu-img create -q -f qcow2 -F qcow2 -b "$guest/disk.qcow2" "$dir/disk.qcow2"
  local web; web=$(vmctl free-port)
  local fwd="user,id=n0,hostfwd=tcp:127.0.0.1:$web-:80"
  local args=(-nodefaults -no-user-config -machine "q35,accel=$accel" -cpu qemu64 -m 1G -display none
    -chardev "socket,id=ser0,path=$dir/ser.sock,server=on,wait=off,logfile=$dir/ser.log" -serial chardev:ser0
    -drive "file=$dir/disk.qcow2,format=qcow2,if=none,id=d0,discard=unmap" -device virtio-blk-pci,drive=d0
    -device virtio-serial-pci
    -chardev "socket,path=$dir/qga.sock,server=on,wait=off,id=qga0"
    -device virtserialport,chardev=qga0,name=org.qemu.guest_agent.0
    -qmp "unix:$dir/qmp.sock,server=on,wait=off")
  if [ "$mode" = uefi ]; then
    cp "$guest/OVMF_VARS_4M.fd" "$dir/vars.fd"
    args+=(-drive if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd
      -drive "if=pflash,format=raw,unit=1,file=$dir/vars.fd")
  fi
  declare -A app_port=([numpy]=8081 [nginx]=8082 [redis]=8083)
  declare -A host_port=()
  if [ "$mode" = bios ]; then
    args+=(-drive "file=$apps/apps.ext4,format=raw,if=none,id=d1,readonly=on" -device virtio-blk-pci,drive=d1)
    for a in numpy nginx redis; do
      host_port[$a]=$(vmctl free-port)
      fwd+=",hostfwd=tcp:127.0.0.1:${host_port[$a]}-:${app_port[$a]}"
    done
  fi
  args+=(-netdev "$fwd" -device virtio-net-pci,netdev=n0)

  echo "== $mode: booting the Debian guest from its disk ($accel)"
  local t0; t0=$(date +%s%N)
  qemu-system-x86_64 "${args[@]}" >"$dir/qemu.log" 2>&1 &
  qemu_pid=$!
  vmctl wait-text "$dir/ser.log" "cloudlet-guest: ready" "$boot_timeout" \
    || { tail -c 2000 "$dir/ser.log" >&2; exit 1; }
  local ms=$(( ($(date +%s%N) - t0) / 1000000 ))
  echo "  ready marker after $ms ms"
  summary+=("$mode boot to ready: $ms ms")

  expect "GET / on port 80" "hello from the cloudlet debian guest" "$(vmctl http "$web" 60)"
  expect "guest agent" 'guest-ping: \{"return": \{\}\}' "$(vmctl qga "$dir/qga.sock" 30)"
  expect "console" "0 6\.1\..*-cloud-amd64" "$(vmctl console "$dir/ser.sock" 30 'true; echo $? $(uname -r)')"
  local st=0; vmctl console "$dir/ser.sock" 30 'exit_with() { return $1; }; exit_with 7' >/dev/null || st=$?
  expect "console exit status" 7 "$st"
  expect "root file system" "/dev/vda2 ext4 .*discard.*" \
    "$(vmctl console "$dir/ser.sock" 30 'findmnt -n -o SOURCE,FSTYPE,OPTIONS /')"
  expect "fstrim" "/: .* trimmed" "$(vmctl console "$dir/ser.sock" 120 'fstrim -v /')"
  expect "failed units" "" "$(vmctl console "$dir/ser.sock" 30 'systemctl --failed --no-legend --plain')"

  if [ "$mode" = bios ]; then
    vmctl console "$dir/ser.sock" 30 'mount -o ro /dev/vdb /mnt' >/dev/null
    local a out
    for a in numpy nginx redis; do
      t0=$(date +%s%N)
      out=$(vmctl console "$dir/ser.sock" 600 "/mnt/$a/install.sh") \
        || { echo "test-debian-guest: $a: install.sh failed: $out" >&2; exit 1; }
      ms=$(( ($(date +%s%N) - t0) / 1000000 ))
      expect "$a install ($ms ms)" "$a: answering on port ${app_port[$a]}" "$out"
      summary+=("$a install + start: $ms ms")
    done
    expect "numpy on port 8081" \
      'numpy-pil: mandelbrot 256x256 64 iterations sum=960594 png=[0-9]+ sha256=[0-9a-f]{16}' \
      "$(vmctl http "${host_port[numpy]}" 120)"
    expect "nginx on port 8082" "hello from nginx on the cloudlet guest" "$(vmctl http "${host_port[nginx]}" 60)"
    expect "redis on port 8083" "redis: cloudlet=stored in redis hits=1" "$(vmctl http "${host_port[redis]}" 60)"
    expect "redis again" "redis: cloudlet=stored in redis hits=2" "$(vmctl http "${host_port[redis]}" 60)"
  fi

  vmctl qmp-quit "$dir/qmp.sock" || true
  local i
  for i in $(seq 300); do kill -0 "$qemu_pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$qemu_pid" 2>/dev/null; then
    echo "test-debian-guest: QEMU did not quit within 30 s of the QMP quit; killing it" >&2
    kill "$qemu_pid"
  fi
  wait "$qemu_pid" 2>/dev/null || true
  qemu_pid=""
}

for m in "${modes[@]}"; do
  case "$m" in
    bios|uefi) boot "$m" ;;
    *) echo "usage: $0 [bios] [uefi]" >&2; exit 2 ;;
  esac
done
echo "== summary"
printf '  %s\n' "${summary[@]}"
