"""tally-client: a Python client for tally, the replicated ledger for payment services.

    from tally_client import Client, Account, Transfer
    with Client(["127.0.0.1:7101", "127.0.0.1:7102"], ca="ca.pem") as client:
        client.create_accounts([Account(id=1, ledger=1, code=1), Account(id=2, ledger=1, code=1)])
        client.create_transfers([Transfer(id=1, debit_account_id=1, credit_account_id=2, amount=10, ledger=1, code=1)])

See README.md beside this package for the retry and failover semantics.
"""

from tally_client.client import Changes, Client, Rejected, TallyError, Unavailable
from tally_client.types import (
    U128_MAX,
    Account,
    AccountBalance,
    AccountFilter,
    AccountFilterFlags,
    AccountFlags,
    ChangeEvent,
    ChangeType,
    CreateAccountResult,
    CreateAccountStatus,
    CreateTransferResult,
    CreateTransferStatus,
    Page,
    QueryFilter,
    QueryFilterFlags,
    ReadConsistency,
    Transfer,
    TransferFlags,
)

__all__ = [
    "U128_MAX",
    "Account",
    "AccountBalance",
    "AccountFilter",
    "AccountFilterFlags",
    "AccountFlags",
    "Changes",
    "ChangeEvent",
    "ChangeType",
    "Client",
    "CreateAccountResult",
    "CreateAccountStatus",
    "CreateTransferResult",
    "CreateTransferStatus",
    "Page",
    "QueryFilter",
    "QueryFilterFlags",
    "ReadConsistency",
    "Rejected",
    "TallyError",
    "Transfer",
    "TransferFlags",
    "Unavailable",
]
