// tally-client: a TypeScript client for tally, the replicated ledger for payment services. The same
// semantics as the Rust `tally-client` (client/src/lib.rs) and the Python one: see README.md.

import * as fs from "fs";
import * as path from "path";
import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";

import {
  Account,
  AccountBalance,
  AccountFilter,
  ChangeEvent,
  CreateAccountResult,
  CreateTransferResult,
  Page,
  QueryFilter,
  Transfer,
  accountFilterDefaults,
  changeFromWire,
  fromWire,
  queryFilterDefaults,
  toWire,
  u128ToWire,
} from "./types";
import { ReadConsistency } from "./generated";

export * from "./generated";
export * from "./types";

/** Messages up to this size are sent and accepted (a full batch of 8189 events is ~2 MiB). */
export const MESSAGE_BYTES_MAX = 64 << 20;
const BACKOFF_MIN_MS = 20;
const BACKOFF_MAX_MS = 100;
/** Set by a node on a reply to a request it forwarded to the leader: the leader's address. */
const LEADER_HEADER = "x-tally-leader";

/** Another node, or the same one later, may answer differently. */
const RETRYABLE = new Set([
  grpc.status.UNAVAILABLE,
  grpc.status.DEADLINE_EXCEEDED,
  grpc.status.UNKNOWN,
  grpc.status.ABORTED,
  grpc.status.CANCELLED,
]);

/** A call that failed: `code` is the gRPC status code, `details` the node's message. */
export class TallyError extends Error {
  constructor(
    readonly code: grpc.status,
    readonly details: string,
  ) {
    super(`${grpc.status[code]}: ${details}`);
    this.name = new.target.name;
  }
}

/** The request is wrong and retrying will not help (INVALID_ARGUMENT, PERMISSION_DENIED...). */
export class Rejected extends TallyError {}

/** No node answered before the deadline. For a write the outcome is unknown: send it again with
 * the same ids; OK or EXISTS then both mean that it is in the ledger, once. */
export class Unavailable extends TallyError {}

export interface ClientOptions {
  /** The cluster's CA certificate (PEM file). Required unless `insecure`. */
  ca?: string;
  /** A client certificate (PEM file) and its key, when the caller proves who it is. */
  cert?: string;
  key?: string;
  /** Plaintext, for a cluster started with --insecure. */
  insecure?: boolean;
  /** Deadline of one call, retries included (default 5000). */
  timeoutMs?: number;
}

const PROTO = path.join(__dirname, "..", "..", "proto", "ledger.proto");

type Stub = grpc.Client & Record<string, Function>;

function ledgerService(): grpc.ServiceClientConstructor {
  const definition = protoLoader.loadSync(PROTO, { keepCase: true, longs: String, enums: Number, defaults: true });
  const tally = grpc.loadPackageDefinition(definition).tally as grpc.GrpcObject;
  return (tally.v1 as grpc.GrpcObject).Ledger as grpc.ServiceClientConstructor;
}

function readPem(file: string, what: "ca" | "cert" | "key"): Buffer {
  let data: Buffer;
  try {
    data = fs.readFileSync(file);
  } catch (e) {
    throw new Error(`cannot read ${file} (${what}): ${(e as Error).message}`);
  }
  const wanted = what === "key" ? "PRIVATE KEY-----" : "-----BEGIN CERTIFICATE-----";
  if (!data.includes(wanted)) {
    throw new Error(`${file} (${what}) holds no PEM ${what === "key" ? "private key" : "certificate"}`);
  }
  return data;
}

function checkAddress(address: string): void {
  const colon = address.lastIndexOf(":");
  const port = Number(address.slice(colon + 1));
  if (colon <= 0 || !/^\d+$/.test(address.slice(colon + 1)) || port > 65535) {
    throw new Error(`'${address}' is not host:port: write each node's client door as host:port, e.g. 127.0.0.1:7101`);
  }
}

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

/**
 * A client of a tally cluster.
 *
 * `nodes` are the nodes' client doors (host:port), any of which may be down. Every call has a
 * deadline of `timeoutMs`; a call that fails because a node is unreachable, has no leader yet, or
 * timed out is retried on the next node with backoff until the deadline. One attempt gets at most
 * half the deadline, so that a node that hangs does not use it all. The client remembers the node
 * that answered last (or the leader a follower named) and starts there.
 */
export class Client {
  readonly nodes: string[];
  readonly timeoutMs: number;
  private readonly stubs: Stub[];
  private preferred = 0;

  constructor(nodes: string[] | string, options: ClientOptions = {}) {
    const list = typeof nodes === "string" ? nodes.split(",").filter((n) => n) : [...nodes];
    if (list.length === 0) throw new Error("no node addresses given");
    list.forEach(checkAddress);
    if ((options.cert === undefined) !== (options.key === undefined)) {
      throw new Error("give both cert and key, or neither");
    }
    let credentials: grpc.ChannelCredentials;
    if (options.insecure) {
      if (options.ca || options.cert) throw new Error("insecure talks plaintext: give no ca, cert or key");
      credentials = grpc.credentials.createInsecure();
    } else {
      if (!options.ca) {
        throw new Error("TLS needs the cluster's CA (ca: ...), or insecure: true for a cluster started with --insecure");
      }
      credentials = grpc.credentials.createSsl(
        readPem(options.ca, "ca"),
        options.key ? readPem(options.key, "key") : null,
        options.cert ? readPem(options.cert, "cert") : null,
      );
    }
    const Ledger = ledgerService();
    const channelOptions = {
      "grpc.max_send_message_length": MESSAGE_BYTES_MAX,
      "grpc.max_receive_message_length": MESSAGE_BYTES_MAX,
      "grpc.initial_reconnect_backoff_ms": 100,
      "grpc.max_reconnect_backoff_ms": 1000,
    };
    this.nodes = list;
    this.stubs = list.map((address) => new Ledger(address, credentials, channelOptions) as unknown as Stub);
    this.timeoutMs = options.timeoutMs ?? 5000;
  }

  close(): void {
    for (const stub of this.stubs) stub.close();
  }

  private attempt(node: number, method: string, request: object, budgetMs: number): Promise<[any, string | undefined]> {
    return new Promise((resolve, reject) => {
      let leader: string | undefined;
      const call = this.stubs[node][method](
        request,
        new grpc.Metadata(),
        { deadline: Date.now() + budgetMs },
        (error: grpc.ServiceError | null, reply: any) => (error ? reject(error) : resolve([reply, leader])),
      ) as grpc.ClientUnaryCall;
      call.on("metadata", (metadata: grpc.Metadata) => {
        const value = metadata.get(LEADER_HEADER)[0];
        if (value !== undefined) leader = value.toString();
      });
    });
  }

  /** Calls `method` on one node after another until one answers or the deadline passes. */
  private async call(method: string, request: object): Promise<any> {
    const deadline = Date.now() + this.timeoutMs;
    let backoff = BACKOFF_MIN_MS;
    let node = this.preferred % this.nodes.length;
    let last = new TallyError(grpc.status.UNAVAILABLE, "no attempt made");
    for (let attempt = 1; ; attempt++) {
      const left = deadline - Date.now();
      if (left <= 0) break;
      const budget = this.nodes.length > 1 ? Math.min(left, this.timeoutMs / 2) : left;
      try {
        const [reply, leader] = await this.attempt(node, method, request, budget);
        const hinted = leader === undefined ? -1 : this.nodes.indexOf(leader);
        this.preferred = hinted >= 0 ? hinted : node;
        return reply;
      } catch (e) {
        const error = e as grpc.ServiceError;
        if (!RETRYABLE.has(error.code)) throw new Rejected(error.code, error.details);
        last = new TallyError(error.code, error.details);
      }
      node = (node + 1) % this.nodes.length;
      // A full round of nodes failed: pause before the next round.
      if (attempt % this.nodes.length === 0) {
        await sleep(Math.max(0, Math.min(backoff, deadline - Date.now())));
        backoff = Math.min(backoff * 2, BACKOFF_MAX_MS);
      }
    }
    // Start the next call elsewhere: this node did not answer.
    this.preferred = node;
    throw new Unavailable(last.code, `no node answered in time (last error: ${last.details})`);
  }

  /** Creates 1 to 8189 accounts; one result per account, in order. */
  async createAccounts(accounts: Account[]): Promise<CreateAccountResult[]> {
    const reply = await this.call("CreateAccounts", { accounts: accounts.map(toWire) });
    return reply.results.map((r: any) => ({ status: r.status, timestamp: BigInt(r.timestamp) }));
  }

  /** Creates 1 to 8189 transfers (posts and voids included); one result per transfer. A
   * transfer already created answers EXISTS: retrying with the same ids moves nothing twice. */
  async createTransfers(transfers: Transfer[]): Promise<CreateTransferResult[]> {
    const reply = await this.call("CreateTransfers", { transfers: transfers.map(toWire) });
    return reply.results.map((r: any) => ({ status: r.status, timestamp: BigInt(r.timestamp) }));
  }

  /** The accounts found, in the order asked; ids not found are absent. */
  async lookupAccounts(ids: bigint[], consistency = ReadConsistency.LINEARIZABLE): Promise<Account[]> {
    const request = { ids: ids.map((id) => u128ToWire(id, "id")), consistency };
    return (await this.call("LookupAccounts", request)).accounts.map(fromWire);
  }

  /** The transfers found, in the order asked; ids not found are absent. */
  async lookupTransfers(ids: bigint[], consistency = ReadConsistency.LINEARIZABLE): Promise<Transfer[]> {
    const request = { ids: ids.map((id) => u128ToWire(id, "id")), consistency };
    return (await this.call("LookupTransfers", request)).transfers.map(fromWire);
  }

  /** One account's transfers. */
  async getAccountTransfers(filter: AccountFilter): Promise<Page<Transfer>> {
    const reply = await this.call("GetAccountTransfers", toWire(accountFilterDefaults(filter)));
    return { items: reply.transfers.map(fromWire), resume_timestamp: BigInt(reply.resume_timestamp) };
  }

  /** One account's balance history (accounts with the HISTORY flag). */
  async getAccountBalances(filter: AccountFilter): Promise<Page<AccountBalance>> {
    const reply = await this.call("GetAccountBalances", toWire(accountFilterDefaults(filter)));
    return { items: reply.balances.map(fromWire), resume_timestamp: BigInt(reply.resume_timestamp) };
  }

  /** Accounts selected by their fields. */
  async queryAccounts(filter: QueryFilter): Promise<Page<Account>> {
    const reply = await this.call("QueryAccounts", toWire(queryFilterDefaults(filter)));
    return { items: reply.accounts.map(fromWire), resume_timestamp: BigInt(reply.resume_timestamp) };
  }

  /** Transfers selected by their fields: find a payment by its reference. */
  async queryTransfers(filter: QueryFilter): Promise<Page<Transfer>> {
    const reply = await this.call("QueryTransfers", toWire(queryFilterDefaults(filter)));
    return { items: reply.transfers.map(fromWire), resume_timestamp: BigInt(reply.resume_timestamp) };
  }

  /** Every applied event from `fromTimestamp` on, then each new one: an async iterator that does
   * not end. When its node fails it resumes by itself, on any node, from the last event + 1, so
   * every event comes exactly once. It throws `Unavailable` only when no node serves the stream
   * for `timeoutMs`. */
  subscribeChanges(fromTimestamp = 0n): Changes {
    return new Changes(this, this.stubs, fromTimestamp, () => this.preferred);
  }
}

/** The change stream of `Client.subscribeChanges`. `node` is the node serving it now. */
export class Changes implements AsyncIterableIterator<ChangeEvent> {
  node: string | undefined;
  private stream: (grpc.ClientReadableStream<any> & AsyncIterable<any>) | undefined;
  private iterator: AsyncIterator<any> | undefined;
  private closed = false;

  constructor(
    private readonly client: Client,
    private readonly stubs: Stub[],
    public nextTimestamp: bigint,
    preferred: () => number,
  ) {
    this.current = preferred() % stubs.length;
  }

  private current: number;

  [Symbol.asyncIterator](): AsyncIterableIterator<ChangeEvent> {
    return this;
  }

  close(): void {
    this.closed = true;
    this.stream?.cancel();
  }

  async return(): Promise<IteratorResult<ChangeEvent>> {
    this.close();
    return { done: true, value: undefined };
  }

  async next(): Promise<IteratorResult<ChangeEvent>> {
    const nodes = this.client.nodes;
    let deadline: number | undefined;
    let backoff = BACKOFF_MIN_MS;
    let failures = 0;
    let last = "no attempt made";
    while (!this.closed) {
      if (this.iterator === undefined) {
        const request = { timestamp_min: this.nextTimestamp.toString() };
        this.stream = this.stubs[this.current].SubscribeChanges(request);
        this.iterator = this.stream![Symbol.asyncIterator]();
        this.node = nodes[this.current];
      }
      try {
        const item = await this.iterator.next();
        if (!item.done) {
          const event = changeFromWire(item.value);
          this.nextTimestamp = event.timestamp + 1n;
          return { done: false, value: event };
        }
        last = "the node ended the stream";
      } catch (e) {
        if (this.closed) break;
        const error = e as grpc.ServiceError;
        if (!RETRYABLE.has(error.code) && error.code !== grpc.status.INTERNAL) {
          throw new Rejected(error.code, error.details);
        }
        last = error.details;
      }
      // The stream broke (its node stopped, or cut off): resume on the next node.
      this.stream?.cancel();
      this.stream = undefined;
      this.iterator = undefined;
      this.node = undefined;
      if (deadline === undefined) deadline = Date.now() + this.client.timeoutMs;
      else if (Date.now() > deadline) {
        throw new Unavailable(grpc.status.UNAVAILABLE, `no node serves the change stream (last error: ${last})`);
      }
      this.current = (this.current + 1) % nodes.length;
      failures += 1;
      if (failures % nodes.length === 0) {
        await sleep(backoff);
        backoff = Math.min(backoff * 2, BACKOFF_MAX_MS);
      }
    }
    return { done: true, value: undefined };
  }
}
