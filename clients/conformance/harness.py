#!/usr/bin/env python3
"""Runs one client's conformance scenario against a real local cluster, and checks its transcript.

    harness.py --tally target/release/tally -- python3 clients/python/tests/conformance.py

starts `tally dev` (three nodes in three sites, TLS on every connection) in a fresh directory on
free ports, makes a client certificate, runs the scenario with the cluster in its environment,
compares what it printed with `expected.txt` (the same for every client), and stops everything.

The scenario reaches the cluster through its environment:
  TALLY_NODES          the client doors, comma-separated
  TALLY_CA             the cluster's CA certificate
  TALLY_CERT, TALLY_KEY  a client certificate (tally://client/conformance) and its key
  TALLY_CONTROL        a command that changes the cluster, with one of:
                         kill-leader      SIGKILL the leader's process; prints its client door
                         kill ADDRESS     SIGKILL the node at that client door
                         start ADDRESS    start that node again; returns once it is back in the quorum
It prints its transcript on stdout (one line per checked result, nothing that varies from run to
run) and anything else on stderr. Only the Python standard library is used here, so the Rust and
TypeScript scenarios need no Python packages.
"""

import argparse
import difflib
import json
import os
import random
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
NODES = 3
START_TIMEOUT_S = 60
SCENARIO_TIMEOUT_S = 180


def ports_free(base):
    for offset in [0, 100, 200]:
        for node in range(1, NODES + 2):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", base + offset + node))
                except OSError:
                    return False
    return True


def free_base_port():
    for _ in range(200):
        base = random.randrange(20000, 60000, 10)
        if ports_free(base):
            return base
    raise SystemExit("harness: no free ports found")


def doors(base):
    return ["127.0.0.1:%d" % (base + i) for i in range(1, NODES + 1)]


def processes():
    """(pid, command-line arguments) of every other process that can be read."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open("/proc/%s/cmdline" % entry, "rb") as f:
                yield int(entry), f.read().decode(errors="replace").split("\0")
        except OSError:
            continue


def node_pids(directory, node):
    """The processes serving node `node` of the dev cluster in `directory`."""
    data_dir = os.path.join(directory, "node-%d" % node)
    return [
        pid
        for pid, args in processes()
        if "serve" in args and "--data-dir" in args and args[args.index("--data-dir") + 1] == data_dir
    ]


def dev_processes(directory):
    """Every process started for the cluster in `directory` (nodes, and `tally dev start-node`)."""
    return [pid for pid, args in processes() if any(a == directory or a.startswith(directory + "/") for a in args)]


def status(tally, directory, base):
    """`tally cluster status --json`, or None when no node answers."""
    command = [tally, "cluster", "status", "--json", "--nodes", ",".join(doors(base)), "--timeout-ms", "2000"]
    command += ["--ca", os.path.join(directory, "certs", "ca.pem")]
    command += ["--cert", os.path.join(directory, "certs", "operator-cli.pem")]
    command += ["--key", os.path.join(directory, "certs", "operator-cli.key")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    try:
        return json.loads(result.stdout)
    except ValueError:
        return None


def control(args):
    """One change to the running cluster, asked for by a scenario."""
    base, directory, tally = args.base_port, args.dir, args.tally
    if args.action == "kill-leader":
        deadline = time.monotonic() + 30
        while True:
            reply = status(tally, directory, base)
            leader = reply and reply.get("leader_id")
            if leader:
                break
            if time.monotonic() > deadline:
                raise SystemExit("control: no leader to kill within 30 s")
            time.sleep(0.1)
        kill(directory, leader)
        print(doors(base)[leader - 1])
    elif args.action == "kill":
        kill(directory, node_of(args.address, base))
    elif args.action == "start":
        node = node_of(args.address, base)
        log = open(os.path.join(directory, "node-%d.restart.log" % node), "ab")
        subprocess.Popen(
            [tally, "dev", "--dir", directory, "--base-port", str(base), "start-node", str(node)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 60
        while True:
            reply = status(tally, directory, base)
            member = [n for n in (reply or {}).get("nodes", []) if n.get("id") == node]
            if member and member[0].get("reachable") and member[0].get("redundancy") == "up_to_date":
                return
            if time.monotonic() > deadline:
                raise SystemExit("control: node %d not back within 60 s: %s" % (node, reply))
            time.sleep(0.2)
    else:
        raise SystemExit("control: unknown action %s" % args.action)


def node_of(address, base):
    node = int(address.rsplit(":", 1)[1]) - base
    if not 1 <= node <= NODES:
        raise SystemExit("control: %s is not a client door of this cluster" % address)
    return node


def kill(directory, node):
    pids = node_pids(directory, node)
    if not pids:
        raise SystemExit("control: node %d runs no process" % node)
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while any(os.path.exists("/proc/%d" % pid) and not zombie(pid) for pid in pids):
        if time.monotonic() > deadline:
            raise SystemExit("control: node %d did not die" % node)
        time.sleep(0.02)


def zombie(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def run(args):
    # Stopped (CI gave up, Ctrl-C): stop the cluster too, which runs in sessions of its own.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    tally = os.path.abspath(args.tally)
    directory = tempfile.mkdtemp(prefix="tally-conformance-")
    base = free_base_port()
    dev = None
    try:
        log = open(os.path.join(directory, "dev.log"), "wb")
        dev = subprocess.Popen(
            [tally, "dev", "--dir", directory, "--base-port", str(base)],
            stdout=subprocess.PIPE,
            stderr=log,
            start_new_session=True,
        )
        started = time.monotonic()
        while True:
            line = dev.stdout.readline().decode(errors="replace")
            if not line:
                raise SystemExit("harness: tally dev exited at start; its log: %s" % open(log.name).read())
            if line.startswith("Ctrl-C stops the cluster"):
                break
            if time.monotonic() - started > START_TIMEOUT_S:
                raise SystemExit("harness: the cluster did not start within %d s" % START_TIMEOUT_S)
        certs = os.path.join(directory, "certs")
        subprocess.run([tally, "certs", "client", "--dir", certs, "--name", "conformance"], check=True, capture_output=True)
        here = os.path.abspath(__file__)
        environment = dict(os.environ)
        environment.update(
            TALLY_NODES=",".join(doors(base)),
            TALLY_CA=os.path.join(certs, "ca.pem"),
            TALLY_CERT=os.path.join(certs, "client-conformance.pem"),
            TALLY_KEY=os.path.join(certs, "client-conformance.key"),
            TALLY_CONTROL=" ".join(
                shlex.quote(w)
                for w in [sys.executable, here, "control", "--tally", tally, "--dir", directory, "--base-port", str(base)]
            ),
        )
        print("harness: %s against %s" % (" ".join(args.scenario), environment["TALLY_NODES"]), file=sys.stderr)
        began = time.monotonic()
        try:
            result = subprocess.run(
                args.scenario, env=environment, stdout=subprocess.PIPE, timeout=SCENARIO_TIMEOUT_S
            )
        except subprocess.TimeoutExpired:
            raise SystemExit("harness: the scenario did not finish within %d s" % SCENARIO_TIMEOUT_S)
        transcript = result.stdout.decode(errors="replace").splitlines()
        with open(args.expected) as f:
            expected = f.read().splitlines()
        if result.returncode != 0 or transcript != expected:
            sys.stderr.write("\n".join(difflib.unified_diff(expected, transcript, "expected", "transcript", lineterm="")))
            sys.stderr.write("\nharness: FAILED (exit %d): %s\n" % (result.returncode, " ".join(args.scenario)))
            return 1
        print("harness: passed in %.1f s: %s" % (time.monotonic() - began, " ".join(args.scenario)), file=sys.stderr)
        return 0
    finally:
        if dev is not None and dev.poll() is None:
            dev.send_signal(signal.SIGTERM)
            try:
                dev.wait(timeout=20)
            except subprocess.TimeoutExpired:
                dev.kill()
        for pid in dev_processes(directory):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        if args.keep:
            print("harness: kept %s" % directory, file=sys.stderr)
        else:
            shutil.rmtree(directory, ignore_errors=True)


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "control":
        parser = argparse.ArgumentParser(prog="harness.py control", description="one change to a running cluster")
        parser.add_argument("--tally", required=True)
        parser.add_argument("--dir", required=True)
        parser.add_argument("--base-port", type=int, required=True)
        parser.add_argument("action", choices=["kill-leader", "kill", "start"])
        parser.add_argument("address", nargs="?")
        control(parser.parse_args(sys.argv[2:]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tally", required=True, help="the tally binary")
    parser.add_argument("--expected", default=os.path.join(HERE, "expected.txt"))
    parser.add_argument("--keep", action="store_true", help="keep the cluster's directory")
    parser.add_argument("scenario", nargs="+", help="the scenario's command, after --")
    return run(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
