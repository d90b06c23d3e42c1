//! The admin HTTP endpoint on `--metrics-listen`: `GET /metrics` in Prometheus's text format,
//! and `GET /ready`, 200 while gRPC health says SERVING and 503 otherwise (for probes that
//! cannot speak TLS, such as Kubernetes' readiness probe). Plain HTTP and read-only: bind it
//! to an address only the monitoring network reaches.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::http::{StatusCode, header};

/// Serves `render` (the metrics' text) and `ready` (whether the node serves) on `address`.
pub async fn serve(
    address: SocketAddr,
    render: impl Fn() -> String + Send + Sync + 'static,
    ready: impl Fn() -> bool + Send + Sync + Clone + 'static,
) -> Result<(), String> {
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .map_err(|e| format!("cannot listen on {address} (--metrics-listen): {e}"))?;
    let render = Arc::new(render);
    let metrics = move || {
        let render = render.clone();
        async move {
            let text = tokio::task::spawn_blocking(move || render()).await.unwrap_or_default();
            ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text)
        }
    };
    let ready = move || {
        let serving = ready();
        async move {
            match serving {
                true => (StatusCode::OK, "SERVING\n"),
                false => (StatusCode::SERVICE_UNAVAILABLE, "NOT_SERVING\n"),
            }
        }
    };
    let app = axum::Router::new()
        .route("/metrics", axum::routing::get(metrics))
        .route("/ready", axum::routing::get(ready));
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!("the metrics endpoint stopped: {e}");
        }
    });
    Ok(())
}
