// Unit tests that need no cluster: 128-bit conversion, range checks, options. The conformance
// scenario (conformance/scenario.ts) runs the client against a real cluster.
import { test } from "node:test";
import * as assert from "node:assert/strict";

import { Client, CreateTransferStatus, TransferFlags, U128_MAX, Unavailable, transfer } from "../src";
import { fromWire, toWire, u128FromWire, u128ToWire } from "../src/types";

test("128-bit values survive the wire form", () => {
  for (const value of [0n, 1n, (1n << 64n) - 1n, 1n << 64n, (0xc0ffeen << 80n) | 7n, U128_MAX]) {
    assert.equal(u128FromWire(u128ToWire(value, "id")), value);
  }
  const t = transfer({ id: U128_MAX - 1n, amount: 1n << 100n, timestamp: (1n << 64n) - 1n, flags: TransferFlags.PENDING });
  assert.deepEqual(fromWire(toWire(t)), t);
});

test("out-of-range values are refused before they are sent", () => {
  assert.throws(() => u128ToWire(-1n, "id"), /between 0 and 2\^128-1/);
  assert.throws(() => u128ToWire(U128_MAX + 1n, "amount"), /amount must be between/);
  assert.throws(() => toWire(transfer({ id: 1n, code: 70000.5 })), /code must be an integer/);
  assert.throws(() => toWire(transfer({ id: 1n, user_data_64: 1n << 64n })), /user_data_64/);
  assert.throws(() => toWire({ id: 5 as unknown as bigint }), /id must be a bigint/);
});

test("the enums come from ledger.proto", () => {
  assert.equal(CreateTransferStatus.EXISTS, 18);
  assert.equal(CreateTransferStatus.ID_ALREADY_FAILED, 59);
  assert.equal(CreateTransferStatus[CreateTransferStatus.EXCEEDS_CREDITS], "EXCEEDS_CREDITS");
});

test("bad options are refused with a clear error", () => {
  assert.throws(() => new Client([]), /no node addresses/);
  assert.throws(() => new Client(["localhost"], { insecure: true }), /not host:port/);
  assert.throws(() => new Client(["127.0.0.1:7101"]), /TLS needs the cluster's CA/);
  assert.throws(() => new Client(["127.0.0.1:7101"], { ca: "/nonexistent.pem" }), /cannot read \/nonexistent.pem/);
  assert.throws(() => new Client(["127.0.0.1:7101"], { ca: __filename }), /holds no PEM certificate/);
});

test("a cluster that is not there is Unavailable within the deadline", async () => {
  const client = new Client(["127.0.0.1:1", "127.0.0.1:2"], { insecure: true, timeoutMs: 400 });
  const started = Date.now();
  await assert.rejects(client.lookupAccounts([1n]), (e: Error) => e instanceof Unavailable && /no node answered in time/.test(e.message));
  assert.ok(Date.now() - started < 3000);
  client.close();
});
