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
