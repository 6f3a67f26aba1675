#!/usr/bin/env bash
# Prepare this host for the live-migration lab (idempotent, as root): Podman with runc, the
# container network plugins, nftables/iptables, debootstrap (for the broker image), and CRIU >= 4.2.
# Why CRIU is built here: Debian 12's CRIU 3.17 fails `criu check` on recent kernels and 4.1.x
# cannot dump inet sockets on kernels >= 6.16, so CRIU is built from Debian sid's source package
# (a deb-src entry only: no sid binary package is ever installed) and cached by version
# in /var/cache/qmig/criu-<version>/criu.
# Where containers cannot work (not root, no namespaces), the reason goes to
# /run/qmig/containers-unavailable and the script exits 0, so the demo and tests can fall back.
set -euo pipefail
shopt -s inherit_errexit  # fail inside $(...) too (build_criu runs in one)

# containernetworking-plugins: Debian's podman 4.3 needs a "container-network-stack"; without
# recommends apt picks the CNI plugins (not netavark). Named here so the choice is fixed.
PACKAGES="podman runc catatonit containernetworking-plugins nftables iptables debootstrap"
CRIU_BUILD_PACKAGES="build-essential libbsd-dev libcap-dev libgnutls28-dev libnet1-dev
    libnftables-dev libnl-3-dev libprotobuf-c-dev libprotobuf-dev pkgconf protobuf-c-compiler
    protobuf-compiler python3-protobuf uuid-dev xz-utils"
CRIU_MIN="4.2"
CRIU_DEST=/usr/local/sbin/criu
CACHE_DIR=/var/cache/qmig
STATE_DIR=/run/qmig
UNAVAILABLE="$STATE_DIR/containers-unavailable"
CONF_DROPIN=/etc/containers/containers.conf.d/qmig.conf
SID_SOURCES=/etc/apt/sources.list.d/qmig-sid-src.sources
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg

log() { echo "setup-containers: $*"; }
fail() { echo "setup-containers: ERROR: $*" >&2; exit 1; }

unavailable() {  # containers cannot work here: say why once, leave the reason, succeed
    { mkdir -p "$STATE_DIR" && echo "$1" >"$UNAVAILABLE"; } 2>/dev/null || true
    log "containers unavailable: $1"
    exit 0
}

is_installed() {
    [[ "$(dpkg -s "$1" 2>/dev/null)" == *"Status: install ok installed"* ]]
}

APT_UPDATED=0
apt_install() {  # install the named packages that are missing; update the lists once per run
    local missing=() pkg
    for pkg in "$@"; do
        is_installed "$pkg" || missing+=("$pkg")
    done
    [ "${#missing[@]}" -gt 0 ] || return 0
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    if [ "$APT_UPDATED" -eq 0 ]; then
        apt-get update -qq || fail "apt-get update failed; check the apt sources and network"
        APT_UPDATED=1
    fi
    local out
    out="$(apt-get install -y -qq --no-install-recommends "${missing[@]}" 2>&1)" \
        || fail "apt-get install ${missing[*]} failed: $(tail -n 1 <<<"$out")"
}

# --- can this host run containers at all? -----------------------------------------------------
if [ "$(id -u)" -ne 0 ]; then
    # Checkpoint/restore needs root Podman; a user cannot fix that here, so nothing to install.
    unavailable "not root (the lab needs root Podman; as root run: bash scripts/setup-containers.sh)"
fi
command -v dpkg >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 \
    || unavailable "not a Debian system (no dpkg/apt-get)"
unshare --pid --net --mount --ipc --uts --fork true >/dev/null 2>&1 \
    || unavailable "the kernel refuses new namespaces (unshare --pid --net --mount failed)"
[ -d /sys/fs/cgroup ] && [ -n "$(ls -A /sys/fs/cgroup 2>/dev/null)" ] \
    || unavailable "no cgroup filesystem at /sys/fs/cgroup"

# --- packages -----------------------------------------------------------------------------------
apt_install $PACKAGES

# --- Podman configuration (podman 4.3 merges containers.conf.d drop-ins over containers.conf) ---
# runc, not crun: cgroups may be hybrid here and crun refuses that. The hard nofile limit may be
# below Podman's default ulimits, which then fail with setrlimit EPERM.
conf_text='# qmig: written by scripts/setup-containers.sh
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=4096:4096"]

[engine]
runtime = "runc"'
if [ "$(cat "$CONF_DROPIN" 2>/dev/null)" != "$conf_text" ]; then
    mkdir -p "$(dirname "$CONF_DROPIN")"
    printf '%s\n' "$conf_text" >"$CONF_DROPIN"
    log "wrote $CONF_DROPIN (runtime runc, default ulimits)"
fi
runtime="$(podman info --format '{{.Host.OCIRuntime.Name}}' 2>/dev/null)" \
    || fail "podman info failed: $(podman info 2>&1 >/dev/null | tail -n 1)"
[ "$runtime" = runc ] || fail "podman uses OCI runtime '$runtime', not runc (see $CONF_DROPIN)"

# --- CRIU >= 4.2 ------------------------------------------------------------------------------
version_of() {  # "Version: 4.2.1" -> 4.2.1; empty when the binary does not run
    "$1" --version 2>/dev/null | sed -n 's/^Version: *//p' | head -n 1
}

criu_usable() {  # $1 is a criu binary that is new enough and whose check passes
    local v
    v="$(version_of "$1")"
    [ -n "$v" ] && dpkg --compare-versions "$v" ge "$CRIU_MIN" || return 1
    "$1" check 2>&1 | grep -q "Looks good"
}

mirror_uri() {  # the Debian archive the system's own apt sources name (never hard-coded)
    local uri=""
    if [ -f /etc/apt/sources.list.d/debian.sources ]; then
        uri="$(awk 'tolower($1) == "uris:" { for (i = 2; i <= NF; i++) print $i }' \
            /etc/apt/sources.list.d/debian.sources | grep -v -- '-security' | head -n 1)"
    fi
    if [ -z "$uri" ] && [ -f /etc/apt/sources.list ]; then
        uri="$(awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i !~ /^\[/ && $i !~ /\]$/) { print $i; break } }' \
            /etc/apt/sources.list | grep -v -- '-security' | head -n 1)"
    fi
    [ -n "$uri" ] || fail "no Debian mirror URI in /etc/apt/sources.list.d/debian.sources or /etc/apt/sources.list"
    echo "${uri%/}"
}

newest_cached_criu() {  # the cached build with the highest version, if any
    local best="" bestv="" f v
    for f in "$CACHE_DIR"/criu-*/criu; do
        [ -x "$f" ] || continue
        v="${f#"$CACHE_DIR"/criu-}"
        v="${v%/criu}"
        if [ -z "$bestv" ] || dpkg --compare-versions "$v" gt "$bestv"; then
            best="$f"
            bestv="$v"
        fi
    done
    echo "$best"
}

build_criu() {  # fetch sid's criu source (newest >= CRIU_MIN), build, cache; prints the binary
    local uri sources version work orig want have
    uri="$(mirror_uri)"
    sources="# qmig: Debian sid source packages only (CRIU >= $CRIU_MIN is built from source).
Types: deb-src
URIs: $uri
Suites: sid
Components: main"
    [ -f "$KEYRING" ] && sources="$sources
Signed-By: $KEYRING"
    if [ "$(cat "$SID_SOURCES" 2>/dev/null)" != "$sources" ]; then
        printf '%s\n' "$sources" >"$SID_SOURCES"
        log "added sid deb-src entry $SID_SOURCES" >&2
    fi
    apt-get update -qq >&2 || fail "apt-get update failed; check the apt sources and network"
    APT_UPDATED=1
    version="$(apt-cache showsrc criu 2>/dev/null | sed -n 's/^Version: *//p' \
        | sort -V -r | head -n 1)"
    [ -n "$version" ] || fail "no criu source package in the apt lists (sid deb-src in $SID_SOURCES)"
    dpkg --compare-versions "$version" ge "$CRIU_MIN" \
        || fail "newest criu source offered is $version, older than $CRIU_MIN"
    apt_install $CRIU_BUILD_PACKAGES >&2

    work="$(mktemp -d /var/tmp/qmig-criu.XXXXXX)"
    trap 'rm -rf "$work"' EXIT
    chown _apt "$work" 2>/dev/null || true  # lets apt download unsandboxed-warning free
    log "building criu $version from source (about 30 s)" >&2
    # The debian tarball may be missing from the mirror: only the .dsc and orig tarball matter.
    (cd "$work" && apt-get source --download-only -qq "criu=$version" >/dev/null 2>&1) || true
    orig="$(ls "$work"/criu_*.orig.tar.* 2>/dev/null | head -n 1)"
    [ -n "$orig" ] || fail "could not download the criu $version orig tarball (apt-get source)"
    # apt checks each file against the signed Sources index; check the .dsc hash too when present.
    if ls "$work"/criu_*.dsc >/dev/null 2>&1; then
        want="$(awk -v f="$(basename "$orig")" '$3 == f && length($1) == 64 { print $1 }' \
            "$work"/criu_*.dsc | head -n 1)"
        have="$(sha256sum "$orig" | cut -d' ' -f1)"
        [ -z "$want" ] || [ "$want" = "$have" ] || fail "sha256 mismatch for $(basename "$orig")"
    fi
    mkdir "$work/src"
    tar -C "$work/src" --strip-components=1 -xf "$orig" || fail "could not unpack $orig"
    make -C "$work/src" -j"$(nproc)" criu >"$work/build.log" 2>&1 \
        || fail "criu build failed: $(tail -n 1 "$work/build.log")"
    local upstream="${version%-*}"
    upstream="${upstream#*:}"
    mkdir -p "$CACHE_DIR/criu-$upstream"
    install -m 0755 "$work/src/criu/criu" "$CACHE_DIR/criu-$upstream/criu"
    rm -rf "$work"
    trap - EXIT
    echo "$CACHE_DIR/criu-$upstream/criu"
}

# QMIG_CRIU_REBUILD=1 builds again from the newest source (e.g. after a kernel update broke it).
rebuild="${QMIG_CRIU_REBUILD:-0}"
if [ "$rebuild" != 1 ] && criu_path="$(command -v criu)" && criu_usable "$criu_path"; then
    :  # already good (ours from an earlier run, or a packaged one)
else
    bin=""
    [ "$rebuild" = 1 ] || bin="$(newest_cached_criu)"
    if [ -z "$bin" ] || ! criu_usable "$bin"; then
        bin="$(build_criu)"
    fi
    install -m 0755 "$bin" "$CRIU_DEST"
    hash -r
    log "installed criu $(version_of "$CRIU_DEST") as $CRIU_DEST"
    criu_path="$(command -v criu || true)"
    [ "$criu_path" = "$CRIU_DEST" ] \
        || fail "criu on PATH is '$criu_path', not $CRIU_DEST; put /usr/local/sbin first in PATH"
    check_out="$("$CRIU_DEST" check 2>&1 || true)"
    grep -q "Looks good" <<<"$check_out" \
        || fail "criu check failed: $(grep -m 1 -E 'Error|error' <<<"$check_out" || tail -n 1 <<<"$check_out")"
fi

# --- what CRIU can do on this kernel (the lab reads $STATE_DIR/criu-features) -----------------
feature() { criu check --feature "$1" >/dev/null 2>&1 && echo yes || echo no; }
dirty="$(feature mem_dirty_track)"
uffd=no
[ "$(feature uffd)" = yes ] && [ "$(feature uffd-noncoop)" = yes ] && uffd=yes
if [ "$dirty" = yes ]; then
    log "memory dirty tracking: available (pre-copy checkpoints possible)"
else
    log "memory dirty tracking: not available (pre-copy impossible: no --pre-checkpoint)"
fi
if [ "$uffd" = yes ]; then
    log "uffd (lazy pages): available (post-copy through the qmig-runc runtime wrapper)"
else
    log "uffd (lazy pages): not available (no post-copy)"
fi
# --- post-copy: the qmig-runc runtime wrapper and the pipe size CRIU's page server needs ------
# The wrapper is runc unless a one-shot control file asks for a lazy restore (see its header).
# Registered as a named runtime; the lab creates the broker with it when it is there.
RUNTIME_SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/migration/lab/qmig-runc"
RUNTIME_DEST=/usr/local/libexec/qmig/qmig-runc
RUNTIME_DROPIN=/etc/containers/containers.conf.d/qmig-runtime.conf
if ! cmp -s "$RUNTIME_SRC" "$RUNTIME_DEST"; then
    install -D -m 0755 "$RUNTIME_SRC" "$RUNTIME_DEST"
    log "installed the runtime wrapper $RUNTIME_DEST"
fi
runtime_text="# qmig: written by scripts/setup-containers.sh (post-copy runtime wrapper)
[engine.runtimes]
qmig-runc = [\"$RUNTIME_DEST\"]"
if [ "$(cat "$RUNTIME_DROPIN" 2>/dev/null)" != "$runtime_text" ]; then
    printf '%s\n' "$runtime_text" >"$RUNTIME_DROPIN"
    log "wrote $RUNTIME_DROPIN (named runtime qmig-runc)"
fi
# CRIU sizes its page-server pipes to ~3.3 MB and ignores the failure under the default 1 MiB
# limit (without CAP_SYS_RESOURCE every lazy page request then fails): 4 MiB, kept across boots.
SYSCTL_CONF=/etc/sysctl.d/90-qmig-postcopy.conf
sysctl_text="# qmig: CRIU lazy-pages page server pipes (scripts/setup-containers.sh)
fs.pipe-max-size = 4194304"
if [ "$(cat "$SYSCTL_CONF" 2>/dev/null)" != "$sysctl_text" ]; then
    printf '%s\n' "$sysctl_text" >"$SYSCTL_CONF"
    log "wrote $SYSCTL_CONF"
fi
if [ "$(sysctl -n fs.pipe-max-size)" -lt 4194304 ]; then
    sysctl -q -w fs.pipe-max-size=4194304 || log "could not raise fs.pipe-max-size (no post-copy)"
fi

mkdir -p "$STATE_DIR"
printf 'criu_version=%s\nmem_dirty_track=%s\nuffd=%s\n' \
    "$(version_of "$(command -v criu)")" "$dirty" "$uffd" >"$STATE_DIR/criu-features"
rm -f "$UNAVAILABLE"
