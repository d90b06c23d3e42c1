//! A local cluster of real `tally serve` processes on 127.0.0.1, for tests and measurements.
//!
//! Ports are picked free by binding port 0; data lives in a temporary directory removed on drop;
//! every process is killed on drop. Waiting is always for a condition, with a deadline. TLS is
//! on, with a throwaway CA in the directory's `certs/` (`security::certs::make_local`); clients
//! are the local operator unless a test asks for another role (`security_as`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tally_client::{Client, Security, v1};

use crate::security::certs;
use crate::security::roles::Role;

pub struct NodeSpec {
    pub id: u64,
    pub site: String,
    /// The client door.
    pub address: String,
    /// The peer door.
    pub peer_address: String,
    /// Its Prometheus endpoint (`--metrics-listen`).
    pub metrics_address: String,
    pub data_dir: PathBuf,
}

/// The name (`--cluster`) of every test cluster.
pub const CLUSTER_NAME: &str = "test";

pub struct TestCluster {
    binary: PathBuf,
    pub dir: tempfile::TempDir,
    pub nodes: BTreeMap<u64, NodeSpec>,
    processes: BTreeMap<u64, Child>,
    /// Extra flags for every `serve`.
    pub extra_args: Vec<String>,
}

/// A channel to `address` (either door) connecting as `security` says.
pub fn channel_with(address: &str, security: &Security) -> tonic::transport::Channel {
    let endpoint = match security.clone() {
        Security::Insecure => tonic::transport::Endpoint::from_shared(format!("http://{address}")).unwrap(),
        Security::Tls { ca_pem, identity } => {
            let mut tls = tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(ca_pem));
            if let Some((cert, key)) = identity {
                tls = tls.identity(tonic::transport::Identity::from_pem(cert, key));
            }
            tonic::transport::Endpoint::from_shared(format!("https://{address}"))
                .unwrap()
                .tls_config(tls)
                .expect("TLS settings")
        }
    };
    endpoint.connect_timeout(Duration::from_secs(2)).connect_lazy()
}

/// A port that was free a moment ago, and never handed out before by this process: the kernel
/// may give a released port to the next `bind(0)`, and CI saw a node's metrics port be another
/// node's client port (tests run in parallel threads of one process).
pub fn free_port() -> u16 {
    static HANDED_OUT: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("bind 127.0.0.1:0")
            .local_addr()
            .unwrap()
            .port();
        if HANDED_OUT.lock().unwrap().insert(port) {
            return port;
        }
    }
}

impl TestCluster {
    /// Starts `sites.len()` nodes, node i+1 in `sites[i]`, bootstrapped by node 1.
    pub fn start(binary: &Path, sites: &[&str], extra_args: &[&str]) -> TestCluster {
        let mut cluster = TestCluster::define(binary, sites, extra_args);
        let ids: Vec<u64> = cluster.nodes.keys().copied().collect();
        for id in ids {
            cluster.spawn(id, id == 1);
        }
        cluster
    }

    /// `start` without starting anything: the nodes' addresses, directories and certificates,
    /// for a test that prepares their data directories first.
    pub fn define(binary: &Path, sites: &[&str], extra_args: &[&str]) -> TestCluster {
        let dir = tempfile::tempdir().expect("temporary directory");
        let mut cluster = TestCluster {
            binary: binary.to_path_buf(),
            dir,
            nodes: BTreeMap::new(),
            processes: BTreeMap::new(),
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
        };
        for (index, site) in sites.iter().enumerate() {
            cluster.define_node(index as u64 + 1, site);
        }
        certs::make_local(&cluster.certs_dir(), 0).expect("the test cluster's CA");
        cluster
    }

    /// Every node as `--peer`/`--voter` names it: ID=CLIENT,PEER@SITE.
    pub fn peer_specs(&self) -> Vec<String> {
        self.nodes.values().map(|n| format!("{}={},{}@{}", n.id, n.address, n.peer_address, n.site)).collect()
    }

    /// The flags with which a CLI command connects to this cluster as `role` (None: TLS without
    /// a client certificate): --nodes and the TLS files.
    pub fn cli_args(&self, role: Option<Role>) -> Vec<String> {
        let mut args = vec!["--nodes".to_string(), self.addresses().join(",")];
        if self.insecure() {
            args.push("--insecure".into());
            return args;
        }
        args.extend(["--ca".to_string(), self.certs_dir().join(certs::CA_CERT).display().to_string()]);
        if let Some(role) = role {
            let (cert, key) = self.certificate(&role);
            args.extend(["--cert".to_string(), cert.display().to_string()]);
            args.extend(["--key".to_string(), key.display().to_string()]);
        }
        args
    }

    /// The cluster's CA and certificates.
    pub fn certs_dir(&self) -> PathBuf {
        self.dir.path().join("certs")
    }

    fn insecure(&self) -> bool {
        self.extra_args.iter().any(|a| a == "--insecure")
    }

    /// How a client of role `role` connects (None: TLS without a client certificate); makes the
    /// certificate the first time.
    pub fn security_as(&self, role: Option<Role>) -> Security {
        if self.insecure() {
            return Security::Insecure;
        }
        let ca = self.certs_dir().join(certs::CA_CERT);
        let Some(role) = role else { return Security::from_files(&ca, None).expect("the CA") };
        let (cert, key) = self.certificate(&role);
        Security::from_files(&ca, Some((&cert, &key))).expect("the certificate")
    }

    /// The certificate and key of `role` signed by the cluster's CA, made the first time.
    fn certificate(&self, role: &Role) -> (PathBuf, PathBuf) {
        let dir = self.certs_dir();
        let (cert, key) = certs::paths(&dir, role);
        if !cert.exists() {
            certs::make(&dir, role, &["127.0.0.1".into()], 1).expect("a certificate");
        }
        (cert, key)
    }

    /// A channel to `address` (either door) as `role` (None: no client certificate), for tests
    /// that make calls the client library does not.
    pub fn channel_as(&self, address: &str, role: Option<Role>) -> tonic::transport::Channel {
        channel_with(address, &self.security_as(role))
    }

    /// The local operator's: what `client` and `client_of` use.
    pub fn security(&self) -> Security {
        self.security_as(Some(Role::Operator(certs::LOCAL_OPERATOR.into())))
    }

    pub fn define_node(&mut self, id: u64, site: &str) -> &NodeSpec {
        let spec = NodeSpec {
            id,
            site: site.to_string(),
            address: format!("127.0.0.1:{}", free_port()),
            peer_address: format!("127.0.0.1:{}", free_port()),
            metrics_address: format!("127.0.0.1:{}", free_port()),
            data_dir: self.dir.path().join(format!("node-{id}")),
        };
        self.nodes.insert(id, spec);
        &self.nodes[&id]
    }

    pub fn command(&self, id: u64, bootstrap: bool) -> Command {
        let tls = (!self.insecure()).then(|| {
            let (cert, key) = self.certificate(&Role::Node(id));
            [self.certs_dir().join(certs::CA_CERT), cert, key]
        });
        self.command_with_tls(id, bootstrap, tls)
    }

    /// `command` with these TLS files (CA, certificate, key) instead of the node's own.
    pub fn command_with_tls(&self, id: u64, bootstrap: bool, tls: Option<[PathBuf; 3]>) -> Command {
        self.command_in(CLUSTER_NAME, id, bootstrap, tls)
    }

    /// Starts node `id` as a node of the cluster named `name` (this one is `CLUSTER_NAME`).
    pub fn spawn_in(&mut self, name: &str, id: u64) {
        let tls = (!self.insecure()).then(|| {
            let (cert, key) = self.certificate(&Role::Node(id));
            [self.certs_dir().join(certs::CA_CERT), cert, key]
        });
        let child = self.command_in(name, id, false, tls).spawn().expect("spawn tally serve");
        self.processes.insert(id, child);
    }

    fn command_in(&self, name: &str, id: u64, bootstrap: bool, tls: Option<[PathBuf; 3]>) -> Command {
        let spec = &self.nodes[&id];
        let mut command = Command::new(&self.binary);
        command.args(["serve", "--cluster", name, "--id", &id.to_string(), "--site", &spec.site]);
        command.args(["--listen", &spec.address, "--peer-listen", &spec.peer_address, "--data-dir"]);
        command.arg(&spec.data_dir);
        command.args(["--metrics-listen", &spec.metrics_address]);
        command.arg("--clock-skew-file").arg(self.skew_file(id));
        if let Some([ca, cert, key]) = tls {
            command.arg("--ca").arg(ca).arg("--cert").arg(cert).arg("--key").arg(key);
        }
        if bootstrap {
            command.arg("--bootstrap");
            for peer in self.nodes.values().filter(|n| n.id != id && n.id <= 3) {
                let addresses = format!("{},{}", peer.address, peer.peer_address);
                command.args(["--peer", &format!("{}={addresses}@{}", peer.id, peer.site)]);
            }
        }
        command.args(&self.extra_args);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("node-{id}.log")))
            .expect("node log file");
        command.stdout(Stdio::null()).stderr(log);
        command
    }

    /// Starts node `id` (again), bootstrapping the cluster if asked.
    pub fn spawn(&mut self, id: u64, bootstrap: bool) {
        let child = self.command(id, bootstrap).spawn().expect("spawn tally serve");
        self.processes.insert(id, child);
    }

    pub fn restart(&mut self, id: u64) {
        self.spawn(id, false);
    }

    /// Starts node `id` again with extra flags for this start only.
    pub fn restart_with(&mut self, id: u64, args: &[&str]) {
        let child = self.command(id, false).args(args).spawn().expect("spawn tally serve");
        self.processes.insert(id, child);
    }

    /// SIGKILL: the node stops dead, as in a power loss of its process.
    pub fn kill(&mut self, id: u64) {
        if let Some(mut child) = self.processes.remove(&id) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then wait for a graceful exit.
    pub fn stop(&mut self, id: u64) {
        if let Some(mut child) = self.processes.remove(&id) {
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let _ = child.wait();
        }
    }

    fn skew_file(&self, id: u64) -> PathBuf {
        self.dir.path().join(format!("node-{id}.clock"))
    }

    /// Makes node `id`'s clock read `offset_ms` off, drifting `drift_ppm` from now on (through
    /// the `--clock-skew-file` test hook; the node picks it up within 100 ms).
    pub fn skew_clock(&self, id: u64, offset_ms: i64, drift_ppm: i64) {
        let path = self.skew_file(id);
        let temporary = path.with_extension("tmp");
        std::fs::write(&temporary, format!("{offset_ms} {drift_ppm}\n")).expect("write the skew file");
        std::fs::rename(&temporary, &path).expect("rename the skew file");
    }

    /// Deletes node `id`'s data directory (it must be stopped): a disk lost, or replaced empty.
    pub fn wipe(&mut self, id: u64) {
        assert!(!self.is_running(id), "wipe node {id} only while it is stopped");
        std::fs::remove_dir_all(&self.nodes[&id].data_dir).expect("remove the data directory");
    }

    /// SIGSTOP: the node freezes (a stalled VM, a long GC pause, a swapped-out process), its
    /// sockets stay open.
    pub fn freeze(&self, id: u64) {
        self.signal(id, libc::SIGSTOP);
    }

    /// SIGCONT after `freeze`.
    pub fn thaw(&self, id: u64) {
        self.signal(id, libc::SIGCONT);
    }

    fn signal(&self, id: u64, signal: i32) {
        if let Some(child) = self.processes.get(&id) {
            unsafe { libc::kill(child.id() as i32, signal) };
        }
    }

    /// The process id of every running node.
    pub fn pids(&self) -> BTreeMap<u64, u32> {
        self.processes.iter().map(|(id, child)| (*id, child.id())).collect()
    }

    pub fn is_running(&self, id: u64) -> bool {
        self.processes.contains_key(&id)
    }

    /// How node `id`'s process ended, if it has (a node this cluster started and did not stop).
    pub fn exited(&mut self, id: u64) -> Option<std::process::ExitStatus> {
        self.processes.get_mut(&id).and_then(|child| child.try_wait().ok().flatten())
    }

    pub fn addresses(&self) -> Vec<String> {
        self.nodes.values().map(|n| n.address.clone()).collect()
    }

    pub fn address(&self, id: u64) -> String {
        self.nodes[&id].address.clone()
    }

    pub fn peer_address(&self, id: u64) -> String {
        self.nodes[&id].peer_address.clone()
    }

    /// The cluster id node `id` keeps in its `identity.toml` (once bootstrapped or adopted).
    pub fn cluster_id(&self, id: u64) -> String {
        let text = std::fs::read_to_string(self.nodes[&id].data_dir.join("identity.toml")).unwrap();
        let line = text.lines().find(|l| l.starts_with("cluster_id")).expect("a cluster id after bootstrap");
        line.split('"').nth(1).unwrap().to_string()
    }

    pub fn client(&self, timeout: Duration) -> Client {
        Client::new(&self.addresses(), timeout, &self.security()).expect("client")
    }

    pub fn client_of(&self, ids: &[u64], timeout: Duration) -> Client {
        let addresses: Vec<String> = ids.iter().map(|id| self.address(*id)).collect();
        Client::new(&addresses, timeout, &self.security()).expect("client")
    }

    /// Waits until a leader is elected among the running nodes and they all answer; returns it.
    /// Each running node is asked on its own: a client sticks to the node that last answered,
    /// which may be one that knows no leader (a node refused by the others).
    pub async fn wait_for_leader(&self, deadline: Duration) -> u64 {
        let started = Instant::now();
        loop {
            let statuses = self.node_statuses().await;
            let term = statuses.values().map(|s| s.term).max().unwrap_or(0);
            if let Some(leader) = statuses.values().find(|s| s.is_leader && s.term == term) {
                return leader.id;
            }
            assert!(started.elapsed() < deadline, "no leader within {deadline:?}:\n{}", self.log_tails());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until every running node applies the newest semantics version its build knows (a
    /// new cluster starts at the first and its leader switches within a second or so): for tests
    /// that count entries or compare digests across clusters.
    pub async fn wait_for_newest_semantics(&self, deadline: Duration) {
        let started = Instant::now();
        loop {
            let statuses = self.node_statuses().await;
            if statuses.len() == self.processes.len()
                && statuses.values().all(|s| s.semantics_version == s.semantics_known)
            {
                return;
            }
            assert!(
                started.elapsed() < deadline,
                "semantics never settled: {statuses:?}\n{}",
                self.log_tails()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Node `id`'s metrics, as Prometheus would scrape them (the whole HTTP response).
    pub async fn scrape(&self, id: u64) -> String {
        self.http_get(id, "/metrics").await
    }

    /// `GET path` on node `id`'s metrics endpoint: the whole HTTP response.
    pub async fn http_get(&self, id: u64, path: &str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let address = &self.nodes[&id].metrics_address;
        let mut stream = tokio::net::TcpStream::connect(address).await.expect("metrics endpoint");
        let request = format!("GET {path} HTTP/1.0\r\nHost: tally\r\n\r\n");
        stream.write_all(request.as_bytes()).await.expect("send the request");
        let mut text = String::new();
        stream.read_to_string(&mut text).await.expect("read the response");
        text
    }

    /// Each running node's own status.
    pub async fn node_statuses(&self) -> BTreeMap<u64, v1::NodeStatus> {
        let client = self.client(Duration::from_secs(1));
        let mut statuses = BTreeMap::new();
        for id in self.processes.keys() {
            if let Ok(status) = client.node_status(&self.address(*id)).await {
                statuses.insert(*id, status);
            }
        }
        statuses
    }

    /// Waits until every running node has applied the same index and reports the same digest;
    /// returns the digest.
    pub async fn wait_for_convergence(&self, deadline: Duration) -> String {
        let started = Instant::now();
        loop {
            let statuses = self.node_statuses().await;
            if statuses.len() == self.processes.len() {
                let first = statuses.values().next().unwrap();
                if statuses
                    .values()
                    .all(|s| s.applied_index == first.applied_index && s.state_digest == first.state_digest)
                {
                    return first.state_digest.clone();
                }
            }
            if started.elapsed() >= deadline {
                panic!("nodes did not converge within {deadline:?}: {statuses:?}\n{}", self.log_tails());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl TestCluster {
    /// The last lines each node wrote to stderr, for a failure message.
    pub fn log_tails(&self) -> String {
        let mut out = String::new();
        for id in self.nodes.keys() {
            let text =
                std::fs::read_to_string(self.dir.path().join(format!("node-{id}.log"))).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            out += &format!(
                "--- node {id} log (last lines)\n{}\n",
                lines[lines.len().saturating_sub(15)..].join("\n")
            );
        }
        out
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        let ids: Vec<u64> = self.processes.keys().copied().collect();
        for id in ids {
            // A frozen process dies of SIGKILL too; thawing first keeps its exit ordinary.
            self.thaw(id);
            self.kill(id);
        }
    }
}
