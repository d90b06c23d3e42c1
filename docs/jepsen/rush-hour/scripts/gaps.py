#!/usr/bin/env python3
"""What each node's metrics said during the longest gaps between acknowledged writes (issue 24).

Usage: gaps.py [--checked] RUN_DIR [MIN_GAP_SECONDS] [COUNT]

RUN_DIR is a tally-jepsen output folder of a run with --load and --sample-metrics-ms. For each
of the COUNT longest gaps (at least MIN_GAP_SECONDS, default 1) between two acknowledged writes
of the background load (with --checked: of the checked clients, which send one request at a
time as payment services do, and whose gaps the summary's fault table reports), prints the faults under way, then each node's samples from two seconds
before the gap to one after: whether it led, its last log, committed and applied indexes, and
what its checkpoints, WAL fsyncs, entry commits, pace waits and applies took in the interval
(seconds added to each histogram's sum since the sample before), the events it applied, and the
CPU it used and waited for.
"""
import collections
import json
import sys

args = sys.argv[1:]
checked = "--checked" in args
args = [arg for arg in args if arg != "--checked"]
run = args[0]
min_gap = float(args[1]) if len(args) > 1 else 1.0
count = int(args[2]) if len(args) > 2 else 10

acks, faults, writes = [], [], set()
with open(f"{run}/history.jsonl") as history:
    for line in history:
        record = json.loads(line)
        kind = record.get("type")
        if kind == "load" and record["outcome"] == "ok" and not checked:
            acks.append((record["time_us"] + record["latency_us"]) / 1e6)
        elif kind == "invoke" and checked and record["process"] != 0 and record["call"]["f"] == "transfers":
            writes.add(record["op"])
        elif kind == "complete" and record["op"] in writes and record["outcome"] == "ok":
            acks.append(record["time_us"] / 1e6)
        elif kind == "nemesis":
            faults.append((record["time_us"] / 1e6, record.get("phase"), record.get("fault"), record.get("detail", "")))
acks.sort()
gaps = sorted(((b - a, a, b) for a, b in zip(acks, acks[1:]) if b - a >= min_gap), reverse=True)[:count]

# samples[node][time][series] = value
samples = collections.defaultdict(lambda: collections.defaultdict(dict))
with open(f"{run}/nodes/metrics.tsv") as tsv:
    for line in tsv:
        time, node, name, value = line.rstrip("\n").split("\t")
        samples[int(node)][float(time)][name] = float(value)

# Seconds added to each since the sample before; "kev": thousands of events applied; "cpu": CPU
# seconds the node used, "runq": seconds its threads waited for a CPU (2026-12-06 builds on).
SUMS = [("ckpt", "tally_checkpoint_seconds_sum"), ("fsync", "tally_wal_fsync_seconds_sum"),
        ("commit", "tally_entry_commit_seconds_sum"), ("pace", "tally_pace_wait_seconds_sum"),
        ("apply", "tally_apply_seconds_sum"), ("kev", "tally_applied_events_total"),
        ("cpu", "tally_process_cpu_seconds_total"), ("runq", "tally_process_run_wait_seconds_total")]
SCALE = {"tally_applied_events_total": 1e-3}

for length, start, end in sorted(gaps, key=lambda gap: gap[1]):
    print(f"\n=== {length:.2f} s without an acknowledged write, {start:.2f} -> {end:.2f} s")
    for at, phase, fault, detail in faults:
        if start - 15 <= at <= end:
            print(f"    {at:8.2f} {phase} {fault} {detail[:100]}")
    for node in sorted(samples):
        times = sorted(samples[node])
        previous = None
        print(f"  node {node}:  time   lead term  last_log committed applied  lag_ms | " + " ".join(f"{n:>6}" for n, _ in SUMS))
        for time in times:
            if start - 2 <= time <= end + 1:
                s = samples[node][time]
                sums = []
                for _, series in SUMS:
                    now, before = s.get(series), previous.get(series) if previous else None
                    scale = SCALE.get(series, 1.0)
                    sums.append(f"{(now - before) * scale:6.2f}" if now is not None and before is not None else "     -")
                print(f"        {time:8.2f} {int(s.get('tally_raft_is_leader', -1)):3d} {int(s.get('tally_raft_term', -1)):4d} "
                      f"{int(s.get('tally_raft_last_log_index', -1)):9d} {int(s.get('tally_raft_committed_index', -1)):9d} "
                      f"{int(s.get('tally_raft_applied_index', -1)):7d} {int(s.get('tally_follower_apply_lag_ms', 0)):7d} | "
                      + " ".join(sums))
            previous = samples[node][time]
