import os

from tally_client import Account, Client, Transfer

# The nodes of `tally dev` and its CA, unless TALLY_NODES and TALLY_CA say otherwise.
nodes = os.environ.get("TALLY_NODES", "127.0.0.1:7101,127.0.0.1:7102,127.0.0.1:7103").split(",")
with Client(nodes, ca=os.environ.get("TALLY_CA", "tally-dev/certs/ca.pem")) as client:
    results = client.create_accounts([Account(id=1, ledger=1, code=1), Account(id=2, ledger=1, code=1)])
    print("accounts:", " ".join(r.status.name for r in results))
    payment = Transfer(id=1, debit_account_id=1, credit_account_id=2, amount=100, ledger=1, code=1)
    # Safe to send again after a timeout: the same id answers EXISTS and moves nothing twice.
    print("payment:", client.create_transfers([payment])[0].status.name)
    for account in client.lookup_accounts([1, 2]):
        print("account %d: debits %d, credits %d" % (account.id, account.debits_posted, account.credits_posted))
