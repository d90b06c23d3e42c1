//! The node's modules import one another in one direction (ARCHITECTURE.md): no cycle between
//! its top-level modules (`storage`, `net`, `node`, `service`, ...). A cycle is how a layer
//! starts to lean on the one above it (the metrics on the node, storage on the configuration);
//! this test names the imports that close one.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

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

/// The top-level module a source file belongs to (`storage` for `src/storage/wal/mod.rs`).
fn module_of(src: &Path, file: &Path) -> String {
    let relative = file.strip_prefix(src).unwrap();
    let first = relative.components().next().unwrap().as_os_str().to_string_lossy().to_string();
    first.trim_end_matches(".rs").to_string()
}

/// The top-level modules `text` names through `crate::` (outside its unit tests and comments).
fn imports(text: &str, modules: &BTreeSet<String>) -> BTreeSet<String> {
    let code = text.split("#[cfg(test)]\nmod tests").next().unwrap();
    let mut found = BTreeSet::new();
    for line in code.lines() {
        let line = line.split("//").next().unwrap();
        let mut rest = line;
        while let Some(at) = rest.find("crate::") {
            rest = &rest[at + "crate::".len()..];
            if let Some(stripped) = rest.strip_prefix('{') {
                // `use crate::{a::X, b};`: every name of the list on this line.
                for name in stripped.split([',', '}']) {
                    let name = name.trim().split("::").next().unwrap_or("");
                    if modules.contains(name) {
                        found.insert(name.to_string());
                    }
                }
            } else {
                let name: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
                if modules.contains(&name) {
                    found.insert(name);
                }
            }
        }
    }
    found
}

/// A cycle in `graph`, as the modules around it, if there is one.
fn cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|seen| seen == node) {
            let mut found = path[at..].to_vec();
            found.push(node.to_string());
            return Some(found);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(found) = visit(next, graph, path, done) {
                return Some(found);
            }
        }
        path.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    graph.keys().find_map(|node| visit(node, graph, &mut Vec::new(), &mut done))
}

#[test]
fn no_import_cycle_between_the_node_modules() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let modules: BTreeSet<String> = files.iter().map(|file| module_of(&src, file)).collect();
    assert!(modules.contains("storage") && modules.contains("node"), "{modules:?}");
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut by: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    for file in &files {
        let module = module_of(&src, file);
        if module == "lib" || module == "main" {
            continue;
        }
        for imported in imports(&std::fs::read_to_string(file).unwrap(), &modules) {
            if imported != module {
                graph.entry(module.clone()).or_default().insert(imported.clone());
                by.entry((module.clone(), imported)).or_default().push(file.display().to_string());
            }
        }
    }
    if let Some(found) = cycle(&graph) {
        let edges: Vec<String> = found
            .windows(2)
            .map(|pair| {
                format!("{} -> {} (in {:?})", pair[0], pair[1], by[&(pair[0].clone(), pair[1].clone())])
            })
            .collect();
        panic!("an import cycle between the node's modules:\n{}", edges.join("\n"));
    }
}

#[test]
fn a_cycle_is_found() {
    let modules: BTreeSet<String> = ["a", "b", "c"].map(String::from).into();
    assert_eq!(imports("use crate::{a::X, b};\nlet x = crate::c::f(); // crate::a", &modules).len(), 3);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    graph.entry("a".into()).or_default().insert("b".into());
    graph.entry("b".into()).or_default().insert("c".into());
    assert_eq!(cycle(&graph), None);
    graph.entry("c".into()).or_default().insert("a".into());
    assert_eq!(cycle(&graph).map(|found| found.len()), Some(4));
}
