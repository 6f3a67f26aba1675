#!/bin/bash
# SPIKE: two "edge hosts" (pods on their own podman networks) and a tbf-shaped link
# namespace, all named qmig-spike-*.  Usage: setup.sh RATE (e.g. 100mbit, 10mbit)
set -euo pipefail
RATE=${1:-100mbit}
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p /run/qmig-spike/ctl /etc/containers/containers.conf.d
# CRIU's page server (lazy dump) sizes a tee pipe to PIPE_MAX_SIZE pages (~3.3 MB) and ignores the
# failure; without CAP_SYS_RESOURCE (missing here) that needs fs.pipe-max-size >= 4 MiB, else
# every page request dies with "page-pipe: splice: -1: Bad file descriptor".
cat /proc/sys/fs/pipe-max-size > /run/qmig-spike/pipe-max-size.orig
sysctl -qw fs.pipe-max-size=4194304
cat > /etc/containers/containers.conf.d/zz-qmig-spike-runtime.conf <<CONF
# qmig-spike (temporary; removed by teardown.sh): runc behind a lazy-pages wrapper
[engine.runtimes]
qmig-spike-runc = ["$HERE/runc-lazy"]
CONF
for h in a b; do
  n=$([ $h = a ] && echo 201 || echo 202)
  podman network exists qmig-spike-$h || podman network create --subnet 198.18.$n.0/24 \
      --gateway 198.18.$n.1 --disable-dns qmig-spike-$h >/dev/null
  podman pod exists qmig-spike-p$h || podman pod create --name qmig-spike-p$h \
      --network qmig-spike-$h --ip 198.18.$n.2 >/dev/null
  podman pod start qmig-spike-p$h >/dev/null
done
# The link: two namespaces of our own joined by a veth pair, shaped both ways.  The source
# side (qmig-spike-src) is where the checkpoint command runs, so CRIU's page server (which
# binds 0.0.0.0:PORT in the netns of whoever runs runc) only sees the link; the destination
# side (qmig-spike-link) is where the transfer receiver and `criu lazy-pages` run.  No veth
# end lives in the machine's own netns (others' `qmig lab down` deletes qmig* links there).
for ns in qmig-spike-src qmig-spike-link; do
  ip netns list | grep -qw $ns || ip netns add $ns
  ip -n $ns link set lo up
done
ip -n qmig-spike-src link show qmig-spk0 >/dev/null 2>&1 || {
  ip -n qmig-spike-src link add qmig-spk0 type veth peer name qmig-spk1 netns qmig-spike-link
  ip -n qmig-spike-src addr add 198.18.250.1/30 dev qmig-spk0
  ip -n qmig-spike-src link set qmig-spk0 up
  ip -n qmig-spike-link addr add 198.18.250.2/30 dev qmig-spk1
  ip -n qmig-spike-link link set qmig-spk1 up
}
"$HERE/rate.sh" "$RATE"
echo "setup done (link $RATE)"
