//! `tally backup` and `tally restore`: a cluster's state to a file, and a new cluster from one.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use serde_json::json;
use tally_client::{Client, v1};

use super::explain::{Call, answered};
use super::{ClientArgs, client, rfc3339, table};
use crate::backup::{self, Checked, restore};
use crate::node::PeerConfig;

#[derive(Args)]
#[command(group(clap::ArgGroup::new("what").required(true).args(["out", "check"])))]
pub struct BackupArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Write the backup to this file (never replaced; written as FILE.partial until checked).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Check a backup file whole and show what it holds; nothing is written.
    #[arg(long)]
    pub check: Option<PathBuf>,
    /// Back up from this node (default: the follower that has applied the most, so that the
    /// leader is not slowed; the leader only when it is the only member up).
    #[arg(long)]
    pub node: Option<u64>,
}

#[derive(Args)]
pub struct RestoreArgs {
    /// The backup file (`tally backup --out`).
    pub file: PathBuf,
    /// The new node's data directory: absent or empty.
    #[arg(long)]
    pub data_dir: PathBuf,
    /// The new node's id.
    #[arg(long)]
    pub id: u64,
    /// The new cluster's name (default: the backed-up cluster's).
    #[arg(long)]
    pub cluster: Option<String>,
    /// Every voter of the new cluster, this node included, as
    /// ID=CLIENT_HOST:PORT,PEER_HOST:PORT@SITE: the same list on every node.
    #[arg(long = "voter", value_parser = super::serve::parse_peer, required = true)]
    pub voters: Vec<PeerConfig>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

pub async fn run_backup(args: BackupArgs) -> Result<ExitCode, String> {
    if let Some(path) = &args.check {
        let checked = tokio::task::spawn_blocking({
            let path = path.clone();
            move || backup::verify_file(&path)
        })
        .await
        .map_err(|e| e.to_string())??;
        print_checked(args.client.json, path, &checked);
        return Ok(ExitCode::SUCCESS);
    }
    let out = args.out.as_ref().expect("clap requires --out or --check");
    let status = answered(&args.client, Call::Read, client(&args.client)?.cluster_status()).await?;
    let node = pick_node(&status, args.node)?;
    let security = args.client.tls.security()?;
    let one = Client::new(
        std::slice::from_ref(&node.address),
        Duration::from_millis(args.client.timeout_ms),
        &security,
    )?;
    let stream = one.backup().await.map_err(|e| format!("node {} at {}: {e}", node.id, node.address))?;
    let checked = backup::receive(stream, out).await?;
    print_checked(args.client.json, out, &checked);
    Ok(ExitCode::SUCCESS)
}

/// The node to back up from: the one asked for, else the reachable follower that applied the
/// most, else the leader.
fn pick_node(status: &v1::StatusReply, asked: Option<u64>) -> Result<v1::NodeStatus, String> {
    if let Some(id) = asked {
        return match status.nodes.iter().find(|n| n.id == id) {
            Some(n) if n.reachable => Ok(n.clone()),
            Some(_) => Err(format!("node {id} does not answer")),
            None => Err(format!("node {id} is not a member")),
        };
    }
    let followers = status.nodes.iter().filter(|n| n.reachable && !n.is_leader);
    followers
        .max_by_key(|n| n.applied_index)
        .or_else(|| status.nodes.iter().find(|n| n.reachable && n.is_leader))
        .cloned()
        .ok_or_else(|| "no member answers".to_string())
}

fn print_checked(json: bool, path: &std::path::Path, checked: &Checked) {
    let header = &checked.header;
    let file_bytes = std::fs::metadata(path).map_or(0, |m| m.len());
    if json {
        let value = json!({
            "file": path.display().to_string(), "cluster": header.cluster, "node_id": header.node_id,
            "applied_index": header.applied_index, "applied_term": header.applied_term,
            "state_digest": header.state_digest, "timestamp_last": header.timestamp_last,
            "records": checked.state.records, "stream_bytes": header.stream_bytes, "file_bytes": file_bytes,
            "created_ns": header.created_ns, "written_by": header.written_by,
        });
        println!("{value}");
        return;
    }
    let mut rows = table(&["backup", "checked whole"]);
    for (what, value) in [
        ("file", path.display().to_string()),
        ("cluster", header.cluster.clone()),
        ("from node", header.node_id.to_string()),
        ("applied index", format!("{} (term {})", header.applied_index, header.applied_term)),
        ("state digest", header.state_digest.clone()),
        ("newest event", rfc3339(header.timestamp_last)),
        ("records", checked.state.records.to_string()),
        ("file size", format!("{file_bytes} bytes ({:.1} MiB)", file_bytes as f64 / (1 << 20) as f64)),
        ("state", format!("{} bytes, the rest is the header", header.stream_bytes)),
        ("taken", rfc3339(header.created_ns)),
    ] {
        rows.add_row(vec![what.to_string(), value]);
    }
    println!("{rows}");
}

pub fn run_restore(args: RestoreArgs) -> Result<ExitCode, String> {
    let header = backup::verify_file(&args.file)?.header;
    let cluster = args.cluster.clone().unwrap_or_else(|| header.cluster.clone());
    let target =
        restore::Target { data_dir: &args.data_dir, cluster: &cluster, id: args.id, voters: &args.voters };
    let restored = restore::restore(&args.file, &target)?;
    if args.json {
        let value = json!({
            "data_dir": args.data_dir.display().to_string(), "id": args.id, "cluster": cluster,
            "incarnation": restored.incarnation, "applied_index": restored.header.applied_index,
            "state_digest": restored.header.state_digest, "cluster_id": restored.cluster_id,
        });
        println!("{value}");
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "restored node {} of cluster '{cluster}' in {}: the state at index {} of the backup (digest {}).",
        args.id,
        args.data_dir.display(),
        restored.header.applied_index,
        restored.header.state_digest
    );
    println!(
        "Start it with `tally serve --id {} --cluster {cluster} --data-dir {} ...` and its doors as --voter \
         names them, without --bootstrap.",
        args.id,
        args.data_dir.display()
    );
    println!(
        "The new cluster's id is {}: restore every voter from this same file with the same --voter list, \
         or it is another cluster to this one and they refuse each other.",
        restored.cluster_id
    );
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: u64, leader: bool, reachable: bool, applied: u64) -> v1::NodeStatus {
        v1::NodeStatus {
            id,
            is_leader: leader,
            reachable,
            applied_index: applied,
            ..v1::NodeStatus::default()
        }
    }

    /// One row per cluster shape: which node a backup comes from.
    #[test]
    fn a_backup_comes_from_the_most_caught_up_follower() {
        for (nodes, asked, expected) in [
            (vec![node(1, true, true, 9), node(2, false, true, 7), node(3, false, true, 8)], None, Ok(3)),
            (vec![node(1, true, true, 9), node(2, false, true, 7), node(3, false, false, 8)], None, Ok(2)),
            (vec![node(1, true, true, 9), node(2, false, false, 7)], None, Ok(1)),
            (vec![node(1, true, true, 9), node(2, false, true, 7)], Some(1), Ok(1)),
            (vec![node(1, true, true, 9), node(2, false, false, 7)], Some(2), Err("does not answer")),
            (vec![node(1, true, true, 9)], Some(4), Err("not a member")),
            (vec![node(1, true, false, 9)], None, Err("no member answers")),
        ] {
            let status = v1::StatusReply { nodes, ..v1::StatusReply::default() };
            match (pick_node(&status, asked), expected) {
                (Ok(picked), Ok(id)) => assert_eq!(picked.id, id),
                (Err(error), Err(says)) => assert!(error.contains(says), "{error}"),
                (got, expected) => panic!("{got:?}, expected {expected:?}"),
            }
        }
    }
}
