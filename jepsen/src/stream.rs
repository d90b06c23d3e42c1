//! A change stream subscriber for the whole run: it reads `SubscribeChanges` from the start,
//! through every fault, resuming on any node from the last timestamp it received + 1 whenever
//! its stream breaks, and records what it read (`Record::Streamed`). Told the ledger's last
//! event once the final state is read, it stops when it has received it (or gives up after a
//! while) and records whether it caught up (`Record::StreamEnd`). The checker
//! `change_stream_matches` holds what it read against the final ledger.

use std::sync::Arc;
use std::time::Duration;

use tally_client::{Client, u128_from, v1};
use tokio::sync::watch;

use crate::history::{Record, StreamedEvent};
use crate::workload::Recorder;

/// Events recorded per history line.
const EVENTS_PER_RECORD: usize = 256;
/// How long the subscriber may take to reach the ledger's last event once told it.
const CATCH_UP_MAX: Duration = Duration::from_secs(60);

/// Follows the stream until `last` says the ledger's last timestamp and it has received it, or
/// `CATCH_UP_MAX` after that.
pub async fn follow(
    client: Arc<Client>,
    recorder: Arc<Recorder>,
    mut last: watch::Receiver<Option<u64>>,
) -> Result<(), String> {
    let mut from = 0u64;
    let mut received = 0u64;
    let mut pending: Vec<StreamedEvent> = Vec::new();
    let mut deadline: Option<tokio::time::Instant> = None;
    loop {
        let target = *last.borrow();
        if let Some(target) = target {
            let deadline = *deadline.get_or_insert_with(|| tokio::time::Instant::now() + CATCH_UP_MAX);
            let caught_up = received > 0 && from > target;
            if caught_up || tokio::time::Instant::now() >= deadline {
                flush(&recorder, &mut pending).await?;
                let time_us = recorder.now_us();
                return recorder
                    .record(Record::StreamEnd { time_us, caught_up, last_timestamp: from.saturating_sub(1) })
                    .await;
            }
        }
        let mut stream =
            match tokio::time::timeout(Duration::from_secs(5), client.subscribe_changes(from)).await {
                Ok(Ok(stream)) => stream,
                _ => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
        // Read until the stream breaks, or until there is news of the target to look at.
        loop {
            let message = tokio::select! {
                message = stream.message() => message,
                _ = last.changed() => break,
                _ = tokio::time::sleep(Duration::from_secs(1)), if target.is_some() => break,
            };
            match message {
                Ok(Some(event)) => {
                    from = event.timestamp + 1;
                    received += 1;
                    pending.push(streamed(&event));
                    if pending.len() >= EVENTS_PER_RECORD {
                        flush(&recorder, &mut pending).await?;
                    }
                    if target.is_some_and(|target| from > target) {
                        break;
                    }
                }
                Ok(None) | Err(_) => break,
            }
        }
        flush(&recorder, &mut pending).await?;
    }
}

fn streamed(event: &v1::ChangeEvent) -> StreamedEvent {
    let kind = event.r#type().as_str_name().trim_start_matches("CHANGE_TYPE_").to_ascii_lowercase();
    let id = match (&event.account, &event.transfer) {
        (Some(account), _) => u128_from(account.id.as_ref()),
        (None, Some(transfer)) => u128_from(transfer.id.as_ref()),
        (None, None) => 0,
    };
    StreamedEvent { timestamp: event.timestamp, kind, id }
}

async fn flush(recorder: &Recorder, pending: &mut Vec<StreamedEvent>) -> Result<(), String> {
    if pending.is_empty() {
        return Ok(());
    }
    let events = std::mem::take(pending);
    recorder.record(Record::Streamed { time_us: recorder.now_us(), events }).await
}
