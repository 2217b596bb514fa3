//! The real `node-agent` and `coordinator` binaries, over real sockets.

use std::{process::Command, time::Duration};

use base64::{Engine, engine::general_purpose::STANDARD as BASE64};

use kowalski_exo_common::proto::{
    ExecStatus, ExecuteRequest, exec_event::Event, node_agent_client::NodeAgentClient,
};
use kowalski_exo_tests::{CEILING, Daemon, binary, describe, eventually, free_port, process_alive};
use nix::sys::signal::Signal;

const AGENT_READY: &str = "node agent listening";

fn standalone_agent(work_dir: &std::path::Path, env: &[(&str, &str)]) -> Daemon {
    Daemon::start(
        "node-agent",
        &[
            "--standalone",
            "--listen",
            "127.0.0.1:0",
            "--work-dir",
            work_dir.to_str().unwrap(),
        ],
        env,
        AGENT_READY,
    )
}

/// Runs code and returns (stdout, finished status, pid of the program).
async fn run(url: &str, language: &str, code: &str) -> (String, ExecStatus) {
    let mut client = NodeAgentClient::connect(url.to_string()).await.unwrap();
    let request = ExecuteRequest {
        language: language.into(),
        code: code.into(),
        ..Default::default()
    };
    let mut stream = client.execute(request).await.unwrap().into_inner();
    let (mut stdout, mut status) = (Vec::new(), None);
    while let Some(event) = tokio::time::timeout(CEILING, stream.message())
        .await
        .expect("run hung")
        .unwrap()
    {
        match event.event {
            Some(Event::Output(chunk)) => stdout.extend(chunk.data),
            Some(Event::Finished(f)) => status = Some(f.status()),
            _ => {}
        }
    }
    (
        String::from_utf8_lossy(&stdout).into_owned(),
        status.expect("no finished event"),
    )
}

#[tokio::test]
async fn agent_binary_runs_code_and_never_shows_its_environment() {
    let dir = tempfile::tempdir().unwrap();
    let agent = standalone_agent(dir.path(), &[("SECRET_TOKEN", "hunter2-do-not-leak")]);
    let code = "import os\nprint(os.environ.get('SECRET_TOKEN', 'absent'))\nprint(b'hunter2' in open('/proc/self/environ', 'rb').read())";
    let (stdout, status) = run(&agent.url(), "python", code).await;
    assert_eq!(status, ExecStatus::Ok);
    assert_eq!(stdout, "absent\nFalse\n");
    let (stdout, _) = run(
        &agent.url(),
        "bash",
        "echo \"${SECRET_TOKEN:-absent}\"; env | grep -c hunter2",
    )
    .await;
    assert_eq!(stdout, "absent\n0\n");

    let description = describe(&agent.url()).await;
    let runtimes = description.runtimes.unwrap().runtimes;
    assert!(
        runtimes
            .iter()
            .any(|r| r.language == "python" && !r.executable.is_empty())
    );
}

#[tokio::test]
async fn sigterm_kills_running_work_and_removes_work_directories() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("work");
    let mut agent = standalone_agent(&work, &[]);
    let mut client = NodeAgentClient::connect(agent.url()).await.unwrap();
    let request = ExecuteRequest {
        language: "bash".into(),
        code: "echo $$; sleep 1000".into(),
        ..Default::default()
    };
    let mut stream = client.execute(request).await.unwrap().into_inner();
    let pid: i32 = loop {
        let event = stream.message().await.unwrap().unwrap();
        if let Some(Event::Output(chunk)) = event.event {
            break String::from_utf8_lossy(&chunk.data).trim().parse().unwrap();
        }
    };
    assert!(
        std::fs::read_dir(&work).unwrap().count() > 0,
        "no work dir while running"
    );
    agent.signal(Signal::SIGTERM);
    let ended = loop {
        match stream.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => break None,
            Err(status) => break Some(status),
        }
    };
    let status = ended.expect("the stream ended without saying why");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(agent.wait_exit().success(), "{:?}", agent.log());
    assert!(!process_alive(pid), "the run outlived the agent");
    assert!(!work.exists(), "work directories left behind");
}

#[tokio::test]
async fn agent_joins_a_coordinator_that_starts_later() {
    let port = free_port();
    let coordinator_url = format!("http://127.0.0.1:{port}");
    let dir = tempfile::tempdir().unwrap();
    let _agent = Daemon::start(
        "node-agent",
        &[
            "--coordinator",
            &coordinator_url,
            "--listen",
            "127.0.0.1:0",
            "--name",
            "late-joiner",
            "--label",
            "room=lab",
            "--work-dir",
            dir.path().to_str().unwrap(),
        ],
        &[],
        AGENT_READY,
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let listen = format!("127.0.0.1:{port}");
    let _coordinator = Daemon::start(
        "coordinator",
        &["serve", "--listen", &listen, "--http", "127.0.0.1:0"],
        &[],
        "coordinator listening",
    );
    let mut line = serde_json::Value::Null;
    eventually("agent registered with the coordinator", || {
        let output = Command::new(binary("coordinator"))
            .args(["nodes", "--json", "--addr", &coordinator_url])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        match stdout
            .lines()
            .next()
            .map(serde_json::from_str::<serde_json::Value>)
        {
            Some(Ok(value)) => {
                line = value;
                true
            }
            _ => false,
        }
    });
    assert_eq!(line["name"], "late-joiner");
    assert_eq!(line["state"], "ready");
    assert!(
        line["runtimes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r == "python")
    );
    for field in ["id", "address", "running", "capacity", "cpu_percent"] {
        assert!(!line[field].is_null(), "missing {field} in {line}");
    }
}

#[tokio::test]
async fn grpcurl_can_list_describe_and_execute() {
    let Ok(version) = Command::new("grpcurl").arg("-version").output() else {
        println!("skipped: grpcurl is not installed (.ci/run installs it with pip)");
        return;
    };
    assert!(version.status.success());
    let dir = tempfile::tempdir().unwrap();
    let agent = standalone_agent(dir.path(), &[]);
    let addr = agent.addr.to_string();
    let grpcurl = |args: &[&str]| {
        let output = Command::new("grpcurl").args(args).output().unwrap();
        assert!(
            output.status.success(),
            "grpcurl {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let services = grpcurl(&["-plaintext", &addr, "list"]);
    let listed: Vec<&str> = services.lines().collect();
    assert_eq!(
        listed,
        [
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
            "kowalski.exo.v1.NodeAgent",
        ],
        "an agent lists only what it serves"
    );
    let coordinator = Daemon::start(
        "coordinator",
        &["serve", "--listen", "127.0.0.1:0", "--http", "127.0.0.1:0"],
        &[],
        "coordinator listening",
    );
    let services = grpcurl(&["-plaintext", &coordinator.addr.to_string(), "list"]);
    assert!(
        services.contains("kowalski.exo.v1.Coordinator"),
        "{services}"
    );
    assert!(
        services.contains("kowalski.exo.v1.AgentRegistry"),
        "{services}"
    );
    assert!(
        !services.contains("NodeAgent"),
        "the coordinator lists NodeAgent: {services}"
    );
    let described = grpcurl(&["-plaintext", &addr, "describe", "kowalski.exo.v1.NodeAgent"]);
    assert!(described.contains("rpc Execute"), "{described}");
    let executed = grpcurl(&[
        "-plaintext",
        "-d",
        r#"{"language":"python","code":"print(6*7)"}"#,
        &addr,
        "kowalski.exo.v1.NodeAgent/Execute",
    ]);
    // Output is bytes on the wire, so grpcurl prints base64, one chunk per read.
    let events: Vec<serde_json::Value> = serde_json::Deserializer::from_str(&executed)
        .into_iter()
        .collect::<Result<_, _>>()
        .unwrap();
    let stdout: Vec<u8> = events
        .iter()
        .filter_map(|e| e["output"]["data"].as_str())
        .flat_map(|data| BASE64.decode(data).unwrap())
        .collect();
    assert_eq!(stdout, b"42\n", "{executed}");
    let last = events.last().unwrap();
    assert_eq!(last["finished"]["status"], "EXEC_STATUS_OK", "{executed}");
    let health = grpcurl(&["-plaintext", &addr, "grpc.health.v1.Health/Check"]);
    assert!(health.contains("SERVING"), "{health}");
}

/// Starts `code` on a standalone agent and SIGKILLs the agent once the program printed a line.
/// Returns that line.
async fn kill_agent_mid_run(code: &str, dir: &std::path::Path) -> String {
    let mut agent = standalone_agent(&dir.join("work"), &[]);
    let mut client = NodeAgentClient::connect(agent.url()).await.unwrap();
    let request = ExecuteRequest {
        language: "python".into(),
        code: code.into(),
        ..Default::default()
    };
    let mut stream = client.execute(request).await.unwrap().into_inner();
    let mut printed = String::new();
    while !printed.ends_with('\n') {
        let event = tokio::time::timeout(CEILING, stream.message())
            .await
            .expect("no output within the ceiling")
            .unwrap()
            .unwrap();
        if let Some(Event::Output(chunk)) = event.event {
            printed.push_str(&String::from_utf8_lossy(&chunk.data));
        }
    }
    agent.signal(Signal::SIGKILL);
    agent.wait_exit();
    printed
}

#[tokio::test]
async fn a_killed_agents_program_and_its_children_end_with_it() {
    let dir = tempfile::tempdir().unwrap();
    // The program, an ordinary child and a child in a session of its own print their pids.
    let code = "import os, subprocess, time\n\
         child = subprocess.Popen(['sleep', '30'])\n\
         detached = subprocess.Popen(['sleep', '30'], start_new_session=True)\n\
         print(os.getpid(), child.pid, detached.pid, flush=True)\n\
         time.sleep(30)\n";
    let printed = kill_agent_mid_run(code, dir.path()).await;
    let pids: Vec<i32> = printed
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    assert_eq!(pids.len(), 3, "{printed}");
    eventually("the program ends with its agent", || {
        !process_alive(pids[0])
    });
    // Its work directory goes too, mounted (as root) or not.
    let work = dir.path().join("work");
    eventually("the run's work directory is unmounted and removed", || {
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let empty = std::fs::read_dir(&work).map_or(true, |mut d| d.next().is_none());
        !mounts.contains(work.to_str().unwrap()) && empty
    });
    eventually("the program's child ends with the agent", || {
        !process_alive(pids[1])
    });
    let cgroups =
        std::fs::read_to_string("/proc/self/cgroup").is_ok() && nix::unistd::geteuid().is_root();
    if cgroups {
        eventually("a child in its own session ends with the agent", || {
            !process_alive(pids[2])
        });
    } else {
        kowalski_exo_tests::cannot_contain_here(
            "not root: a child in its own session is only contained with cgroups",
        );
    }
}

#[tokio::test]
async fn an_agent_that_cannot_reach_its_coordinator_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = format!("http://127.0.0.1:{}", free_port());
    let agent = Daemon::start(
        "node-agent",
        &[
            "--coordinator",
            &coordinator,
            "--listen",
            "127.0.0.1:0",
            "--work-dir",
            dir.path().to_str().unwrap(),
        ],
        &[],
        AGENT_READY,
    );
    eventually("the agent logs that the coordinator is unreachable", || {
        agent
            .log()
            .iter()
            .any(|l| l.contains("cannot reach the coordinator") && l.contains(&coordinator))
    });
    // Retries go on every few seconds at most, but the log says it once a minute.
    std::thread::sleep(Duration::from_secs(2));
    let said = agent
        .log()
        .iter()
        .filter(|l| l.contains("cannot reach the coordinator"))
        .count();
    assert_eq!(said, 1, "{:?}", agent.log());
}

#[test]
fn runtimes_json_is_one_object_per_line_with_a_reason_for_what_is_missing() {
    let empty = tempfile::tempdir().unwrap();
    let output = Command::new(binary("node-agent"))
        .args(["runtimes", "--json"])
        .env("PATH", empty.path())
        .output()
        .unwrap();
    assert!(output.status.success());
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(lines.len() >= 10, "{lines:?}");
    let python = lines.iter().find(|l| l["language"] == "python").unwrap();
    assert_eq!(python["health"], "missing");
    assert_eq!(python["reason"], "no python executable on PATH");
}
