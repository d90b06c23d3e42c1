//! Counts and times every gRPC call of a door, by method and status code: a tower layer around
//! the door's router. The code is the `grpc-status` of the response headers, where tonic puts
//! it for every error; a response without one is counted as OK (its status comes in trailers).
//! Unknown methods are counted as "unknown", so no caller can grow the label set.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

#[derive(Clone, Copy)]
pub struct Observe {
    pub door: &'static str,
}

impl<S> tower_layer::Layer<S> for Observe {
    type Service = Observed<S>;

    fn layer(&self, inner: S) -> Observed<S> {
        Observed { inner, door: self.door }
    }
}

#[derive(Clone)]
pub struct Observed<S> {
    inner: S,
    door: &'static str,
}

/// gRPC's UNIMPLEMENTED: what tonic answers for a method no service has.
const UNIMPLEMENTED: &str = "12";

impl<S, B, R> tower_service::Service<http::Request<B>> for Observed<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<R>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        // The clone is not ready; the one polled ready is taken (tower's rule).
        let ready = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, ready);
        let (door, method) = (self.door, request.uri().path().to_string());
        Box::pin(async move {
            let started = Instant::now();
            let response = inner.call(request).await;
            if let Ok(response) = &response {
                let code = response.headers().get("grpc-status").and_then(|v| v.to_str().ok()).unwrap_or("0");
                let method = if code == UNIMPLEMENTED { "unknown" } else { method.as_str() };
                super::REQUESTS.with_label_values(&[door, method, code]).inc();
                super::REQUEST_SECONDS
                    .with_label_values(&[door, method])
                    .observe(started.elapsed().as_secs_f64());
            }
            response
        })
    }
}
