#!/usr/bin/env bash
# Install the Debian packages qmig's tests and demo need (idempotent, as root).
# Why the extra care: Debian's mosquitto package starts a system broker on port 1883, which
# would collide with qmig's own broker and tests, so it is stopped and kept from starting.
set -euo pipefail

PACKAGES="mosquitto mosquitto-clients iproute2"

log() { echo "setup-system: $*"; }
fail() { echo "setup-system: ERROR: $*" >&2; exit 1; }

is_installed() {
    [[ "$(dpkg -s "$1" 2>/dev/null)" == *"Status: install ok installed"* ]]
}

# A system Python (Debian's) needs its venv package to create .venv; pyenv/other builds do not.
python_bin="$(command -v python3.11 || command -v python3 || true)"
if [ -n "$python_bin" ] && ! "$python_bin" -c 'import ensurepip' >/dev/null 2>&1; then
    PACKAGES="$PACKAGES python3-venv"
fi

missing=()
for pkg in $PACKAGES; do
    is_installed "$pkg" || missing+=("$pkg")
done

if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        fail "missing Debian packages: ${missing[*]} (as root run: apt-get install -y ${missing[*]})"
    fi
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || fail "apt-get update failed; check the apt sources and network"
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
        || fail "apt-get install ${missing[*]} failed"
fi

# --- keep the packaged mosquitto service off port 1883 ---------------------------------------
stop_pid() {  # stop one process and wait briefly for it to go away
    local pid="$1" i
    kill "$pid" 2>/dev/null || return 0
    for i in 1 2 3 4 5 6 7 8 9 10; do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.2
    done
    kill -9 "$pid" 2>/dev/null || true
}

package_mosquitto_pids() {  # only brokers the package started, i.e. with its config file
    local pid
    for pid in $(pgrep -x mosquitto || true); do
        if tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline" \
            | grep -q -- '-c /etc/mosquitto/mosquitto.conf'; then
            echo "$pid"
        fi
    done
}

if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
    # systemd is PID 1: the package enabled and started mosquitto.service.
    if systemctl is-enabled --quiet mosquitto 2>/dev/null \
        || systemctl is-active --quiet mosquitto 2>/dev/null; then
        if [ "$(id -u)" -ne 0 ]; then
            fail "the system mosquitto service is enabled; as root run: systemctl disable --now mosquitto"
        fi
        systemctl disable --now mosquitto >/dev/null 2>&1 \
            || fail "could not stop the system mosquitto service (systemctl disable --now mosquitto)"
        log "disabled the system mosquitto service"
    fi
else
    # No systemd (containers): the postinst ran /etc/init.d/mosquitto start unless policy-rc.d
    # forbade it; that script runs /usr/sbin/mosquitto -c /etc/mosquitto/mosquitto.conf.
    pids="$(package_mosquitto_pids)"
    if [ -n "$pids" ]; then
        [ "$(id -u)" -eq 0 ] || fail "the system mosquitto is running; as root run: service mosquitto stop"
        if command -v service >/dev/null 2>&1; then
            service mosquitto stop >/dev/null 2>&1 || true
        elif [ -x /etc/init.d/mosquitto ]; then
            /etc/init.d/mosquitto stop >/dev/null 2>&1 || true
        fi
        for pid in $(package_mosquitto_pids); do stop_pid "$pid"; done
        [ -z "$(package_mosquitto_pids)" ] || fail "could not stop the system mosquitto broker"
        log "stopped the system mosquitto broker"
    fi
    # Keep sysvinit from starting it at the next boot.
    if [ "$(id -u)" -eq 0 ] && compgen -G '/etc/rc[2-5].d/S*mosquitto' >/dev/null \
        && command -v update-rc.d >/dev/null 2>&1; then
        update-rc.d mosquitto disable >/dev/null 2>&1 || true
    fi
fi
