#!/usr/bin/env python3
"""Samples the CPU time of the chaos run's processes every second, for cpu.py.

Usage: proccpu.py OUT_FILE   (run beside tally-jepsen; stop it when the run ends)

Each line: unix time, then for every tally or tally-jepsen process NAME:PID:TICKS, NAME being
nodeN for `tally serve --id N`, TICKS its utime + stime in 1/100 s.
"""
import os, time, sys
out = open(sys.argv[1], 'w')
while True:
    parts = [f"{time.time():.2f}"]
    for pid in os.listdir('/proc'):
        if not pid.isdigit(): continue
        try:
            cmd = open(f'/proc/{pid}/cmdline','rb').read().split(b'\0')
            stat = open(f'/proc/{pid}/stat').read()
        except OSError: continue
        exe = os.path.basename(cmd[0].decode(errors='replace')) if cmd and cmd[0] else ''
        if not (exe.startswith('tally') or exe.startswith('jepsen')): continue
        name = exe
        if 'serve' in [c.decode(errors='replace') for c in cmd]:
            args=[c.decode(errors='replace') for c in cmd]
            name = 'node' + (args[args.index('--id')+1] if '--id' in args else '?')
        f = stat.rsplit(')',1)[1].split()
        parts.append(f"{name}:{pid}:{int(f[11])+int(f[12])}")
    out.write(' '.join(parts)+'\n'); out.flush()
    time.sleep(1)
