#!/usr/bin/env python3
"""Where the CPU went during a chaos run's workload (issue 24).

Usage: cpu.py RUN_DIR PROC_FILE [PRESSURE_FILE]

PROC_FILE is what proccpu.py wrote beside the run, PRESSURE_FILE what pressure.sh wrote. Prints,
over the workload (the history's first 'time-limit' seconds), the cores each process used on
average and, with PRESSURE_FILE, the share of the time some task waited for a CPU and for IO.
"""
import collections
import json
import sys

run, proc_file = sys.argv[1], sys.argv[2]
pressure_file = sys.argv[3] if len(sys.argv) > 3 else None

epoch, end = None, 0.0
with open(f"{run}/history.jsonl") as history:
    for line in history:
        record = json.loads(line)
        if record.get("type") == "setup":
            epoch = record["clock"]["epoch_unix_us"] / 1e6
        elif record.get("type") == "load":
            end = max(end, record["time_us"] / 1e6)

rows = []
with open(proc_file) as samples:
    for line in samples:
        parts = line.split()
        at = float(parts[0]) - epoch
        if 0 <= at <= end:
            ticks = {}
            for part in parts[1:]:
                name, pid, value = part.rsplit(":", 2)
                ticks[(name, pid)] = int(value)
            rows.append((at, ticks))
first, last = {}, {}
for _, ticks in rows:
    for key, value in ticks.items():
        first.setdefault(key, value)
        last[key] = value
used = collections.Counter()
for key in last:
    used[key[0]] += (last[key] - first[key]) / 100
span = rows[-1][0] - rows[0][0]
print(f"workload {span:.0f} s: cores used on average")
for name, seconds in sorted(used.items()):
    print(f"  {name:16s} {seconds / span:5.2f}")
print(f"  {'all of them':16s} {sum(used.values()) / span:5.2f}")

if pressure_file:
    points = []
    with open(pressure_file) as samples:
        for line in samples:
            at, io_some, io_full, cpu_some = line.split()
            points.append((float(at) - epoch, int(io_some), int(io_full), int(cpu_some)))
    points = [point for point in points if 0 <= point[0] <= end]
    length = points[-1][0] - points[0][0]
    share = lambda i: (points[-1][i] - points[0][i]) / 1e6 / length
    print(f"some task waited for a CPU {share(3):.0%} of the time, for IO {share(1):.0%} (all for IO {share(2):.0%})")
