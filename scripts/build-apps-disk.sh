#!/usr/bin/env bash
# Builds the apps disk for the Debian 12 test guest (scripts/build-debian-guest.sh) and prints
# its directory (default .cache/debian-apps, else $CLOUDLET_APPS_DIR):
#   apps.ext4   ext4 image (label cloudlet-apps), the guest's second disk (/dev/vdb)
#   packages    the .debs on it, per app
#   stamp
# The .debs come from `apt-get download`: each app's packages and those of their dependencies
# that the guest lacks (resolved by apt-get against the guest's dpkg status). Each app is
# installed and started by one command on the guest's console:
#   mount -o ro /dev/vdb /mnt && /mnt/APP/install.sh
# install.sh installs the .debs (services are started only once configured), writes the
# config, starts the service and returns once its port answers (or fails after 120 s).
#
#   APP     PORT  GET / answers
#   numpy   8081  "numpy-pil: mandelbrot 256x256 64 iterations sum=960594 png=7215 sha256=71d20775f70b1298"
#                 (python3-numpy computes the set, python3-pil renders it as a PNG; the sum
#                 is fixed, the PNG's size and hash are those of bookworm's PIL and zlib)
#   nginx   8082  "hello from nginx on the cloudlet guest"
#   redis   8083  "redis: cloudlet=stored in redis hits=N" (redis-server; a python3-redis
#                 HTTP front sets the key and increments the counter on every request)
#
# Cached: rebuilt when this script, the guest or the packages' versions change.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
guest=$("$root/scripts/build-debian-guest.sh")
out="${CLOUDLET_APPS_DIR:-$root/.cache/debian-apps}"
mkdir -p "$out"

apps="numpy nginx redis"
pkgs_numpy="python3-numpy python3-pil"
pkgs_nginx="nginx"
pkgs_redis="redis-server python3-redis"

# name=version of what apt-get would install into the guest for an app.
resolve() {
  # shellcheck disable=SC2086
  apt-get -s -o Dir::State::status="$guest/dpkg-status" install --no-install-recommends $1 \
    | awk '/^Inst / {v=$3; sub(/^\(/, "", v); print $2 "=" v}'
}
list=""
for a in $apps; do
  eval "p=\$pkgs_$a"
  r=$(resolve "$p" 2>/dev/null || true)
  if [ -z "$r" ]; then
    apt-get update -qq >/dev/null
    r=$(resolve "$p")
  fi
  list+="$a: $(echo $r)"$'\n'
done
stamp=$( (cat "$0"; cat "$guest/stamp"; echo "$list") | sha256sum | cut -c1-16)
if [ -f "$out/stamp" ] && [ "$(cat "$out/stamp")" = "$stamp" ] && [ -f "$out/apps.ext4" ]; then
  echo "$out"
  exit 0
fi
echo "build-apps-disk: building the apps disk in $out" >&2

work=$(mktemp -d "${TMPDIR:-/tmp}/cloudlet-apps.XXXXXX")
trap 'rm -rf "$work"' EXIT
d="$work/disk"
for a in $apps; do
  mkdir -p "$d/$a/debs"
  # shellcheck disable=SC2046
  (cd "$d/$a/debs" && apt-get download -q -o APT::Sandbox::User=root $(echo "$list" | sed -n "s/^$a: //p") >/dev/null)
done

# Shared by every install.sh: install the .debs without starting their services, wait for a port.
cat > "$d/lib.sh" <<'EOF'
# Sourced by the apps' install.sh (bash).
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

# install_debs DIR: dpkg -i DIR/*.deb; services stay stopped (policy-rc.d) until configured.
install_debs() {
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
  chmod 755 /usr/sbin/policy-rc.d
  local log=/var/log/cloudlet-app-install.log st=0
  dpkg -i "$1"/*.deb >"$log" 2>&1 || st=$?
  rm -f /usr/sbin/policy-rc.d
  if [ $st -ne 0 ]; then
    tail -n 20 "$log"
    echo "install: dpkg -i failed (exit $st), log in $log" >&2
    return 1
  fi
}

# wait_port NAME PORT: until something accepts connections on PORT, at most 120 s.
wait_port() {
  local i
  for i in $(seq 1200); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$2") 2>/dev/null; then
      echo "$1: answering on port $2"
      return 0
    fi
    sleep 0.1
  done
  echo "$1: nothing answers on port $2 after 120 s" >&2
  return 1
}

# python_service NAME PORT SCRIPT: runs SCRIPT with python3 as cloudlet-NAME.service.
python_service() {
  cat > "/etc/systemd/system/cloudlet-$1.service" <<UNIT
[Unit]
Description=cloudlet app $1 on port $2
After=network.target

[Service]
ExecStart=/usr/bin/python3 $3
Restart=on-failure

[Install]
WantedBy=multi-user.target
UNIT
  systemctl daemon-reload
  systemctl enable --now "cloudlet-$1.service" >/dev/null 2>&1
}
EOF

# numpy: python3-numpy + python3-pil behind http.server, port 8081.
cat > "$d/numpy/app.py" <<'EOF'
"""GET / computes a Mandelbrot set with numpy, renders it with PIL as a PNG, says what it got."""
import hashlib
import http.server
import io

import numpy as np
from PIL import Image


def render():
    y, x = np.mgrid[-1.5:1.5:256j, -2.0:1.0:256j]
    c = x + 1j * y
    z = np.zeros_like(c)
    n = np.zeros(c.shape, dtype=np.int64)
    for _ in range(64):
        inside = np.abs(z) <= 2.0
        z[inside] = z[inside] * z[inside] + c[inside]
        n[inside] += 1
    png = io.BytesIO()
    Image.fromarray((n * 4 - 1).clip(0, 255).astype(np.uint8), mode="L").save(png, format="PNG")
    data = png.getvalue()
    return (f"numpy-pil: mandelbrot 256x256 64 iterations sum={int(n.sum())} "
            f"png={len(data)} sha256={hashlib.sha256(data).hexdigest()[:16]}\n")


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = render().encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


http.server.ThreadingHTTPServer(("", 8081), Handler).serve_forever()
EOF
cat > "$d/numpy/install.sh" <<'EOF'
#!/bin/bash
# numpy app: python3-numpy + python3-pil; GET / on port 8081 answers
# "numpy-pil: mandelbrot 256x256 64 iterations sum=... png=... sha256=...".
here=$(cd "$(dirname "$0")" && pwd)
. "$here/../lib.sh"
install_debs "$here/debs"
mkdir -p /opt/cloudlet-apps/numpy
cp "$here/app.py" /opt/cloudlet-apps/numpy/app.py
python_service numpy 8081 /opt/cloudlet-apps/numpy/app.py
wait_port numpy 8081
EOF

# nginx: static content, port 8082.
cat > "$d/nginx/site.conf" <<'EOF'
server {
    listen 8082 default_server;
    root /var/www/cloudlet;
    index index.html;
}
EOF
cat > "$d/nginx/install.sh" <<'EOF'
#!/bin/bash
# nginx app: static content; GET / on port 8082 answers "hello from nginx on the cloudlet guest".
here=$(cd "$(dirname "$0")" && pwd)
. "$here/../lib.sh"
install_debs "$here/debs"
rm -f /etc/nginx/sites-enabled/default
cp "$here/site.conf" /etc/nginx/sites-enabled/cloudlet
mkdir -p /var/www/cloudlet
echo "hello from nginx on the cloudlet guest" > /var/www/cloudlet/index.html
systemctl enable nginx.service >/dev/null 2>&1
systemctl restart nginx.service
wait_port nginx 8082
EOF

# redis: redis-server, and an HTTP front in python3-redis, port 8083.
cat > "$d/redis/front.py" <<'EOF'
"""GET / sets a key in redis, increments a counter, and answers with what redis holds."""
import http.server

import redis

db = redis.Redis(host="127.0.0.1", port=6379, decode_responses=True)


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        db.set("cloudlet", "stored in redis")
        hits = db.incr("hits")
        body = f"redis: cloudlet={db.get('cloudlet')} hits={hits}\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


http.server.ThreadingHTTPServer(("", 8083), Handler).serve_forever()
EOF
cat > "$d/redis/install.sh" <<'EOF'
#!/bin/bash
# redis app: redis-server and a python3-redis HTTP front; GET / on port 8083 answers
# "redis: cloudlet=stored in redis hits=N".
here=$(cd "$(dirname "$0")" && pwd)
. "$here/../lib.sh"
install_debs "$here/debs"
systemctl enable redis-server.service >/dev/null 2>&1
systemctl restart redis-server.service
wait_port redis-server 6379
mkdir -p /opt/cloudlet-apps/redis
cp "$here/front.py" /opt/cloudlet-apps/redis/front.py
python_service redis-front 8083 /opt/cloudlet-apps/redis/front.py
wait_port redis 8083
EOF
chmod 755 "$d"/*/install.sh
echo "$list" > "$work/packages"

mb=$(du -sm "$d" | cut -f1)
mkfs.ext4 -q -F -L cloudlet-apps -m 0 -E lazy_itable_init=0,lazy_journal_init=0 \
  -d "$d" "$work/apps.ext4" $((mb + 64))M >/dev/null
mv "$work/apps.ext4" "$out/apps.ext4"
mv "$work/packages" "$out/packages"
echo "$stamp" > "$out/stamp"
echo "$out"
