//! The `coordinator` binary as a user runs it: exit codes, and a one-process cluster.

use std::process::Command;

use kowalski_exo_tests::{Daemon, eventually};

fn coordinator() -> Command {
    Command::new(env!("CARGO_BIN_EXE_coordinator"))
}

#[test]
fn nodes_exits_4_naming_an_unreachable_coordinator() {
    let output = coordinator()
        .args(["nodes", "--addr", "http://127.0.0.1:1"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(4));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("cannot reach the coordinator at http://127.0.0.1:1"),
        "{stderr}"
    );
}

#[test]
fn bad_usage_exits_2() {
    let output = coordinator().args(["nodes", "--bogus"]).output().unwrap();
    assert_eq!(output.status.code(), Some(2));
}

#[test]
fn serve_with_local_agent_is_a_one_node_cluster() {
    let server = Daemon::start(
        "coordinator",
        &["serve", "--listen", "127.0.0.1:0", "--local-agent"],
        &[],
        "coordinator listening",
    );
    let mut table = String::new();
    eventually("local agent listed as ready", || {
        let output = coordinator()
            .args(["nodes", "--addr", &server.url()])
            .output()
            .unwrap();
        table = String::from_utf8_lossy(&output.stdout).into_owned();
        table.lines().any(|l| l.contains(" ready "))
    });
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 2, "{table}");
    assert!(lines[0].starts_with("ID"), "{table}");
    assert!(lines[1].contains("python"), "{table}");
}

#[test]
fn run_local_quickstart_runs_every_block_in_order() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/quickstart.md");
    let output = coordinator()
        .args(["run", "--local", "--json", example])
        .output()
        .unwrap();
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let finished_blocks: Vec<u64> = lines
        .iter()
        .filter(|l| l["event"] == "finished" && l["status"] == "ok")
        .map(|l| l["block"].as_u64().unwrap())
        .collect();
    let skipped: Vec<&serde_json::Value> =
        lines.iter().filter(|l| l["event"] == "skipped").collect();
    let blocks = finished_blocks.len() + skipped.len();
    assert_eq!(blocks, 7, "{lines:?}");
    assert!(
        finished_blocks.windows(2).all(|w| w[0] < w[1]),
        "out of order: {finished_blocks:?}"
    );
    assert_eq!(
        skipped.last().unwrap()["reason"],
        "the block names no language"
    );
    let stdout: String = lines
        .iter()
        .filter(|l| l["event"] == "output" && l["stream"] == "stdout")
        .map(|l| l["data"].as_str().unwrap().to_string())
        .collect();
    assert!(stdout.contains("says hello"), "{stdout}");
}
