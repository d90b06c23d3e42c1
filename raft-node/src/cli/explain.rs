//! A failed call, in words that name the cause and the next step: a door that speaks another
//! protocol or trusts another CA, a cluster that cannot commit, a write whose outcome is unknown.

use std::time::Duration;

use tally_client::{Client, Error, v1};

use super::ClientArgs;

/// What the failed call was: a write's outcome may be unknown, a read's never matters.
#[derive(Clone, Copy, PartialEq)]
pub enum Call {
    Read,
    Write,
}

/// How long the status asked for after a failure may take.
const STATUS_MAX: Duration = Duration::from_millis(1500);

/// Awaits `call`; a failure comes back explained.
pub async fn answered<T>(
    args: &ClientArgs,
    kind: Call,
    call: impl std::future::Future<Output = Result<T, Error>>,
) -> Result<T, String> {
    match call.await {
        Ok(value) => Ok(value),
        Err(error) => Err(failure(error, args, kind).await),
    }
}

/// `error` in words. A refusal is the node's own message. When no node answered, each address
/// is probed for what is wrong with it, and a node that can be reached is asked whether the
/// cluster commits at all; a write then says that its outcome is unknown and a retry is safe.
pub async fn failure(error: Error, args: &ClientArgs, kind: Call) -> String {
    let status = match error {
        // An HTTP answer without gRPC (a 404): the address is not a node's client door.
        Error::Rejected(status) if status.message().contains("grpc-status header missing") => status,
        Error::Rejected(status) => return format!("refused: {}", status.message()),
        Error::Unavailable(status) => status,
    };
    let Ok(security) = args.tls.security() else { return Error::Unavailable(status).to_string() };
    let probes = args.nodes.iter().map(|address| tally_client::diagnose(address, &security));
    let problems = futures::future::join_all(probes).await;
    let reachable: Vec<String> = args
        .nodes
        .iter()
        .zip(&problems)
        .filter(|(_, problem)| problem.is_none())
        .map(|(address, _)| address.clone())
        .collect();
    let mut lines: Vec<String> = args
        .nodes
        .iter()
        .zip(&problems)
        .filter_map(|(address, problem)| problem.as_ref().map(|p| format!("  {address}: {p}")))
        .collect();
    let cause = if reachable.is_empty() {
        "no node could be reached:".to_string()
    } else {
        match cluster_verdict(&reachable, &security).await {
            Some(verdict) => verdict,
            None => format!(
                "no node completed the request within {} ms (last error: {})",
                args.timeout_ms,
                status.message()
            ),
        }
    };
    lines.insert(0, cause);
    if !reachable.is_empty() && lines.len() > 1 {
        lines.insert(1, "Not every address given answers:".into());
    }
    if kind == Call::Read && lines[0].starts_with("THE CLUSTER CANNOT COMMIT") {
        lines.push(
            "Reads with --local answer from one node's state without the quorum (possibly stale).".into(),
        );
    }
    if kind == Call::Write && !reachable.is_empty() {
        lines.push(
            "The write's outcome is unknown: it may have been applied. Running the same command again (same \
             --id) is safe: `exists` then means it was applied the first time."
                .into(),
        );
    }
    lines.join("\n")
}

/// The cluster's own verdict when it cannot commit, from the first node that answers; None
/// when it commits or nobody answered.
async fn cluster_verdict(addresses: &[String], security: &tally_client::Security) -> Option<String> {
    let client = Client::new(addresses, STATUS_MAX, security).ok()?;
    let status = client.cluster_status().await.ok()?;
    (!status.can_commit).then(|| commit_verdict(&status))
}

/// Whether the cluster commits now, in words: first line of the status.
pub(super) fn commit_verdict(status: &v1::StatusReply) -> String {
    let quorum = status.voters / 2 + 1;
    let verb = if status.voters_up == 1 { "is" } else { "are" };
    let up = format!("{} of {} voters {verb} up (a majority is {quorum})", status.voters_up, status.voters);
    if status.can_commit {
        return format!("The cluster commits: leader node {}; {up}.", status.leader_id);
    }
    let leader = status.nodes.iter().find(|n| n.id == status.leader_id);
    let why = match leader {
        _ if status.leader_id == 0 => "no leader is elected".to_string(),
        None => format!("node {} is named leader but is not a member", status.leader_id),
        Some(n) if !n.reachable => format!("node {} is named leader but does not answer", n.id),
        Some(n) => format!("node {} leads but has not heard from a majority of voters lately", n.id),
    };
    let down: Vec<String> = status
        .nodes
        .iter()
        .filter(|n| !n.reachable && n.role != v1::NodeRole::Learner as i32)
        .map(|n| n.id.to_string())
        .collect();
    let next = if status.voters_up >= quorum || down.is_empty() {
        "wait a few seconds for an election, and look again".to_string()
    } else {
        format!("bring back {} of nodes {}", quorum - status.voters_up, down.join(", "))
    };
    format!("THE CLUSTER CANNOT COMMIT: writes fail; {why}. {up}: {next}.")
}
