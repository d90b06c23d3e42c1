//! The deployment recipes under `deploy/` are checked as far as this machine can without a
//! cluster to apply them to: every Kubernetes document parses and has the parts a three-site
//! cluster needs, every `tally serve` they run takes its flags, and the systemd unit's TOML is a
//! node configuration `tally serve --config` accepts.

use std::path::{Path, PathBuf};

use clap::Parser;
use raft_node::cli::{Cli, Command};
use yaml_rust2::{Yaml, YamlLoader};

fn deploy(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy").join(path)
}

/// The node configuration `tally` + `args` would run with.
fn serve_config(args: &[String]) -> raft_node::node::NodeConfig {
    let argv = std::iter::once("tally".to_string()).chain(args.iter().cloned());
    let cli = Cli::try_parse_from(argv).unwrap_or_else(|e| panic!("tally {args:?}: {e}"));
    let Command::Serve(serve) = cli.command else { panic!("not `tally serve`: {args:?}") };
    raft_node::cli::node_config(*serve).unwrap_or_else(|e| panic!("tally {args:?}: {e}"))
}

#[test]
fn the_kubernetes_manifests_describe_a_three_site_cluster() {
    let text = std::fs::read_to_string(deploy("kubernetes/tally.yaml")).unwrap();
    let documents = YamlLoader::load_from_str(&text).expect("valid YAML");
    let kind = |doc: &Yaml| doc["kind"].as_str().unwrap_or("").to_string();
    for doc in &documents {
        assert!(doc["apiVersion"].as_str().is_some(), "a document without apiVersion: {doc:?}");
        assert!(doc["metadata"]["name"].as_str().is_some(), "a document without a name: {doc:?}");
    }
    let budget = documents.iter().find(|d| kind(d) == "PodDisruptionBudget").expect("a PodDisruptionBudget");
    assert_eq!(budget["spec"]["maxUnavailable"].as_i64(), Some(1));
    let sets: Vec<&Yaml> = documents.iter().filter(|d| kind(d) == "StatefulSet").collect();
    assert_eq!(sets.len(), 3, "one StatefulSet per zone");
    let mut zones = Vec::new();
    let mut bootstrapping = 0;
    for set in sets {
        let pod = &set["spec"]["template"]["spec"];
        let zone = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
            [0]["matchExpressions"][0]
            .clone();
        assert_eq!(zone["key"].as_str(), Some("topology.kubernetes.io/zone"));
        let anti = &pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0];
        assert_eq!(anti["topologyKey"].as_str(), Some("topology.kubernetes.io/zone"), "one node per zone");
        let container = &pod["containers"][0];
        assert_eq!(container["readinessProbe"]["httpGet"]["path"].as_str(), Some("/ready"));
        let args: Vec<String> =
            container["args"].as_vec().unwrap().iter().map(|a| a.as_str().unwrap().to_string()).collect();
        let config = serve_config(&args);
        assert!(config.tls.is_some() && !config.insecure, "TLS on");
        assert_eq!(Some(config.site.as_str()), zone["values"][0].as_str(), "site = zone");
        assert!(config.metrics_listen.is_some());
        let mounts: Vec<&str> = container["volumeMounts"]
            .as_vec()
            .unwrap()
            .iter()
            .map(|m| m["mountPath"].as_str().unwrap())
            .collect();
        assert!(mounts.contains(&config.data_dir.to_str().unwrap()), "the data directory is a volume");
        if config.bootstrap {
            bootstrapping += 1;
            assert_eq!(config.peers.len(), 2);
        }
        zones.push(config.site);
    }
    zones.sort();
    zones.dedup();
    assert_eq!(zones.len(), 3, "three zones");
    assert_eq!(bootstrapping, 1, "exactly one node bootstraps");
}

#[test]
fn the_systemd_unit_runs_a_configuration_tally_accepts() {
    let config =
        raft_node::node::read_config_file(&deploy("systemd/tally.toml")).expect("a valid node configuration");
    assert!(config.tls.is_some() && !config.insecure, "TLS on");
    assert_eq!(config.peers.len(), 2);
    let unit = std::fs::read_to_string(deploy("systemd/tally.service")).unwrap();
    for line in [
        "ExecStart=/usr/local/bin/tally serve --config /etc/tally/tally.toml",
        "LimitNOFILE=",
        "Restart=on-failure",
        "ExecReload=/bin/kill -HUP $MAINPID",
    ] {
        assert!(unit.contains(line), "the unit lacks {line}");
    }
    let exec = unit.lines().find_map(|l| l.strip_prefix("ExecStart=")).unwrap();
    let args: Vec<String> = exec.split_whitespace().skip(1).map(str::to_string).collect();
    let argv = std::iter::once("tally".to_string()).chain(args.iter().cloned());
    Cli::try_parse_from(argv).unwrap_or_else(|e| panic!("{exec}: {e}"));
}

/// The entry apply target (`batcher::ENTRY_APPLY_TARGET`) is 100 ms unless the flag or the file
/// says otherwise; 0 turns the cut off.
#[test]
fn the_entry_apply_target_comes_from_the_flag_then_the_file() {
    let file = deploy("systemd/tally.toml").display().to_string();
    let with = |extra: &[&str]| {
        let mut args: Vec<String> =
            ["serve", "--config", file.as_str()].iter().map(|a| a.to_string()).collect();
        args.extend(extra.iter().map(|a| a.to_string()));
        serve_config(&args).entry_apply_target_ms
    };
    assert_eq!(with(&[]), 100);
    assert_eq!(with(&["--entry-apply-target-ms", "250"]), 250);
    assert_eq!(with(&["--entry-apply-target-ms", "0"]), 0);
    let dir = tempfile::tempdir().unwrap();
    // Before the file's first table, where a top-level key belongs.
    let text = "entry_apply_target_ms = 40\n".to_string() + &std::fs::read_to_string(&file).unwrap();
    let edited = dir.path().join("tally.toml");
    std::fs::write(&edited, text).unwrap();
    let config = raft_node::node::read_config_file(&edited).expect("a valid node configuration");
    assert_eq!(config.entry_apply_target_ms, 40);
}
