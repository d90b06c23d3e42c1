import { Client, CreateAccountStatus, CreateTransferStatus, account, transfer } from "tally-client";

async function main() {
  // The nodes of `tally dev` and its CA, unless TALLY_NODES and TALLY_CA say otherwise.
  const nodes = process.env.TALLY_NODES ?? "127.0.0.1:7101,127.0.0.1:7102,127.0.0.1:7103";
  const client = new Client(nodes.split(","), { ca: process.env.TALLY_CA ?? "tally-dev/certs/ca.pem" });
  const results = await client.createAccounts([
    account({ id: 1n, ledger: 1, code: 1 }),
    account({ id: 2n, ledger: 1, code: 1 }),
  ]);
  console.log("accounts:", results.map((r) => CreateAccountStatus[r.status]).join(" "));
  const payment = transfer({ id: 1n, debit_account_id: 1n, credit_account_id: 2n, amount: 100n, ledger: 1, code: 1 });
  // Safe to send again after a timeout: the same id answers EXISTS and moves nothing twice.
  const [result] = await client.createTransfers([payment]);
  console.log("payment:", CreateTransferStatus[result.status]);
  for (const a of await client.lookupAccounts([1n, 2n])) {
    console.log(`account ${a.id}: debits ${a.debits_posted}, credits ${a.credits_posted}`);
  }
  client.close();
}

main();
