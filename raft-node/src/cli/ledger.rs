//! The client commands: create accounts and transfers, look them up, an account's history.

use std::process::ExitCode;

use clap::{Args, Subcommand};
use serde_json::json;
use tally_client::{u128_from, u128_to, v1};

use super::explain::{Call, answered};
use super::{ClientArgs, Command, client, consistency, status_name, table};

#[derive(Subcommand)]
pub enum AccountCommand {
    Create {
        #[command(flatten)]
        client: ClientArgs,
        #[arg(long)]
        id: u128,
        #[arg(long)]
        ledger: u32,
        #[arg(long)]
        code: u32,
        /// Comma-separated: linked, debits-must-not-exceed-credits, credits-must-not-exceed-debits,
        /// history, closed.
        #[arg(long, value_delimiter = ',')]
        flags: Vec<String>,
        #[arg(long, default_value_t = 0)]
        user_data_128: u128,
        #[arg(long, default_value_t = 0)]
        user_data_64: u64,
        #[arg(long, default_value_t = 0)]
        user_data_32: u32,
        /// Import the account from another system as created at this time (RFC 3339, or ns
        /// since the Unix epoch): in the past, after the ledger's last event.
        #[arg(long, value_parser = parse_time)]
        imported_at: Option<u64>,
    },
}

#[derive(Args)]
pub struct TransferArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    #[arg(long)]
    pub id: u128,
    #[arg(long, default_value_t = 0)]
    pub debit: u128,
    #[arg(long, default_value_t = 0)]
    pub credit: u128,
    /// For --post: omit to post the whole pending amount.
    #[arg(long)]
    pub amount: Option<u128>,
    #[arg(long, default_value_t = 0)]
    pub ledger: u32,
    #[arg(long, default_value_t = 0)]
    pub code: u32,
    /// Reserve the amount; post or void it later.
    #[arg(long)]
    pub pending: bool,
    /// Seconds after which a pending transfer expires.
    #[arg(long, default_value_t = 0)]
    pub timeout: u32,
    /// Post the pending transfer with this id.
    #[arg(long, conflicts_with_all = ["void", "pending"])]
    pub post: Option<u128>,
    /// Void the pending transfer with this id.
    #[arg(long, conflicts_with_all = ["post", "pending"])]
    pub void: Option<u128>,
    /// Extra flags, comma-separated: balancing-debit, balancing-credit, closing-debit, closing-credit.
    #[arg(long, value_delimiter = ',')]
    pub flags: Vec<String>,
    #[arg(long, default_value_t = 0)]
    pub user_data_128: u128,
    #[arg(long, default_value_t = 0)]
    pub user_data_64: u64,
    #[arg(long, default_value_t = 0)]
    pub user_data_32: u32,
    /// Import the transfer from another system as made at this time (RFC 3339, or ns since the
    /// Unix epoch): in the past, after the ledger's last event and after both accounts.
    #[arg(long, value_parser = parse_time)]
    pub imported_at: Option<u64>,
}

/// A time as RFC 3339 (`2026-11-01T09:30:00Z`) or as nanoseconds since the Unix epoch.
fn parse_time(text: &str) -> Result<u64, String> {
    if let Ok(ns) = text.parse::<u64>() {
        return Ok(ns);
    }
    let time = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .map_err(|e| format!("'{text}': not RFC 3339 (e.g. 2026-11-01T09:30:00Z) nor nanoseconds: {e}"))?;
    u64::try_from(time.unix_timestamp_nanos()).map_err(|_| format!("'{text}' is before 1970"))
}

#[derive(Subcommand)]
pub enum LookupCommand {
    Account {
        #[command(flatten)]
        client: ClientArgs,
        #[arg(required = true)]
        ids: Vec<u128>,
    },
    Transfer {
        #[command(flatten)]
        client: ClientArgs,
        #[arg(required = true)]
        ids: Vec<u128>,
    },
}

#[derive(Args)]
pub struct HistoryArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    pub account: u128,
    #[command(flatten)]
    pub fields: FieldArgs,
    #[command(flatten)]
    pub range: RangeArgs,
    /// Show the balances after each transfer (accounts with the history flag).
    #[arg(long)]
    pub balances: bool,
}

/// Fields a query selects by: every one given must match.
#[derive(Args, Clone, Copy)]
pub struct FieldArgs {
    #[arg(long, default_value_t = 0)]
    pub user_data_128: u128,
    #[arg(long, default_value_t = 0)]
    pub user_data_64: u64,
    #[arg(long, default_value_t = 0)]
    pub user_data_32: u32,
    #[arg(long, default_value_t = 0)]
    pub code: u32,
}

/// Which part of the timeline, how many results, in which order.
#[derive(Args, Clone, Copy)]
pub struct RangeArgs {
    /// From this time on (RFC 3339, or ns since the Unix epoch).
    #[arg(long, value_parser = parse_time)]
    pub after: Option<u64>,
    /// Up to this time (RFC 3339, or ns since the Unix epoch).
    #[arg(long, value_parser = parse_time)]
    pub before: Option<u64>,
    #[arg(long, default_value_t = 20)]
    pub limit: u32,
    /// Newest first.
    #[arg(long)]
    pub reversed: bool,
}

#[derive(Args)]
pub struct WatchArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Start at the first event at or after this time (RFC 3339, or ns since the Unix epoch);
    /// the whole history by default.
    #[arg(long, value_parser = parse_time)]
    pub from: Option<u64>,
    /// Stop after this many events (never, by default).
    #[arg(long)]
    pub count: Option<u64>,
}

/// One change event as a line: JSON (one object per line), or text.
fn change_line(json: bool, event: &v1::ChangeEvent) -> String {
    let kind = status_name(event.r#type().as_str_name(), "CHANGE_TYPE_");
    if json {
        let mut line = json!({ "timestamp": event.timestamp, "type": kind });
        for (name, account) in [
            ("account", &event.account),
            ("debit_account", &event.debit_account),
            ("credit_account", &event.credit_account),
        ] {
            if let Some(account) = account {
                line[name] = account_json(account);
            }
        }
        if let Some(transfer) = &event.transfer {
            line["transfer"] = transfer_json(transfer);
        }
        return line.to_string();
    }
    let at = super::rfc3339(event.timestamp);
    let posted = |a: &v1::Account| {
        format!(
            "{} (debits {}+{} pending, credits {}+{} pending)",
            u128_from(a.id.as_ref()),
            u128_from(a.debits_posted.as_ref()),
            u128_from(a.debits_pending.as_ref()),
            u128_from(a.credits_posted.as_ref()),
            u128_from(a.credits_pending.as_ref()),
        )
    };
    match (&event.account, &event.transfer, &event.debit_account, &event.credit_account) {
        (Some(account), ..) => format!("{at} {kind} {}", u128_from(account.id.as_ref())),
        (None, Some(t), Some(debit), Some(credit)) => format!(
            "{at} {kind} transfer {} amount {}: {} -> {}",
            u128_from(t.id.as_ref()),
            u128_from(t.amount.as_ref()),
            posted(debit),
            posted(credit)
        ),
        _ => format!("{at} {kind}"),
    }
}

/// Follows the change stream, resuming from the last event printed whenever the node it reads
/// from goes away (any node serves it): every event is printed once.
async fn watch(args: &WatchArgs) -> Result<ExitCode, String> {
    let client = client(&args.client)?;
    let mut from = args.from.unwrap_or(0);
    let mut printed = 0u64;
    loop {
        let mut stream = match client.subscribe_changes(from).await {
            Ok(stream) => stream,
            Err(error) => {
                eprintln!("tally watch: no node serves the change stream now ({error}); retrying");
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                continue;
            }
        };
        loop {
            match stream.message().await {
                Ok(Some(event)) => {
                    println!("{}", change_line(args.client.json, &event));
                    from = event.timestamp + 1;
                    printed += 1;
                    if args.count.is_some_and(|count| printed >= count) {
                        return Ok(ExitCode::SUCCESS);
                    }
                }
                Ok(None) => break,
                Err(status) => {
                    eprintln!("tally watch: the stream broke ({}); resuming from {from}", status.message());
                    break;
                }
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

#[derive(Subcommand)]
pub enum QueryCommand {
    /// Accounts selected by their fields, in the order they were created.
    Accounts(QueryArgs),
    /// Transfers selected by their fields, in the order they were made: find a payment by the
    /// reference it carries.
    Transfers(QueryArgs),
}

#[derive(Args)]
pub struct QueryArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    #[command(flatten)]
    pub fields: FieldArgs,
    #[arg(long, default_value_t = 0)]
    pub ledger: u32,
    #[command(flatten)]
    pub range: RangeArgs,
}

impl QueryArgs {
    fn filter(&self) -> v1::QueryFilter {
        v1::QueryFilter {
            user_data_128: u128_to(self.fields.user_data_128),
            user_data_64: self.fields.user_data_64,
            user_data_32: self.fields.user_data_32,
            ledger: self.ledger,
            code: self.fields.code,
            timestamp_min: self.range.after.unwrap_or(0),
            timestamp_max: self.range.before.unwrap_or(0),
            limit: self.range.limit,
            flags: if self.range.reversed { v1::QueryFilterFlag::Reversed as u32 } else { 0 },
            consistency: consistency(&self.client) as i32,
        }
    }
}

/// Says where a query whose scan budget ran out stopped, and how to go on (on stderr, so that
/// `--json` output stays one document).
fn print_resume(resume_timestamp: u64, reversed: bool) {
    if resume_timestamp != 0 {
        let option = if reversed { "--before" } else { "--after" };
        eprintln!(
            "the scan stopped at its budget before the limit; more may follow: ask again with {option} {resume_timestamp}"
        );
    }
}

fn account_flags(names: &[String]) -> Result<u32, String> {
    use v1::AccountFlag as F;
    names.iter().filter(|n| !n.is_empty()).try_fold(0u32, |flags, name| {
        let flag = match name.as_str() {
            "linked" => F::Linked,
            "debits-must-not-exceed-credits" => F::DebitsMustNotExceedCredits,
            "credits-must-not-exceed-debits" => F::CreditsMustNotExceedDebits,
            "history" => F::History,
            "closed" => F::Closed,
            other => return Err(format!("unknown account flag '{other}'")),
        };
        Ok(flags | flag as u32)
    })
}

fn transfer_flags(args: &TransferArgs) -> Result<u32, String> {
    use v1::TransferFlag as F;
    let mut flags = 0u32;
    if args.pending {
        flags |= F::Pending as u32;
    }
    if args.post.is_some() {
        flags |= F::PostPendingTransfer as u32;
    }
    if args.void.is_some() {
        flags |= F::VoidPendingTransfer as u32;
    }
    if args.imported_at.is_some() {
        flags |= F::Imported as u32;
    }
    for name in args.flags.iter().filter(|n| !n.is_empty()) {
        flags |= match name.as_str() {
            "linked" => F::Linked,
            "balancing-debit" => F::BalancingDebit,
            "balancing-credit" => F::BalancingCredit,
            "closing-debit" => F::ClosingDebit,
            "closing-credit" => F::ClosingCredit,
            other => return Err(format!("unknown transfer flag '{other}'")),
        } as u32;
    }
    Ok(flags)
}

/// Prints the results of a create and returns failure unless every event is ok or exists.
fn report_results(json: bool, results: &[(String, u64)]) -> ExitCode {
    if json {
        let items: Vec<_> = results
            .iter()
            .map(|(status, timestamp)| json!({"status": status, "timestamp": timestamp}))
            .collect();
        println!("{}", serde_json::Value::Array(items));
    } else {
        let mut table = table(&["event", "result", "timestamp"]);
        for (index, (status, timestamp)) in results.iter().enumerate() {
            table.add_row(vec![index.to_string(), status.clone(), super::rfc3339(*timestamp)]);
        }
        println!("{table}");
    }
    if results.iter().all(|(status, _)| status == "ok" || status == "exists") {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn account_json(a: &v1::Account) -> serde_json::Value {
    json!({
        "id": u128_from(a.id.as_ref()).to_string(),
        "ledger": a.ledger, "code": a.code, "flags": a.flags,
        "debits_pending": u128_from(a.debits_pending.as_ref()).to_string(),
        "debits_posted": u128_from(a.debits_posted.as_ref()).to_string(),
        "credits_pending": u128_from(a.credits_pending.as_ref()).to_string(),
        "credits_posted": u128_from(a.credits_posted.as_ref()).to_string(),
        "user_data_128": u128_from(a.user_data_128.as_ref()).to_string(),
        "user_data_64": a.user_data_64, "user_data_32": a.user_data_32,
        "timestamp": a.timestamp,
    })
}

fn transfer_json(t: &v1::Transfer) -> serde_json::Value {
    json!({
        "id": u128_from(t.id.as_ref()).to_string(),
        "debit_account_id": u128_from(t.debit_account_id.as_ref()).to_string(),
        "credit_account_id": u128_from(t.credit_account_id.as_ref()).to_string(),
        "amount": u128_from(t.amount.as_ref()).to_string(),
        "pending_id": u128_from(t.pending_id.as_ref()).to_string(),
        "ledger": t.ledger, "code": t.code, "flags": t.flags, "timeout": t.timeout,
        "user_data_128": u128_from(t.user_data_128.as_ref()).to_string(),
        "user_data_64": t.user_data_64, "user_data_32": t.user_data_32,
        "timestamp": t.timestamp,
    })
}

fn print_accounts(json: bool, accounts: &[v1::Account]) {
    if json {
        println!("{}", serde_json::Value::Array(accounts.iter().map(account_json).collect()));
        return;
    }
    let mut table = table(&[
        "id",
        "ledger",
        "code",
        "debits pending",
        "debits posted",
        "credits pending",
        "credits posted",
        "flags",
    ]);
    for a in accounts {
        table.add_row(vec![
            u128_from(a.id.as_ref()).to_string(),
            a.ledger.to_string(),
            a.code.to_string(),
            u128_from(a.debits_pending.as_ref()).to_string(),
            u128_from(a.debits_posted.as_ref()).to_string(),
            u128_from(a.credits_pending.as_ref()).to_string(),
            u128_from(a.credits_posted.as_ref()).to_string(),
            format!("{:#x}", a.flags),
        ]);
    }
    println!("{table}");
}

fn print_transfers(json: bool, transfers: &[v1::Transfer]) {
    if json {
        println!("{}", serde_json::Value::Array(transfers.iter().map(transfer_json).collect()));
        return;
    }
    let mut table =
        table(&["id", "debit", "credit", "amount", "pending id", "ledger", "code", "flags", "timestamp"]);
    for t in transfers {
        table.add_row(vec![
            u128_from(t.id.as_ref()).to_string(),
            u128_from(t.debit_account_id.as_ref()).to_string(),
            u128_from(t.credit_account_id.as_ref()).to_string(),
            u128_from(t.amount.as_ref()).to_string(),
            u128_from(t.pending_id.as_ref()).to_string(),
            t.ledger.to_string(),
            t.code.to_string(),
            format!("{:#x}", t.flags),
            super::rfc3339(t.timestamp),
        ]);
    }
    println!("{table}");
}

pub async fn run(command: Command) -> Result<ExitCode, String> {
    match command {
        Command::Account(AccountCommand::Create {
            client: args,
            id,
            ledger,
            code,
            flags,
            user_data_128,
            user_data_64,
            user_data_32,
            imported_at,
        }) => {
            let imported = if imported_at.is_some() { v1::AccountFlag::Imported as u32 } else { 0 };
            let account = v1::Account {
                id: u128_to(id),
                ledger,
                code,
                flags: account_flags(&flags)? | imported,
                user_data_128: u128_to(user_data_128),
                user_data_64,
                user_data_32,
                timestamp: imported_at.unwrap_or(0),
                ..v1::Account::default()
            };
            let results = answered(&args, Call::Write, client(&args)?.create_accounts(vec![account])).await?;
            let named = results
                .iter()
                .map(|r| (status_name(r.status().as_str_name(), "CREATE_ACCOUNT_STATUS_"), r.timestamp))
                .collect::<Vec<_>>();
            Ok(report_results(args.json, &named))
        }
        Command::Transfer(args) => {
            let flags = transfer_flags(&args)?;
            let settle = args.post.or(args.void);
            let amount = match (args.amount, args.post) {
                (Some(amount), _) => amount,
                (None, Some(_)) => u128::MAX,
                (None, None) if args.void.is_some() => 0,
                (None, None) => return Err("--amount is required".into()),
            };
            let transfer = v1::Transfer {
                id: u128_to(args.id),
                debit_account_id: u128_to(args.debit),
                credit_account_id: u128_to(args.credit),
                amount: u128_to(amount),
                pending_id: u128_to(settle.unwrap_or(0)),
                user_data_128: u128_to(args.user_data_128),
                user_data_64: args.user_data_64,
                user_data_32: args.user_data_32,
                timeout: args.timeout,
                ledger: args.ledger,
                code: args.code,
                flags,
                timestamp: args.imported_at.unwrap_or(0),
            };
            let results =
                answered(&args.client, Call::Write, client(&args.client)?.create_transfers(vec![transfer]))
                    .await?;
            let named = results
                .iter()
                .map(|r| (status_name(r.status().as_str_name(), "CREATE_TRANSFER_STATUS_"), r.timestamp))
                .collect::<Vec<_>>();
            Ok(report_results(args.client.json, &named))
        }
        Command::Lookup(LookupCommand::Account { client: args, ids }) => {
            let accounts =
                answered(&args, Call::Read, client(&args)?.lookup_accounts(&ids, consistency(&args))).await?;
            print_accounts(args.json, &accounts);
            Ok(if accounts.len() == ids.len() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        Command::Lookup(LookupCommand::Transfer { client: args, ids }) => {
            let transfers =
                answered(&args, Call::Read, client(&args)?.lookup_transfers(&ids, consistency(&args)))
                    .await?;
            print_transfers(args.json, &transfers);
            Ok(if transfers.len() == ids.len() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        Command::Watch(args) => watch(&args).await,
        Command::Query(QueryCommand::Accounts(args)) => {
            let page =
                answered(&args.client, Call::Read, client(&args.client)?.query_accounts(args.filter()))
                    .await?;
            print_accounts(args.client.json, &page.accounts);
            print_resume(page.resume_timestamp, args.range.reversed);
            Ok(ExitCode::SUCCESS)
        }
        Command::Query(QueryCommand::Transfers(args)) => {
            let page =
                answered(&args.client, Call::Read, client(&args.client)?.query_transfers(args.filter()))
                    .await?;
            print_transfers(args.client.json, &page.transfers);
            print_resume(page.resume_timestamp, args.range.reversed);
            Ok(ExitCode::SUCCESS)
        }
        Command::History(args) => {
            use v1::AccountFilterFlag as F;
            let mut flags = F::Debits as u32 | F::Credits as u32;
            let reversed = args.range.reversed;
            if reversed {
                flags |= F::Reversed as u32;
            }
            let filter = v1::AccountFilter {
                account_id: u128_to(args.account),
                user_data_128: u128_to(args.fields.user_data_128),
                user_data_64: args.fields.user_data_64,
                user_data_32: args.fields.user_data_32,
                code: args.fields.code,
                timestamp_min: args.range.after.unwrap_or(0),
                timestamp_max: args.range.before.unwrap_or(0),
                limit: args.range.limit,
                flags,
                consistency: consistency(&args.client) as i32,
            };
            let client = client(&args.client)?;
            if args.balances {
                let page = answered(&args.client, Call::Read, client.get_account_balances(filter)).await?;
                print_balances(args.client.json, &page.balances);
                print_resume(page.resume_timestamp, reversed);
            } else {
                let page = answered(&args.client, Call::Read, client.get_account_transfers(filter)).await?;
                print_transfers(args.client.json, &page.transfers);
                print_resume(page.resume_timestamp, reversed);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Serve(_)
        | Command::Dev(_)
        | Command::Cluster(_)
        | Command::Benchmark(_)
        | Command::Certs(_)
        | Command::Backup(_)
        | Command::Restore(_) => {
            unreachable!("not a ledger command")
        }
    }
}

fn print_balances(json: bool, balances: &[v1::AccountBalance]) {
    let row = |b: &v1::AccountBalance| {
        [
            u128_from(b.debits_pending.as_ref()).to_string(),
            u128_from(b.debits_posted.as_ref()).to_string(),
            u128_from(b.credits_pending.as_ref()).to_string(),
            u128_from(b.credits_posted.as_ref()).to_string(),
        ]
    };
    if json {
        let items: Vec<_> = balances
            .iter()
            .map(|b| {
                let [dp, dpo, cp, cpo] = row(b);
                json!({"timestamp": b.timestamp, "debits_pending": dp, "debits_posted": dpo, "credits_pending": cp, "credits_posted": cpo})
            })
            .collect();
        println!("{}", serde_json::Value::Array(items));
        return;
    }
    let mut table =
        table(&["timestamp", "debits pending", "debits posted", "credits pending", "credits posted"]);
    for b in balances {
        let mut cells = vec![super::rfc3339(b.timestamp)];
        cells.extend(row(b));
        table.add_row(cells);
    }
    println!("{table}");
}

#[cfg(test)]
mod tests {
    use super::parse_time;

    #[test]
    fn import_times_read_as_rfc3339_or_nanoseconds() {
        assert_eq!(parse_time("1796128768389841106"), Ok(1_796_128_768_389_841_106));
        assert_eq!(parse_time("1970-01-01T00:00:01Z"), Ok(1_000_000_000));
        assert_eq!(parse_time("2026-12-01T12:39:28.389841106Z"), Ok(1_796_128_768_389_841_106));
        assert_eq!(parse_time("2026-12-01T13:39:28.5+01:00"), Ok(1_796_128_768_500_000_000));
        for bad in ["", "yesterday", "1969-12-31T23:59:59Z", "-5", "2026-13-01T00:00:00Z"] {
            assert!(parse_time(bad).is_err(), "{bad}");
        }
    }
}
