#!/bin/bash
# SPIKE: shape the link both ways with tbf
set -eu
RATE=$1
ip netns exec qmig-spike-src tc qdisc replace dev qmig-spk0 root tbf rate "$RATE" burst 32kbit latency 50ms
ip netns exec qmig-spike-link tc qdisc replace dev qmig-spk1 root tbf rate "$RATE" burst 32kbit latency 50ms
