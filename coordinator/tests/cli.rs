//! The `coordinator` binary as a user runs it: exit codes, and a one-process cluster.

use std::process::Command;

use kowalski_exo_tests::{Daemon, binary, eventually, outcome};

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
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
            "--local-agent",
        ],
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
    let (last, lines) = lines.split_last().unwrap();
    assert_eq!(
        last,
        &serde_json::json!({"event": "finished", "status": "ok", "blocks_run": 6}),
        "the document's own line ends the output"
    );
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

/// Runs the coordinator with `args`, `stdin` piped in; returns (exit code, stdout, stderr).
fn run_with_stdin(args: &[&str], stdin: &[u8]) -> (Option<i32>, String, String) {
    use std::io::Write;
    let mut child = coordinator()
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    outcome(child.wait_with_output().unwrap())
}

fn run(args: &[&str]) -> (Option<i32>, String, String) {
    run_with_stdin(args, b"")
}

/// The JSON lines a command printed.
fn json_lines(stdout: &str) -> Vec<serde_json::Value> {
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

#[test]
fn exec_forwards_piped_stdin_and_a_stdin_file_to_the_program() {
    let code = "import sys; print(sys.stdin.read().upper(), end='')";
    let (status, stdout, stderr) = run_with_stdin(
        &["exec", "--local", "--lang", "python", "-c", code],
        b"piped words\n",
    );
    assert_eq!(status, Some(0), "{stderr}");
    assert_eq!(stdout, "PIPED WORDS\n");

    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("input.txt");
    std::fs::write(&input, "from a file\n").unwrap();
    let (status, stdout, stderr) = run(&[
        "exec",
        "--local",
        "--lang",
        "python",
        "--stdin",
        input.to_str().unwrap(),
        "-c",
        code,
    ]);
    assert_eq!(status, Some(0), "{stderr}");
    assert_eq!(stdout, "FROM A FILE\n");

    // Past tonic's default message size of 4 MiB, within the 16 MiB a run takes.
    let large = vec![b'x'; 6 * 1024 * 1024];
    let (status, stdout, stderr) = run_with_stdin(
        &[
            "exec",
            "--local",
            "--lang",
            "python",
            "-c",
            "import sys; print(len(sys.stdin.buffer.read()))",
        ],
        &large,
    );
    assert_eq!(status, Some(0), "{stderr}");
    assert_eq!(stdout, "6291456\n");
}

#[test]
fn timeout_zero_is_the_default_and_block_timeouts_take_fractions() {
    let (status, stdout, stderr) = run(&[
        "exec",
        "--local",
        "--timeout",
        "0",
        "--lang",
        "python",
        "-c",
        "import time; time.sleep(0.3); print('slept')",
    ]);
    assert_eq!((status, stdout.as_str()), (Some(0), "slept\n"), "{stderr}");

    let dir = tempfile::tempdir().unwrap();
    let doc = dir.path().join("doc.md");
    std::fs::write(
        &doc,
        "```python {timeout=0.5}\nimport time\ntime.sleep(20)\n```\n",
    )
    .unwrap();
    let (status, _, stderr) = run(&["run", "--local", doc.to_str().unwrap()]);
    assert_eq!(status, Some(124), "{stderr}");
}

#[test]
fn limit_flags_reach_the_run() {
    let (status, _, stderr) = run(&[
        "exec",
        "--local",
        "--output-limit",
        "1k",
        "--lang",
        "python",
        "-c",
        "print('x' * 10000)",
    ]);
    assert_eq!(status, Some(125), "{stderr}");
    assert!(stderr.contains("more than 1024 bytes"), "{stderr}");
    let (status, _, stderr) = run(&[
        "exec",
        "--local",
        "--cpu-seconds",
        "1",
        "--timeout",
        "20",
        "--lang",
        "python",
        "-c",
        "while True: pass",
    ]);
    assert_eq!(status, Some(125), "{stderr}");
}

#[test]
fn every_json_error_ends_with_an_error_event() {
    let (status, stdout, _) = run(&[
        "exec",
        "--json",
        "--addr",
        "http://127.0.0.1:1",
        "--lang",
        "python",
        "-c",
        "1",
    ]);
    assert_eq!(status, Some(4));
    let last = json_lines(&stdout).pop().expect("no JSON at all");
    assert_eq!(
        (&last["event"], &last["code"]),
        (&"error".into(), &"infrastructure".into())
    );
    assert!(
        last["message"]
            .as_str()
            .unwrap()
            .contains("cannot reach the coordinator")
    );

    let (status, stdout, _) = run(&[
        "exec",
        "--local",
        "--json",
        "--wait-for-nodes",
        "0",
        "--node",
        "nas",
        "--lang",
        "py",
        "-c",
        "1",
    ]);
    assert_eq!(status, Some(3));
    let last = json_lines(&stdout).pop().expect("no JSON at all");
    assert_eq!(last["code"], "no_node");
    assert_eq!(
        last["message"],
        "no node is called 'nas'; known nodes: local"
    );

    let (status, stdout, _) = run(&[
        "exec", "--local", "--json", "--label", "gpu=yes", "--lang", "py", "-c", "1",
    ]);
    assert_eq!(status, Some(3));
    let last = json_lines(&stdout).pop().expect("no JSON at all");
    assert!(
        last["message"]
            .as_str()
            .unwrap()
            .contains("labels gpu=yes (local has no labels)"),
        "{last}"
    );
}

#[test]
fn oversized_code_is_bad_usage_in_run_as_in_exec() {
    let dir = tempfile::tempdir().unwrap();
    let big = format!("# {}\n", "x".repeat(1024 * 1024 + 10));
    let doc = dir.path().join("big.md");
    std::fs::write(
        &doc,
        format!("```python\n{big}```\n\n```bash\necho after\n```\n"),
    )
    .unwrap();
    let (status, stdout, _) = run(&["run", "--local", "--json", doc.to_str().unwrap()]);
    assert_eq!(status, Some(2));
    let lines = json_lines(&stdout);
    assert_eq!(lines[0]["skip"], "invalid", "{:?}", lines[0]);
    assert!(
        lines[0]["reason"]
            .as_str()
            .unwrap()
            .starts_with("code is 1048")
    );
    assert_eq!(lines[1]["skip"], "not_run");
    let last = lines.last().unwrap();
    assert_eq!(
        (&last["event"], &last["code"]),
        (&"error".into(), &"invalid_request".into())
    );

    let file = dir.path().join("big.py");
    std::fs::write(&file, &big).unwrap();
    let (status, stdout, _) = run(&[
        "exec",
        "--local",
        "--json",
        "--lang",
        "py",
        file.to_str().unwrap(),
    ]);
    assert_eq!(status, Some(2));
    assert_eq!(
        json_lines(&stdout).pop().unwrap()["code"],
        "invalid_request"
    );
}

#[test]
fn an_address_without_scheme_is_bad_usage_with_the_fix() {
    let (status, _, stderr) = run(&["nodes", "--addr", "127.0.0.1:50051"]);
    assert_eq!(status, Some(2));
    assert!(
        stderr.contains("write it as http://127.0.0.1:50051"),
        "{stderr}"
    );
    let agent = Command::new(binary("node-agent"))
        .args(["--coordinator", "127.0.0.1:50051"])
        .output()
        .unwrap();
    assert_eq!(agent.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&agent.stderr).contains("write it as http://127.0.0.1:50051"));
}

#[test]
fn run_points_a_source_file_at_exec_and_says_when_there_is_nothing_to_run() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("script.rs");
    std::fs::write(&script, "fn main() {}\n").unwrap();
    let (status, _, stderr) = run(&["run", "--local", script.to_str().unwrap()]);
    assert_eq!(status, Some(2));
    assert!(
        stderr.contains("run it with `coordinator exec --lang rust"),
        "{stderr}"
    );

    let prose = dir.path().join("prose.md");
    std::fs::write(&prose, "# Notes\n\n```text\njust output\n```\n").unwrap();
    let (status, _, stderr) = run(&["run", "--local", prose.to_str().unwrap()]);
    assert_eq!(status, Some(2));
    assert!(stderr.contains("no code block to run"), "{stderr}");
}

#[test]
fn start_up_failures_exit_alike_from_both_binaries() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().to_string();
    let work = tempfile::tempdir().unwrap();
    let work_dir = work.path().join("work");
    for (address, expected) in [(":50051", 2), (port.as_str(), 4)] {
        let server = coordinator()
            .args(["serve", "--listen", address])
            .output()
            .unwrap();
        let agent = Command::new(binary("node-agent"))
            .args(["--standalone", "--listen", address, "--work-dir"])
            .arg(&work_dir)
            .output()
            .unwrap();
        for output in [&server, &agent] {
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert_eq!(output.status.code(), Some(expected), "{address}: {stderr}");
            assert!(
                stderr.contains(&format!("cannot listen on {address}")),
                "{stderr}"
            );
        }
        assert!(!work_dir.exists(), "a failed start left its work directory");
    }
}
