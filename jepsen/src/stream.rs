//! A change stream subscriber for the whole run: it reads `SubscribeChanges` from the start,
//! through every fault, resuming on any node from the last timestamp it received + 1 whenever
//! its stream breaks, and records what it read (`Record::Streamed`). Told the ledger's last
//! event once the final state is read, it stops when it has received it (or gives up once it
//! makes no progress for a while, or after a long while in all) and records whether it caught
//! up (`Record::StreamEnd`). The checker `change_stream_matches` holds what it read against the
//! final ledger.

use std::sync::Arc;
use std::time::Duration;

use tally_client::{Client, u128_from, v1};
use tokio::sync::watch;

use crate::history::{Record, StreamedEvent};
use crate::workload::Recorder;

/// Events recorded per history line.
const EVENTS_PER_RECORD: usize = 256;
/// How long the subscriber may go without receiving an event once told the ledger's last one
/// (a stream that is stuck, not one that is slow: at rush hour on a busy machine it trailed the
/// ledger by minutes and caught up at ~3x real time once the load stopped).
const STALL_MAX: Duration = Duration::from_secs(60);
/// How long the subscriber may take in all to reach the ledger's last event once told it.
const CATCH_UP_MAX: Duration = Duration::from_secs(15 * 60);

/// Follows the stream until `last` says the ledger's last timestamp and it has received it, or
/// it received nothing for `STALL_MAX`, or `CATCH_UP_MAX` after it was told.
pub async fn follow(
    client: Arc<Client>,
    recorder: Arc<Recorder>,
    mut last: watch::Receiver<Option<u64>>,
) -> Result<(), String> {
    let mut from = 0u64;
    let mut received = 0u64;
    let mut pending: Vec<StreamedEvent> = Vec::new();
    let mut told_at: Option<tokio::time::Instant> = None;
    let mut progress_at = tokio::time::Instant::now();
    loop {
        let target = *last.borrow();
        if let Some(target) = target {
            let now = tokio::time::Instant::now();
            let told_at = *told_at.get_or_insert(now);
            let caught_up = received > 0 && from > target;
            if caught_up || gives_up(now, told_at, progress_at) {
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
                    progress_at = tokio::time::Instant::now();
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

/// Whether a subscriber told the ledger's last event at `told_at`, that last received one at
/// `progress_at`, stops trying at `now`.
fn gives_up(
    now: tokio::time::Instant,
    told_at: tokio::time::Instant,
    progress_at: tokio::time::Instant,
) -> bool {
    let stalled = now.saturating_duration_since(progress_at.max(told_at)) >= STALL_MAX;
    stalled || now.saturating_duration_since(told_at) >= CATCH_UP_MAX
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slow_subscriber_goes_on_and_a_stuck_one_gives_up() {
        let told = tokio::time::Instant::now();
        let at = |secs: u64| told + Duration::from_secs(secs);
        // Far behind when told, still receiving: goes on past STALL_MAX.
        assert!(!gives_up(at(114), told, at(113)));
        // Nothing received since a minute before it was told: a minute from when it was told.
        assert!(!gives_up(at(59), told, told - Duration::from_secs(60)));
        assert!(gives_up(at(60), told, told - Duration::from_secs(60)));
        // Stuck after progress.
        assert!(!gives_up(at(159), told, at(100)));
        assert!(gives_up(at(160), told, at(100)));
        // Receiving, but never reaching the end.
        assert!(gives_up(at(15 * 60), told, at(15 * 60)));
    }
}
