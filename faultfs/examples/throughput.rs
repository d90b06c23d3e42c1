//! What the chaos harness's disks cost: writes and an fsync on a faultfs mount against the same
//! on a plain directory of the machine's disk. Every write to faultfs crosses FUSE, takes the
//! mount's one lock, reads the durable bytes it overwrites (for the undo a power cut replays) and
//! copies itself (for a torn write); a page store's durable commit writes out everything it
//! buffered since the last one and then fsyncs, so a slow write path turns into a slow commit.
//!
//! `cargo run --release -p faultfs --example throughput [MIB]` (needs root and /dev/fuse): a file
//! of MIB MiB (default 64) written and synced, then overwritten in 128 KiB writes and synced
//! (what a commit that rewrites pages does), then in 4 KiB writes at scattered offsets and synced.
//! Last, a log beside the pages: one thread rewrites the pages in scattered 4 KiB writes again
//! while another appends 4 KiB records to a second file with an fdatasync each, as a node's Raft
//! log does while its page store writes out a commit; it prints the log's fsync rate and latency.

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Instant;

const CHUNK: usize = 128 << 10;
const PAGE: usize = 4 << 10;

fn main() {
    let mib: usize = std::env::args().nth(1).map_or(64, |arg| arg.parse().expect("MiB: a number"));
    let plain = tempfile::tempdir().expect("a temporary directory");
    run("plain directory", plain.path(), mib);
    let mountpoint = tempfile::tempdir().expect("a temporary directory");
    let disk = faultfs::FaultFs::mount(mountpoint.path()).expect("mount faultfs (root and /dev/fuse)");
    run("faultfs", disk.mountpoint(), mib);
}

fn run(name: &str, dir: &Path, mib: usize) {
    let bytes = mib << 20;
    let path = dir.join("pages");
    let mut file = std::fs::File::create(&path).expect("create");
    let chunk = vec![0xA5u8; CHUNK];
    let started = Instant::now();
    for _ in 0..bytes / CHUNK {
        file.write_all(&chunk).expect("append");
    }
    let appended = started.elapsed();
    file.sync_all().expect("fsync");
    let first_sync = started.elapsed() - appended;

    let chunk = vec![0x5Au8; CHUNK];
    let started = Instant::now();
    for index in 0..bytes / CHUNK {
        file.write_all_at(&chunk, (index * CHUNK) as u64).expect("overwrite");
    }
    let overwritten = started.elapsed();
    file.sync_data().expect("fdatasync");
    let overwrite_sync = started.elapsed() - overwritten;

    let page = vec![0x3Cu8; PAGE];
    let pages = bytes / PAGE;
    let started = Instant::now();
    // Every page once, in a scattered order (a stride coprime with the page count).
    let stride = (1..pages).rev().find(|stride| gcd(*stride, pages) == 1 && *stride < pages / 2).unwrap_or(1);
    for step in 0..pages {
        let index = (step * stride) % pages;
        file.write_all_at(&page, (index * PAGE) as u64).expect("page write");
    }
    let scattered = started.elapsed();
    file.sync_data().expect("fdatasync");
    let scattered_sync = started.elapsed() - scattered;

    let (log_syncs, log_latency) = log_beside_pages(dir, &file, pages, stride);

    let rate = |took: std::time::Duration| bytes as f64 / (1 << 20) as f64 / took.as_secs_f64().max(1e-9);
    println!(
        "{name:16} {mib} MiB: append {:7.1} MiB/s + fsync {:6.0} ms | overwrite 128 KiB {:7.1} MiB/s + fdatasync {:6.0} ms | \
         scattered 4 KiB {:7.1} MiB/s + fdatasync {:6.0} ms",
        rate(appended),
        first_sync.as_secs_f64() * 1e3,
        rate(overwritten),
        overwrite_sync.as_secs_f64() * 1e3,
        rate(scattered),
        scattered_sync.as_secs_f64() * 1e3,
    );
    let millis = |at: f64| {
        let index = ((log_latency.len() as f64 - 1.0) * at).round() as usize;
        log_latency.get(index).map_or(0.0, |took| took.as_secs_f64() * 1e3)
    };
    println!(
        "{name:16} log beside the pages: {log_syncs:6.0} appends+fdatasync/s, latency p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        millis(0.5),
        millis(0.99),
        millis(1.0),
    );
}

/// Rewrites every page of `pages` (scattered, then an fdatasync) on one thread while another
/// appends 4 KiB records with an fdatasync each to a log file beside it; returns the log's syncs
/// per second and each append's latency, sorted.
fn log_beside_pages(
    dir: &Path,
    pages: &std::fs::File,
    count: usize,
    stride: usize,
) -> (f64, Vec<std::time::Duration>) {
    let done = std::sync::atomic::AtomicBool::new(false);
    let mut log = std::fs::File::create(dir.join("log")).expect("create the log");
    let record = vec![0x77u8; PAGE];
    std::thread::scope(|scope| {
        scope.spawn(|| {
            let page = vec![0xC3u8; PAGE];
            for step in 0..count {
                let index = (step * stride) % count;
                pages.write_all_at(&page, (index * PAGE) as u64).expect("page write");
            }
            pages.sync_data().expect("fdatasync");
            done.store(true, std::sync::atomic::Ordering::Relaxed);
        });
        let started = Instant::now();
        let mut latency = Vec::new();
        while !done.load(std::sync::atomic::Ordering::Relaxed) {
            let append = Instant::now();
            log.write_all(&record).expect("log append");
            log.sync_data().expect("log fdatasync");
            latency.push(append.elapsed());
        }
        latency.sort();
        (latency.len() as f64 / started.elapsed().as_secs_f64().max(1e-9), latency)
    })
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 { a } else { gcd(b, a % b) }
}
