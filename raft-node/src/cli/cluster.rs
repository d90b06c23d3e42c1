//! `tally cluster`: status and membership, for operators.

use std::process::ExitCode;

use clap::Subcommand;
use serde_json::json;
use tally_client::v1;

use super::{ClientArgs, client, status_name, table};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uptimes_and_site_losses_read_in_words() {
        for (seconds, text) in [(42, "42s"), (725, "12m 5s"), (7_380, "2h 3m"), (273_600, "3d 4h")] {
            assert_eq!(uptime(seconds), text);
        }
        let site = |name: &str, voters, survives_loss| v1::SiteStatus {
            site: name.into(),
            voters,
            learners: 0,
            survives_loss,
        };
        let lines = survival(&[site("a", 2, false), site("b", 1, true), site("c", 0, true)]);
        assert!(lines[0].contains("leaves 1 of 3 voters, no majority"), "{}", lines[0]);
        assert!(lines[1].contains("leaves 2 of 3 voters, a majority"), "{}", lines[1]);
        assert!(lines[2].contains("loses no voter"), "{}", lines[2]);
    }
}

#[derive(Subcommand)]
pub enum ClusterCommand {
    Status {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Add a node: it joins as a learner, catches up, then becomes a voter (unless --learner).
    Add {
        #[command(flatten)]
        client: ClientArgs,
        #[arg(long)]
        id: u64,
        /// Its client door (its --advertise, or --listen).
        #[arg(long)]
        address: String,
        /// Its peer door (its --peer-advertise, or --peer-listen).
        #[arg(long)]
        peer_address: String,
        #[arg(long)]
        site: String,
        #[arg(long)]
        learner: bool,
        /// Accept a placement where losing one site loses the voter majority.
        #[arg(long)]
        force: bool,
    },
    Remove {
        #[command(flatten)]
        client: ClientArgs,
        #[arg(long)]
        id: u64,
        #[arg(long)]
        force: bool,
    },
    /// Bring back a node whose disk was lost: start it again, empty, under its old id, then run
    /// this. It rejoins as a new incarnation, catches up and votes again.
    Replace {
        #[command(flatten)]
        client: ClientArgs,
        #[arg(long)]
        id: u64,
    },
    TransferLeader {
        #[command(flatten)]
        client: ClientArgs,
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

/// What losing each site would do, in words.
fn survival(sites: &[v1::SiteStatus]) -> Vec<String> {
    let voters: u32 = sites.iter().map(|s| s.voters).sum();
    sites
        .iter()
        .map(|s| {
            let left = voters - s.voters;
            if s.voters == 0 {
                format!("Losing {} loses no voter: the cluster keeps serving.", s.site)
            } else if s.survives_loss {
                format!(
                    "Losing {} leaves {left} of {voters} voters, a majority: the cluster keeps serving.",
                    s.site
                )
            } else {
                format!(
                    "Losing {} leaves {left} of {voters} voters, no majority: writes stop until it is back. \
                     Move a voter elsewhere, or add one in another site.",
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
                    "state_bytes_received": n.state_bytes_received,
                })
            })
            .collect();
        let sites: Vec<_> = status
            .sites
            .iter()
            .map(|s| json!({"site": s.site, "voters": s.voters, "learners": s.learners, "survives_loss": s.survives_loss}))
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
        let value = json!({"leader_id": status.leader_id, "term": status.term, "committed_index": status.committed_index, "nodes": nodes, "sites": sites, "divergences": divergences});
        println!("{value}");
        return;
    }
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
    println!(
        "leader: node {}   term: {}   committed index: {}",
        status.leader_id, status.term, status.committed_index
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
        "disk",
    ]);
    for n in &status.nodes {
        nodes.add_row(vec![
            n.id.to_string(),
            n.address.clone(),
            n.site.clone(),
            status_name(v1::NodeRole::try_from(n.role).unwrap_or_default().as_str_name(), "NODE_ROLE_"),
            if n.is_leader { "*".into() } else { String::new() },
            if n.reachable { "yes".into() } else { "NO".into() },
            if n.reachable { uptime(n.uptime_seconds) } else { String::new() },
            n.version.clone(),
            n.term.to_string(),
            n.last_log_index.to_string(),
            n.applied_index.to_string(),
            n.replication_lag.to_string(),
            redundancy_text(n),
            n.state_digest.chars().take(12).collect(),
            if n.needs_replace { "LOST: replace".into() } else { String::new() },
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
    let mut sites = table(&["site", "voters", "learners", "survives its loss"]);
    for s in &status.sites {
        sites.add_row(vec![
            s.site.clone(),
            s.voters.to_string(),
            s.learners.to_string(),
            if s.survives_loss { "yes".into() } else { "NO".into() },
        ]);
    }
    println!("{sites}");
    for line in survival(&status.sites) {
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
            let taken = client(&args)?.take_snapshot(purge_log).await.map_err(|e| e.to_string())?;
            if args.json {
                println!("{}", serde_json::json!({ "index": taken.index, "purged": taken.purged }));
            } else {
                println!("snapshot up to log index {}; log purged up to {}", taken.index, taken.purged);
            }
            return Ok(ExitCode::SUCCESS);
        }
    };
    let status = status.map_err(|e| e.to_string())?;
    print_status(args.json, &status);
    if !status.divergences.is_empty() {
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}
