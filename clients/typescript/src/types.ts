// tally's messages as TypeScript values: 128-bit ids and amounts are bigints, fields named as in
// ledger.proto.

import {
  AccountFilterFlags,
  ChangeType,
  CreateAccountStatus,
  CreateTransferStatus,
  ReadConsistency,
} from "./generated";

/** 2^128-1: for a post of a pending transfer, "all of it". */
export const U128_MAX = (1n << 128n) - 1n;
const U64_MASK = (1n << 64n) - 1n;

/** An account. To create one, set id, ledger, code, flags and any user data. */
export interface Account {
  id: bigint;
  debits_pending: bigint;
  debits_posted: bigint;
  credits_pending: bigint;
  credits_posted: bigint;
  user_data_128: bigint;
  user_data_64: bigint;
  user_data_32: number;
  ledger: number;
  code: number;
  flags: number;
  timestamp: bigint;
}

/** A transfer of `amount` from `debit_account_id` to `credit_account_id`; `id` is the
 * idempotency key. */
export interface Transfer {
  id: bigint;
  debit_account_id: bigint;
  credit_account_id: bigint;
  amount: bigint;
  pending_id: bigint;
  user_data_128: bigint;
  user_data_64: bigint;
  user_data_32: number;
  timeout: number;
  ledger: number;
  code: number;
  flags: number;
  timestamp: bigint;
}

export interface CreateAccountResult {
  status: CreateAccountStatus;
  timestamp: bigint;
}

export interface CreateTransferResult {
  status: CreateTransferStatus;
  timestamp: bigint;
}

export interface AccountBalance {
  debits_pending: bigint;
  debits_posted: bigint;
  credits_pending: bigint;
  credits_posted: bigint;
  timestamp: bigint;
}

/** One account's transfers or balances (`AccountFilter` in ledger.proto). */
export interface AccountFilter {
  account_id: bigint;
  timestamp_min?: bigint;
  timestamp_max?: bigint;
  limit?: number;
  flags?: number;
  consistency?: ReadConsistency;
  user_data_128?: bigint;
  user_data_64?: bigint;
  user_data_32?: number;
  code?: number;
}

/** Accounts or transfers selected by their fields: every non-zero field must match. */
export interface QueryFilter {
  user_data_128?: bigint;
  user_data_64?: bigint;
  user_data_32?: number;
  ledger?: number;
  code?: number;
  timestamp_min?: bigint;
  timestamp_max?: bigint;
  limit?: number;
  flags?: number;
  consistency?: ReadConsistency;
}

/** Results of a query. A non-zero `resume_timestamp` means the scan budget ran out before
 * `limit` results: ask again with timestamp_min (REVERSED: timestamp_max) set to it. */
export interface Page<T> {
  items: T[];
  resume_timestamp: bigint;
}

/** One applied event of the change stream (`ChangeEvent` in ledger.proto). */
export interface ChangeEvent {
  timestamp: bigint;
  type: ChangeType;
  transfer?: Transfer;
  debit_account?: Account;
  credit_account?: Account;
  account?: Account;
}

export function account(fields: Partial<Account> & { id: bigint }): Account {
  return {
    debits_pending: 0n,
    debits_posted: 0n,
    credits_pending: 0n,
    credits_posted: 0n,
    user_data_128: 0n,
    user_data_64: 0n,
    user_data_32: 0,
    ledger: 0,
    code: 0,
    flags: 0,
    timestamp: 0n,
    ...fields,
  };
}

export function transfer(fields: Partial<Transfer> & { id: bigint }): Transfer {
  return {
    debit_account_id: 0n,
    credit_account_id: 0n,
    amount: 0n,
    pending_id: 0n,
    user_data_128: 0n,
    user_data_64: 0n,
    user_data_32: 0,
    timeout: 0,
    ledger: 0,
    code: 0,
    flags: 0,
    timestamp: 0n,
    ...fields,
  };
}

// The wire form, as @grpc/proto-loader reads and writes it (64-bit integers as decimal strings).
type Wire = Record<string, unknown>;
interface WireU128 {
  lo: string;
  hi: string;
}

const U128_FIELDS = new Set([
  "id",
  "debits_pending",
  "debits_posted",
  "credits_pending",
  "credits_posted",
  "user_data_128",
  "debit_account_id",
  "credit_account_id",
  "amount",
  "pending_id",
  "account_id",
]);
const U64_FIELDS = new Set(["user_data_64", "timestamp", "timestamp_min", "timestamp_max"]);

export function u128ToWire(value: bigint, name: string): WireU128 {
  if (typeof value !== "bigint") throw new TypeError(`${name} must be a bigint, not ${typeof value}`);
  if (value < 0n || value > U128_MAX) throw new RangeError(`${name} must be between 0 and 2^128-1, not ${value}`);
  return { lo: (value & U64_MASK).toString(), hi: (value >> 64n).toString() };
}

export function u128FromWire(value: WireU128 | null | undefined): bigint {
  if (!value) return 0n;
  return (BigInt(value.hi) << 64n) | BigInt(value.lo);
}

/** A message as the wire object proto-loader encodes; checks every field's range. */
export function toWire(value: object): Wire {
  const wire: Wire = {};
  for (const [name, item] of Object.entries(value)) {
    if (item === undefined) continue;
    if (U128_FIELDS.has(name)) {
      wire[name] = u128ToWire(item as bigint, name);
    } else if (U64_FIELDS.has(name)) {
      if (typeof item !== "bigint") throw new TypeError(`${name} must be a bigint, not ${typeof item}`);
      if (item < 0n || item > U64_MASK) throw new RangeError(`${name} must be between 0 and 2^64-1, not ${item}`);
      wire[name] = item.toString();
    } else {
      if (!Number.isInteger(item) || (item as number) < 0 || (item as number) > 0xffffffff) {
        throw new RangeError(`${name} must be an integer between 0 and 2^32-1, not ${item}`);
      }
      wire[name] = item;
    }
  }
  return wire;
}

/** A decoded wire object as a message of bigints and numbers. */
export function fromWire<T>(wire: Wire): T {
  const value: Wire = {};
  for (const [name, item] of Object.entries(wire)) {
    if (U128_FIELDS.has(name)) value[name] = u128FromWire(item as WireU128);
    else if (U64_FIELDS.has(name)) value[name] = BigInt((item as string) ?? "0");
    else value[name] = item;
  }
  return value as T;
}

export function accountFilterDefaults(filter: AccountFilter): AccountFilter {
  return {
    limit: 8189,
    flags: AccountFilterFlags.DEBITS | AccountFilterFlags.CREDITS,
    ...filter,
  };
}

export function queryFilterDefaults(filter: QueryFilter): QueryFilter {
  return { limit: 8189, ...filter };
}

export function changeFromWire(wire: Wire): ChangeEvent {
  const event: ChangeEvent = {
    timestamp: BigInt(wire.timestamp as string),
    type: wire.type as ChangeType,
  };
  for (const name of ["transfer", "debit_account", "credit_account", "account"] as const) {
    const item = wire[name] as Wire | null | undefined;
    if (item) (event as unknown as Wire)[name] = fromWire(item);
  }
  return event;
}

export { CreateAccountStatus, CreateTransferStatus, ReadConsistency };
