//! The two doors' gRPC servers, what they report to health checks, and shutting them down.

use crate::net::MESSAGE_BYTES_MAX;
use crate::security::doors::{self, Door, Limits};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tally_proto::v1 as pb;

use crate::node::NodeHandle;

/// Serves the client door and the peer door on the configured addresses until `shutdown`
/// resolves, then stops Raft.
pub async fn serve(
    node: Arc<NodeHandle>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), String> {
    let bind = |address: SocketAddr, door: &'static str| async move {
        crate::sys::TcpListener::bind(address)
            .await
            .map_err(|e| format!("cannot listen on {address} ({door}): {e}"))
    };
    let clients = bind(node.config.listen, "the client door, --listen").await?;
    let peers = bind(node.config.peer_listen, "the peer door, --peer-listen").await?;
    serve_on(node, clients, peers, shutdown).await
}

/// The two doors (DESIGN.md, decision 11). The client door serves clients (`tally.v1.Ledger`),
/// operators (`tally.v1.Cluster`), health and reflection. The peer door serves only what nodes
/// ask of each other: `tally.v1.Raft`, and the Ledger and Cluster requests a node forwards to
/// the leader or fans out for status, so that all node-to-node traffic goes one way, through
/// one route (`--route`).
pub async fn serve_on(
    node: Arc<NodeHandle>,
    clients: crate::sys::TcpListener,
    peers: crate::sys::TcpListener,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), String> {
    crate::service::cluster::spawn_housekeeping(&node);
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    tokio::spawn(report_health(node.clone(), health_reporter));
    // Reflection as v1 and as v1alpha, which older tools (Python's grpcio-reflection, older
    // grpcurl) still ask for.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(tally_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1alpha = reflection().build_v1alpha().map_err(|e| e.to_string())?;
    let reflection = reflection().build_v1().map_err(|e| e.to_string())?;
    let ledger = || {
        pb::ledger_server::LedgerServer::new(crate::service::LedgerService::new(node.clone()))
            .max_decoding_message_size(crate::service::LEDGER_REQUEST_BYTES_MAX)
            .max_encoding_message_size(MESSAGE_BYTES_MAX)
    };
    let cluster =
        || pb::cluster_server::ClusterServer::new(crate::service::ClusterService::new(node.clone()));
    let raft = pb::raft_server::RaftServer::new(crate::service::RaftService::new(node.clone()))
        .max_decoding_message_size(MESSAGE_BYTES_MAX)
        .max_encoding_message_size(MESSAGE_BYTES_MAX);
    let raft = tonic::service::interceptor::InterceptedService::new(
        raft,
        crate::service::refuse_strangers(node.identities.clone()),
    );
    let (stopping, stop_requested) = tokio::sync::watch::channel(false);
    let stopped = |mut watch: tokio::sync::watch::Receiver<bool>| async move {
        let _ = watch.wait_for(|stopping| *stopping).await;
    };
    let limits = Limits {
        connections_max: node.config.connections_max,
        idle_max: Duration::from_secs(node.config.idle_timeout_s),
    };
    if node.tls.is_none() {
        tracing::warn!(
            node = node.id(),
            "--insecure: both doors are plaintext and anyone who reaches them may write, change the membership \
             or pose as a node; never outside a test machine"
        );
    }
    let client_door = door_server(CLIENT_STREAMS_PER_CONNECTION_MAX)
        .layer(crate::metrics::layer::Observe { door: "client" })
        .layer(crate::security::budget::ReceiveBudget::new(node.config.receiving_bytes_max))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_v1alpha)
        .add_service(ledger())
        .add_service(cluster())
        .serve_with_incoming_shutdown(
            doors::incoming(clients, Door::Clients, node.tls.clone(), limits),
            stopped(stop_requested.clone()),
        );
    let peer_door = door_server(STREAMS_PER_CONNECTION_MAX)
        .layer(crate::metrics::layer::Observe { door: "peer" })
        .add_service(raft)
        .add_service(ledger())
        .add_service(cluster())
        .serve_with_incoming_shutdown(
            doors::incoming(peers, Door::Peers, node.tls.clone(), limits),
            stopped(stop_requested.clone()),
        );
    let doors = async { tokio::try_join!(client_door, peer_door).map(|_| ()) };
    let signal = async move {
        shutdown.await;
        let _ = stopping.send(true);
    };
    // A graceful stop waits for requests in flight, but not forever: a request waiting for a
    // commit that will never come (this node was removed, or lost its quorum) must not keep
    // the process alive after SIGTERM.
    let drain_deadline = async {
        signal.await;
        tokio::time::sleep(SHUTDOWN_DRAIN_MAX).await;
    };
    let result = tokio::select! {
        served = doors => served.map_err(|e| format!("gRPC server: {e}")),
        () = drain_deadline => {
            tracing::warn!(node = node.id(), "requests still in flight {SHUTDOWN_DRAIN_MAX:?} after the stop signal; stopping anyway");
            Ok(())
        }
    };
    let _ = node.raft.shutdown().await;
    result
}

fn door_server(streams_per_connection: u32) -> tonic::transport::Server {
    tonic::transport::Server::builder()
        // Streams a peer reset before this node got to them: every heartbeat to a frozen node
        // times out after 50 ms and is reset, and h2's default of 20 answered a thawed node's
        // peers with GOAWAY (too_many_resets), cutting replication. Still bounded, against
        // rapid-reset floods.
        .http2_max_pending_accept_reset_streams(Some(RESET_STREAMS_PENDING_MAX))
        // Calls one connection may have open at once; h2 refuses more (REFUSED_STREAM), and
        // well-behaved clients queue them.
        .max_concurrent_streams(Some(streams_per_connection))
}

/// Calls open at once on one connection of the peer door (a leader's replication and
/// heartbeats, forwarded writes).
pub const STREAMS_PER_CONNECTION_MAX: u32 = 1024;

/// ... and of the client door: an application's pool of calls, whose bytes the receive budget
/// bounds over all connections too.
pub const CLIENT_STREAMS_PER_CONNECTION_MAX: u32 = 256;

/// Streams reset by the peer before they were accepted that a connection tolerates: a 50 ms
/// heartbeat to a node frozen for 30 s makes 600.
const RESET_STREAMS_PENDING_MAX: usize = 1024;

/// How long a stopping node waits for requests in flight to finish.
const SHUTDOWN_DRAIN_MAX: Duration = Duration::from_secs(2);

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
}

/// How often health is re-evaluated.
const HEALTH_INTERVAL: Duration = Duration::from_millis(200);

/// Keeps gRPC health true to what a load balancer needs to know: SERVING only while this node
/// is a member and in contact with a leader that is in contact with a quorum (it can take
/// writes, forwarding them); NOT_SERVING when no leader is elected, when it is cut off from the
/// leader, when the leader is cut off from a quorum, and once it is removed from the cluster.
/// For the whole server ("") and for `tally.v1.Ledger`.
async fn report_health(node: Arc<NodeHandle>, reporter: tonic_health::server::HealthReporter) {
    let ledger =
        <pb::ledger_server::LedgerServer<crate::service::LedgerService> as tonic::server::NamedService>::NAME;
    let mut reported = None;
    let mut ticks = tokio::time::interval(HEALTH_INTERVAL);
    loop {
        ticks.tick().await;
        let serving = node.judge_serving();
        node.serving.store(serving, std::sync::atomic::Ordering::Relaxed);
        if reported != Some(serving) {
            let status = if serving {
                tonic_health::ServingStatus::Serving
            } else {
                tonic_health::ServingStatus::NotServing
            };
            for service in ["", ledger] {
                reporter.set_service_status(service, status).await;
            }
            reported = Some(serving);
        }
    }
}
