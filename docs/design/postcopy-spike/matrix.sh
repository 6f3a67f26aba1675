#!/bin/bash
# SPIKE: the measured matrix (method x link rate), JSON lines into results.jsonl
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=${OUT:-$HERE/results.jsonl}
for rate in ${RATES:-100mbit 10mbit}; do
  "$HERE/rate.sh" "$rate"
  for method in ${METHODS:-cold lazy lazy+touch cold lazy}; do
    extra=""; [ "${method#*+}" = touch ] && extra=--touch
    line=$(timeout 500 "$HERE/run_one.sh" "${method%+*}" --compress $extra 2>&1 | grep '^{')
    echo "{\"rate\": \"$rate\", ${line#\{}" | tee -a "$OUT"
  done
done
