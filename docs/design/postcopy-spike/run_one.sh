#!/bin/bash
# SPIKE: start a fresh test container in pod A, migrate it to pod B (cold|lazy), check the
# result is an ordinary podman container, remove both.  Usage: run_one.sh cold|lazy [--compress]
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
IMG=${IMG:-localhost/qmig-broker:latest}
for c in qmig-spike-src qmig-spike-dst; do podman rm -f $c >/dev/null 2>&1 || true; done
python3 -c "import sys; sys.path.insert(0, \"$HERE\"); import migrate; migrate.clear_criu_lock(\"qmig-spike-pa\"); migrate.clear_criu_lock(\"qmig-spike-pb\")"
timeout 60 podman run -d --name qmig-spike-src --pod qmig-spike-pa --runtime qmig-spike-runc \
    "$IMG" python3 -u -c "$(cat "$HERE/echo_server.py")" >/dev/null
for _ in $(seq 100); do podman logs qmig-spike-src 2>/dev/null | grep -q ready && break; sleep 0.2; done
timeout 400 python3 "$HERE/migrate.py" "$@"
echo "# podman ps after:"; podman ps -a --format '{{.Names}} {{.Status}}' | grep qmig-spike-
echo "# logs of the destination:"; podman logs qmig-spike-dst | tail -2
timeout 30 podman stop -t 2 qmig-spike-dst >/dev/null && echo "# stop ok"
podman rm -f qmig-spike-src qmig-spike-dst >/dev/null && echo "# rm ok"
