//! The client commands: create accounts and transfers, look them up, an account's history.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Subcommand};
use serde::Deserialize;
use serde_json::json;
use tally_client::{u128_from, u128_to, v1};

use super::explain::{Call, answered};
use super::{ClientArgs, Command, client, consistency, status_name, table};

#[derive(Subcommand)]
pub enum AccountCommand {
    /// Create one account (its fields as flags), or many from --file.
    Create {
        #[command(flatten)]
        client: ClientArgs,
        #[command(flatten)]
        event: AccountEvent,
        /// Several accounts at once, from a file (`-`: stdin): a JSON array, or JSON lines, of
        /// objects whose fields are this command's flags with underscores (id, ledger, code,
        /// flags, user_data_128, user_data_64, user_data_32, imported_at), or CSV with those names
        /// in a header row (flags joined by '|'). Ids may be numbers or strings.
        #[arg(long, conflicts_with = "id")]
        file: Option<PathBuf>,
    },
}

/// One account, from flags or from a line of a file.
#[derive(Args, Deserialize, Default, Clone, Debug)]
#[serde(deny_unknown_fields, default)]
pub struct AccountEvent {
    #[arg(long, required_unless_present = "file")]
    #[serde(deserialize_with = "number::u128_opt")]
    pub id: Option<u128>,
    /// The ledger (currency or asset) it keeps: accounts transfer only within one. Not 0.
    #[arg(long, required_unless_present = "file")]
    pub ledger: Option<u32>,
    /// What kind of account it is, for your own use (e.g. 1 for customer). Not 0.
    #[arg(long, required_unless_present = "file")]
    pub code: Option<u32>,
    /// Comma-separated: linked, debits-must-not-exceed-credits, credits-must-not-exceed-debits,
    /// history, closed.
    #[arg(long, value_delimiter = ',')]
    #[serde(deserialize_with = "number::names")]
    pub flags: Vec<String>,
    /// Your own data, e.g. a reference to the customer record (queryable).
    #[arg(long, default_value_t = 0)]
    #[serde(deserialize_with = "number::u128")]
    pub user_data_128: u128,
    #[arg(long, default_value_t = 0)]
    pub user_data_64: u64,
    #[arg(long, default_value_t = 0)]
    pub user_data_32: u32,
    /// Import the account from another system as created at this time (RFC 3339, or ns
    /// since the Unix epoch): in the past, after the ledger's last event.
    #[arg(long, value_parser = parse_time)]
    #[serde(deserialize_with = "number::time_opt")]
    pub imported_at: Option<u64>,
}

impl AccountEvent {
    fn account(&self) -> Result<v1::Account, String> {
        let imported = if self.imported_at.is_some() { v1::AccountFlag::Imported as u32 } else { 0 };
        Ok(v1::Account {
            id: u128_to(self.id.ok_or("every account needs an id")?),
            ledger: self.ledger.unwrap_or(0),
            code: self.code.unwrap_or(0),
            flags: super::words::parse_account_flags(&self.flags)? | imported,
            user_data_128: u128_to(self.user_data_128),
            user_data_64: self.user_data_64,
            user_data_32: self.user_data_32,
            timestamp: self.imported_at.unwrap_or(0),
            ..v1::Account::default()
        })
    }
}

#[derive(Args)]
pub struct TransferArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    #[command(flatten)]
    pub event: TransferEvent,
    /// Several transfers at once, from a file (`-`: stdin): a JSON array, or JSON lines, of
    /// objects whose fields are this command's flags with underscores (id, debit, credit,
    /// amount, ledger, code, pending, pending_timeout, post, void, flags, user_data_128,
    /// user_data_64, user_data_32, imported_at), or CSV with those names in a header row (flags
    /// joined by '|'). Linked chains (flags linked on every transfer but the chain's last)
    /// succeed or fail as a whole. Up to 8189 per request; a longer file goes in several
    /// requests, never splitting a chain.
    #[arg(long, conflicts_with = "id")]
    pub file: Option<PathBuf>,
}

/// One transfer, from flags or from a line of a file.
#[derive(Args, Deserialize, Default, Clone, Debug)]
#[serde(deny_unknown_fields, default)]
pub struct TransferEvent {
    #[arg(long, required_unless_present = "file")]
    #[serde(deserialize_with = "number::u128_opt")]
    pub id: Option<u128>,
    /// The account debited (money leaves it).
    #[arg(long, default_value_t = 0)]
    #[serde(deserialize_with = "number::u128")]
    pub debit: u128,
    /// The account credited (money arrives).
    #[arg(long, default_value_t = 0)]
    #[serde(deserialize_with = "number::u128")]
    pub credit: u128,
    /// For --post: omit to post the whole pending amount.
    #[arg(long)]
    #[serde(deserialize_with = "number::u128_opt")]
    pub amount: Option<u128>,
    /// The ledger of both accounts. Not 0 (a post or void may leave it out: it is the pending
    /// transfer's).
    #[arg(long, required_unless_present_any = ["post", "void", "file"])]
    pub ledger: Option<u32>,
    /// Why the money moves, for your own use (e.g. 1 for a payment). Not 0 (a post or void may
    /// leave it out).
    #[arg(long, required_unless_present_any = ["post", "void", "file"])]
    pub code: Option<u32>,
    /// Reserve the amount; post or void it later.
    #[arg(long)]
    pub pending: bool,
    /// Seconds after which a pending transfer expires and its reservation is released (0:
    /// never). Not the request's deadline: that is --timeout-ms.
    #[arg(long, default_value_t = 0)]
    pub pending_timeout: u32,
    /// Post the pending transfer with this id.
    #[arg(long, conflicts_with_all = ["void", "pending"])]
    #[serde(deserialize_with = "number::u128_opt")]
    pub post: Option<u128>,
    /// Void the pending transfer with this id.
    #[arg(long, conflicts_with_all = ["post", "pending"])]
    #[serde(deserialize_with = "number::u128_opt")]
    pub void: Option<u128>,
    /// Comma-separated: linked, pending, balancing-debit, balancing-credit, closing-debit,
    /// closing-credit.
    #[arg(long, value_delimiter = ',')]
    #[serde(deserialize_with = "number::names")]
    pub flags: Vec<String>,
    /// Your own data, e.g. the payment's reference (queryable: `tally query transfers
    /// --user-data-128`).
    #[arg(long, default_value_t = 0)]
    #[serde(deserialize_with = "number::u128")]
    pub user_data_128: u128,
    #[arg(long, default_value_t = 0)]
    pub user_data_64: u64,
    #[arg(long, default_value_t = 0)]
    pub user_data_32: u32,
    /// Import the transfer from another system as made at this time (RFC 3339, or ns since the
    /// Unix epoch): in the past, after the ledger's last event and after both accounts.
    #[arg(long, value_parser = parse_time)]
    #[serde(deserialize_with = "number::time_opt")]
    pub imported_at: Option<u64>,
}

impl TransferEvent {
    fn transfer(&self) -> Result<v1::Transfer, String> {
        use v1::TransferFlag as F;
        let mut flags = super::words::parse_transfer_flags(&self.flags)?;
        if self.pending {
            flags |= F::Pending as u32;
        }
        if self.post.is_some() {
            flags |= F::PostPendingTransfer as u32;
        }
        if self.void.is_some() {
            flags |= F::VoidPendingTransfer as u32;
        }
        if self.imported_at.is_some() {
            flags |= F::Imported as u32;
        }
        let settle = self.post.or(self.void);
        let amount = match (self.amount, self.post) {
            (Some(amount), _) => amount,
            (None, Some(_)) => u128::MAX,
            (None, None) if self.void.is_some() => 0,
            (None, None) => return Err("every transfer but a post or void needs an amount (--amount)".into()),
        };
        Ok(v1::Transfer {
            id: u128_to(self.id.ok_or("every transfer needs an id")?),
            debit_account_id: u128_to(self.debit),
            credit_account_id: u128_to(self.credit),
            amount: u128_to(amount),
            pending_id: u128_to(settle.unwrap_or(0)),
            user_data_128: u128_to(self.user_data_128),
            user_data_64: self.user_data_64,
            user_data_32: self.user_data_32,
            timeout: self.pending_timeout,
            ledger: self.ledger.unwrap_or(0),
            code: self.code.unwrap_or(0),
            flags,
            timestamp: self.imported_at.unwrap_or(0),
        })
    }
}

/// Fields of events read from a file: numbers or strings for 128-bit values (JSON numbers
/// past 2^53 lose digits in most languages), names as a list or a joined string.
mod number {
    use serde::de::{Deserializer, Error, Visitor};

    /// A whole number, or a string of one; or, for `text`, any string.
    enum Wide {
        Number(u128),
        Text(String),
    }

    struct WideVisitor;

    impl Visitor<'_> for WideVisitor {
        type Value = Wide;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a whole number, or a string")
        }

        fn visit_u64<E: Error>(self, v: u64) -> Result<Wide, E> {
            Ok(Wide::Number(v.into()))
        }

        fn visit_u128<E: Error>(self, v: u128) -> Result<Wide, E> {
            Ok(Wide::Number(v))
        }

        fn visit_i64<E: Error>(self, v: i64) -> Result<Wide, E> {
            u128::try_from(v).map(Wide::Number).map_err(|_| E::custom(format!("{v} is negative")))
        }

        fn visit_str<E: Error>(self, v: &str) -> Result<Wide, E> {
            Ok(Wide::Text(v.to_string()))
        }
    }

    fn wide<'de, D: Deserializer<'de>>(d: D) -> Result<Wide, D::Error> {
        d.deserialize_any(WideVisitor)
    }

    pub fn u128<'de, D: Deserializer<'de>>(d: D) -> Result<u128, D::Error> {
        match wide(d)? {
            Wide::Number(n) => Ok(n),
            Wide::Text(t) => {
                t.trim().parse().map_err(|_| D::Error::custom(format!("'{t}' is not a whole number")))
            }
        }
    }

    pub fn u128_opt<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u128>, D::Error> {
        u128(d).map(Some)
    }

    pub fn time_opt<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        match wide(d)? {
            Wide::Number(n) => u64::try_from(n).map(Some).map_err(|_| D::Error::custom("time too large")),
            Wide::Text(t) => super::parse_time(&t).map(Some).map_err(D::Error::custom),
        }
    }

    pub fn names<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
        struct NamesVisitor;
        impl<'de> Visitor<'de> for NamesVisitor {
            type Value = Vec<String>;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a list of names, or one string of them joined by ',' or '|'")
            }

            fn visit_str<E: Error>(self, v: &str) -> Result<Vec<String>, E> {
                Ok(v.split([',', '|']).map(str::to_string).collect())
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<String>, A::Error> {
                let mut names = Vec::new();
                while let Some(name) = seq.next_element::<String>()? {
                    names.push(name);
                }
                Ok(names)
            }
        }
        d.deserialize_any(NamesVisitor)
    }
}

/// The most events one request carries.
const EVENTS_PER_REQUEST_MAX: usize = 8189;

/// Events from `path` (`-`: stdin): a JSON array, JSON lines, or CSV with a header row.
fn read_events<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Vec<T>, String> {
    let text = if path == Path::new("-") {
        std::io::read_to_string(std::io::stdin()).map_err(|e| format!("cannot read stdin: {e}"))?
    } else {
        std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?
    };
    let name = path.display();
    let trimmed = text.trim_start();
    if trimmed.starts_with('[') {
        return serde_json::from_str(trimmed).map_err(|e| format!("{name}: not a JSON array of events: {e}"));
    }
    if trimmed.starts_with('{') {
        return text
            .lines()
            .enumerate()
            .filter(|(_, line)| !line.trim().is_empty())
            .map(|(at, line)| serde_json::from_str(line).map_err(|e| format!("{name}, line {}: {e}", at + 1)))
            .collect();
    }
    let mut lines = text.lines().enumerate().filter(|(_, line)| !line.trim().is_empty());
    let Some((_, header)) = lines.next() else { return Ok(Vec::new()) };
    let columns: Vec<String> = header.split(',').map(|c| c.trim().to_string()).collect();
    lines
        .map(|(at, line)| {
            let cells: Vec<&str> = line.split(',').map(str::trim).collect();
            if cells.len() != columns.len() {
                return Err(format!(
                    "{name}, line {}: {} cells, the header has {}",
                    at + 1,
                    cells.len(),
                    columns.len()
                ));
            }
            let mut object = serde_json::Map::new();
            for (column, cell) in columns.iter().zip(cells).filter(|(_, cell)| !cell.is_empty()) {
                let value = match cell {
                    "true" | "false" => serde_json::Value::Bool(cell == "true"),
                    _ => match cell.parse::<u64>() {
                        Ok(number) if column != "flags" => number.into(),
                        _ => cell.into(),
                    },
                };
                object.insert(column.clone(), value);
            }
            serde_json::from_value(serde_json::Value::Object(object))
                .map_err(|e| format!("{name}, line {}: {e}", at + 1))
        })
        .collect()
}

/// Splits `events` into requests of at most `EVENTS_PER_REQUEST_MAX`, never inside a linked
/// chain (an event with the linked flag belongs with the next).
fn requests<T>(events: Vec<T>, linked: impl Fn(&T) -> bool) -> Result<Vec<Vec<T>>, String> {
    let mut requests: Vec<Vec<T>> = Vec::new();
    let mut current: Vec<T> = Vec::new();
    let mut chain_start = 0;
    for event in events {
        let closes_chain = !linked(&event);
        current.push(event);
        if closes_chain {
            if current.len() > EVENTS_PER_REQUEST_MAX {
                let rest = current.split_off(chain_start);
                if rest.len() > EVENTS_PER_REQUEST_MAX {
                    return Err(format!(
                        "a linked chain of {} events: one request carries at most {EVENTS_PER_REQUEST_MAX}",
                        rest.len()
                    ));
                }
                requests.push(std::mem::replace(&mut current, rest));
            }
            chain_start = current.len();
        }
    }
    if !current.is_empty() {
        requests.push(current);
    }
    Ok(requests)
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
    /// Accounts by id, with their balances; says which ids are not found (exit 1).
    Account {
        #[command(flatten)]
        client: ClientArgs,
        #[arg(required = true)]
        ids: Vec<u128>,
    },
    /// Transfers by id, with what became of pending ones; says which ids are not found (exit 1).
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
    /// The account's id.
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
    /// Only those with this user data 128 (0: any).
    #[arg(long, default_value_t = 0)]
    pub user_data_128: u128,
    /// Only those with this user data 64 (0: any).
    #[arg(long, default_value_t = 0)]
    pub user_data_64: u64,
    /// Only those with this user data 32 (0: any).
    #[arg(long, default_value_t = 0)]
    pub user_data_32: u32,
    /// Only those with this code (0: any).
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
    /// At most this many rows (up to 8189); the command says how to ask for the next ones.
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
    // Resumes by itself on another node from the last event + 1 when its node fails.
    let mut changes = client.changes(args.from.unwrap_or(0));
    let mut printed = 0u64;
    loop {
        match changes.next().await {
            Ok(event) => {
                println!("{}", change_line(args.client.json, &event));
                printed += 1;
                if args.count.is_some_and(|count| printed >= count) {
                    return Ok(ExitCode::SUCCESS);
                }
            }
            Err(tally_client::Error::Rejected(status)) => {
                return Err(format!("the change stream was refused: {}", status.message()));
            }
            Err(error) => {
                eprintln!(
                    "tally watch: no node serves the change stream now ({error}); retrying from {}",
                    changes.next_timestamp()
                );
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
        }
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
    /// Only those of this ledger (0: any).
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

/// Says, on stderr (so that `--json` stays one document), when more rows may follow: the
/// limit was reached, or the scan's budget ran out first; and how to ask for them.
fn print_more(rows: usize, range: &RangeArgs, last_timestamp: u64, resume_timestamp: u64) {
    let option = if range.reversed { "--before" } else { "--after" };
    if resume_timestamp != 0 {
        eprintln!(
            "the scan stopped at its budget before the limit; more may follow: ask again with {option} {resume_timestamp}"
        );
    } else if rows == range.limit as usize && rows > 0 {
        let next = if range.reversed { last_timestamp.saturating_sub(1) } else { last_timestamp + 1 };
        eprintln!("{rows} rows, the limit (--limit); more may follow: ask again with {option} {next}");
    }
}

/// Says which ids were not found (on stderr); failure if any.
fn say_missing(what: &str, asked: &[u128], found: &[u128]) -> ExitCode {
    let missing: Vec<String> = asked.iter().filter(|id| !found.contains(id)).map(u128::to_string).collect();
    if missing.is_empty() {
        return ExitCode::SUCCESS;
    }
    eprintln!("not found: {what} {}", missing.join(", "));
    ExitCode::FAILURE
}

/// The most pending transfers whose state a table looks up (each costs a read).
const PENDING_STATES_MAX: usize = 50;

/// What became of each pending transfer among `transfers`, by id: posted or voided (by which
/// transfer, found among the debit account's later transfers), expired (its timeout passed), or
/// still pending (until when).
async fn pending_states(
    client: &tally_client::Client,
    transfers: &[v1::Transfer],
    consistency: v1::ReadConsistency,
) -> std::collections::HashMap<u128, String> {
    use v1::TransferFlag as F;
    let mut states = std::collections::HashMap::new();
    let pending = transfers.iter().filter(|t| t.flags & F::Pending as u32 != 0).take(PENDING_STATES_MAX);
    let now_ns = time::OffsetDateTime::now_utc().unix_timestamp_nanos() as u64;
    for t in pending {
        let id = u128_from(t.id.as_ref());
        let filter = v1::AccountFilter {
            account_id: t.debit_account_id,
            timestamp_min: t.timestamp + 1,
            limit: EVENTS_PER_REQUEST_MAX as u32,
            flags: v1::AccountFilterFlag::Debits as u32,
            consistency: consistency as i32,
            ..v1::AccountFilter::default()
        };
        let settled = client.get_account_transfers(filter).await.ok().and_then(|page| {
            page.transfers.into_iter().find(|later| u128_from(later.pending_id.as_ref()) == id)
        });
        let expires_ns = t.timestamp.saturating_add(u64::from(t.timeout) * 1_000_000_000);
        let state = match settled {
            Some(s) if s.flags & F::PostPendingTransfer as u32 != 0 => {
                format!("posted by {}", u128_from(s.id.as_ref()))
            }
            Some(s) => format!("voided by {}", u128_from(s.id.as_ref())),
            None if t.timeout == 0 => "pending".into(),
            None if expires_ns <= now_ns => format!("expired {}", super::rfc3339(expires_ns)),
            None => format!("pending until {}", super::rfc3339(expires_ns)),
        };
        states.insert(id, state);
    }
    states
}

/// One event's result: its id, its code's name and meaning, its timestamp.
struct Outcome {
    id: u128,
    status: String,
    meaning: String,
    timestamp: u64,
}

impl Outcome {
    /// The result `name` of `enumeration` (`CreateTransferStatus`), whose values begin with
    /// `prefix` (`CREATE_TRANSFER_STATUS_`).
    fn new(id: u128, enumeration: &str, prefix: &str, name: &str, timestamp: u64) -> Outcome {
        Outcome {
            id,
            status: status_name(name, prefix),
            meaning: super::words::meaning(enumeration, name, prefix),
            timestamp,
        }
    }
}

/// Prints the results of a create and returns failure unless every event is ok or exists.
fn report_results(json: bool, results: &[Outcome]) -> ExitCode {
    if json {
        let items: Vec<_> = results
            .iter()
            .map(|r| json!({"id": r.id.to_string(), "status": r.status, "timestamp": r.timestamp}))
            .collect();
        println!("{}", serde_json::Value::Array(items));
    } else {
        let mut table = table(&["event", "id", "result", "timestamp"]);
        for (index, r) in results.iter().enumerate() {
            table.add_row(vec![
                index.to_string(),
                r.id.to_string(),
                r.status.clone(),
                super::rfc3339(r.timestamp),
            ]);
        }
        println!("{table}");
        // What each refusal means, once per code.
        let mut told = std::collections::BTreeSet::new();
        for r in results.iter().filter(|r| r.status != "ok" && r.status != "exists") {
            if told.insert(r.status.clone()) {
                println!("{}: {}", r.status, r.meaning);
            }
        }
    }
    if results.iter().all(|r| r.status == "ok" || r.status == "exists") {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn account_json(a: &v1::Account) -> serde_json::Value {
    json!({
        "id": u128_from(a.id.as_ref()).to_string(),
        "ledger": a.ledger, "code": a.code, "flags": a.flags,
        "flag_names": super::words::account_flag_names(a.flags),
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
        "flag_names": super::words::transfer_flag_names(t.flags),
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
            super::words::account_flag_names(a.flags),
        ]);
    }
    println!("{table}");
}

fn print_transfers(json: bool, transfers: &[v1::Transfer], states: &std::collections::HashMap<u128, String>) {
    if json {
        let items = transfers.iter().map(|t| {
            let mut item = transfer_json(t);
            if let Some(state) = states.get(&u128_from(t.id.as_ref())) {
                item["state"] = state.clone().into();
            }
            item
        });
        println!("{}", serde_json::Value::Array(items.collect()));
        return;
    }
    let mut table = table(&[
        "id",
        "debit",
        "credit",
        "amount",
        "pending id",
        "ledger",
        "code",
        "flags",
        "user data 128",
        "state",
        "timestamp",
    ]);
    for t in transfers {
        let id = u128_from(t.id.as_ref());
        let pending_id = u128_from(t.pending_id.as_ref());
        table.add_row(vec![
            id.to_string(),
            u128_from(t.debit_account_id.as_ref()).to_string(),
            u128_from(t.credit_account_id.as_ref()).to_string(),
            u128_from(t.amount.as_ref()).to_string(),
            if pending_id == 0 { String::new() } else { pending_id.to_string() },
            t.ledger.to_string(),
            t.code.to_string(),
            super::words::transfer_flag_names(t.flags),
            u128_from(t.user_data_128.as_ref()).to_string(),
            states.get(&id).cloned().unwrap_or_default(),
            super::rfc3339(t.timestamp),
        ]);
    }
    println!("{table}");
}

pub async fn run(command: Command) -> Result<ExitCode, String> {
    match command {
        Command::Account(AccountCommand::Create { client: args, event, file }) => {
            let events = match &file {
                Some(path) => read_events::<AccountEvent>(path)?,
                None => vec![event],
            };
            let accounts = events.iter().map(AccountEvent::account).collect::<Result<Vec<_>, _>>()?;
            let linked = |a: &v1::Account| a.flags & v1::AccountFlag::Linked as u32 != 0;
            let client = client(&args)?;
            let mut outcomes = Vec::new();
            for request in requests(accounts, linked)? {
                let ids: Vec<u128> = request.iter().map(|a| u128_from(a.id.as_ref())).collect();
                let results = answered(&args, Call::Write, client.create_accounts(request)).await?;
                for (id, result) in ids.into_iter().zip(results) {
                    let name = result.status().as_str_name();
                    outcomes.push(Outcome::new(
                        id,
                        "CreateAccountStatus",
                        "CREATE_ACCOUNT_STATUS_",
                        name,
                        result.timestamp,
                    ));
                }
            }
            Ok(report_results(args.json, &outcomes))
        }
        Command::Transfer(args) => {
            let events = match &args.file {
                Some(path) => read_events::<TransferEvent>(path)?,
                None => vec![args.event.clone()],
            };
            let transfers = events.iter().map(TransferEvent::transfer).collect::<Result<Vec<_>, _>>()?;
            let linked = |t: &v1::Transfer| t.flags & v1::TransferFlag::Linked as u32 != 0;
            let client = client(&args.client)?;
            let mut outcomes = Vec::new();
            for request in requests(transfers, linked)? {
                let ids: Vec<u128> = request.iter().map(|t| u128_from(t.id.as_ref())).collect();
                let results = answered(&args.client, Call::Write, client.create_transfers(request)).await?;
                for (id, result) in ids.into_iter().zip(results) {
                    let name = result.status().as_str_name();
                    outcomes.push(Outcome::new(
                        id,
                        "CreateTransferStatus",
                        "CREATE_TRANSFER_STATUS_",
                        name,
                        result.timestamp,
                    ));
                }
            }
            Ok(report_results(args.client.json, &outcomes))
        }
        Command::Lookup(LookupCommand::Account { client: args, ids }) => {
            let accounts =
                answered(&args, Call::Read, client(&args)?.lookup_accounts(&ids, consistency(&args))).await?;
            let found: Vec<u128> = accounts.iter().map(|a| u128_from(a.id.as_ref())).collect();
            if !accounts.is_empty() || args.json {
                print_accounts(args.json, &accounts);
            }
            Ok(say_missing("account", &ids, &found))
        }
        Command::Lookup(LookupCommand::Transfer { client: args, ids }) => {
            let client = client(&args)?;
            let transfers =
                answered(&args, Call::Read, client.lookup_transfers(&ids, consistency(&args))).await?;
            let found: Vec<u128> = transfers.iter().map(|t| u128_from(t.id.as_ref())).collect();
            if !transfers.is_empty() || args.json {
                let states = pending_states(&client, &transfers, consistency(&args)).await;
                print_transfers(args.json, &transfers, &states);
            }
            Ok(say_missing("transfer", &ids, &found))
        }
        Command::Watch(args) => watch(&args).await,
        Command::Query(QueryCommand::Accounts(args)) => {
            let page =
                answered(&args.client, Call::Read, client(&args.client)?.query_accounts(args.filter()))
                    .await?;
            print_accounts(args.client.json, &page.accounts);
            let last = page.accounts.last().map_or(0, |a| a.timestamp);
            print_more(page.accounts.len(), &args.range, last, page.resume_timestamp);
            Ok(ExitCode::SUCCESS)
        }
        Command::Query(QueryCommand::Transfers(args)) => {
            let client = client(&args.client)?;
            let page = answered(&args.client, Call::Read, client.query_transfers(args.filter())).await?;
            let states = pending_states(&client, &page.transfers, consistency(&args.client)).await;
            print_transfers(args.client.json, &page.transfers, &states);
            let last = page.transfers.last().map_or(0, |t| t.timestamp);
            print_more(page.transfers.len(), &args.range, last, page.resume_timestamp);
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
            // The transfers of the same range: the rows of each, and the ids of the balances'.
            let page = answered(&args.client, Call::Read, client.get_account_transfers(filter)).await?;
            if page.transfers.is_empty() {
                let account = answered(
                    &args.client,
                    Call::Read,
                    client.lookup_accounts(&[args.account], consistency(&args.client)),
                )
                .await?;
                if account.is_empty() {
                    eprintln!("not found: account {}", args.account);
                    return Ok(ExitCode::FAILURE);
                }
            }
            let last = page.transfers.last().map_or(0, |t| t.timestamp);
            if args.balances {
                let balances =
                    answered(&args.client, Call::Read, client.get_account_balances(filter)).await?;
                if balances.balances.is_empty() && !page.transfers.is_empty() {
                    eprintln!(
                        "account {} keeps no balance history: it was created without the history flag",
                        args.account
                    );
                }
                print_balances(args.client.json, &balances.balances, &page.transfers);
            } else {
                let states = pending_states(&client, &page.transfers, consistency(&args.client)).await;
                print_transfers(args.client.json, &page.transfers, &states);
            }
            print_more(page.transfers.len(), &args.range, last, page.resume_timestamp);
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

/// The balances after each transfer, with the transfer's id (matched by timestamp).
fn print_balances(json: bool, balances: &[v1::AccountBalance], transfers: &[v1::Transfer]) {
    let transfer_of = |timestamp: u64| {
        transfers
            .iter()
            .find(|t| t.timestamp == timestamp)
            .map_or(String::new(), |t| u128_from(t.id.as_ref()).to_string())
    };
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
                json!({"timestamp": b.timestamp, "transfer_id": transfer_of(b.timestamp), "debits_pending": dp, "debits_posted": dpo, "credits_pending": cp, "credits_posted": cpo})
            })
            .collect();
        println!("{}", serde_json::Value::Array(items));
        return;
    }
    let mut table = table(&[
        "timestamp",
        "transfer",
        "debits pending",
        "debits posted",
        "credits pending",
        "credits posted",
    ]);
    for b in balances {
        let mut cells = vec![super::rfc3339(b.timestamp), transfer_of(b.timestamp)];
        cells.extend(row(b));
        table.add_row(cells);
    }
    println!("{table}");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Requests of at most 8189 events, cut between chains: a chain never straddles two.
    #[test]
    fn long_files_go_in_requests_that_never_split_a_chain() {
        let cut = |events: Vec<bool>| -> Vec<usize> {
            requests(events, |linked| *linked).unwrap().iter().map(Vec::len).collect()
        };
        assert_eq!(cut(vec![false; 10]), vec![10]);
        assert_eq!(cut(vec![false; EVENTS_PER_REQUEST_MAX + 1]), vec![EVENTS_PER_REQUEST_MAX, 1]);
        // A chain of three that would cross the boundary moves whole to the next request.
        let mut events = vec![false; EVENTS_PER_REQUEST_MAX - 1];
        events.extend([true, true, false, false]);
        assert_eq!(cut(events), vec![EVENTS_PER_REQUEST_MAX - 1, 4]);
        let mut too_long = vec![true; EVENTS_PER_REQUEST_MAX];
        too_long.push(false);
        assert!(requests(too_long, |linked| *linked).unwrap_err().contains("a linked chain of 8190 events"));
    }

    /// The same transfers as JSON lines, a JSON array and CSV; flags as a list or joined; ids as
    /// numbers or strings (2^128-2 does not fit a JSON number most languages read).
    #[test]
    fn events_read_from_json_lines_arrays_and_csv() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        let big = u128::MAX - 1;
        let lines = write(
            "t.jsonl",
            &format!(
                "{{\"id\": 1, \"debit\": 1, \"credit\": 2, \"amount\": 5, \"ledger\": 1, \"code\": 1, \"flags\": [\"linked\"]}}\n\n{{\"id\": \"{big}\", \"post\": 7}}\n"
            ),
        );
        let array = write(
            "t.json",
            &format!(
                "[{{\"id\": 1, \"debit\": 1, \"credit\": 2, \"amount\": 5, \"ledger\": 1, \"code\": 1, \"flags\": \"linked\"}}, {{\"id\": \"{big}\", \"post\": 7}}]"
            ),
        );
        let csv = write(
            "t.csv",
            &format!("id,debit,credit,amount,ledger,code,flags,post\n1,1,2,5,1,1,linked,\n{big},,,,,,,7\n"),
        );
        for path in [lines, array, csv] {
            let events: Vec<TransferEvent> = read_events(&path).unwrap();
            let transfers: Vec<v1::Transfer> = events.iter().map(|e| e.transfer().unwrap()).collect();
            assert_eq!(transfers.len(), 2, "{}", path.display());
            assert_eq!(transfers[0].flags, v1::TransferFlag::Linked as u32, "{}", path.display());
            assert_eq!(u128_from(transfers[1].id.as_ref()), big, "{}", path.display());
            assert_eq!(u128_from(transfers[1].pending_id.as_ref()), 7, "{}", path.display());
            assert_eq!(u128_from(transfers[1].amount.as_ref()), u128::MAX, "a post of the whole amount");
        }
        let bad = write("bad.jsonl", "{\"id\": 1, \"amount\": -5}\n");
        assert!(read_events::<TransferEvent>(&bad).unwrap_err().contains("line 1"));
        let unknown = write("unknown.csv", "id,colour\n1,red\n");
        assert!(read_events::<TransferEvent>(&unknown).unwrap_err().contains("unknown field `colour`"));
    }

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
