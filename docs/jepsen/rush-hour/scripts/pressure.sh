#!/bin/bash
# Usage: pressure.sh > OUT_FILE   (beside a chaos run, for cpu.py)
# Every 250 ms: unix time, then the host's pressure-stall totals (/proc/pressure, microseconds):
# IO "some", IO "full", CPU "some" (time at least one runnable task waited for a CPU).
while true; do
  io=$(</proc/pressure/io); cpu=$(</proc/pressure/cpu)
  ios=${io#*total=}; ios=${ios%%$'\n'*}; iof=${io##*total=}
  cpus=${cpu#*total=}; cpus=${cpus%%$'\n'*}
  echo "$EPOCHREALTIME $ios $iof $cpus"
  sleep 0.25
done
