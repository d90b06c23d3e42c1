// The conformance scenario (clients/conformance/README.md) for the TypeScript client. Run by
// clients/conformance/harness.py against a real cluster; prints the transcript that
// clients/conformance/expected.txt holds, or exits non-zero saying what went wrong.
import { spawn } from "node:child_process";

import {
  AccountFlags,
  ChangeType,
  Client,
  CreateAccountStatus,
  CreateTransferStatus,
  Rejected,
  Transfer,
  TransferFlags,
  U128_MAX,
  Unavailable,
  account,
  transfer,
} from "../src";
import * as grpc from "@grpc/grpc-js";

const LEDGER = 700;
const CODE = 10;
const REFERENCE = (0xc0ffeen << 80n) | 7n;
const WRITES = 300;
const KILL_AT = 20;
const KILL_DONE_BY = 150;
const AFTER_KILL = 50;

const say = (line: string) => process.stdout.write(line + "\n");

function fail(why: string): never {
  process.stderr.write(`conformance: ${why}\n`);
  process.exit(1);
}

/** Runs TALLY_CONTROL with `words`; resolves to what it printed. */
function control(...words: string[]): Promise<string> {
  const command = process.env.TALLY_CONTROL!;
  return new Promise((resolve) => {
    const child = spawn("sh", ["-c", `${command} ${words.join(" ")}`], { stdio: ["ignore", "pipe", "inherit"] });
    let out = "";
    child.stdout.on("data", (chunk) => (out += chunk));
    child.on("close", (code) => (code === 0 ? resolve(out.trim()) : fail(`TALLY_CONTROL ${words.join(" ")} failed (exit ${code})`)));
  });
}

const names = (results: { status: number }[], of: Record<number, string>) => results.map((r) => of[r.status]).join(" ");
const accountNames = (results: { status: number }[]) => names(results, CreateAccountStatus);
const transferNames = (results: { status: number }[]) => names(results, CreateTransferStatus);

function payment(id: bigint, debit: bigint, credit: bigint, amount: bigint, flags = 0, fields: Partial<Transfer> = {}) {
  return transfer({ id, debit_account_id: debit, credit_account_id: credit, amount, ledger: LEDGER, code: CODE, flags, ...fields });
}

async function balances(client: Client, id: bigint): Promise<string> {
  const [a] = await client.lookupAccounts([id]);
  return `account ${id}: debits_pending=${a.debits_pending} debits_posted=${a.debits_posted} credits_posted=${a.credits_posted}`;
}

/** Creates `t`, retrying with the same id while the outcome is unknown; OK or EXISTS is an
 * acknowledgement. */
async function writeOnce(client: Client, t: Transfer): Promise<void> {
  for (let attempt = 0; attempt < 10; attempt++) {
    let status: CreateTransferStatus;
    try {
      [{ status }] = await client.createTransfers([t]);
    } catch (e) {
      if (!(e instanceof Unavailable)) throw e;
      process.stderr.write(`conformance: transfer ${t.id}: outcome unknown (${e.message}); retrying with its id\n`);
      continue;
    }
    if (status !== CreateTransferStatus.OK && status !== CreateTransferStatus.EXISTS) {
      fail(`transfer ${t.id}: ${CreateTransferStatus[status]}`);
    }
    return;
  }
  fail(`transfer ${t.id}: no node acknowledged it in 10 tries`);
}

async function main(): Promise<void> {
  const client = new Client(process.env.TALLY_NODES!.split(","), {
    ca: process.env.TALLY_CA,
    cert: process.env.TALLY_CERT,
    key: process.env.TALLY_KEY,
    timeoutMs: 5000,
  });
  const accounts = [
    account({ id: 1n, ledger: LEDGER, code: CODE }),
    account({ id: 2n, ledger: LEDGER, code: CODE, flags: AccountFlags.DEBITS_MUST_NOT_EXCEED_CREDITS | AccountFlags.HISTORY }),
    account({ id: 3n, ledger: LEDGER, code: CODE }),
  ];
  say("create_accounts: " + accountNames(await client.createAccounts(accounts)));
  say("create_accounts again: " + accountNames(await client.createAccounts(accounts)));

  try {
    await client.createTransfers(Array.from({ length: 8190 }, (_, i) => payment(90_000n + BigInt(i), 1n, 3n, 1n)));
    fail("a batch of 8190 transfers was accepted");
  } catch (e) {
    if (!(e instanceof Rejected)) throw e;
    say("oversized batch: rejected " + grpc.status[e.code]);
  }

  const chain = [
    payment(100n, 1n, 2n, 500n, TransferFlags.LINKED),
    payment(101n, 2n, 3n, 200n, TransferFlags.LINKED),
    payment(102n, 2n, 999n, 1n),
  ];
  say("linked chain: " + transferNames(await client.createTransfers(chain)));
  say(`linked chain lookup: ${(await client.lookupTransfers([100n, 101n, 102n])).length} of 3 found`);

  say("fund: " + transferNames(await client.createTransfers([payment(110n, 1n, 2n, 1000n)])));
  say("pending: " + transferNames(await client.createTransfers([payment(120n, 2n, 3n, 300n, TransferFlags.PENDING, { timeout: 3600 })])));
  say(await balances(client, 2n));
  const post = transfer({ id: 121n, pending_id: 120n, amount: U128_MAX, flags: TransferFlags.POST_PENDING_TRANSFER });
  const posted = transferNames(await client.createTransfers([post]));
  say(`post all: ${posted} amount=${(await client.lookupTransfers([121n]))[0].amount}`);
  say(await balances(client, 2n));
  const voided = transfer({ id: 131n, pending_id: 130n, flags: TransferFlags.VOID_PENDING_TRANSFER });
  say("pending then void: " + transferNames(await client.createTransfers([payment(130n, 2n, 3n, 100n, TransferFlags.PENDING), voided])));
  say(await balances(client, 2n));

  say("refused: " + transferNames(await client.createTransfers([payment(140n, 2n, 3n, 10_000n)])));
  say("refused, retried with its id: " + transferNames(await client.createTransfers([payment(140n, 2n, 3n, 10_000n)])));

  say("by reference: " + transferNames(await client.createTransfers([payment(150n, 2n, 3n, 25n, 0, { user_data_128: REFERENCE })])));
  const found = (await client.queryTransfers({ user_data_128: REFERENCE, limit: 10 })).items;
  say(
    `query_transfers by reference: ${found.length} found: ` +
      found.map((t) => `id=${t.id} amount=${t.amount} user_data_128=${t.user_data_128}`).join(" "),
  );
  const page = await client.getAccountTransfers({ account_id: 3n, limit: 100 });
  say("get_account_transfers of 3: " + page.items.map((t) => t.id).join(" "));
  const history = (await client.getAccountBalances({ account_id: 2n, limit: 100 })).items;
  const lastBalance = history[history.length - 1];
  say(
    `get_account_balances of 2: ${history.length} entries, last debits_posted=${lastBalance.debits_posted} ` +
      `credits_posted=${lastBalance.credits_posted}`,
  );

  // Writes, one payment per request, while the leader is killed.
  let killer: Promise<string> | undefined;
  let killed = "";
  for (let i = 0; i < WRITES; i++) {
    if (i === KILL_AT) killer = control("kill-leader");
    if (i === KILL_DONE_BY) {
      killed = await killer!;
      process.stderr.write(`conformance: killed the leader, ${killed}, during write ${KILL_AT}..${i}\n`);
    }
    await writeOnce(client, payment(1000n + BigInt(i), 1n, 3n, 1n));
  }
  const written = await client.lookupTransfers(Array.from({ length: WRITES }, (_, i) => 1000n + BigInt(i)));
  say(`writes across a leader kill: ${WRITES} acknowledged once each, ${written.length} found`);
  const [account1, account3] = await client.lookupAccounts([1n, 3n]);
  say(`account 1: debits_posted=${account1.debits_posted}`);
  say(`account 3: credits_posted=${account3.credits_posted}`);
  await control("start", killed);

  // The change stream from the start, its node killed halfway; the payments made after the kill
  // can only come from another node.
  const expected = 3 + 6 + WRITES + AFTER_KILL;
  const changes = client.subscribeChanges(0n);
  let seen = 0;
  let last = 0n;
  let firstNode: string | undefined;
  const types = new Map<string, number>();
  const ids = new Set<bigint>();
  for await (const event of changes) {
    if (event.timestamp <= last) fail(`change stream: timestamp ${event.timestamp} after ${last}`);
    last = event.timestamp;
    seen += 1;
    const type = ChangeType[event.type];
    types.set(type, (types.get(type) ?? 0) + 1);
    if (event.transfer) {
      if (ids.has(event.transfer.id)) fail(`change stream: transfer ${event.transfer.id} twice`);
      ids.add(event.transfer.id);
    }
    if (seen === Math.floor(expected / 2)) {
      firstNode = changes.node;
      await control("kill", firstNode!);
      for (let i = 0; i < AFTER_KILL; i++) await writeOnce(client, payment(2000n + BigInt(i), 1n, 3n, 1n));
    }
    if (seen === expected) break;
  }
  if (changes.node === firstNode) fail(`change stream: still on ${firstNode}, which was killed`);
  say(`change stream: ${seen} events in order, each once, resumed on another node`);
  say(
    "change stream types: " +
      [...types.keys()]
        .sort()
        .map((name) => `${name}=${types.get(name)}`)
        .join(" "),
  );
  client.close();
}

main().catch((e) => fail(String(e?.stack ?? e)));
