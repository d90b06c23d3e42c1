//! `tally cluster`: status and membership, for operators.

use std::process::ExitCode;

use clap::Subcommand;
use serde_json::json;
use tally_client::v1;

use super::explain::{Call, answered, commit_verdict};
use super::{ClientArgs, client, status_name, table};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uptimes_read_in_words() {
        for (seconds, text) in [(42, "42s"), (725, "12m 5s"), (7_380, "2h 3m"), (273_600, "3d 4h")] {
            assert_eq!(uptime(seconds), text);
        }
    }

    fn node(id: u64, site: &str, reachable: bool) -> v1::NodeStatus {
        v1::NodeStatus { id, site: site.into(), reachable, ..v1::NodeStatus::default() }
    }

    fn site(name: &str, voters: u32, voters_up: u32, survives_loss_now: bool) -> v1::SiteStatus {
        v1::SiteStatus {
            site: name.into(),
            voters,
            voters_up,
            survives_loss_now,
            ..v1::SiteStatus::default()
        }
    }

    /// Four voters, two of them down: the verdict says the cluster cannot commit, which
    /// members are missing and how many bring it back; no site line claims survival.
    #[test]
    fn a_cluster_without_a_quorum_is_told_so_first() {
        let status = v1::StatusReply {
            leader_id: 4,
            can_commit: false,
            voters: 4,
            voters_up: 2,
            nodes: vec![node(1, "a", false), node(2, "b", true), node(3, "c", false), node(4, "d", true)],
            sites: vec![
                site("a", 1, 0, false),
                site("b", 1, 1, false),
                site("c", 1, 0, false),
                site("d", 1, 1, false),
            ],
            ..v1::StatusReply::default()
        };
        let verdict = commit_verdict(&status);
        assert!(verdict.starts_with("THE CLUSTER CANNOT COMMIT"), "{verdict}");
        assert!(verdict.contains("2 of 4 voters are up"), "{verdict}");
        assert!(verdict.contains("a majority is 3"), "{verdict}");
        assert!(verdict.contains("bring back 1 of nodes 1, 3"), "{verdict}");
        assert!(verdict.contains("node 4 leads but has not heard from a majority"), "{verdict}");
        let lines = survival(&status);
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(!lines[0].contains("keeps serving"), "{lines:?}");
    }

    #[test]
    fn site_losses_are_judged_from_here() {
        let status = v1::StatusReply {
            leader_id: 1,
            can_commit: true,
            voters: 5,
            voters_up: 4,
            nodes: vec![
                node(1, "a", true),
                node(2, "a", true),
                node(3, "b", true),
                node(4, "b", false),
                node(5, "c", true),
            ],
            sites: vec![site("a", 2, 2, false), site("b", 2, 1, true), site("c", 1, 1, true)],
            ..v1::StatusReply::default()
        };
        let verdict = commit_verdict(&status);
        assert!(verdict.starts_with("The cluster commits"), "{verdict}");
        let lines = survival(&status);
        assert!(lines[0].contains("Losing a now leaves 2 of 5 voters up, no majority"), "{}", lines[0]);
        assert!(lines[1].contains("Losing b now leaves 3 of 5 voters up, a majority"), "{}", lines[1]);
        assert!(lines[2].contains("Losing c now leaves 3 of 5 voters up, a majority"), "{}", lines[2]);
    }
}

#[derive(Subcommand)]
pub enum ClusterCommand {
    /// Whether the cluster commits now, each member and each site, and what losing a site now
    /// would do. Exits 0 when it commits, 2 when it cannot or members' books disagree, 1 when
    /// no node answered.
    Status {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Add a node: it joins as a learner, catches up, then becomes a voter (unless --learner).
    Add {
        #[command(flatten)]
        client: ClientArgs,
        /// Its id (its --id).
        #[arg(long)]
        id: u64,
        /// Its client door (its --advertise, or --listen).
        #[arg(long)]
        address: String,
        /// Its peer door (its --peer-advertise, or --peer-listen).
        #[arg(long)]
        peer_address: String,
        /// Its site (its --site).
        #[arg(long)]
        site: String,
        /// Keep it a learner: a copy that does not vote.
        #[arg(long)]
        learner: bool,
        /// Accept a placement where losing one site loses the voter majority.
        #[arg(long)]
        force: bool,
    },
    /// Remove a member (voter or learner); its process stops serving once it learns it.
    Remove {
        #[command(flatten)]
        client: ClientArgs,
        /// The member's id.
        #[arg(long)]
        id: u64,
        /// Accept a placement where losing one site loses the voter majority.
        #[arg(long)]
        force: bool,
    },
    /// Bring back a node whose disk was lost: start it again, empty, under its old id, then run
    /// this. It rejoins as a new incarnation, catches up and votes again.
    Replace {
        #[command(flatten)]
        client: ClientArgs,
        /// The id of the node that lost its disk.
        #[arg(long)]
        id: u64,
    },
    /// Hand leadership to another voter (before maintenance on the leader's machine).
    TransferLeader {
        #[command(flatten)]
        client: ClientArgs,
        /// The voter to lead next.
        #[arg(long)]
        to: u64,
    },
    /// Have the leader snapshot its state now; with --purge-log, also drop its whole log behind
    /// the snapshot (members behind it then catch up from the snapshot).
    Snapshot {
        #[command(flatten)]
        client: ClientArgs,
        #[arg(long)]
        purge_log: bool,
    },
}

/// The exit code of a status that answered but found the cluster unable to commit, or its
/// members' books disagreeing (1 is for errors: no node answered, bad arguments).
const UNHEALTHY: u8 = 2;

/// Seconds as the two largest units: 3d 4h, 12m 5s, 42s.
fn uptime(seconds: u64) -> String {
    let (days, hours, minutes) = (seconds / 86_400, seconds / 3600 % 24, seconds / 60 % 60);
    match (days, hours, minutes) {
        (0, 0, 0) => format!("{seconds}s"),
        (0, 0, m) => format!("{m}m {}s", seconds % 60),
        (0, h, m) => format!("{h}h {m}m"),
        (d, h, _) => format!("{d}d {h}h"),
    }
}

/// A warning when the node that answered is itself out of touch with a leader that has a quorum:
/// removed from the cluster, or cut off, its view of the membership may be old.
fn stale_view(status: &v1::StatusReply) -> Option<String> {
    let me = status.nodes.iter().find(|n| n.id == status.answered_by)?;
    (status.can_commit && !me.serving).then(|| {
        format!(
            "Node {} answered, and it is not in touch with a leader that has a quorum: its view may be old \
             (removed from the cluster, or cut off from it). Ask another node (--nodes).",
            me.id
        )
    })
}

/// What losing each site now would do, in words (one line when writes are stopped already).
fn survival(status: &v1::StatusReply) -> Vec<String> {
    if !status.can_commit {
        return vec![
            "Writes are stopped already: losing any further site changes nothing until a majority is back."
                .to_string(),
        ];
    }
    let (voters, up) = (status.voters, status.voters_up);
    status
        .sites
        .iter()
        .map(|s| {
            let left = up - s.voters_up.min(up);
            if s.voters_up == 0 {
                format!("Losing {} now loses no voter that is up: the cluster keeps committing.", s.site)
            } else if s.survives_loss_now {
                format!(
                    "Losing {} now leaves {left} of {voters} voters up, a majority: the cluster keeps committing.",
                    s.site
                )
            } else if s.survives_loss {
                format!(
                    "Losing {} now leaves {left} of {voters} voters up, no majority: writes would stop. It would \
                     not with every member up: bring the others back.",
                    s.site
                )
            } else {
                format!(
                    "Losing {} now leaves {left} of {voters} voters up, no majority: writes would stop until it is \
                     back. Move a voter elsewhere, or add one in another site.",
                    s.site
                )
            }
        })
        .collect()
}

fn print_status(json: bool, status: &v1::StatusReply) {
    if json {
        let nodes: Vec<_> = status
            .nodes
            .iter()
            .map(|n| {
                json!({
                    "id": n.id, "address": n.address, "peer_address": n.peer_address, "site": n.site,
                    "role": status_name(v1::NodeRole::try_from(n.role).unwrap_or_default().as_str_name(), "NODE_ROLE_"),
                    "leader": n.is_leader, "reachable": n.reachable, "term": n.term,
                    "last_log_index": n.last_log_index, "applied_index": n.applied_index,
                    "replication_lag": n.replication_lag, "state_digest": n.state_digest,
                    "incarnation": n.incarnation, "needs_replace": n.needs_replace,
                    "clock_offset_ms": n.clock_offset_ms, "clock_synchronized": n.clock_synchronized,
                    "uptime_seconds": n.uptime_seconds, "version": n.version,
                    "semantics_version": n.semantics_version, "semantics_known": n.semantics_known,
                    "snapshot_index": n.snapshot_index, "log_first_index": n.log_first_index,
                    "redundancy": redundancy_name(n), "entries_behind": n.entries_behind,
                    "state_bytes_received": n.state_bytes_received, "serving": n.serving,
                })
            })
            .collect();
        let sites: Vec<_> = status
            .sites
            .iter()
            .map(|s| {
                json!({
                    "site": s.site, "voters": s.voters, "learners": s.learners, "survives_loss": s.survives_loss,
                    "voters_up": s.voters_up, "survives_loss_now": s.survives_loss_now,
                })
            })
            .collect();
        let divergences: Vec<_> = status
            .divergences
            .iter()
            .map(|d| {
                let digests: serde_json::Map<String, serde_json::Value> =
                    d.digests.iter().map(|(id, digest)| (id.to_string(), json!(digest))).collect();
                json!({"index": d.index, "digests": digests})
            })
            .collect();
        let value = json!({
            "can_commit": status.can_commit, "voters": status.voters, "voters_up": status.voters_up,
            "leader_id": status.leader_id, "term": status.term, "committed_index": status.committed_index,
            "answered_by": status.answered_by, "nodes": nodes, "sites": sites, "divergences": divergences,
        });
        println!("{value}");
        return;
    }
    // Books that disagree come first: more urgent than whether writes go on.
    if let Some(first) = status.divergences.first() {
        println!(
            "THE MEMBERS' BOOKS DISAGREE: after index {} their states differ ({}){}. They apply the same log \
             to different states (restored from different backups, or built with other semantics): stop \
             writes, and find which state is right before anything else.",
            first.index,
            crate::service::cluster::describe_digests(&first.digests),
            match status.divergences.len() {
                1 => String::new(),
                n => format!(", and at {} more indexes", n - 1),
            }
        );
    }
    println!("{}", commit_verdict(status));
    if let Some(line) = stale_view(status) {
        println!("{line}");
    }
    let leader = match status.leader_id {
        0 => "none".to_string(),
        id => format!("node {id}"),
    };
    println!(
        "leader: {leader}   term: {}   committed index: {}   (as node {} sees it)",
        status.term, status.committed_index, status.answered_by
    );
    let mut nodes = table(&[
        "id",
        "address",
        "site",
        "role",
        "leader",
        "up",
        "uptime",
        "version",
        "term",
        "last log",
        "applied",
        "lag",
        "redundancy",
        "digest",
    ]);
    for n in &status.nodes {
        // A member that did not answer reported nothing: blanks, not zeros.
        let reported = |value: String| if n.reachable { value } else { String::new() };
        nodes.add_row(vec![
            n.id.to_string(),
            n.address.clone(),
            n.site.clone(),
            status_name(v1::NodeRole::try_from(n.role).unwrap_or_default().as_str_name(), "NODE_ROLE_"),
            if n.is_leader { "*".into() } else { String::new() },
            if n.reachable { "yes".into() } else { "NO".into() },
            reported(uptime(n.uptime_seconds)),
            n.version.clone(),
            reported(n.term.to_string()),
            reported(n.last_log_index.to_string()),
            reported(n.applied_index.to_string()),
            reported(n.replication_lag.to_string()),
            if n.needs_replace { "DISK LOST: replace".into() } else { redundancy_text(n) },
            n.state_digest.chars().take(12).collect(),
        ]);
    }
    println!("{nodes}");
    for n in status.nodes.iter().filter(|n| n.needs_replace) {
        println!(
            "node {} runs on a new data directory (its disk was lost): run `tally cluster replace --id {}`",
            n.id, n.id
        );
    }
    println!("{}", redundancy_line(&status.nodes));
    let mut sites = table(&["site", "voters", "up", "learners", "survives its loss now", "with all up"]);
    let yes = |yes: bool| if yes { "yes".to_string() } else { "NO".to_string() };
    for s in &status.sites {
        sites.add_row(vec![
            s.site.clone(),
            s.voters.to_string(),
            s.voters_up.to_string(),
            s.learners.to_string(),
            if status.can_commit { yes(s.survives_loss_now) } else { "-".into() },
            yes(s.survives_loss),
        ]);
    }
    println!("{sites}");
    for line in survival(status) {
        println!("{line}");
    }
    if let Some(line) = semantics_line(&status.nodes) {
        println!("{line}");
    }
}

fn redundancy_name(node: &v1::NodeStatus) -> String {
    let name = v1::Redundancy::try_from(node.redundancy).unwrap_or_default().as_str_name();
    status_name(name, "REDUNDANCY_")
}

/// "up to date", "catching up: 1234 entries", "receiving state: 12 MiB", "down".
fn redundancy_text(node: &v1::NodeStatus) -> String {
    match v1::Redundancy::try_from(node.redundancy).unwrap_or_default() {
        v1::Redundancy::UpToDate => "up to date".into(),
        v1::Redundancy::CatchingUp => format!("catching up: {} entries", node.entries_behind),
        v1::Redundancy::ReceivingState => {
            format!("receiving state: {} MiB", node.state_bytes_received >> 20)
        }
        v1::Redundancy::Down => "down".into(),
        v1::Redundancy::Unspecified => String::new(),
    }
}

/// Whether every member holds the ledger now, in words.
fn redundancy_line(nodes: &[v1::NodeStatus]) -> String {
    let lacking: Vec<String> = nodes
        .iter()
        .filter(|n| n.redundancy != v1::Redundancy::UpToDate as i32)
        .map(|n| format!("node {} {}", n.id, redundancy_text(n)))
        .collect();
    if lacking.is_empty() {
        "Full redundancy: every member is up to date.".into()
    } else {
        format!("Redundancy reduced: {}.", lacking.join(", "))
    }
}

/// The rules the ledger applies, and what holds a newer version back, in words.
fn semantics_line(nodes: &[v1::NodeStatus]) -> Option<String> {
    let up: Vec<&v1::NodeStatus> = nodes.iter().filter(|n| n.reachable).collect();
    let applied = up.iter().map(|n| n.semantics_version).max()?;
    let newest = up.iter().map(|n| n.semantics_known).max()?;
    let behind: Vec<String> =
        up.iter().filter(|n| n.semantics_known < newest).map(|n| n.id.to_string()).collect();
    Some(if behind.is_empty() && applied == newest {
        format!("Ledger rules: semantics version {applied}, the newest every member knows.")
    } else if behind.is_empty() {
        format!(
            "Ledger rules: semantics version {applied}; every member knows {newest}: the leader switches shortly."
        )
    } else {
        format!(
            "Ledger rules: semantics version {applied}; node(s) {} run an older build: the cluster moves to \
             version {newest} once they run one that knows it (upgrade them one at a time).",
            behind.join(", ")
        )
    })
}

pub async fn run(command: ClusterCommand) -> Result<ExitCode, String> {
    let asks_status = matches!(command, ClusterCommand::Status { .. });
    let (args, status) = match command {
        ClusterCommand::Status { client: args } => {
            let status = client(&args)?.cluster_status().await;
            (args, status)
        }
        ClusterCommand::Add { client: args, id, address, peer_address, site, learner, force } => {
            let request = v1::AddNodeRequest {
                id,
                address,
                peer_address,
                site,
                learner_only: learner,
                force,
                incarnation: 0,
            };
            let status = client(&args)?.add_node(request).await;
            (args, status)
        }
        ClusterCommand::Remove { client: args, id, force } => {
            let status = client(&args)?.remove_node(v1::RemoveNodeRequest { id, force }).await;
            (args, status)
        }
        ClusterCommand::Replace { client: args, id } => {
            let status = client(&args)?.replace_node(id).await;
            (args, status)
        }
        ClusterCommand::TransferLeader { client: args, to } => {
            let status = client(&args)?.transfer_leader(to).await;
            (args, status)
        }
        ClusterCommand::Snapshot { client: args, purge_log } => {
            let taken = answered(&args, Call::Read, client(&args)?.take_snapshot(purge_log)).await?;
            if args.json {
                println!("{}", serde_json::json!({ "index": taken.index, "purged": taken.purged }));
            } else {
                println!("snapshot up to log index {}; log purged up to {}", taken.index, taken.purged);
            }
            return Ok(ExitCode::SUCCESS);
        }
    };
    let status = match status {
        Ok(status) => status,
        Err(error) => return Err(super::explain::failure(error, &args, Call::Read).await),
    };
    print_status(args.json, &status);
    // A membership change that was made succeeded, whatever the moment's status.
    if asks_status && (!status.can_commit || !status.divergences.is_empty()) {
        return Ok(ExitCode::from(UNHEALTHY));
    }
    Ok(ExitCode::SUCCESS)
}
