"""The conformance scenario (clients/conformance/README.md) for the Python client.

Run by clients/conformance/harness.py against a real cluster; prints the transcript that
clients/conformance/expected.txt holds, or exits non-zero saying what went wrong.
"""

import os
import shlex
import subprocess
import sys

from tally_client import (
    U128_MAX,
    Account,
    AccountFilter,
    AccountFlags,
    ChangeType,
    Client,
    CreateTransferStatus,
    QueryFilter,
    Rejected,
    Transfer,
    TransferFlags,
    Unavailable,
)

LEDGER = 700
CODE = 10
REFERENCE = (0xC0FFEE << 80) | 7
WRITES = 300
KILL_AT = 20
KILL_DONE_BY = 150
AFTER_KILL = 50


def say(line):
    print(line, flush=True)


def fail(why):
    sys.stderr.write("conformance: %s\n" % why)
    sys.exit(1)


def names(results):
    return " ".join(r.status.name for r in results)


def control(*words):
    return subprocess.Popen(shlex.split(os.environ["TALLY_CONTROL"]) + list(words), stdout=subprocess.PIPE, text=True)


def finish(process):
    out, _ = process.communicate(timeout=120)
    if process.returncode != 0:
        fail("TALLY_CONTROL %s failed (exit %d)" % (" ".join(process.args[-2:]), process.returncode))
    return out.strip()


def transfer(id, debit, credit, amount, flags=0, **fields):
    return Transfer(id=id, debit_account_id=debit, credit_account_id=credit, amount=amount, ledger=LEDGER, code=CODE, flags=flags, **fields)


def balances(client, id):
    account = client.lookup_accounts([id])[0]
    return "account %d: debits_pending=%d debits_posted=%d credits_posted=%d" % (
        id,
        account.debits_pending,
        account.debits_posted,
        account.credits_posted,
    )


def write_once(client, t):
    """Creates `t`, retrying with the same id while the outcome is unknown; OK or EXISTS is an
    acknowledgement."""
    for _ in range(10):
        try:
            status = client.create_transfers([t])[0].status
        except Unavailable as e:
            sys.stderr.write("conformance: transfer %d: outcome unknown (%s); retrying with its id\n" % (t.id, e))
            continue
        if status not in (CreateTransferStatus.OK, CreateTransferStatus.EXISTS):
            fail("transfer %d: %s" % (t.id, status.name))
        return
    fail("transfer %d: no node acknowledged it in 10 tries" % t.id)


def main():
    client = Client(
        os.environ["TALLY_NODES"].split(","),
        ca=os.environ["TALLY_CA"],
        cert=os.environ["TALLY_CERT"],
        key=os.environ["TALLY_KEY"],
        timeout_s=5.0,
    )
    accounts = [
        Account(id=1, ledger=LEDGER, code=CODE),
        Account(id=2, ledger=LEDGER, code=CODE, flags=AccountFlags.DEBITS_MUST_NOT_EXCEED_CREDITS | AccountFlags.HISTORY),
        Account(id=3, ledger=LEDGER, code=CODE),
    ]
    say("create_accounts: " + names(client.create_accounts(accounts)))
    say("create_accounts again: " + names(client.create_accounts(accounts)))

    try:
        client.create_transfers([transfer(90_000 + i, 1, 3, 1) for i in range(8190)])
        fail("a batch of 8190 transfers was accepted")
    except Rejected as e:
        say("oversized batch: rejected " + e.code.name)

    chain = [
        transfer(100, 1, 2, 500, TransferFlags.LINKED),
        transfer(101, 2, 3, 200, TransferFlags.LINKED),
        transfer(102, 2, 999, 1),
    ]
    say("linked chain: " + names(client.create_transfers(chain)))
    say("linked chain lookup: %d of 3 found" % len(client.lookup_transfers([100, 101, 102])))

    say("fund: " + names(client.create_transfers([transfer(110, 1, 2, 1000)])))
    say("pending: " + names(client.create_transfers([transfer(120, 2, 3, 300, TransferFlags.PENDING, timeout=3600)])))
    say(balances(client, 2))
    post = Transfer(id=121, pending_id=120, amount=U128_MAX, flags=TransferFlags.POST_PENDING_TRANSFER)
    status = names(client.create_transfers([post]))
    say("post all: %s amount=%d" % (status, client.lookup_transfers([121])[0].amount))
    say(balances(client, 2))
    void = Transfer(id=131, pending_id=130, flags=TransferFlags.VOID_PENDING_TRANSFER)
    say("pending then void: " + names(client.create_transfers([transfer(130, 2, 3, 100, TransferFlags.PENDING), void])))
    say(balances(client, 2))

    say("refused: " + names(client.create_transfers([transfer(140, 2, 3, 10_000)])))
    say("refused, retried with its id: " + names(client.create_transfers([transfer(140, 2, 3, 10_000)])))

    say("by reference: " + names(client.create_transfers([transfer(150, 2, 3, 25, user_data_128=REFERENCE)])))
    found = client.query_transfers(QueryFilter(user_data_128=REFERENCE, limit=10)).items
    say(
        "query_transfers by reference: %d found: "
        % len(found)
        + " ".join("id=%d amount=%d user_data_128=%d" % (x.id, x.amount, x.user_data_128) for x in found)
    )
    page = client.get_account_transfers(AccountFilter(account_id=3, limit=100))
    say("get_account_transfers of 3: " + " ".join(str(x.id) for x in page.items))
    history = client.get_account_balances(AccountFilter(account_id=2, limit=100)).items
    say(
        "get_account_balances of 2: %d entries, last debits_posted=%d credits_posted=%d"
        % (len(history), history[-1].debits_posted, history[-1].credits_posted)
    )

    # Writes, one payment per request, while the leader is killed.
    killer = None
    for i in range(WRITES):
        if i == KILL_AT:
            killer = control("kill-leader")
        if i == KILL_DONE_BY:
            killed = finish(killer)
            sys.stderr.write("conformance: killed the leader, %s, during write %d..%d\n" % (killed, KILL_AT, i))
        write_once(client, transfer(1000 + i, 1, 3, 1))
    found = client.lookup_transfers([1000 + i for i in range(WRITES)])
    say("writes across a leader kill: %d acknowledged once each, %d found" % (WRITES, len(found)))
    account_1, account_3 = client.lookup_accounts([1, 3])
    say("account 1: debits_posted=%d" % account_1.debits_posted)
    say("account 3: credits_posted=%d" % account_3.credits_posted)
    finish(control("start", killed))

    # The change stream from the start, its node killed halfway; the payments made after the kill
    # can only come from another node.
    expected = 3 + 6 + WRITES + AFTER_KILL
    changes = client.subscribe_changes(0)
    seen, last, types, ids, first_node = 0, 0, {}, set(), None
    for event in changes:
        if event.timestamp <= last:
            fail("change stream: timestamp %d after %d" % (event.timestamp, last))
        last = event.timestamp
        seen += 1
        types[event.type.name] = types.get(event.type.name, 0) + 1
        if event.transfer is not None:
            if event.transfer.id in ids:
                fail("change stream: transfer %d twice" % event.transfer.id)
            ids.add(event.transfer.id)
        if seen == expected // 2:
            first_node = changes.node
            finish(control("kill", first_node))
            for i in range(AFTER_KILL):
                write_once(client, transfer(2000 + i, 1, 3, 1))
        if seen == expected:
            break
    if changes.node == first_node:
        fail("change stream: still on %s, which was killed" % first_node)
    changes.close()
    say("change stream: %d events in order, each once, resumed on another node" % seen)
    say("change stream types: " + " ".join("%s=%d" % (name, types[name]) for name in sorted(types)))
    client.close()


if __name__ == "__main__":
    main()
