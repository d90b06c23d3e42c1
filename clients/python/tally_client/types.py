"""tally's messages as Python values: 128-bit ids and amounts are ints, flags and statuses enums.

The enums are read from the generated descriptor, so they always match `ledger.proto`; their
names drop the proto prefix (`CREATE_TRANSFER_STATUS_EXISTS` is `CreateTransferStatus.EXISTS`).
"""

import dataclasses
import enum
from typing import List, Optional

from tally_client._pb import ledger_pb2 as pb

U128_MAX = (1 << 128) - 1
"""2^128-1: for a post of a pending transfer, "all of it"."""


def _enum(kind, proto_name, prefix, base=enum.IntEnum):
    values = pb.DESCRIPTOR.enum_types_by_name[proto_name].values
    return base(kind, {v.name[len(prefix):]: v.number for v in values})


AccountFlags = _enum("AccountFlags", "AccountFlag", "ACCOUNT_FLAG_", enum.IntFlag)
TransferFlags = _enum("TransferFlags", "TransferFlag", "TRANSFER_FLAG_", enum.IntFlag)
AccountFilterFlags = _enum("AccountFilterFlags", "AccountFilterFlag", "ACCOUNT_FILTER_FLAG_", enum.IntFlag)
QueryFilterFlags = _enum("QueryFilterFlags", "QueryFilterFlag", "QUERY_FILTER_FLAG_", enum.IntFlag)
CreateAccountStatus = _enum("CreateAccountStatus", "CreateAccountStatus", "CREATE_ACCOUNT_STATUS_")
CreateTransferStatus = _enum("CreateTransferStatus", "CreateTransferStatus", "CREATE_TRANSFER_STATUS_")
ReadConsistency = _enum("ReadConsistency", "ReadConsistency", "READ_CONSISTENCY_")
ChangeType = _enum("ChangeType", "ChangeType", "CHANGE_TYPE_")


@dataclasses.dataclass
class Account:
    """An account. To create one, set id, ledger, code, flags and any user data."""

    id: int = 0
    debits_pending: int = 0
    debits_posted: int = 0
    credits_pending: int = 0
    credits_posted: int = 0
    user_data_128: int = 0
    user_data_64: int = 0
    user_data_32: int = 0
    ledger: int = 0
    code: int = 0
    flags: int = 0
    timestamp: int = 0


@dataclasses.dataclass
class Transfer:
    """A transfer of `amount` from `debit_account_id` to `credit_account_id`; `id` is the
    idempotency key."""

    id: int = 0
    debit_account_id: int = 0
    credit_account_id: int = 0
    amount: int = 0
    pending_id: int = 0
    user_data_128: int = 0
    user_data_64: int = 0
    user_data_32: int = 0
    timeout: int = 0
    ledger: int = 0
    code: int = 0
    flags: int = 0
    timestamp: int = 0


@dataclasses.dataclass
class CreateAccountResult:
    status: CreateAccountStatus
    timestamp: int = 0


@dataclasses.dataclass
class CreateTransferResult:
    status: CreateTransferStatus
    timestamp: int = 0


@dataclasses.dataclass
class AccountBalance:
    debits_pending: int = 0
    debits_posted: int = 0
    credits_pending: int = 0
    credits_posted: int = 0
    timestamp: int = 0


@dataclasses.dataclass
class AccountFilter:
    """One account's transfers or balances (see `AccountFilter` in ledger.proto)."""

    account_id: int = 0
    timestamp_min: int = 0
    timestamp_max: int = 0
    limit: int = 8189
    flags: int = AccountFilterFlags.DEBITS | AccountFilterFlags.CREDITS
    consistency: ReadConsistency = ReadConsistency.LINEARIZABLE
    user_data_128: int = 0
    user_data_64: int = 0
    user_data_32: int = 0
    code: int = 0


@dataclasses.dataclass
class QueryFilter:
    """Accounts or transfers selected by their fields: every non-zero field must match."""

    user_data_128: int = 0
    user_data_64: int = 0
    user_data_32: int = 0
    ledger: int = 0
    code: int = 0
    timestamp_min: int = 0
    timestamp_max: int = 0
    limit: int = 8189
    flags: int = 0
    consistency: ReadConsistency = ReadConsistency.LINEARIZABLE


@dataclasses.dataclass
class Page:
    """Results of a query. A non-zero `resume_timestamp` means the query's scan budget ran out
    before `limit` results: ask again with timestamp_min (REVERSED: timestamp_max) set to it."""

    items: list
    resume_timestamp: int = 0


@dataclasses.dataclass
class ChangeEvent:
    """One applied event of the change stream (see `ChangeEvent` in ledger.proto)."""

    timestamp: int
    type: ChangeType
    transfer: Optional[Transfer] = None
    debit_account: Optional[Account] = None
    credit_account: Optional[Account] = None
    account: Optional[Account] = None


def _u128_to_pb(value: int, name: str) -> pb.U128:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError("%s must be an int, not %s" % (name, type(value).__name__))
    if value < 0 or value > U128_MAX:
        raise ValueError("%s must be between 0 and 2^128-1, not %d" % (name, value))
    return pb.U128(lo=value & 0xFFFFFFFFFFFFFFFF, hi=value >> 64)


def _u128_from_pb(message: pb.U128) -> int:
    return message.hi << 64 | message.lo


def to_pb(value, message_class):
    """A dataclass as the generated message of the same field names."""
    message = message_class()
    for field in message_class.DESCRIPTOR.fields:
        item = getattr(value, field.name)
        if field.message_type is not None and field.message_type.name == "U128":
            checked = _u128_to_pb(item, field.name)
            if item != 0:  # an absent U128 is zero: nothing on the wire
                getattr(message, field.name).CopyFrom(checked)
        else:
            bits = 64 if field.type in (field.TYPE_UINT64, field.TYPE_FIXED64) else 32
            if field.enum_type is None and (item < 0 or item >= 1 << bits):
                raise ValueError("%s must be between 0 and 2^%d-1, not %d" % (field.name, bits, item))
            setattr(message, field.name, int(item))
    return message


def from_pb(message, cls):
    """A generated message as the dataclass of the same field names."""
    values = {}
    for field in message.DESCRIPTOR.fields:
        item = getattr(message, field.name)
        if field.message_type is not None and field.message_type.name == "U128":
            values[field.name] = _u128_from_pb(item)
        else:
            values[field.name] = item
    return cls(**values)


def change_from_pb(message) -> ChangeEvent:
    def optional(name, cls):
        return from_pb(getattr(message, name), cls) if message.HasField(name) else None

    return ChangeEvent(
        timestamp=message.timestamp,
        type=ChangeType(message.type),
        transfer=optional("transfer", Transfer),
        debit_account=optional("debit_account", Account),
        credit_account=optional("credit_account", Account),
        account=optional("account", Account),
    )


def ids_to_pb(ids: List[int]) -> List[pb.U128]:
    return [_u128_to_pb(i, "id") for i in ids]
