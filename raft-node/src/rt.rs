//! How blocking work runs beside the async runtime. A node runs on tokio's multi-threaded
//! runtime, where `block_in_place` hands this worker's other tasks to another worker while a
//! long apply or checkpoint holds it. On a current-thread runtime (a deterministic simulation,
//! issue 26) there is no other worker to hand them to and `block_in_place` panics: the work then
//! runs inline, which on one thread is what would happen anyway.

/// Runs `work`, letting the runtime move this worker's other tasks elsewhere meanwhile when it
/// can.
pub fn block<T>(work: impl FnOnce() -> T) -> T {
    let multi_threaded = tokio::runtime::Handle::try_current()
        .is_ok_and(|handle| handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
    if multi_threaded { tokio::task::block_in_place(work) } else { work() }
}

/// Runs `work` on tokio's blocking pool, so that the awaiting task's worker goes on with other
/// tasks meanwhile; inline on a current-thread runtime, whose blocking pool is real threads that a
/// deterministic simulation must not have.
pub async fn off_thread<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, tokio::task::JoinError> {
    let current_thread = tokio::runtime::Handle::try_current()
        .is_ok_and(|handle| handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread);
    if current_thread { Ok(work()) } else { tokio::task::spawn_blocking(work).await }
}

/// Calls `spawning`, which makes openraft spawn a task (`Raft::stream_append`), from a task that
/// is not a node's own: a gRPC handler's, spawned by the server. Under simulation openraft derives
/// a spawned task's random seed from its caller's, which the simulator sets on each node's own
/// tasks only: here the caller gets `seed`. Nothing in production.
pub async fn openraft_spawning<T>(seed: u64, spawning: impl FnOnce() -> T) -> T {
    #[cfg(feature = "sim")]
    return openraft::rt::deterministic_rng::DeterministicRng::<openraft_rt_tokio::TokioRuntime>::scope(
        seed,
        async move { spawning() },
    )
    .await;
    #[cfg(not(feature = "sim"))]
    {
        let _ = seed;
        spawning()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn blocking_work_runs_on_either_runtime_and_outside_one() {
        assert_eq!(super::block(|| 7), 7);
        let current = tokio::runtime::Builder::new_current_thread().build().unwrap();
        assert_eq!(current.block_on(async { super::block(|| 8) }), 8);
        let multi = tokio::runtime::Builder::new_multi_thread().worker_threads(2).build().unwrap();
        assert_eq!(multi.block_on(async { super::block(|| 9) }), 9);
    }
}
