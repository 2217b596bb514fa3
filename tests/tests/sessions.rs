//! Sessions across a real cluster (a coordinator and agents, each its own process): the CLI's
//! `exec --session`, `run --session`, `sessions` and `session close`, a session that moves
//! with its variables when its node is SIGKILLed (telling which replays did not succeed
//! again), and sessions forgotten after the idle time the coordinator is given.

use std::{process::Command, time::Duration};

use kowalski_exo_common::proto::{
    ClusterOpenSessionRequest, ExecStatus, ListNodesRequest, ListSessionsRequest,
    OpenSessionRequest, SessionMoved, coordinator_client::CoordinatorClient,
};
use kowalski_exo_tests::{CEILING, Cluster, Daemon, binary, channel, outcome, run_in_session};
use nix::sys::signal::Signal;

/// Runs the coordinator CLI against `cluster`; returns (exit code, stdout, stderr).
fn cli(cluster: &Cluster, args: &[&str]) -> (Option<i32>, String, String) {
    outcome(
        Command::new(binary("coordinator"))
            .args(args)
            .env("KOWALSKI_COORDINATOR", cluster.url())
            .output()
            .unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_runs_code_and_documents_in_named_sessions() {
    let cluster = Cluster::start(1, 2, &[]).await;
    let (code, _, err) = cli(
        &cluster,
        &["exec", "--session", "nb", "--lang", "py", "-c", "x = 40"],
    );
    assert_eq!(code, Some(0), "{err}");
    let (code, out, err) = cli(
        &cluster,
        &["exec", "--session", "nb", "--lang", "py", "-c", "x + 2"],
    );
    assert_eq!((code, out.as_str()), (Some(0), "42\n"), "{err}");
    let (code, out, _) = cli(
        &cluster,
        &[
            "exec",
            "--session",
            "nb",
            "--lang",
            "py",
            "--json",
            "-c",
            "print(x)",
        ],
    );
    assert_eq!(code, Some(0));
    let finished = out
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|l| l["event"] == "finished")
        .unwrap();
    assert_eq!(finished["session"], "nb", "{out}");
    assert_eq!(finished["status"], "ok", "{out}");

    let dir = tempfile::tempdir().unwrap();
    let notebook = dir.path().join("notebook.md");
    std::fs::write(
        &notebook,
        "# A notebook\n\n```python\ntotal = sum(range(5))\n```\n\nThen:\n\n```python\nprint(total * 2)\n```\n",
    )
    .unwrap();
    let (code, out, err) = cli(
        &cluster,
        &["run", "--session", "doc", notebook.to_str().unwrap()],
    );
    assert_eq!((code, out.as_str()), (Some(0), "20\n"), "{err}");

    let (code, out, _) = cli(&cluster, &["sessions", "--json"]);
    assert_eq!(code, Some(0));
    let listed: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let names: Vec<&str> = listed.iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["doc", "nb"]);
    assert_eq!(listed[1]["executions"], 3);
    assert_eq!(listed[1]["node"], "agent-0");
    assert_eq!(listed[1]["languages"], serde_json::json!(["python"]));

    let (code, _, err) = cli(&cluster, &["session", "close", "nb"]);
    assert_eq!(code, Some(0), "{err}");
    let (_, out, _) = cli(&cluster, &["sessions", "--json"]);
    assert!(!out.contains("\"nb\""), "{out}");
    let (code, _, err) = cli(&cluster, &["session", "close", "nb"]);
    assert_ne!(code, Some(0));
    assert!(err.contains("no session named 'nb'"), "{err}");
    let (code, _, err) = cli(
        &cluster,
        &[
            "exec",
            "--session",
            "nb",
            "--lang",
            "rust",
            "-c",
            "fn main() {}",
        ],
    );
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("sessions hold"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_opened_explicitly_is_placed_at_once_and_its_name_is_taken() {
    let cluster = Cluster::start(1, 2, &[]).await;
    let mut client = cluster.client().await;
    let open = ClusterOpenSessionRequest {
        session: Some(OpenSessionRequest {
            session_id: "warm".into(),
            languages: vec!["python".into()],
            model: "tiny".into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let info = client
        .open_session(open.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (info.name.as_str(), info.node_name.as_str()),
        ("warm", "agent-0")
    );
    assert_eq!(info.model, "tiny");
    let taken = client.open_session(open).await.unwrap_err();
    assert_eq!(taken.code(), tonic::Code::AlreadyExists);
    let bad = client
        .open_session(ClusterOpenSessionRequest {
            session: Some(OpenSessionRequest {
                session_id: "no spaces".into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
}

/// Runs Python in the session `moving` over gRPC; returns its stdout, whether it finished ok,
/// and the session_moved events seen.
async fn in_session(cluster: &Cluster, code: &str) -> (String, bool, Vec<SessionMoved>) {
    let run = run_in_session(&mut cluster.client().await, "moving", "python", code).await;
    (run.stdout, run.status == Some(ExecStatus::Ok), run.moves)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_whose_node_is_killed_moves_with_its_variables() {
    let cluster = Cluster::start(2, 2, &[]).await;
    let (out, ok, moves) = in_session(&cluster, "print('defining'); data = [1, 2, 3]").await;
    assert_eq!((out.as_str(), ok, moves.len()), ("defining\n", true, 0));
    in_session(&cluster, "data.append(4)").await;
    in_session(&cluster, "this_fails = 1 / 0").await;
    // Succeeds now, and no longer when it is replayed after the kill.
    let deadline = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
        + 1.0;
    let (out, ok, _) = in_session(
        &cluster,
        &format!("import time\nassert time.time() < {deadline}, 'past its deadline'"),
    )
    .await;
    assert!(ok, "{out}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let listed = cluster.sessions().await;
    let home = listed[0].node_name.clone();
    cluster.agent(&home).signal(Signal::SIGKILL);
    let (out, ok, moves) = in_session(&cluster, "sum(data)").await;
    assert!(ok, "{out}");
    // The replayed executions' output ("defining") is not shown again.
    assert_eq!(out, "10\n");
    assert_eq!(moves.len(), 1, "{moves:?}");
    assert_eq!(moves[0].from_node, home);
    assert_ne!(moves[0].to_node, home);
    assert_eq!(
        moves[0].executions_replayed, 3,
        "the failed execution is not replayed"
    );
    let [failure] = moves[0].replay_failures.as_slice() else {
        panic!("one replay should have failed: {:?}", moves[0]);
    };
    assert!(
        failure.starts_with("execution 3: ")
            && failure.ends_with("(AssertionError: past its deadline)"),
        "{failure}"
    );
    let (out, _, moves) = in_session(&cluster, "len(data)").await;
    assert_eq!((out.as_str(), moves.len()), ("4\n", 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_told_a_session_idle_time_forgets_sessions_unused_that_long() {
    let coordinator = Daemon::start(
        "coordinator",
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--http",
            "off",
            "--local-agent",
            "--session-idle",
            "2s",
        ],
        &[],
        "coordinator listening",
    );
    let url = coordinator.url();
    let mut client = CoordinatorClient::new(channel(&url).await.unwrap());
    let listed = |client: &mut CoordinatorClient<_>| {
        let mut client = client.clone();
        async move {
            let listed = client.list_sessions(ListSessionsRequest {}).await.unwrap();
            let sessions = listed.into_inner().sessions;
            sessions.into_iter().map(|s| s.name).collect::<Vec<_>>()
        }
    };
    // The agent in the coordinator's process registers just after the coordinator listens.
    let started = std::time::Instant::now();
    while client
        .list_nodes(ListNodesRequest {})
        .await
        .unwrap()
        .into_inner()
        .nodes
        .is_empty()
    {
        assert!(
            started.elapsed() < CEILING,
            "the local agent never registered"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let run = run_in_session(&mut client, "short", "python", "x = 1").await;
    assert_eq!(run.status, Some(ExecStatus::Ok), "{}", run.stdout);
    assert_eq!(listed(&mut client).await, ["short"]);
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(listed(&mut client).await, Vec::<String>::new());
    let (code, _, err) = outcome(
        Command::new(binary("coordinator"))
            .args(["session", "close", "short", "--addr", &url])
            .output()
            .unwrap(),
    );
    assert_ne!(code, Some(0));
    assert!(err.contains("sessions unused for 2s are closed"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_whose_history_outgrew_its_limit_starts_afresh_where_it_moves_and_says_so() {
    let cluster = Cluster::start_with(3, 2, &[], &["--session-history", "1K"]).await;
    in_session(&cluster, "x = 1").await;
    let big = format!("y = '{}'", "a".repeat(2000));
    let (out, ok, _) = in_session(&cluster, &big).await;
    assert!(ok, "{out}");
    in_session(&cluster, "z = 3").await;
    let home = cluster.sessions().await[0].node_name.clone();
    cluster.agent(&home).signal(Signal::SIGKILL);
    let (out, ok, moves) = in_session(&cluster, "print('x' in dir(), 'z' in dir())").await;
    assert!(ok, "{out}");
    assert_eq!(out, "False False\n", "nothing was replayed");
    assert_eq!(moves.len(), 1, "{moves:?}");
    assert_eq!(moves[0].executions_replayed, 0);
    let [why] = moves[0].replay_failures.as_slice() else {
        panic!("the move should say why: {:?}", moves[0]);
    };
    assert!(
        why.contains("more than the 1K kept for a session (coordinator serve --session-history)")
            && why.ends_with("the session starts afresh here"),
        "{why}"
    );
    // It keeps its executions again from there.
    in_session(&cluster, "w = 5").await;
    let home = cluster.sessions().await[0].node_name.clone();
    cluster.agent(&home).signal(Signal::SIGKILL);
    let (out, _, moves) = in_session(&cluster, "print(w)").await;
    assert_eq!(out, "5\n");
    assert_eq!(moves.len(), 1, "{moves:?}");
    assert_eq!(moves[0].executions_replayed, 2);
    assert!(moves[0].replay_failures.is_empty(), "{:?}", moves[0]);
}
