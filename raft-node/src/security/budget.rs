//! One budget for the request bytes a door is receiving, over all its connections: a tower layer
//! that counts every data frame of a request body against a shared semaphore, and gives the
//! bytes back when the body is dropped (tonic drops it once the message is decoded and the
//! stream ended). Without it, 4,096 connections of 1,024 streams each could each hold a 4 MiB
//! message being received: anonymous clients could exhaust the node's memory. A frame past the
//! budget ends its request with RESOURCE_EXHAUSTED (nothing of it was applied); the others go on.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::codegen::Bytes;

/// The default of `--max-receiving-bytes`: 64 of the largest requests at once.
pub const RECEIVING_BYTES_DEFAULT: u64 = 256 << 20;

#[derive(Clone)]
pub struct ReceiveBudget {
    bytes: Arc<Semaphore>,
    bytes_max: usize,
}

impl ReceiveBudget {
    pub fn new(bytes_max: u64) -> ReceiveBudget {
        let bytes_max = (bytes_max as usize).min(Semaphore::MAX_PERMITS);
        ReceiveBudget { bytes: Arc::new(Semaphore::new(bytes_max)), bytes_max }
    }
}

impl<S> tower_layer::Layer<S> for ReceiveBudget {
    type Service = Budgeted<S>;

    fn layer(&self, inner: S) -> Budgeted<S> {
        Budgeted { inner, budget: self.clone() }
    }
}

#[derive(Clone)]
pub struct Budgeted<S> {
    inner: S,
    budget: ReceiveBudget,
}

impl<S> tower_service::Service<http::Request<tonic::body::Body>> for Budgeted<S>
where
    S: tower_service::Service<http::Request<tonic::body::Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let budget = self.budget.clone();
        self.inner.call(request.map(|body| tonic::body::Body::new(CountedBody { body, budget, held: None })))
    }
}

/// A request body whose data frames hold their bytes of the budget until it is dropped.
struct CountedBody {
    body: tonic::body::Body,
    budget: ReceiveBudget,
    held: Option<OwnedSemaphorePermit>,
}

impl http_body::Body for CountedBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, tonic::Status>>> {
        let frame = match Pin::new(&mut self.body).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => frame,
            other => return other,
        };
        let Some(data) = frame.data_ref() else { return Poll::Ready(Some(Ok(frame))) };
        let taken = u32::try_from(data.len())
            .ok()
            .and_then(|bytes| self.budget.bytes.clone().try_acquire_many_owned(bytes).ok());
        let Some(taken) = taken else {
            let message = format!(
                "this node is receiving as many request bytes as it takes ({} MiB, --max-receiving-bytes): \
                 nothing of this request was applied; retry shortly, or send to another node",
                self.budget.bytes_max >> 20
            );
            return Poll::Ready(Some(Err(tonic::Status::resource_exhausted(message))));
        };
        match &mut self.held {
            Some(held) => held.merge(taken),
            held => *held = Some(taken),
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}
