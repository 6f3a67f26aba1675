#!/bin/bash
# SPIKE: remove everything setup.sh and the runs created
for c in $(podman ps -a --format '{{.Names}}' | grep '^qmig-spike-'); do podman rm -f "$c" >/dev/null; done
for p in qmig-spike-pa qmig-spike-pb; do podman pod exists $p && podman pod rm -f $p >/dev/null; done
for n in qmig-spike-a qmig-spike-b; do podman network exists $n && podman network rm -f $n >/dev/null; done
for ns in qmig-spike-src qmig-spike-link; do ip netns list | grep -qw $ns && ip netns del $ns; done
rm -f /etc/containers/containers.conf.d/zz-qmig-spike-runtime.conf
[ -f /run/qmig-spike/pipe-max-size.orig ] && sysctl -qw fs.pipe-max-size="$(cat /run/qmig-spike/pipe-max-size.orig)"
rm -rf /run/qmig-spike /tmp/qmig-spike
echo "teardown done"
