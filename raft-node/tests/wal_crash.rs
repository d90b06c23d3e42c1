//! Crash test for the write-ahead log with real processes: a child appends and syncs groups of
//! records, acknowledging each group on stdout after its sync, and is killed with SIGKILL at
//! random points; the parent reopens the log and an auditor checks that no acknowledged record is
//! lost and that no torn record is ever returned. Later rounds also truncate a recent suffix first,
//! as Raft does on a conflict.
//!
//! The seed fixes the schedule (how many acknowledgements before each kill, group sizes,
//! truncation points), not the exact instant of each kill, which depends on the scheduler.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};

use raft_node::storage::wal::Wal;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const SEED_ENV: &str = "TALLY_SEED";
const CHILD_DIR_ENV: &str = "TALLY_WAL_CHILD_DIR";
const CHILD_SEED_ENV: &str = "TALLY_WAL_CHILD_SEED";
const CHILD_TERM_ENV: &str = "TALLY_WAL_CHILD_TERM";
const CHILD_TRUNCATE_FROM_ENV: &str = "TALLY_WAL_CHILD_TRUNCATE_FROM";

const ROUNDS_APPEND: u64 = 20;
const ROUNDS_TRUNCATE: u64 = 8;
const ACKS_BEFORE_KILL_MAX: u64 = 12;
/// Few, so that kills land while the child has yet to overwrite what it truncated.
const ACKS_AFTER_TRUNCATE_MAX: u64 = 3;
const GROUP_RECORDS_MAX: u64 = 16;
/// Random payload bytes after the 8-byte term.
const PAYLOAD_RANDOM_BYTES_MAX: usize = 4000;
/// A truncation removes at most this many of the newest records.
const TRUNCATE_RECORDS_MAX: u64 = 40;
/// Small segments (about 16 records) so that kills also land around segment rolls.
const SEGMENT_BYTES_CHILD: u64 = 32 * 1024;
/// The child stops writing after this many groups should nobody kill it, bounding its disk use.
const CHILD_GROUPS_MAX: u64 = 2_000;
const SIGKILL: i32 = 9;

/// The payload of `index` as written in `term`: the term, then bytes that only (index, term)
/// determine, so that any record read back can be checked on its own.
fn payload(index: u64, term: u64) -> Vec<u8> {
    let mut rng = ChaCha8Rng::seed_from_u64(index.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ term);
    let mut random = vec![0; rng.random_range(1..=PAYLOAD_RANDOM_BYTES_MAX)];
    rng.fill(&mut random[..]);
    [term.to_le_bytes().as_slice(), &random].concat()
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|value| value.parse().unwrap_or_else(|_| panic!("{name}={value:?}")))
}

/// Not a test on its own: the body of the child process, which does nothing unless the parent set
/// `TALLY_WAL_CHILD_DIR`.
#[test]
fn wal_crash_child() {
    let Some(dir) = std::env::var_os(CHILD_DIR_ENV) else { return };
    let mut rng = ChaCha8Rng::seed_from_u64(env_u64(CHILD_SEED_ENV).unwrap());
    let term = env_u64(CHILD_TERM_ENV).unwrap();
    let mut wal = Wal::open_with(Path::new(&dir), SEGMENT_BYTES_CHILD).unwrap();
    let mut stdout = io::stdout().lock();
    if let Some(index) = env_u64(CHILD_TRUNCATE_FROM_ENV) {
        wal.truncate_from(index).unwrap();
        writeln!(stdout, "truncated {index}").unwrap();
        stdout.flush().unwrap();
    }
    for _ in 0..CHILD_GROUPS_MAX {
        let first = wal.last_index().map_or(1, |last| last + 1);
        let last = first + rng.random_range(0..GROUP_RECORDS_MAX);
        for index in first..=last {
            wal.append(index, &payload(index, term)).unwrap();
        }
        wal.sync().unwrap();
        // Fails, and so ends the child, once the parent is gone.
        writeln!(stdout, "acked {last}").unwrap();
        stdout.flush().unwrap();
    }
    // Wait to be killed rather than exit: the parent treats any exit as a failure. Reading stdin
    // returns when the parent closes it, so an orphan does not linger.
    let _ = io::stdin().read(&mut [0]);
}

/// The auditor: what the log must hold after any crash.
#[derive(Default)]
struct Auditor {
    /// `terms[i]` is the term of index `i + 1`, for every index known to be in the log.
    terms: Vec<u64>,
    /// Every index up to this one was acknowledged and not truncated since: no crash may lose it.
    acked_last: u64,
    /// `(index, term)`: the child of `term` reported its truncation from `index` done, so every
    /// record from `index` on is one it wrote since.
    truncated: Option<(u64, u64)>,
}

impl Auditor {
    /// A truncation of a recent suffix, or `None` while the log is empty.
    fn pick_truncation(&self, rng: &mut ChaCha8Rng) -> Option<u64> {
        let last = self.terms.len() as u64;
        (last > 0).then(|| rng.random_range(last.saturating_sub(TRUNCATE_RECORDS_MAX - 1).max(1)..=last))
    }

    /// Called before the child starts: the truncation may have happened by any crash after that.
    fn truncating(&mut self, index: u64) {
        self.terms.truncate(index as usize - 1);
        self.acked_last = self.acked_last.min(index - 1);
    }

    fn truncation_done(&mut self, index: u64, term: u64) {
        self.truncated = Some((index, term));
    }

    /// The child synced every index up to `last`; the ones the auditor did not know yet are its.
    fn acked(&mut self, last: u64, term: u64) {
        assert!(
            last > self.terms.len() as u64,
            "acked {last}, but the log already held {}",
            self.terms.len()
        );
        self.terms.resize(last as usize, term);
        self.acked_last = last;
    }

    /// Checks the reopened log and learns what it holds, acknowledged or not.
    fn check(&mut self, wal: &Wal, context: &str) {
        let entries = wal.read(0, u64::MAX).unwrap_or_else(|error| panic!("{context}: read: {error}"));
        // Indexes are contiguous from first to last, and nothing was purged.
        assert_eq!(wal.first_index(), entries.first().map(|_| 1), "{context}: first index");
        assert_eq!(wal.last_index(), Some(entries.len() as u64).filter(|&last| last > 0), "{context}");
        let mut terms = Vec::with_capacity(entries.len());
        for (position, (index, bytes)) in entries.iter().enumerate() {
            assert_eq!(*index, position as u64 + 1, "{context}: indexes not contiguous");
            terms.push(check_payload(*index, bytes, context));
        }
        // No acknowledged record is lost, or replaced.
        assert!(
            terms.len() as u64 >= self.acked_last,
            "{context}: acked {} but the log ends at {}",
            self.acked_last,
            terms.len()
        );
        let acked = ..self.acked_last as usize;
        assert_eq!(terms[acked], self.terms[acked], "{context}: terms of acknowledged records");
        // Terms never go down along the log, and a truncation reported done is durable.
        assert!(terms.is_sorted(), "{context}: terms go down: {terms:?}");
        if let Some((index, term)) = self.truncated.take() {
            let after = terms.get(index as usize - 1..).unwrap_or_default();
            assert!(after.iter().all(|&t| t == term), "{context}: truncated from {index}, yet {after:?}");
        }
        self.terms = terms;
    }
}

/// A record is whole: its payload is exactly the one written for its index and term. Returns the term.
fn check_payload(index: u64, bytes: &[u8], context: &str) -> u64 {
    let term = u64::from_le_bytes(
        bytes.get(..8).unwrap_or_else(|| panic!("{context}: index {index} too short")).try_into().unwrap(),
    );
    assert!(bytes == payload(index, term), "{context}: index {index} is not what term {term} wrote");
    term
}

/// One round: start a child, let it acknowledge `acks_before_kill` groups, SIGKILL it.
fn run_child(
    dir: &Path,
    term: u64,
    truncate_from: Option<u64>,
    acks_before_kill: u64,
    child_seed: u64,
    auditor: &mut Auditor,
    context: &str,
) {
    let mut command = Command::new(std::env::current_exe().unwrap());
    command
        .args(["--exact", "wal_crash_child", "--nocapture", "--test-threads=1"])
        .env(CHILD_DIR_ENV, dir)
        .env(CHILD_SEED_ENV, child_seed.to_string())
        .env(CHILD_TERM_ENV, term.to_string())
        .env_remove(CHILD_TRUNCATE_FROM_ENV)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    if let Some(index) = truncate_from {
        command.env(CHILD_TRUNCATE_FROM_ENV, index.to_string());
        auditor.truncating(index);
    }
    let mut child = command.spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut acks = 0;
    while acks < acks_before_kill {
        let line = lines
            .next()
            .unwrap_or_else(|| panic!("{context}: child exited before {acks_before_kill} acks"))
            .unwrap();
        if let Some(last) = line.strip_prefix("acked ") {
            auditor.acked(last.parse().unwrap(), term);
            acks += 1;
        } else if let Some(index) = line.strip_prefix("truncated ") {
            assert_eq!(index.parse().ok(), truncate_from, "{context}");
            auditor.truncation_done(truncate_from.unwrap(), term);
        }
        // Anything else is the test harness talking.
    }
    child.kill().unwrap();
    let status = child.wait().unwrap();
    // The child never exits by itself, so any other ending is a failure in it (see its stderr).
    assert_eq!(status.signal(), Some(SIGKILL), "{context}: child ended with {status}");
}

#[test]
fn wal_survives_sigkill() {
    let seed = env_u64(SEED_ENV).unwrap_or_else(rand::random);
    eprintln!("wal_survives_sigkill: seed {seed}; rerun with {SEED_ENV}={seed}");
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    // On the target's disk rather than a tmpfs /tmp, so that syncs are real.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let mut auditor = Auditor::default();
    let mut truncations = 0;
    for round in 0..ROUNDS_APPEND + ROUNDS_TRUNCATE {
        let context = format!("seed {seed}, round {round}");
        // Every round writes in a term of its own, so truncated records are told from new ones.
        let term = round + 1;
        let truncate_from = if round >= ROUNDS_APPEND { auditor.pick_truncation(&mut rng) } else { None };
        truncations += u64::from(truncate_from.is_some());
        let acks_max = if truncate_from.is_some() { ACKS_AFTER_TRUNCATE_MAX } else { ACKS_BEFORE_KILL_MAX };
        // Kill right away now and then, to crash during recovery or a truncation.
        let acks_before_kill = if rng.random_ratio(1, 5) { 0 } else { rng.random_range(1..=acks_max) };
        run_child(dir.path(), term, truncate_from, acks_before_kill, rng.random(), &mut auditor, &context);
        let wal = Wal::open(dir.path()).unwrap_or_else(|error| panic!("{context}: reopen: {error}"));
        auditor.check(&wal, &context);
    }
    // The run must have exercised what it is for.
    let segments = std::fs::read_dir(dir.path()).unwrap().count();
    assert!(
        auditor.acked_last > 0 && segments > 1,
        "seed {seed}: acked {}, {segments} segments",
        auditor.acked_last
    );
    assert_eq!(truncations, ROUNDS_TRUNCATE, "seed {seed}");
    eprintln!(
        "wal_survives_sigkill: {} records, {} acknowledged, {segments} segments",
        auditor.terms.len(),
        auditor.acked_last
    );
}
