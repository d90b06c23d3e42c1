//! The admin HTTP endpoint: `GET /metrics` in Prometheus's text format, on `--metrics-listen`.
//! Plain HTTP and read-only: bind it to an address only the monitoring network reaches.

use std::net::SocketAddr;
use std::sync::Arc;

use crate::node::NodeHandle;

pub async fn serve(node: Arc<NodeHandle>, address: SocketAddr) -> Result<(), String> {
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .map_err(|e| format!("cannot listen on {address} (--metrics-listen): {e}"))?;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let node = node.clone();
            async move {
                let text =
                    tokio::task::spawn_blocking(move || super::render(&node)).await.unwrap_or_default();
                ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], text)
            }
        }),
    );
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!("the metrics endpoint stopped: {e}");
        }
    });
    Ok(())
}
