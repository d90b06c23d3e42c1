#!/usr/bin/env python3
"""After each change of leader in a tally-jepsen run (--sample-metrics-ms): its first sampled
replication lag to each follower (entries), and how long until the best follower's lag was <= 2
(openraft's search for where each follower's log matches; docs/results/chaos.md, 2026-12-07 night).

Usage: matching.py RUN_DIR...
"""
import collections, sys
for run in sys.argv[1:]:
    s = collections.defaultdict(lambda: collections.defaultdict(dict))
    for line in open(f"{run}/nodes/metrics.tsv"):
        t, n, name, v = line.rstrip("\n").split("\t")
        s[float(t)][int(n)][name] = float(v)
    times = sorted(s)
    leader, since, first = None, None, None
    out = []
    for t in times:
        lead = [n for n, m in s[t].items() if m.get("tally_raft_is_leader") == 1]
        if lead and lead[0] != leader:
            leader, since, first = lead[0], t, None
            continue
        if leader is None or since is None:
            continue
        m = s[t].get(leader, {})
        lags = {k.split('"')[1]: int(v) for k, v in m.items() if k.startswith("tally_raft_replication_lag") and k.split('"')[1] != str(leader)}
        if first is None and lags:
            first = lags
        if lags and min(lags.values()) <= 2:
            out.append((since, leader, first, t - since))
            since = None
    print(run)
    for since, leader, first, took in out:
        print(f"  {since:7.2f} node {leader}: first lags {first}  best follower matched within {took:.2f} s")
