//! What an operator in a fire and a newcomer at a terminal are told, by the real `tally`
//! command against real `tally serve` processes with TLS on: whether the cluster commits, and
//! what is wrong with an address, a certificate or a flag.

use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use raft_node::security::certs;
use raft_node::security::roles::Role;
use raft_node::testkit::TestCluster;

const TALLY: &str = env!("CARGO_BIN_EXE_tally");
const DEADLINE: Duration = Duration::from_secs(30);

fn tally(args: &[String]) -> Output {
    std::process::Command::new(TALLY).args(args).output().expect("run tally")
}

fn text(output: &Output) -> (String, String) {
    (String::from_utf8_lossy(&output.stdout).into(), String::from_utf8_lossy(&output.stderr).into())
}

fn args(words: &[&str]) -> Vec<String> {
    words.iter().map(|w| w.to_string()).collect()
}

fn operator() -> Option<Role> {
    Some(Role::Operator(certs::LOCAL_OPERATOR.into()))
}

/// Four voters in four sites; two followers killed. The surviving follower still hears the
/// leader's heartbeats, but the leader has no majority: `tally cluster status` asked of the
/// follower says first that the cluster cannot commit and what brings it back, claims no
/// survival, and exits 2; both survivors' `/ready` say NOT_SERVING; a write through the CLI says
/// why it failed and that its outcome is unknown. Before, status said "the cluster keeps
/// serving" and exited 0, and the follower's `/ready` said SERVING.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_that_lost_its_quorum_says_so_in_status_health_and_errors() {
    let mut cluster = TestCluster::start(Path::new(TALLY), &["site-a", "site-b", "site-c", "site-d"], &[]);
    cluster.wait_for_leader(DEADLINE).await;
    let mut add = args(&["cluster", "add", "--id", "4", "--site", "site-d", "--address"]);
    add.extend([cluster.address(4), "--peer-address".into(), cluster.peer_address(4)]);
    add.extend(cluster.cli_args(operator()));
    let output = tally(&add);
    assert!(output.status.success(), "cluster add: {:?}", text(&output));
    let leader = cluster.wait_for_leader(DEADLINE).await;
    let followers: Vec<u64> = cluster.nodes.keys().copied().filter(|id| *id != leader).collect();
    let kept = followers[0];
    let status_of_kept = {
        let mut command = args(&["cluster", "status"]);
        command.extend(cluster.cli_args(operator()));
        let at = command.iter().position(|a| a == "--nodes").unwrap() + 1;
        command[at] = cluster.address(kept);
        command
    };
    let started = Instant::now();
    loop {
        let output = tally(&status_of_kept);
        let (stdout, _) = text(&output);
        if output.status.code() == Some(0) && stdout.contains("4 of 4 voters are up (a majority is 3)") {
            assert!(stdout.starts_with("The cluster commits: leader node"), "{stdout}");
            break;
        }
        assert!(started.elapsed() < DEADLINE, "status never said the cluster commits: {:?}", text(&output));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    for id in &followers[1..] {
        cluster.kill(*id);
    }
    let started = Instant::now();
    let (stdout, stderr) = loop {
        let output = tally(&status_of_kept);
        if output.status.code() == Some(2) {
            break text(&output);
        }
        assert!(started.elapsed() < DEADLINE, "status still says it commits: {:?}", text(&output));
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(stdout.starts_with("THE CLUSTER CANNOT COMMIT: writes fail"), "{stdout}{stderr}");
    assert!(stdout.contains("2 of 4 voters are up (a majority is 3)"), "{stdout}");
    assert!(stdout.contains(&format!("node {leader} leads but has not heard from a majority")), "{stdout}");
    let down: Vec<String> = followers[1..].iter().map(u64::to_string).collect();
    assert!(stdout.contains(&format!("bring back 1 of nodes {}", down.join(", "))), "{stdout}");
    assert!(!stdout.contains("keeps committing") && !stdout.contains("keeps serving"), "{stdout}");

    for id in [leader, kept] {
        let started = Instant::now();
        loop {
            let ready = cluster.http_get(id, "/ready").await;
            if ready.contains("503") && ready.contains("NOT_SERVING") {
                break;
            }
            assert!(started.elapsed() < DEADLINE, "node {id} still says it is ready: {ready}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    let mut write =
        args(&["account", "create", "--id", "7", "--ledger", "1", "--code", "1", "--timeout-ms", "1500"]);
    write.extend(cluster.cli_args(Some(Role::Client("app".into()))));
    let output = tally(&write);
    let (stdout, stderr) = text(&output);
    assert_eq!(output.status.code(), Some(1), "{stdout}{stderr}");
    assert!(stderr.contains("THE CLUSTER CANNOT COMMIT"), "{stderr}");
    assert!(stderr.contains("The write's outcome is unknown"), "{stderr}");
    for id in &followers[1..] {
        let address = cluster.address(*id);
        assert!(stderr.contains(&format!("{address}: nothing listens there")), "{stderr}");
    }
}

/// Each mistake with an address or a certificate gets its own words and exit code 1, never a
/// silent death (before: exit 141 from SIGPIPE with no output for --insecure against TLS, a
/// peer door, a metrics port): plaintext against TLS, a peer door, a metrics port, a port
/// without a host, a closed port, a key passed as the CA, another cluster's CA, an operator
/// certificate given as the key. And a node started without the cluster's name (`--cluster`)
/// is not added: before, it joined, and its backups said the other name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_names_what_is_wrong_with_an_address_a_certificate_or_a_node() {
    let mut cluster = TestCluster::start(Path::new(TALLY), &["site-a", "site-b", "site-c"], &[]);
    cluster.wait_for_leader(DEADLINE).await;
    let node = &cluster.nodes[&1];
    let ca = cluster.certs_dir().join(certs::CA_CERT).display().to_string();
    let ca_key = cluster.certs_dir().join(certs::CA_KEY).display().to_string();
    let other = tempfile::tempdir().unwrap();
    certs::make_local(other.path(), 0).unwrap();
    let other_ca = other.path().join(certs::CA_CERT).display().to_string();
    let closed = format!("127.0.0.1:{}", raft_node::testkit::free_port());
    let (op_cert, op_key) = certs::paths(&cluster.certs_dir(), &operator().unwrap());
    let (op_cert, op_key) = (op_cert.display().to_string(), op_key.display().to_string());
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--nodes", &node.address, "--insecure"], "it speaks TLS: drop --insecure"),
        (vec!["--nodes", &node.peer_address, "--ca", &ca], "a node's peer door (--peer-listen) admits only"),
        (
            vec!["--nodes", &node.peer_address, "--ca", &ca, "--cert", &op_cert, "--key", &op_key],
            "a node's peer door (--peer-listen) admits only",
        ),
        (vec!["--nodes", &node.metrics_address, "--ca", &ca], "a node's metrics port"),
        (vec!["--nodes", &node.metrics_address, "--insecure"], "a node's metrics port"),
        (vec!["--nodes", "7101", "--ca", &ca], "'7101' is not host:port"),
        (vec!["--nodes", &closed, "--ca", &ca], "nothing listens there (connection refused)"),
        (vec!["--nodes", &node.address, "--ca", &ca_key], "(--ca) holds a private key, not a certificate"),
        (vec!["--nodes", &node.address, "--ca", &other_ca], "its certificate is not signed by the CA given"),
        (
            vec!["--nodes", &node.address, "--ca", &ca, "--cert", &ca, "--key", &ca],
            "(--key) holds a certificate",
        ),
    ];
    for (flags, expected) in cases {
        let mut command = args(&["lookup", "account", "1", "--timeout-ms", "1000"]);
        command.extend(flags.iter().map(|f| f.to_string()));
        let output = tally(&command);
        let (stdout, stderr) = text(&output);
        assert_eq!(output.status.code(), Some(1), "{flags:?}: {stdout}{stderr}");
        assert!(stderr.contains(expected), "{flags:?}: expected '{expected}' in: {stderr}");
    }

    cluster.define_node(4, "site-d");
    cluster.spawn_in("tally", 4);
    let mut add = args(&["cluster", "add", "--id", "4", "--site", "site-d", "--address"]);
    add.extend([cluster.address(4), "--peer-address".into(), cluster.peer_address(4)]);
    add.extend(cluster.cli_args(operator()));
    let started = Instant::now();
    let stderr = loop {
        let output = tally(&add);
        let (stdout, stderr) = text(&output);
        assert!(!output.status.success(), "a node of cluster 'tally' was added to 'test': {stdout}");
        if !stderr.contains("does not answer") {
            break stderr;
        }
        assert!(started.elapsed() < DEADLINE, "node 4 never answered: {stderr}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(stderr.contains("was started as cluster 'tally', this is cluster 'test'"), "{stderr}");
    assert!(stderr.contains("restart it with --cluster test"), "{stderr}");
}

/// A base port for `tally dev` whose twelve ports (client, peer and metrics doors of nodes 1-4)
/// are free now.
fn free_base_port() -> u16 {
    loop {
        let base = raft_node::testkit::free_port().saturating_sub(300).max(1024);
        let ports = (1..=4).flat_map(|i| [base + i, base + 100 + i, base + 200 + i]);
        let free = ports.into_iter().all(|p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok());
        if free && base < 65_000 {
            return base;
        }
    }
}

/// The pid of the process whose command line contains `needle`, from /proc.
fn pid_of(needle: &str) -> Option<i32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|entry| {
        let pid: i32 = entry.file_name().to_str()?.parse().ok()?;
        let line = std::fs::read(entry.path().join("cmdline")).ok()?;
        let line = String::from_utf8_lossy(&line).replace('\0', " ");
        (line.contains(needle) && !line.contains("first_hour")).then_some(pid)
    })
}

/// Processes a test started, killed when it ends however it ends.
struct Reaper(Vec<std::process::Child>);

impl Drop for Reaper {
    fn drop(&mut self) {
        for child in &mut self.0 {
            // SIGTERM: `tally dev` stops its nodes.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let _ = child.wait();
        }
    }
}

async fn wait_for_text(path: &Path, expected: &str) -> String {
    let started = Instant::now();
    loop {
        let found = std::fs::read_to_string(path).unwrap_or_default();
        if found.contains(expected) {
            return found;
        }
        assert!(started.elapsed() < DEADLINE, "'{expected}' not in {}: {found}", path.display());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn spawn_logged(words: &[String], dir: &Path, name: &str) -> std::process::Child {
    let out = std::fs::File::create(dir.join(format!("{name}.out"))).unwrap();
    let err = std::fs::File::create(dir.join(format!("{name}.err"))).unwrap();
    std::process::Command::new(TALLY).args(words).stdout(out).stderr(err).spawn().expect("spawn tally")
}

/// `tally dev` says what happens to its nodes: one killed (the others go on, and how to start it
/// again), all gone (it stops, and says so); `tally dev add-node 4` adds a fourth node in
/// site-d. Before, it said "the others keep running" with none left, and could neither start
/// nor add a node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tally_dev_says_what_happens_to_its_nodes_and_adds_one() {
    let dir = tempfile::tempdir().unwrap();
    let base = free_base_port();
    let place =
        args(&["--dir", &dir.path().join("dev").display().to_string(), "--base-port", &base.to_string()]);
    let mut dev_command = args(&["dev"]);
    dev_command.extend(place.clone());
    let mut reaper = Reaper(vec![spawn_logged(&dev_command, dir.path(), "dev")]);
    wait_for_text(&dir.path().join("dev.out"), "Ctrl-C stops the cluster.").await;

    let mut add = args(&["dev", "add-node", "4"]);
    add.extend(place.clone());
    reaper.0.push(spawn_logged(&add, dir.path(), "add"));
    wait_for_text(&dir.path().join("add.out"), "node 4 is a voter in site-d").await;
    let mut status = args(&["cluster", "status", "--nodes", &format!("127.0.0.1:{}", base + 1)]);
    let certs = dir.path().join("dev/certs");
    let (cert, key) = certs::paths(&certs, &Role::Operator(certs::LOCAL_OPERATOR.into()));
    status.extend(["--ca".into(), certs.join(certs::CA_CERT).display().to_string()]);
    status.extend(["--cert".into(), cert.display().to_string(), "--key".into(), key.display().to_string()]);
    let output = tally(&status);
    let (stdout, stderr) = text(&output);
    assert!(stdout.contains("4 of 4 voters are up"), "{stdout}{stderr}");

    let node = |id: u64| {
        format!(
            "--id {id} --site site-{} --listen 127.0.0.1:{}",
            ["a", "b", "c"][id as usize - 1],
            base + id as u16
        )
    };
    let kill = |id: u64| {
        let pid = pid_of(&node(id)).unwrap_or_else(|| panic!("node {id} of tally dev runs"));
        unsafe { libc::kill(pid, libc::SIGKILL) };
    };
    kill(2);
    let said = wait_for_text(&dir.path().join("dev.err"), "start-node 2").await;
    assert!(said.contains("node 2 exited"), "{said}");
    assert!(said.contains("nodes 1 and 3 still run, a majority"), "{said}");
    kill(1);
    kill(3);
    let said = wait_for_text(&dir.path().join("dev.err"), "with none of its nodes left").await;
    assert!(!said.contains("the others keep running"), "{said}");
    let started = Instant::now();
    while reaper.0[0].try_wait().unwrap().is_none() {
        assert!(started.elapsed() < DEADLINE, "tally dev did not stop with none of its nodes left");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every node of `tally dev` fails at start (its ports are taken): it says so at once and exits
/// 1, instead of 30 s of silence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tally_dev_says_at_once_when_every_node_fails_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let base = free_base_port();
    let _taken: Vec<std::net::TcpListener> =
        (1..=3).map(|i| std::net::TcpListener::bind(("127.0.0.1", base + i)).unwrap()).collect();
    let mut dev = args(&["dev", "--dir", &dir.path().join("dev").display().to_string()]);
    dev.extend(["--base-port".into(), base.to_string()]);
    let started = Instant::now();
    let output = tally(&dev);
    let (stdout, stderr) = text(&output);
    assert_eq!(output.status.code(), Some(1), "{stdout}{stderr}");
    assert!(stderr.contains("every node exited at start"), "{stderr}");
    assert!(stderr.contains("Address already in use"), "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(15), "took {:?}", started.elapsed());
}

/// The ledger commands as a newcomer meets them: a flag in the proto's spelling, a linked chain
/// from a file that fails as a whole and says why, lookups and history of ids that do not exist,
/// a query cut off by its limit. Before: no batches from the CLI (a linked flag always failed
/// with linked_event_chain_open), results without ids or meanings, empty tables without a word.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ledger_commands_say_what_happened() {
    let cluster = TestCluster::start(Path::new(TALLY), &["site-a", "site-b", "site-c"], &[]);
    cluster.wait_for_leader(DEADLINE).await;
    let run = |words: &[&str], stdin: Option<&str>| {
        let mut command = args(words);
        command.extend(cluster.cli_args(Some(Role::Client("app".into()))));
        let mut child = std::process::Command::new(TALLY)
            .args(&command)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child.stdin.take().unwrap().write_all(stdin.unwrap_or("").as_bytes()).unwrap();
        let output = child.wait_with_output().unwrap();
        let (stdout, stderr) = text(&output);
        (output.status.code(), stdout, stderr)
    };
    let (code, stdout, stderr) =
        run(&["account", "create", "--id", "1", "--ledger", "1", "--code", "1"], None);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    let flags = "debits_must_not_exceed_credits,HISTORY";
    let (code, stdout, stderr) =
        run(&["account", "create", "--id", "2", "--ledger", "1", "--code", "1", "--flags", flags], None);
    assert_eq!(code, Some(0), "{stdout}{stderr}");

    // A chain whose second transfer overdraws account 2: neither takes effect.
    let chain = "id,debit,credit,amount,ledger,code,flags\n10,1,2,5,1,1,linked\n11,2,1,1000,1,1,\n";
    let (code, stdout, stderr) = run(&["transfer", "--file", "-"], Some(chain));
    assert_eq!(code, Some(1), "{stdout}{stderr}");
    assert!(stdout.contains("10   linked_event_failed"), "{stdout}");
    assert!(stdout.contains("11   exceeds_credits"), "{stdout}");
    assert!(
        stdout.contains("linked_event_failed: Another event in this event's linked chain failed"),
        "{stdout}"
    );
    assert!(
        stdout.contains("exceeds_credits: The debit account has DEBITS_MUST_NOT_EXCEED_CREDITS"),
        "{stdout}"
    );
    let (code, _, stderr) = run(&["lookup", "transfer", "10", "11"], None);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("not found: transfer 10, 11"), "{stderr}");

    // The same chain, affordable, as JSON lines: both.
    let chain = "{\"id\": 12, \"debit\": 1, \"credit\": 2, \"amount\": 5, \"ledger\": 1, \"code\": 1, \"flags\": [\"linked\"]}\n\
                 {\"id\": 13, \"debit\": 2, \"credit\": 1, \"amount\": 3, \"ledger\": 1, \"code\": 1}\n";
    let (code, stdout, stderr) = run(&["transfer", "--file", "-"], Some(chain));
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("12   ok") && stdout.contains("13   ok"), "{stdout}");

    let (code, _, stderr) = run(&["history", "999"], None);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("not found: account 999"), "{stderr}");
    let (code, stdout, stderr) = run(&["query", "transfers", "--ledger", "1", "--limit", "1"], None);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(
        stderr.contains("1 rows, the limit (--limit); more may follow: ask again with --after"),
        "{stderr}"
    );
    let (code, stdout, _) = run(&["history", "2", "--balances"], None);
    assert_eq!(code, Some(0));
    assert!(stdout.contains(" 12 ") && stdout.contains(" 13 "), "balance rows name their transfer: {stdout}");
}
