//! The conformance scenario (clients/conformance/README.md) for the Rust client. Run by
//! `clients/conformance/harness.py` against a real cluster:
//!
//! ```sh
//! python3 clients/conformance/harness.py --tally target/release/tally -- target/release/examples/conformance
//! ```
//!
//! Prints the transcript that `clients/conformance/expected.txt` holds, or exits non-zero saying
//! what went wrong.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use tally_client::v1::{self, AccountFlag, ChangeType, CreateTransferStatus, ReadConsistency, TransferFlag};
use tally_client::{Client, Error, Security, u128_from, u128_to};

const LEDGER: u32 = 700;
const CODE: u32 = 10;
const REFERENCE: u128 = (0xC0FFEE << 80) | 7;
const WRITES: u128 = 300;
const KILL_AT: u128 = 20;
const KILL_DONE_BY: u128 = 150;
const AFTER_KILL: u128 = 50;

fn fail(why: String) -> ! {
    eprintln!("conformance: {why}");
    std::process::exit(1)
}

/// Starts TALLY_CONTROL with `words`; its output is read by `finish`.
fn control(words: &[&str]) -> tokio::process::Child {
    let command = std::env::var("TALLY_CONTROL").expect("TALLY_CONTROL");
    tokio::process::Command::new("sh")
        .arg("-c")
        .arg(format!("{command} {}", words.join(" ")))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| fail(format!("cannot run TALLY_CONTROL: {e}")))
}

async fn finish(child: tokio::process::Child) -> String {
    let output = child.wait_with_output().await.unwrap_or_else(|e| fail(format!("TALLY_CONTROL: {e}")));
    if !output.status.success() {
        fail(format!("TALLY_CONTROL failed ({})", output.status));
    }
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

fn account(id: u128, flags: i32) -> v1::Account {
    v1::Account { id: u128_to(id), ledger: LEDGER, code: CODE, flags: flags as u32, ..Default::default() }
}

fn payment(id: u128, debit: u128, credit: u128, amount: u128, flags: i32) -> v1::Transfer {
    v1::Transfer {
        id: u128_to(id),
        debit_account_id: u128_to(debit),
        credit_account_id: u128_to(credit),
        amount: u128_to(amount),
        ledger: LEDGER,
        code: CODE,
        flags: flags as u32,
        ..Default::default()
    }
}

fn account_names(results: &[v1::CreateAccountResult]) -> String {
    let names: Vec<&str> =
        results.iter().map(|r| name(r.status().as_str_name(), "CREATE_ACCOUNT_STATUS_")).collect();
    names.join(" ")
}

fn transfer_names(results: &[v1::CreateTransferResult]) -> String {
    let names: Vec<&str> =
        results.iter().map(|r| name(r.status().as_str_name(), "CREATE_TRANSFER_STATUS_")).collect();
    names.join(" ")
}

/// A gRPC status code as the other languages name it: INVALID_ARGUMENT.
fn code_name(code: tonic::Code) -> String {
    let mut out = String::new();
    for (i, c) in format!("{code:?}").chars().enumerate() {
        if c.is_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

fn name<'a>(full: &'a str, prefix: &str) -> &'a str {
    full.strip_prefix(prefix).unwrap_or(full)
}

async fn transfers(client: &Client, batch: Vec<v1::Transfer>) -> String {
    transfer_names(
        &client.create_transfers(batch).await.unwrap_or_else(|e| fail(format!("create_transfers: {e}"))),
    )
}

async fn balances(client: &Client, id: u128) -> String {
    let accounts = client.lookup_accounts(&[id], ReadConsistency::Linearizable).await;
    let a = &accounts.unwrap_or_else(|e| fail(format!("lookup_accounts: {e}")))[0];
    format!(
        "account {id}: debits_pending={} debits_posted={} credits_posted={}",
        u128_from(a.debits_pending.as_ref()),
        u128_from(a.debits_posted.as_ref()),
        u128_from(a.credits_posted.as_ref())
    )
}

/// Creates `transfer`, retrying with the same id while the outcome is unknown; OK or EXISTS is an
/// acknowledgement.
async fn write_once(client: &Client, transfer: v1::Transfer) {
    let id = u128_from(transfer.id.as_ref());
    for _ in 0..10 {
        match client.create_transfers(vec![transfer]).await {
            Ok(results) => match results[0].status() {
                CreateTransferStatus::Ok | CreateTransferStatus::Exists => return,
                status => fail(format!("transfer {id}: {}", status.as_str_name())),
            },
            Err(Error::Unavailable(status)) => {
                eprintln!(
                    "conformance: transfer {id}: outcome unknown ({}); retrying with its id",
                    status.message()
                );
            }
            Err(error) => fail(format!("transfer {id}: {error}")),
        }
    }
    fail(format!("transfer {id}: no node acknowledged it in 10 tries"))
}

#[tokio::main]
async fn main() {
    let env = |name: &str| std::env::var(name).unwrap_or_else(|_| fail(format!("{name} is not set")));
    let (cert, key) = (env("TALLY_CERT"), env("TALLY_KEY"));
    let security = Security::from_files(env("TALLY_CA").as_ref(), Some((cert.as_ref(), key.as_ref())))
        .unwrap_or_else(|e| fail(e));
    let nodes: Vec<String> = env("TALLY_NODES").split(',').map(str::to_string).collect();
    let client = Client::new(&nodes, Duration::from_secs(5), &security).unwrap_or_else(|e| fail(e));
    let linearizable = ReadConsistency::Linearizable;

    let history_flags = AccountFlag::DebitsMustNotExceedCredits as i32 | AccountFlag::History as i32;
    let accounts = vec![account(1, 0), account(2, history_flags), account(3, 0)];
    for label in ["create_accounts", "create_accounts again"] {
        let results = client.create_accounts(accounts.clone()).await;
        println!("{label}: {}", account_names(&results.unwrap_or_else(|e| fail(format!("{label}: {e}")))));
    }

    let oversized: Vec<v1::Transfer> = (0..8190).map(|i| payment(90_000 + i, 1, 3, 1, 0)).collect();
    match client.create_transfers(oversized).await {
        Err(Error::Rejected(status)) => {
            println!("oversized batch: rejected {}", code_name(status.code()))
        }
        other => fail(format!("a batch of 8190 transfers: {other:?}")),
    }

    let linked = TransferFlag::Linked as i32;
    let chain =
        vec![payment(100, 1, 2, 500, linked), payment(101, 2, 3, 200, linked), payment(102, 2, 999, 1, 0)];
    println!("linked chain: {}", transfers(&client, chain).await);
    let found =
        client.lookup_transfers(&[100, 101, 102], linearizable).await.unwrap_or_else(|e| fail(e.to_string()));
    println!("linked chain lookup: {} of 3 found", found.len());

    println!("fund: {}", transfers(&client, vec![payment(110, 1, 2, 1000, 0)]).await);
    let pending = TransferFlag::Pending as i32;
    let reserve = v1::Transfer { timeout: 3600, ..payment(120, 2, 3, 300, pending) };
    println!("pending: {}", transfers(&client, vec![reserve]).await);
    println!("{}", balances(&client, 2).await);
    let post = v1::Transfer {
        id: u128_to(121),
        pending_id: u128_to(120),
        amount: u128_to(u128::MAX),
        flags: TransferFlag::PostPendingTransfer as u32,
        ..Default::default()
    };
    let posted = transfers(&client, vec![post]).await;
    let post = client.lookup_transfers(&[121], linearizable).await.unwrap_or_else(|e| fail(e.to_string()));
    println!("post all: {posted} amount={}", u128_from(post[0].amount.as_ref()));
    println!("{}", balances(&client, 2).await);
    let void = v1::Transfer {
        id: u128_to(131),
        pending_id: u128_to(130),
        flags: TransferFlag::VoidPendingTransfer as u32,
        ..Default::default()
    };
    println!("pending then void: {}", transfers(&client, vec![payment(130, 2, 3, 100, pending), void]).await);
    println!("{}", balances(&client, 2).await);

    println!("refused: {}", transfers(&client, vec![payment(140, 2, 3, 10_000, 0)]).await);
    println!(
        "refused, retried with its id: {}",
        transfers(&client, vec![payment(140, 2, 3, 10_000, 0)]).await
    );

    let referenced = v1::Transfer { user_data_128: u128_to(REFERENCE), ..payment(150, 2, 3, 25, 0) };
    println!("by reference: {}", transfers(&client, vec![referenced]).await);
    let filter = v1::QueryFilter { user_data_128: u128_to(REFERENCE), limit: 10, ..Default::default() };
    let found = client.query_transfers(filter).await.unwrap_or_else(|e| fail(e.to_string())).transfers;
    let described: Vec<String> = found
        .iter()
        .map(|t| {
            format!(
                "id={} amount={} user_data_128={}",
                u128_from(t.id.as_ref()),
                u128_from(t.amount.as_ref()),
                u128_from(t.user_data_128.as_ref())
            )
        })
        .collect();
    println!("query_transfers by reference: {} found: {}", found.len(), described.join(" "));
    let both = v1::AccountFilterFlag::Debits as u32 | v1::AccountFilterFlag::Credits as u32;
    let filter = v1::AccountFilter { account_id: u128_to(3), limit: 100, flags: both, ..Default::default() };
    let page = client.get_account_transfers(filter).await.unwrap_or_else(|e| fail(e.to_string()));
    let ids: Vec<String> = page.transfers.iter().map(|t| u128_from(t.id.as_ref()).to_string()).collect();
    println!("get_account_transfers of 3: {}", ids.join(" "));
    let filter = v1::AccountFilter { account_id: u128_to(2), limit: 100, flags: both, ..Default::default() };
    let history = client.get_account_balances(filter).await.unwrap_or_else(|e| fail(e.to_string())).balances;
    let last = history.last().unwrap_or_else(|| fail("no balance history".into()));
    println!(
        "get_account_balances of 2: {} entries, last debits_posted={} credits_posted={}",
        history.len(),
        u128_from(last.debits_posted.as_ref()),
        u128_from(last.credits_posted.as_ref())
    );

    // Writes, one payment per request, while the leader is killed.
    let mut killer = None;
    let mut killed = String::new();
    for i in 0..WRITES {
        if i == KILL_AT {
            killer = Some(control(&["kill-leader"]));
        }
        if i == KILL_DONE_BY {
            killed = finish(killer.take().expect("started")).await;
            eprintln!("conformance: killed the leader, {killed}, during write {KILL_AT}..{i}");
        }
        write_once(&client, payment(1000 + i, 1, 3, 1, 0)).await;
    }
    let ids: Vec<u128> = (0..WRITES).map(|i| 1000 + i).collect();
    let found = client.lookup_transfers(&ids, linearizable).await.unwrap_or_else(|e| fail(e.to_string()));
    println!("writes across a leader kill: {WRITES} acknowledged once each, {} found", found.len());
    let accounts =
        client.lookup_accounts(&[1, 3], linearizable).await.unwrap_or_else(|e| fail(e.to_string()));
    println!("account 1: debits_posted={}", u128_from(accounts[0].debits_posted.as_ref()));
    println!("account 3: credits_posted={}", u128_from(accounts[1].credits_posted.as_ref()));
    finish(control(&["start", &killed])).await;

    // The change stream from the start, its node killed halfway; the payments made after the
    // kill can only come from another node.
    let expected = 3 + 6 + WRITES + AFTER_KILL;
    let mut changes = client.changes(0);
    let (mut seen, mut last, mut first_node) = (0, 0, None);
    let mut types: BTreeMap<&str, u32> = BTreeMap::new();
    let mut ids = HashSet::new();
    while seen < expected {
        let event = changes.next().await.unwrap_or_else(|e| fail(format!("change stream: {e}")));
        if event.timestamp <= last {
            fail(format!("change stream: timestamp {} after {last}", event.timestamp));
        }
        last = event.timestamp;
        seen += 1;
        let kind = ChangeType::try_from(event.r#type).unwrap_or_default().as_str_name();
        *types.entry(name(kind, "CHANGE_TYPE_")).or_default() += 1;
        if let Some(transfer) = &event.transfer
            && !ids.insert(u128_from(transfer.id.as_ref()))
        {
            fail(format!("change stream: transfer {} twice", u128_from(transfer.id.as_ref())));
        }
        if seen == expected / 2 {
            let node = changes.node().unwrap_or_else(|| fail("change stream: no node".into())).to_string();
            finish(control(&["kill", &node])).await;
            for i in 0..AFTER_KILL {
                write_once(&client, payment(2000 + i, 1, 3, 1, 0)).await;
            }
            first_node = Some(node);
        }
    }
    if changes.node() == first_node.as_deref() {
        fail(format!("change stream: still on {first_node:?}, which was killed"));
    }
    println!("change stream: {seen} events in order, each once, resumed on another node");
    let counts: Vec<String> = types.iter().map(|(kind, count)| format!("{kind}={count}")).collect();
    println!("change stream types: {}", counts.join(" "));
}
