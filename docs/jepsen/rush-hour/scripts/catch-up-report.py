#!/usr/bin/env python3
"""For each TAG of catch-up.sh: the load's latency line and the slowest second of commits (the
highest committed index any node reports) in the 12 s after node 2 was killed."""
import re
import sys

for tag in sys.argv[1:]:
    events = {}
    for line in open(f"/tmp/exp-{tag}/events.txt"):
        at, what = line.split(None, 1)
        events[what.strip()] = float(at)
    rows = []
    for line in open(f"/tmp/exp-{tag}/poll.txt"):
        at = float(line.split()[0])
        rows.append((at, max([int(c) for c in re.findall(r"comm=(\d+)", line)], default=0)))
    kill = events["KILL 2"]
    slowest = float("inf")
    for i, (at, committed) in enumerate(rows):
        if kill <= at <= kill + 12:
            later = next((row for row in rows[i:] if row[0] >= at + 1.0), None)
            if later:
                slowest = min(slowest, (later[1] - committed) / (later[0] - at))
    latency = next((l for l in open(f"/tmp/exp-{tag}/load.txt") if "transfers (latency" in l), "").strip()
    print(f"{tag}: slowest second of commits after the kill: {slowest:.0f} entries/s | {latency}")
