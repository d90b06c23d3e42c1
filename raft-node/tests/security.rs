//! Who may do what, against real `tally serve` processes with TLS on: the operator role, node
//! certificates for joining, certificate reload on SIGHUP, and the limits on each door.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use raft_node::security::certs;
use raft_node::security::roles::Role;
use raft_node::testkit::{TestCluster, channel_with};
use tally_client::{Client, Error, Security, v1};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

mod common;

const TALLY: &str = env!("CARGO_BIN_EXE_tally");
const SITES: [&str; 3] = ["site-a", "site-b", "site-c"];
const DEADLINE: Duration = Duration::from_secs(30);

fn code_of<T: std::fmt::Debug>(result: Result<T, Error>) -> tonic::Code {
    match result {
        Ok(value) => panic!("expected a refusal, got {value:?}"),
        Err(error) => error.status().code(),
    }
}

/// A client without the operator role reads the cluster's status but cannot change it, whatever
/// the change; an operator can, through any node (a follower forwards it to the leader).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_an_operator_changes_the_cluster() {
    let cluster = TestCluster::start(Path::new(TALLY), &SITES, &[]);
    let leader = cluster.wait_for_leader(DEADLINE).await;
    let follower = *cluster.nodes.keys().find(|id| **id != leader).unwrap();
    let addresses = cluster.addresses();
    let callers = [
        ("a client without a certificate", cluster.security_as(None)),
        ("a client's certificate", cluster.security_as(Some(Role::Client("payments".into())))),
    ];
    for (who, security) in callers {
        let client = Client::new(&addresses, Duration::from_secs(5), &security).unwrap();
        let status = client.cluster_status().await.expect("status is for everyone");
        assert_eq!(status.leader_id, leader);
        let removal = client.remove_node(v1::RemoveNodeRequest { id: follower, force: true }).await;
        let message = match &removal {
            Err(Error::Rejected(status)) if status.code() == tonic::Code::PermissionDenied => {
                status.message()
            }
            other => panic!("{who}: remove_node: {other:?}"),
        };
        assert!(message.contains("operator certificate"), "{who}: {message}");
        assert_eq!(code_of(client.transfer_leader(follower).await), tonic::Code::PermissionDenied, "{who}");
        assert_eq!(code_of(client.take_snapshot(false).await), tonic::Code::PermissionDenied, "{who}");
        assert_eq!(code_of(client.replace_node(follower).await), tonic::Code::PermissionDenied, "{who}");
        let add = v1::AddNodeRequest {
            id: 9,
            address: "127.0.0.1:1".into(),
            peer_address: "127.0.0.1:2".into(),
            site: "site-d".into(),
            ..v1::AddNodeRequest::default()
        };
        assert_eq!(code_of(client.add_node(add).await), tonic::Code::PermissionDenied, "{who}");
        // Clients still write.
        let account =
            v1::Account { id: tally_client::u128_to(1), ledger: 1, code: 1, ..v1::Account::default() };
        client.create_accounts(vec![account]).await.expect("a client writes");
    }
    let voters =
        |status: &v1::StatusReply| status.nodes.iter().filter(|n| n.role() == v1::NodeRole::Voter).count();
    // The follower asked may not hold the membership yet (the writes above needed only the
    // leader and one follower): every node caught up first.
    cluster.wait_for_convergence(DEADLINE).await;
    let operator = cluster.client_of(&[follower], Duration::from_secs(10));
    assert_eq!(voters(&operator.cluster_status().await.unwrap()), 3, "a refused change changed something");
    let moved = operator.transfer_leader(follower).await.expect("an operator moves the leader");
    assert_eq!(moved.leader_id, follower);
}

/// Waits until `check` holds, or panics with `what` at the deadline.
async fn wait_until(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let started = Instant::now();
    while !check().await {
        assert!(started.elapsed() < DEADLINE, "not within {DEADLINE:?}: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A node must hold a certificate of this cluster's CA for its own id: one that names another
/// node does not start; one from another CA starts but is refused by every peer, so it never
/// joins; with the right certificate the same node joins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_a_valid_certificate_cannot_join() {
    let mut cluster = TestCluster::start(Path::new(TALLY), &SITES, &[]);
    cluster.wait_for_leader(DEADLINE).await;
    cluster.define_node(4, "site-d");
    let dir = cluster.certs_dir();
    let ca = dir.join(certs::CA_CERT);
    let join = ["--join".to_string(), cluster.peer_address(1)];
    let join: Vec<&str> = join.iter().map(String::as_str).collect();

    // Node 1's certificate, for node 4: refused at start.
    let (cert, key) = certs::paths(&dir, &Role::Node(1));
    let output = cluster
        .command_with_tls(4, false, Some([ca.clone(), cert, key]))
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    assert!(!output.status.success());
    let message = String::from_utf8_lossy(&output.stderr);
    assert!(message.contains("is the certificate of node 1, not of node 4"), "{message}");

    // A certificate for node 4 from another CA: the node runs, but no peer lets it in.
    let elsewhere = tempfile::tempdir().unwrap();
    certs::make_local(elsewhere.path(), 4).unwrap();
    let (cert, key) = certs::paths(elsewhere.path(), &Role::Node(4));
    let other_ca = elsewhere.path().join(certs::CA_CERT);
    let mut stranger =
        cluster.command_with_tls(4, false, Some([other_ca, cert, key])).args(&join).spawn().unwrap();
    let operator = cluster.client(Duration::from_secs(5));
    // Its join attempts reach node 1's peer door and are turned away there.
    wait_until("node 1 refuses the stranger's handshake", async || {
        cluster.log_tails().contains("TLS handshake refused")
    })
    .await;
    let status = operator.cluster_status().await.unwrap();
    assert!(status.nodes.iter().all(|n| n.id != 4), "a node of another CA joined: {status:?}");
    stranger.kill().unwrap();
    stranger.wait().unwrap();

    // The same node with its own certificate from this CA joins (the test kit passes it).
    cluster.wipe(4);
    cluster.restart_with(4, &join);
    wait_until("node 4 joins as a voter", async || {
        operator.cluster_status().await.is_ok_and(|s| {
            s.nodes.iter().any(|n| n.id == 4 && n.role() == v1::NodeRole::Voter && n.reachable)
        })
    })
    .await;
}

/// The node's certificate and CA are read again on SIGHUP: after the files are replaced by
/// those of a new CA, new connections need the new CA, and a reload of broken files keeps the
/// certificates in use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_reload_on_sighup() {
    let cluster = TestCluster::start(Path::new(TALLY), &SITES[..1], &[]);
    cluster.wait_for_leader(DEADLINE).await;
    let address = cluster.address(1);
    let dir = cluster.certs_dir();
    let pid = cluster.pids()[&1] as i32;
    let answers = async |security: &Security| {
        // A fresh client: a new connection, with the certificates the node serves now.
        let client = Client::new(std::slice::from_ref(&address), Duration::from_secs(2), security).unwrap();
        client.cluster_status().await.is_ok()
    };
    let old = cluster.security_as(None);
    assert!(answers(&old).await);

    // A new CA and node certificate, in new files; the node's files replaced with them.
    let renewed = tempfile::tempdir().unwrap();
    certs::make_local(renewed.path(), 1).unwrap();
    let new = Security::from_files(&renewed.path().join(certs::CA_CERT), None).unwrap();
    assert!(!answers(&new).await, "the new CA is trusted before the reload");
    let (cert, key) = certs::paths(&dir, &Role::Node(1));
    let (new_cert, new_key) = certs::paths(renewed.path(), &Role::Node(1));
    let replace = |from: &Path, to: &Path| {
        let temporary = to.with_extension("new");
        std::fs::copy(from, &temporary).unwrap();
        std::fs::rename(&temporary, to).unwrap();
    };
    // First a broken key: the reload fails and the old certificates stay.
    let saved_key = std::fs::read(&key).unwrap();
    std::fs::write(&key, b"not a key").unwrap();
    unsafe { libc::kill(pid, libc::SIGHUP) };
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(answers(&old).await, "a failed reload dropped the certificates in use");
    std::fs::write(&key, saved_key).unwrap();

    replace(&renewed.path().join(certs::CA_CERT), &dir.join(certs::CA_CERT));
    replace(&new_cert, &cert);
    replace(&new_key, &key);
    unsafe { libc::kill(pid, libc::SIGHUP) };
    wait_until("the new certificate is served", async || answers(&new).await).await;
    assert!(!answers(&old).await, "the old CA still checks out after the reload");
    let log = cluster.log_tails();
    assert!(log.contains("TLS certificates not reloaded"), "{log}");
    assert!(log.contains("TLS certificates reloaded"), "{log}");
}

/// A SIGHUP while a node is still starting (opening its state, joining its peers) does not stop
/// it: SIGHUPs are sent every few milliseconds from the moment its data directory exists until
/// it serves, and it serves. (The handler was installed only once the node served: such a
/// SIGHUP killed it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sighup_while_starting_does_not_stop_the_node() {
    let mut cluster = TestCluster::define(Path::new(TALLY), &SITES[..1], &[]);
    cluster.spawn(1, true);
    let pid = cluster.pids()[&1] as i32;
    let identity = cluster.nodes[&1].data_dir.join("identity.toml");
    let client = cluster.client(Duration::from_millis(200));
    let address = cluster.address(1);
    let started = Instant::now();
    let mut sent = 0;
    loop {
        if identity.exists() {
            unsafe { libc::kill(pid, libc::SIGHUP) };
            sent += 1;
        }
        if client.node_status(&address).await.is_ok_and(|s| s.is_leader) {
            break;
        }
        if let Some(status) = cluster.exited(1) {
            panic!("the node stopped ({status}) after {sent} SIGHUPs:\n{}", cluster.log_tails());
        }
        assert!(started.elapsed() < DEADLINE, "the node never served:\n{}", cluster.log_tails());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(sent > 0, "no SIGHUP was sent while it started");
    unsafe { libc::kill(pid, libc::SIGHUP) };
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(cluster.exited(1), None, "the node stopped on a SIGHUP while serving");
}

/// Status calls a node's peer door answered (the fan-out of other nodes' whole-cluster status).
fn peer_status_calls(metrics: &str) -> u64 {
    metrics
        .lines()
        .filter(|line| {
            line.starts_with("tally_grpc_requests_total{")
                && line.contains(r#"door="peer""#)
                && line.contains(r#"method="/tally.v1.Cluster/Status""#)
        })
        .filter_map(|line| line.rsplit_once(' ')?.1.parse::<u64>().ok())
        .sum()
}

/// Anyone who reaches the client door may ask for the whole cluster's status, which costs a call
/// to every other member: callers without an operator's certificate share one status gathered at
/// most a second ago. Fifty anonymous calls at once cost a follower a few status calls, not
/// fifty (before, each one fanned out); an operator's call is still answered fresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_status_calls_share_one_fan_out() {
    let cluster = TestCluster::start(Path::new(TALLY), &SITES, &[]);
    let leader = cluster.wait_for_leader(DEADLINE).await;
    cluster.wait_for_newest_semantics(DEADLINE).await;
    let follower = *cluster.nodes.keys().find(|id| **id != leader).unwrap();
    let before = peer_status_calls(&cluster.scrape(follower).await);
    let anonymous = cluster.security_as(None);
    let calls = (0..50).map(|_| {
        let client = Client::new(&[cluster.address(leader)], Duration::from_secs(5), &anonymous).unwrap();
        async move { client.cluster_status().await.map(|status| status.nodes.len()) }
    });
    for answered in futures::future::join_all(calls).await {
        assert_eq!(answered.expect("status is for everyone"), 3);
    }
    let after = peer_status_calls(&cluster.scrape(follower).await);
    // Besides the shared fan-out: every node compares digests every 5 s.
    assert!(after - before <= 6, "{} status calls reached node {follower}", after - before);
    let operator = cluster.client_of(&[leader], Duration::from_secs(5));
    operator.cluster_status().await.unwrap();
    assert!(peer_status_calls(&cluster.scrape(follower).await) > after, "an operator's status was not fresh");
}

/// TCP clients that never finish TLS cannot take a door's places: with --max-connections 8,
/// eight sockets open at node 2's peer door and silent, a node's TLS connection made after them
/// is still served. (A connection took its place before its handshake: they held every place for
/// 10 s each, and the node's connection was closed at once.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_that_never_finish_tls_do_not_take_a_doors_places() {
    let cluster = TestCluster::start(Path::new(TALLY), &SITES, &["--max-connections", "8"]);
    cluster.wait_for_leader(DEADLINE).await;
    cluster.wait_for_convergence(DEADLINE).await;
    let door = cluster.peer_address(2);
    let mut silent = Vec::new();
    for _ in 0..8 {
        silent.push(tokio::net::TcpStream::connect(&door).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let cluster_id = cluster.cluster_id(2);
    let mut raft = v1::raft_client::RaftClient::new(cluster.channel_as(&door, Some(Role::Node(1))));
    let mut request = tonic::Request::new(v1::ClockRequest::default());
    request.metadata_mut().insert("x-tally-cluster", cluster_id.parse().unwrap());
    request.metadata_mut().insert("x-tally-from", "1.0".parse().unwrap());
    request.metadata_mut().insert("x-tally-to", "2.0".parse().unwrap());
    let answered = raft.clock(request).await;
    assert!(answered.is_ok(), "a node's connection behind {} silent sockets: {answered:?}", silent.len());
}

/// A node's calls to a peer (forwarded writes, membership changes, status, incarnations) reach
/// the node it means: through node 1's channel pool, node 2's peer door answers a channel for
/// node 2, and a channel for node 3 at the same address is refused, since the certificate there
/// names node 2. (The pool dialed an address and took whoever answered, and a node's
/// incarnation was what the answer said.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_reaches_the_peer_it_means_or_none() {
    use raft_node::security::tls::{Tls, TlsFiles};
    let cluster = TestCluster::start(Path::new(TALLY), &SITES, &[]);
    cluster.wait_for_leader(DEADLINE).await;
    let dir = cluster.certs_dir();
    let (cert, key) = certs::paths(&dir, &Role::Node(1));
    let tls = Tls::load(TlsFiles { ca: dir.join(certs::CA_CERT), cert, key }, 1).unwrap();
    let pool = raft_node::net::Pool::new(Some(Arc::new(tls)));
    let door = cluster.peer_address(2);
    let ask = async |node: u64| {
        let mut client = v1::cluster_client::ClusterClient::new(pool.channel(Some(node), &door).unwrap());
        client
            .status(v1::StatusRequest { local_only: true })
            .await
            .map(|reply| reply.into_inner().nodes[0].id)
    };
    assert_eq!(ask(2).await.expect("node 2 at its own door"), 2);
    let wrong = ask(3).await.expect_err("node 2 answered for node 3");
    assert!(wrong.message().contains("not node 3") || wrong.code() == tonic::Code::Unavailable, "{wrong}");
}

/// A TLS connection to `address` trusting the cluster's CA, without a client certificate.
async fn tls_connection(
    cluster: &TestCluster,
    address: &str,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    let ca =
        rustls::pki_types::CertificateDer::from_pem_file(cluster.certs_dir().join(certs::CA_CERT)).unwrap();
    roots.add(ca).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let stream = tokio::net::TcpStream::connect(address).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, stream).await.unwrap()
}

/// Reads until the peer closes the connection; the bytes read, or None past `within`.
async fn read_until_closed(stream: &mut (impl AsyncReadExt + Unpin), within: Duration) -> Option<Vec<u8>> {
    let mut seen = Vec::new();
    let read_all = async {
        let mut buffer = [0u8; 4096];
        loop {
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(n) => seen.extend_from_slice(&buffer[..n]),
            }
        }
    };
    tokio::time::timeout(within, read_all).await.ok().map(|()| seen)
}

/// Each door holds at most --max-connections connections: with three connections open, one more
/// is closed at once, before any TLS work. A connection that does not finish its handshake is
/// dropped, and holds a handshake place meanwhile, not one of the door's. Once the others go, the
/// door takes connections again. A connection that sends nothing for --idle-timeout-s is closed.
/// Every connection is told how many calls it may have open at once
/// (SETTINGS_MAX_CONCURRENT_STREAMS).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_door_limits_its_connections() {
    let args = ["--max-connections", "3", "--idle-timeout-s", "2"];
    let cluster = TestCluster::start(Path::new(TALLY), &SITES[..1], &args);
    cluster.wait_for_leader(DEADLINE).await;
    // A node's certificate, which both doors take.
    let node = cluster.security_as(Some(Role::Node(1)));
    for address in [cluster.address(1), cluster.peer_address(1)] {
        // Slow: a connection that does not finish its TLS handshake within the idle timeout
        // (2 s here) is dropped.
        let mut silent = tokio::net::TcpStream::connect(&address).await.unwrap();
        let started = Instant::now();
        let closed = read_until_closed(&mut silent, Duration::from_secs(10)).await;
        assert_eq!(closed, Some(Vec::new()), "{address}: a silent handshake was kept");
        assert!(started.elapsed() < Duration::from_secs(5), "{address}: {:?}", started.elapsed());
        // Three connections fill the door (the first may find a place still held by the test
        // kit's last client, closing: filled once one more is closed at once).
        let mut open = Vec::new();
        let started = Instant::now();
        loop {
            let mut client = v1::cluster_client::ClusterClient::new(channel_with(&address, &node));
            if client.status(v1::StatusRequest { local_only: true }).await.is_ok() {
                open.push(client);
            }
            let mut one_more = tokio::net::TcpStream::connect(&address).await.unwrap();
            if read_until_closed(&mut one_more, Duration::from_millis(300)).await == Some(Vec::new()) {
                break;
            }
            assert!(open.len() <= 3, "{address}: a fourth connection was kept");
            assert!(started.elapsed() < DEADLINE, "{address}: the door never filled");
        }
        drop(open);
        // The places are free again (the node notices the closes at once).
        wait_until("the door takes connections again", async || {
            let mut client = v1::cluster_client::ClusterClient::new(channel_with(&address, &node));
            client.status(v1::StatusRequest { local_only: true }).await.is_ok()
        })
        .await;
    }

    // Idle: a TLS connection that says nothing after the handshake is closed after 2 s. The
    // node speaks first (its HTTP/2 SETTINGS), which tells this connection's stream limit.
    let mut idle = tls_connection(&cluster, &cluster.address(1)).await;
    let started = Instant::now();
    let sent =
        read_until_closed(&mut idle, Duration::from_secs(10)).await.expect("the idle connection stays open");
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(1500), "closed after {waited:?}, before it was idle for 2 s");
    assert_eq!(
        max_concurrent_streams(&sent),
        Some(raft_node::service::CLIENT_STREAMS_PER_CONNECTION_MAX),
        "the node's first frames: {sent:?}"
    );
    let _ = idle.shutdown().await;
}

/// SETTINGS_MAX_CONCURRENT_STREAMS from the first SETTINGS frame in `bytes` (HTTP/2 frames).
fn max_concurrent_streams(bytes: &[u8]) -> Option<u32> {
    let mut at = 0;
    while at + 9 <= bytes.len() {
        let length = u32::from_be_bytes([0, bytes[at], bytes[at + 1], bytes[at + 2]]) as usize;
        let (kind, flags) = (bytes[at + 3], bytes[at + 4]);
        let payload = bytes.get(at + 9..at + 9 + length)?;
        // A SETTINGS frame (type 4) that is not an acknowledgement: 6-byte entries.
        if kind == 4 && flags & 1 == 0 {
            return payload.chunks(6).find_map(|entry| {
                (u16::from_be_bytes([entry[0], entry[1]]) == 3)
                    .then(|| u32::from_be_bytes([entry[2], entry[3], entry[4], entry[5]]))
            });
        }
        at += 9 + length;
    }
    None
}

fn transfer(id: u128) -> v1::Transfer {
    v1::Transfer {
        id: tally_client::u128_to(id),
        debit_account_id: tally_client::u128_to(1),
        credit_account_id: tally_client::u128_to(2),
        amount: tally_client::u128_to(1),
        ledger: 1,
        code: 1,
        ..v1::Transfer::default()
    }
}

/// Accounts 1 and 2 on ledger 1, which `transfer` moves money between.
async fn create_accounts_1_and_2(client: &Client) {
    let accounts = (1..=2).map(|id| v1::Account {
        id: tally_client::u128_to(id),
        ledger: 1,
        code: 1,
        ..v1::Account::default()
    });
    client.create_accounts(accounts.collect()).await.unwrap();
}

/// Bytes of events waiting or in flight on a node are bounded, not only their count: a batch
/// past the budget is refused with RESOURCE_EXHAUSTED and moves nothing; smaller ones go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_past_the_queued_bytes_budget_are_refused() {
    // A full batch of 8189 transfers is about 1 MiB of events.
    let cluster = TestCluster::start(Path::new(TALLY), &SITES, &["--max-queued-bytes", "512KiB"]);
    cluster.wait_for_leader(DEADLINE).await;
    let client = cluster.client(Duration::from_secs(10));
    create_accounts_1_and_2(&client).await;
    let full: Vec<v1::Transfer> = (1..=8189).map(transfer).collect();
    let refused = client.create_transfers(full).await;
    let status = match &refused {
        Err(Error::Rejected(status)) if status.code() == tonic::Code::ResourceExhausted => status,
        other => panic!("a batch past the budget: {other:?}"),
    };
    assert!(status.message().contains("nothing was proposed"), "{}", status.message());
    let small: Vec<v1::Transfer> = (10_001..=10_100).map(transfer).collect();
    let results = client.create_transfers(small).await.expect("a batch within the budget");
    assert!(results.iter().all(|r| r.status() == v1::CreateTransferStatus::Ok));
    let found = client.lookup_transfers(&[1, 8189, 10_001], v1::ReadConsistency::Linearizable).await.unwrap();
    assert_eq!(found.len(), 1, "only the batch within the budget was applied");
}

/// A request that gives up (its deadline passes, its stream is reset) does not give back its
/// share of --max-queued-bytes while its batch still waits or replicates: with the followers
/// stopped, writes that time out one after another fill the budget and the next is refused, where
/// before each cancelled request freed its bytes and the node queued without bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_writes_keep_their_queued_bytes_until_their_entry_is_done() {
    // Eight single-transfer batches of 128 bytes.
    let cluster = TestCluster::start(Path::new(TALLY), &SITES, &["--max-queued-bytes", "1KiB"]);
    let leader = cluster.wait_for_leader(DEADLINE).await;
    let client = cluster.client(Duration::from_secs(10));
    create_accounts_1_and_2(&client).await;
    cluster.wait_for_convergence(DEADLINE).await;
    let followers: Vec<u64> = cluster.nodes.keys().copied().filter(|id| *id != leader).collect();
    for id in &followers {
        cluster.freeze(*id);
    }
    let mut ledger = v1::ledger_client::LedgerClient::new(cluster.channel_as(&cluster.address(leader), None));
    let mut codes = Vec::new();
    for id in 1..=16u128 {
        let mut request = tonic::Request::new(v1::CreateTransfersRequest { transfers: vec![transfer(id)] });
        request.set_timeout(Duration::from_millis(100));
        let code =
            ledger.create_transfers(request).await.map(|_| tonic::Code::Ok).unwrap_or_else(|s| s.code());
        codes.push(code);
        if code == tonic::Code::ResourceExhausted {
            break;
        }
    }
    for id in &followers {
        cluster.thaw(*id);
    }
    assert_eq!(
        codes.last(),
        Some(&tonic::Code::ResourceExhausted),
        "cancelled writes freed their bytes while their batches were still held: {codes:?}"
    );
    assert!(codes.len() >= 9, "refused before the budget was full: {codes:?}");
    // Once the entries are done, the bytes come back and writes go on.
    let started = Instant::now();
    loop {
        match client.create_transfers(vec![transfer(100)]).await {
            Ok(results) => {
                assert!(results.iter().all(|r| r.status() == v1::CreateTransferStatus::Ok));
                break;
            }
            Err(error) => assert!(started.elapsed() < DEADLINE, "the budget never came back: {error:?}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cluster.wait_for_convergence(DEADLINE).await;
}

/// A transfer of 1 from account 1 to 2 with every 128-bit field set, so that its encoding is
/// large: for filling a request to a given size.
fn wide_transfer(id: u128) -> v1::Transfer {
    let wide = u128::MAX - id;
    v1::Transfer { user_data_128: tally_client::u128_to(wide), ..transfer(id) }
}

/// A CreateTransfers request of about `bytes` encoded.
fn request_of(bytes: usize, first_id: u128) -> v1::CreateTransfersRequest {
    let one = prost::Message::encoded_len(&wide_transfer(first_id)) + 3;
    let transfers = (first_id..first_id + (bytes / one) as u128).map(wide_transfer).collect();
    v1::CreateTransfersRequest { transfers }
}

/// Anonymous callers cannot make a node hold unbounded memory. Request bytes being received are
/// bounded over all connections of the client door: two calls that each sent a message of
/// 3.9 MiB and keep their streams open hold 7.8 MiB of an 8 MiB budget, and a 500 KiB write is
/// refused with RESOURCE_EXHAUSTED (nothing applied) until they end; then it goes through.
/// Change-stream subscribers are bounded too: with --max-subscribers 2 a third is refused, and
/// the place comes back when one goes away. (Before: no budget and no cap.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_being_received_and_subscribers_are_bounded() {
    let args = ["--max-receiving-bytes", "8MiB", "--max-subscribers", "2"];
    let cluster = TestCluster::start(Path::new(TALLY), &SITES, &args);
    let leader = cluster.wait_for_leader(DEADLINE).await;
    let client = cluster.client_of(&[leader], Duration::from_secs(10));
    create_accounts_1_and_2(&client).await;
    let door = cluster.address(leader);
    let held = prost::Message::encode_to_vec(&request_of(4_000 << 10, 1_000_000));
    assert!(held.len() < 4 << 20, "{} bytes: within the message limit", held.len());
    let hold = || {
        common::open_call(cluster.channel_as(&door, None), "/tally.v1.Ledger/CreateTransfers", held.clone())
    };
    let mut holders: Vec<_> = (0..2).map(|_| hold()).collect();
    let mut ledger = v1::ledger_client::LedgerClient::new(cluster.channel_as(&door, None))
        .max_encoding_message_size(8 << 20);
    let write = request_of(500 << 10, 1);
    let started = Instant::now();
    let refused = loop {
        match ledger.create_transfers(write.clone()).await {
            Err(status) if status.code() == tonic::Code::ResourceExhausted => break status,
            other => {
                assert!(started.elapsed() < DEADLINE, "never refused: {:?}", other.map(|_| ()));
                // Written before the held messages arrived whole: the same ids again are EXISTS.
                // A holder whose frames came while a write held its bytes was refused itself
                // (the budget at work): it holds again.
                for holder in &mut holders {
                    if holder.1.is_finished() {
                        let code = (&mut holder.1).await.unwrap();
                        assert_eq!(code, tonic::Code::ResourceExhausted, "a holder ended");
                        *holder = hold();
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    assert!(refused.message().contains("--max-receiving-bytes"), "{}", refused.message());
    for (sender, call) in holders {
        drop(sender);
        // Too many transfers for one batch: refused once received whole, never applied.
        assert_eq!(call.await.unwrap(), tonic::Code::InvalidArgument);
    }
    let written = ledger.create_transfers(request_of(500 << 10, 500_000)).await.expect("the bytes came back");
    assert!(written.get_ref().results.iter().all(|r| r.status() == v1::CreateTransferStatus::Ok));

    let subscribe = || {
        let mut ledger = v1::ledger_client::LedgerClient::new(cluster.channel_as(&door, None));
        async move { ledger.subscribe_changes(v1::SubscribeChangesRequest { timestamp_min: 0 }).await }
    };
    let first = subscribe().await.expect("a first subscriber");
    let _second = subscribe().await.expect("a second subscriber");
    let third = subscribe().await.map(|_| ()).unwrap_err();
    assert_eq!(third.code(), tonic::Code::ResourceExhausted, "{}", third.message());
    assert!(third.message().contains("--max-subscribers"), "{}", third.message());
    drop(first);
    let started = Instant::now();
    while subscribe().await.is_err() {
        assert!(started.elapsed() < DEADLINE, "the place of a subscriber that left never came back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A node takes one snapshot install at a time, and none larger than --max-snapshot-bytes: a
/// second stream while one is open, and a stream past the size, get RESOURCE_EXHAUSTED, and the
/// place is free again once the first stream ends. (Sent as a member would, with node 1's
/// certificate and the cluster's id, to node 2's peer door.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_installs_are_one_at_a_time_and_bounded_in_size() {
    let cluster = TestCluster::start(Path::new(TALLY), &SITES, &["--max-snapshot-bytes", "64KiB"]);
    cluster.wait_for_leader(DEADLINE).await;
    cluster.wait_for_convergence(DEADLINE).await;
    let channel = channel_with(&cluster.peer_address(2), &cluster.security_as(Some(Role::Node(1))));
    let cluster_id = cluster.cluster_id(2);
    let install = |chunks: tokio::sync::mpsc::Receiver<v1::SnapshotChunk>| {
        let mut raft = v1::raft_client::RaftClient::new(channel.clone());
        let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(chunks));
        let metadata = request.metadata_mut();
        metadata.insert("x-tally-cluster", cluster_id.parse().unwrap());
        metadata.insert("x-tally-from", "1.0".parse().unwrap());
        metadata.insert("x-tally-to", "2.0".parse().unwrap());
        async move {
            raft.install_snapshot(request).await.map(|_| ()).map_err(|s| (s.code(), s.message().to_string()))
        }
    };
    let chunk = |bytes: usize| v1::SnapshotChunk { header: None, data: vec![7; bytes] };

    // Too large: 80 KiB against 64 KiB.
    let (send, chunks) = tokio::sync::mpsc::channel(4);
    for _ in 0..2 {
        send.send(chunk(40 << 10)).await.unwrap();
    }
    drop(send);
    let (code, message) = install(chunks).await.unwrap_err();
    assert_eq!(code, tonic::Code::ResourceExhausted, "{message}");
    assert!(message.contains("--max-snapshot-bytes"), "{message}");

    // One open stream, kept alive by a small chunk every 500 ms, holds the only place. A probe
    // takes the place for a moment too: an open stream that arrived during one was refused, and
    // is opened again.
    let open_one = || {
        let (first, chunks) = tokio::sync::mpsc::channel(4);
        let open = tokio::spawn(install(chunks));
        let feeder = tokio::spawn({
            let first = first.clone();
            async move {
                while first.send(chunk(16)).await.is_ok() {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        });
        (first, open, feeder)
    };
    let second = async || {
        let (send, chunks) = tokio::sync::mpsc::channel(1);
        drop(send);
        install(chunks).await
    };
    let (mut first, mut open, mut feeder) = open_one();
    let started = Instant::now();
    loop {
        if matches!(second().await, Err((tonic::Code::ResourceExhausted, ref m)) if m.contains("one at a time"))
        {
            break;
        }
        assert!(started.elapsed() < DEADLINE, "a second install was never refused while one was open");
        if open.is_finished() {
            feeder.abort();
            (first, open, feeder) = open_one();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    feeder.abort();
    drop(first);
    // The first stream ends without a header: refused for that, and the place is free.
    let (code, message) = open.await.unwrap().unwrap_err();
    assert_eq!(code, tonic::Code::InvalidArgument, "{message}");
    let (code, message) = second().await.unwrap_err();
    assert_eq!(code, tonic::Code::InvalidArgument, "the place stayed taken: {message}");
    // Nothing of it became the node's: it still serves and agrees with the others.
    cluster.wait_for_convergence(DEADLINE).await;
}
