//! Backup and restore end to end, through the `tally` binary as an operator runs them: a backup
//! taken under load, restored into a new cluster of three nodes with the same state, and every
//! damaged or misused input refused with nothing written.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use raft_node::security::certs;
use raft_node::security::roles::Role;
use raft_node::testkit::TestCluster;
use tally_client::{u128_from, u128_to, v1};

const TALLY: &str = env!("CARGO_BIN_EXE_tally");
const SITES: [&str; 3] = ["site-a", "site-b", "site-c"];
const DEADLINE: Duration = Duration::from_secs(30);
const LEDGER: u32 = 7;
const ACCOUNTS: u128 = 16;
/// Transfers acknowledged before the backup starts, so that it holds a state worth checking.
const TRANSFERS_BEFORE: usize = 3000;

fn operator() -> Option<Role> {
    Some(Role::Operator(certs::LOCAL_OPERATOR.into()))
}

/// Runs `tally ARGS` and waits for it, off the async runtime.
async fn tally(args: Vec<String>) -> Output {
    tokio::task::spawn_blocking(move || std::process::Command::new(TALLY).args(&args).output().unwrap())
        .await
        .unwrap()
}

fn args(parts: &[&str]) -> Vec<String> {
    parts.iter().map(|s| s.to_string()).collect()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn json(output: &Output) -> serde_json::Value {
    assert!(output.status.success(), "tally failed: {}", stderr(output));
    serde_json::from_slice(&output.stdout).expect("JSON output")
}

fn path(path: &Path) -> String {
    path.display().to_string()
}

fn restore_args(file: &Path, cluster: &TestCluster, id: u64, data_dir: &Path) -> Vec<String> {
    let mut command = args(&["restore", &path(file), "--json", "--id", &id.to_string(), "--data-dir"]);
    command.push(path(data_dir));
    for voter in cluster.peer_specs() {
        command.extend(["--voter".to_string(), voter]);
    }
    command
}

/// Keeps writing transfers of 1 between the accounts until `stop`, recording each acknowledged id
/// in order.
fn start_load(
    client: Arc<tally_client::Client>,
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<u128>>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut next = 1_000u128;
        while !stop.load(Ordering::Relaxed) {
            let batch: Vec<v1::Transfer> = (0..100)
                .map(|i| {
                    let id = next + i;
                    let debit = 1 + id % ACCOUNTS;
                    let credit = 1 + (id * 7 + 3) % ACCOUNTS;
                    let credit = if credit == debit { 1 + debit % ACCOUNTS } else { credit };
                    v1::Transfer {
                        id: u128_to(id),
                        debit_account_id: u128_to(debit),
                        credit_account_id: u128_to(credit),
                        amount: u128_to(1),
                        ledger: LEDGER,
                        code: 1,
                        ..v1::Transfer::default()
                    }
                })
                .collect();
            let ids: Vec<u128> = batch.iter().map(|t| u128_from(t.id.as_ref())).collect();
            next += 100;
            if let Ok(results) = client.create_transfers(batch).await {
                let mut acked = acked.lock().unwrap();
                for (id, result) in ids.iter().zip(&results) {
                    assert_eq!(result.status(), v1::CreateTransferStatus::Ok, "transfer {id}");
                    acked.push(*id);
                }
            }
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_taken_under_load_restores_to_a_new_cluster_with_the_same_state() {
    let source = TestCluster::start(Path::new(TALLY), &SITES, &[]);
    source.wait_for_leader(DEADLINE).await;
    // A restored cluster at older rules switches, and its digest moves before its first write.
    source.wait_for_newest_semantics(DEADLINE).await;
    let client = Arc::new(source.client(Duration::from_secs(10)));
    let accounts: Vec<v1::Account> = (1..=ACCOUNTS)
        .map(|id| v1::Account { id: u128_to(id), ledger: LEDGER, code: 1, ..v1::Account::default() })
        .collect();
    let results = client.create_accounts(accounts).await.unwrap();
    assert!(results.iter().all(|r| r.status() == v1::CreateAccountStatus::Ok), "{results:?}");

    let (stop, acked) = (Arc::new(AtomicBool::new(false)), Arc::new(Mutex::new(Vec::new())));
    let load = start_load(client.clone(), stop.clone(), acked.clone());
    let waited = Instant::now();
    while acked.lock().unwrap().len() < TRANSFERS_BEFORE {
        assert!(waited.elapsed() < DEADLINE, "the load made too little progress: {}", source.log_tails());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let before: Vec<u128> = acked.lock().unwrap().clone();
    let file = source.dir.path().join("ledger.tally");
    let mut backup = args(&["backup", "--json", "--out", &path(&file)]);
    backup.extend(source.cli_args(operator()));
    let backed_up = json(&tally(backup.clone()).await);
    let after = acked.lock().unwrap().len();
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    assert!(after > before.len(), "the load went on during the backup");
    let digest = backed_up["state_digest"].as_str().unwrap().to_string();
    assert_eq!(digest.len(), 64);
    assert!(backed_up["applied_index"].as_u64().unwrap() > 0, "{backed_up}");
    // The size said is the file's (it was the state stream's alone).
    assert_eq!(
        backed_up["file_bytes"].as_u64(),
        Some(std::fs::metadata(&file).unwrap().len()),
        "{backed_up}"
    );

    // Misuse, refused with what is wrong: the file exists; a client certificate is no operator's.
    let again = tally(backup).await;
    assert!(!again.status.success() && stderr(&again).contains("exists already"), "{}", stderr(&again));
    let mut as_client = args(&["backup", "--out", &path(&source.dir.path().join("client.tally"))]);
    as_client.extend(source.cli_args(Some(Role::Client("app".into()))));
    let refused = tally(as_client).await;
    assert!(!refused.status.success(), "a client made a backup");
    assert!(stderr(&refused).contains("operator"), "{}", stderr(&refused));
    assert!(
        !source.dir.path().join("client.tally").exists()
            && !source.dir.path().join("client.tally.partial").exists()
    );

    // The file checks out on its own and says what the backup said.
    let checked = json(&tally(args(&["backup", "--json", "--check", &path(&file)])).await);
    assert_eq!(checked, backed_up);

    // Restore into three new data directories, one per node of a new cluster.
    let mut restored = TestCluster::define(Path::new(TALLY), &SITES, &[]);
    let mut made_ids = Vec::new();
    for id in 1..=3 {
        let data_dir = restored.nodes[&id].data_dir.clone();
        let made = json(&tally(restore_args(&file, &restored, id, &data_dir)).await);
        assert_eq!(made["state_digest"], backed_up["state_digest"]);
        made_ids.push(made["cluster_id"].clone());
    }
    assert!(made_ids.iter().all(|id| *id == made_ids[0]), "one cluster id: {made_ids:?}");
    // A directory that holds a node already, and a node that is not among the voters.
    let data_dir = restored.nodes[&1].data_dir.clone();
    let over = tally(restore_args(&file, &restored, 1, &data_dir)).await;
    assert!(!over.status.success() && stderr(&over).contains("not empty"), "{}", stderr(&over));
    let stranger_dir = restored.dir.path().join("stranger");
    let stranger = tally(restore_args(&file, &restored, 9, &stranger_dir)).await;
    assert!(
        !stranger.status.success() && stderr(&stranger).contains("not among the voters"),
        "{}",
        stderr(&stranger)
    );
    assert!(!stranger_dir.exists());

    for id in 1..=3 {
        restored.spawn(id, false);
    }
    restored.wait_for_leader(DEADLINE).await;
    assert_eq!(restored.wait_for_convergence(DEADLINE).await, digest, "the restored cluster's digest");
    let new_id = restored.cluster_id(1);
    assert_ne!(new_id, source.cluster_id(1), "a restored cluster is a new cluster");
    assert_eq!((restored.cluster_id(2), restored.cluster_id(3)), (new_id.clone(), new_id));

    // The same balances as the backup's state, read on its own.
    let (_, stream) = raft_node::backup::open(&file).unwrap();
    let mut memory = ledger::MemStore::new();
    ledger::snapshot::import(&mut memory, stream).unwrap();
    let memory = ledger::Ledger::open(memory).unwrap();
    let ids: Vec<u128> = (1..=ACCOUNTS).collect();
    let expected = memory.lookup_accounts(&ids).unwrap();
    let restored_client = restored.client(Duration::from_secs(10));
    let found = restored_client.lookup_accounts(&ids, v1::ReadConsistency::Linearizable).await.unwrap();
    let balances = |a: &v1::Account| {
        (u128_from(a.id.as_ref()), u128_from(a.debits_posted.as_ref()), u128_from(a.credits_posted.as_ref()))
    };
    let found: Vec<_> = found.iter().map(balances).collect();
    let expected: Vec<_> = expected.iter().map(|a| (a.id, a.debits_posted, a.credits_posted)).collect();
    assert_eq!(found, expected);
    // Every transfer acknowledged before the backup began is in it, as the source has it; no
    // more than were acknowledged by its end.
    let total: u128 = found.iter().map(|(_, debits, _)| debits).sum();
    assert_eq!(total, found.iter().map(|(_, _, credits)| credits).sum::<u128>());
    assert!(total >= before.len() as u128 && total <= after as u128, "{total} of {} / {after}", before.len());
    for chunk in before.chunks(1000) {
        let theirs = client.lookup_transfers(chunk, v1::ReadConsistency::Linearizable).await.unwrap();
        let ours = restored_client.lookup_transfers(chunk, v1::ReadConsistency::Linearizable).await.unwrap();
        assert_eq!(ours.len(), chunk.len(), "acknowledged transfers missing from the backup");
        assert_eq!(ours, theirs);
    }

    // The new cluster takes writes of its own.
    let transfer = v1::Transfer {
        id: u128_to(1),
        debit_account_id: u128_to(1),
        credit_account_id: u128_to(2),
        amount: u128_to(5),
        ledger: LEDGER,
        code: 1,
        ..v1::Transfer::default()
    };
    let results = restored_client.create_transfers(vec![transfer]).await.unwrap();
    assert_eq!(results[0].status(), v1::CreateTransferStatus::Ok);
    let written = restored.wait_for_convergence(DEADLINE).await;
    assert_ne!(written, digest);
    // A power loss of the whole new cluster: it comes back with the restored state and its write.
    for id in 1..=3 {
        restored.kill(id);
    }
    for id in 1..=3 {
        restored.restart(id);
    }
    restored.wait_for_leader(DEADLINE).await;
    // The first linearizable read sees the write; the nodes re-apply it once a new leader
    // commits (until then they may agree on the state sled kept, without it).
    let read = restored_client.lookup_transfers(&[1], v1::ReadConsistency::Linearizable).await.unwrap();
    assert_eq!(read.len(), 1, "the write acknowledged before the power loss");
    let waited = Instant::now();
    while restored.wait_for_convergence(DEADLINE).await != written {
        assert!(waited.elapsed() < DEADLINE, "the restored cluster never re-applied its write");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    damaged_backups_are_refused(&file, &restored).await;
}

/// One row per way a backup file can be damaged: `backup --check` and `restore` refuse each,
/// and the restore leaves no directory behind.
async fn damaged_backups_are_refused(file: &Path, cluster: &TestCluster) {
    let bytes = std::fs::read(file).unwrap();
    let flipped = |at: usize| {
        let mut b = bytes.clone();
        b[at] ^= 0x01;
        b
    };
    for (what, damaged, says) in [
        ("a flipped byte in the state", flipped(bytes.len() / 2), "damaged"),
        ("a flipped byte in the header", flipped(40), "damaged"),
        ("a cut stream", bytes[..bytes.len() - 10].to_vec(), "damaged or incomplete"),
        ("half a file", bytes[..bytes.len() / 2].to_vec(), "damaged or incomplete"),
        ("bytes after the end", [bytes.clone(), vec![0]].concat(), "damaged or incomplete"),
        ("no backup at all", b"hello".to_vec(), "not a tally backup"),
    ] {
        let path_of = cluster.dir.path().join("damaged.tally");
        std::fs::write(&path_of, &damaged).unwrap();
        let check = tally(args(&["backup", "--check", &path(&path_of)])).await;
        assert!(!check.status.success(), "{what}: checked out");
        assert!(stderr(&check).contains(says), "{what}: {}", stderr(&check));
        let data_dir: PathBuf = cluster.dir.path().join("from-damaged");
        let restore = tally(restore_args(&path_of, cluster, 1, &data_dir)).await;
        assert!(!restore.status.success(), "{what}: restored");
        assert!(stderr(&restore).contains(says), "{what}: {}", stderr(&restore));
        assert!(!data_dir.exists(), "{what}: a restore left {} behind", data_dir.display());
    }
}

/// Writes transfers `ids` one per request (one Raft entry each).
async fn write_one_by_one(client: &tally_client::Client, ids: std::ops::RangeInclusive<u128>) {
    for id in ids {
        let transfer = v1::Transfer {
            id: u128_to(id),
            debit_account_id: u128_to(1),
            credit_account_id: u128_to(2),
            amount: u128_to(1),
            ledger: LEDGER,
            code: 1,
            ..v1::Transfer::default()
        };
        let results = client.create_transfers(vec![transfer]).await.unwrap();
        assert_eq!(results[0].status(), v1::CreateTransferStatus::Ok, "transfer {id}");
    }
}

/// A one-node cluster with accounts 1 and 2 and the transfers `ids`, written one per entry, and
/// its backups.
struct Source {
    cluster: TestCluster,
    client: tally_client::Client,
}

impl Source {
    async fn start(ids: std::ops::RangeInclusive<u128>) -> Source {
        let cluster = TestCluster::start(Path::new(TALLY), &SITES[..1], &[]);
        cluster.wait_for_leader(DEADLINE).await;
        // Two sources must count their entries alike: the switch to the newest rules first.
        cluster.wait_for_newest_semantics(DEADLINE).await;
        let client = cluster.client(Duration::from_secs(10));
        let accounts: Vec<v1::Account> = (1..=2)
            .map(|id| v1::Account { id: u128_to(id), ledger: LEDGER, code: 1, ..v1::Account::default() })
            .collect();
        client.create_accounts(accounts).await.unwrap();
        write_one_by_one(&client, ids).await;
        Source { cluster, client }
    }

    /// `tally backup` into `file`: its JSON.
    async fn backup(&self, file: &Path) -> serde_json::Value {
        let mut command = args(&["backup", "--json", "--out", &path(file)]);
        command.extend(self.cluster.cli_args(operator()));
        json(&tally(command).await)
    }
}

/// Restores node `id` of `cluster` from `file`; returns the new cluster id.
async fn restore_node(cluster: &TestCluster, id: u64, file: &Path) -> String {
    let data_dir = cluster.nodes[&id].data_dir.clone();
    let made = json(&tally(restore_args(file, cluster, id, &data_dir)).await);
    made["cluster_id"].as_str().unwrap().to_string()
}

/// Nodes restored from different backups are different clusters: nodes 1 and 2 restored from a
/// backup, node 3 from a later one, the same --voter list, refuse each other, and node 3 stays
/// at its backup's state while 1 and 2 take writes. (Before, node 3 adopted the cluster id the
/// lowest voter made, took entries after its own backup's index onto another state, and members
/// showed other digests at the same index, without a word.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_restored_from_different_backups_refuse_each_other() {
    let files = tempfile::tempdir().unwrap();
    let (earlier, later) = (files.path().join("earlier.tally"), files.path().join("later.tally"));
    let source = Source::start(1..=20).await;
    source.backup(&earlier).await;
    write_one_by_one(&source.client, 21..=120).await;
    let later_header = source.backup(&later).await;
    let later_index = later_header["applied_index"].as_u64().unwrap();
    drop(source);

    let mut restored = TestCluster::define(Path::new(TALLY), &SITES, &[]);
    let ids = [
        restore_node(&restored, 1, &earlier).await,
        restore_node(&restored, 2, &earlier).await,
        restore_node(&restored, 3, &later).await,
    ];
    assert_eq!(ids[0], ids[1], "restored alike, one cluster");
    assert_ne!(ids[0], ids[2], "restored from another backup, another cluster");
    for id in 1..=3 {
        restored.spawn(id, false);
    }
    restored.wait_for_leader(DEADLINE).await;
    let survivors = restored.client_of(&[1, 2], Duration::from_secs(10));
    write_one_by_one(&survivors, 1001..=1200).await;
    let statuses = restored.node_statuses().await;
    assert!(statuses[&1].applied_index > later_index + 50, "{statuses:?}");
    assert_eq!(statuses[&3].applied_index, later_index, "node 3 took entries from another cluster");
    assert_eq!(statuses[&3].state_digest, later_header["state_digest"].as_str().unwrap());
    assert_eq!(restored.cluster_id(3), ids[2]);
}

/// When members do apply the same log to different states (here forced: node 3 restored from
/// another cluster's backup at the same index, and given the others' cluster id by hand), it is
/// said loudly: `tally cluster status` names the index and the digests and exits non-zero, and
/// the nodes set `tally_state_diverged`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_with_different_states_at_one_index_are_reported() {
    let files = tempfile::tempdir().unwrap();
    let (ours, theirs) = (files.path().join("ours.tally"), files.path().join("theirs.tally"));
    let ours_header = Source::start(1..=20).await.backup(&ours).await;
    let theirs_header = Source::start(501..=520).await.backup(&theirs).await;
    assert_eq!(ours_header["applied_index"], theirs_header["applied_index"], "two histories of one length");
    assert_ne!(ours_header["state_digest"], theirs_header["state_digest"]);

    let mut restored = TestCluster::define(Path::new(TALLY), &SITES, &[]);
    let id = restore_node(&restored, 1, &ours).await;
    restore_node(&restored, 2, &ours).await;
    let other_id = restore_node(&restored, 3, &theirs).await;
    let identity = restored.nodes[&3].data_dir.join("identity.toml");
    let text = std::fs::read_to_string(&identity).unwrap().replace(&other_id, &id);
    std::fs::write(&identity, text).unwrap();
    for id in 1..=3 {
        restored.spawn(id, false);
    }
    restored.wait_for_leader(DEADLINE).await;
    let client = restored.client(Duration::from_secs(10));
    let mut status = args(&["cluster", "status", "--json"]);
    status.extend(restored.cli_args(operator()));
    let started = Instant::now();
    let mut next = 2001;
    let reported = loop {
        write_one_by_one(&client, next..=next).await;
        next += 1;
        let output = tally(status.clone()).await;
        let value: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap_or_default();
        if let Some(first) = value["divergences"].as_array().and_then(|d| d.first()) {
            assert!(!output.status.success(), "status exits 0 on divergent books");
            break first.clone();
        }
        assert!(started.elapsed() < DEADLINE, "no divergence reported: {value}\n{}", restored.log_tails());
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let digests = reported["digests"].as_object().unwrap();
    assert!(
        digests.contains_key("3") && (digests.contains_key("1") || digests.contains_key("2")),
        "{reported}"
    );
    let text_status = tally(status.iter().filter(|a| *a != "--json").cloned().collect()).await;
    let said = String::from_utf8_lossy(&text_status.stdout);
    assert!(said.starts_with("THE MEMBERS' BOOKS DISAGREE"), "{said}");
    let mut text = String::new();
    let started = Instant::now();
    while !text.contains("tally_state_diverged 1") {
        assert!(started.elapsed() < DEADLINE, "tally_state_diverged not set: {text}");
        tokio::time::sleep(Duration::from_millis(200)).await;
        text = restored.scrape(1).await;
    }
}
