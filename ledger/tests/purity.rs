//! ARCHITECTURE.md's invariants for `ledger`, checked on its source: no async, no clock, no
//! randomness, no networking, no thread, no file and no storage engine. Determinism rests on
//! them (the same entries give the same bytes on every replica and build), and a dependency that
//! brings one in fails here, not in a replica that diverged. The engine is `tally-store`'s; the
//! node's threads and files are `raft-node`'s.

use std::path::{Path, PathBuf};

/// What `ledger`'s own code may not name, with why.
const FORBIDDEN: &[(&str, &str)] = &[
    ("std::thread", "a thread"),
    ("thread::spawn", "a thread"),
    ("thread::sleep", "sleeping"),
    ("Instant", "a clock"),
    ("SystemTime", "a clock"),
    ("std::fs", "a file"),
    ("File::", "a file"),
    ("std::net", "networking"),
    ("std::env", "the environment"),
    ("std::process", "a process"),
    ("println!", "printing"),
    ("eprintln!", "printing"),
    ("async fn", "async"),
    (".await", "async"),
    ("tokio", "async"),
    ("rand::", "randomness"),
    ("redb", "a storage engine"),
    ("sled", "a storage engine"),
    ("openraft", "Raft types"),
    ("RandomState", "a hash seeded per process (iteration order would differ between replicas)"),
];

/// The crates `ledger` may depend on: hashing and a deterministic hash map.
const DEPENDENCIES: &[&str] = &["blake3", "foldhash"];

fn sources(dir: &Path, found: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, found);
        } else if path.extension().is_some_and(|extension| extension == "rs") {
            found.push(path);
        }
    }
}

/// The code of a line: what comes before a `//` comment.
fn code(line: &str) -> &str {
    line.find("//").map_or(line, |at| &line[..at])
}

#[test]
fn the_ledger_has_no_thread_clock_file_randomness_or_storage_engine() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    sources(&root.join("src"), &mut files);
    assert!(files.len() >= 10, "the ledger's sources are not where this test looks: {files:?}");
    let mut broken = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        for (number, line) in text.lines().enumerate() {
            for (name, why) in FORBIDDEN {
                if code(line).contains(name) {
                    broken.push(format!("{}:{}: {name} ({why})", file.display(), number + 1));
                }
            }
        }
    }
    assert!(broken.is_empty(), "ledger must stay pure (ARCHITECTURE.md):\n{}", broken.join("\n"));
}

#[test]
fn the_ledger_depends_only_on_hashing() {
    let manifest = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml")).unwrap();
    let section = manifest.split("[dependencies]").nth(1).expect("a [dependencies] section");
    let section = section.split("\n[").next().unwrap();
    let names: Vec<&str> = section
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(|line| line.split(['.', ' ', '=']).next().unwrap())
        .collect();
    let extra: Vec<&&str> = names.iter().filter(|name| !DEPENDENCIES.contains(name)).collect();
    assert!(
        extra.is_empty(),
        "ledger depends on {extra:?}: its dependencies are {DEPENDENCIES:?} (ARCHITECTURE.md)"
    );
}

#[test]
fn a_line_that_breaks_the_rule_is_found() {
    // The scan itself: a forbidden name in code is seen, the same in a comment is not.
    assert!(code("    let now = std::time::Instant::now(); // Instant").contains("Instant"));
    assert!(!code("    // an Instant in a comment").contains("Instant"));
}
