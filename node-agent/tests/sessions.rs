//! Sessions through the real NodeAgent gRPC service of an in-process agent: state kept across
//! executions in every session language, notebook cells, interrupts, limits, idle closing.

mod support;

use std::time::Duration;

use kowalski_exo_common::proto::{
    CloseSessionRequest, DescribeRequest, ExecLimits, ExecStatus, IsolationLayer,
    ListSessionsRequest, OpenSessionRequest, SessionExecuteRequest,
    node_agent_client::NodeAgentClient,
};
use support::*;
use tonic::{Code, transport::Channel};

async fn open(client: &mut NodeAgentClient<Channel>, id: &str, languages: &[&str]) {
    client
        .open_session(OpenSessionRequest {
            session_id: id.into(),
            languages: languages.iter().map(|l| l.to_string()).collect(),
            ..Default::default()
        })
        .await
        .unwrap();
}

async fn cell(
    client: &mut NodeAgentClient<Channel>,
    session: &str,
    language: &str,
    code: &str,
) -> RunRecord {
    cell_with(client, session, language, code, 0).await.unwrap()
}

async fn cell_with(
    client: &mut NodeAgentClient<Channel>,
    session: &str,
    language: &str,
    code: &str,
    timeout_ms: u32,
) -> Result<RunRecord, tonic::Status> {
    let stream = client
        .execute_in_session(SessionExecuteRequest {
            session_id: session.into(),
            language: language.into(),
            code: code.into(),
            timeout_ms,
            ..Default::default()
        })
        .await?
        .into_inner();
    collect(stream).await
}

#[tokio::test]
async fn variables_functions_and_the_working_directory_persist_in_every_language() {
    let mut t = start_agent(|_| {}).await;
    open(&mut t.client, "notebook", &["python"]).await;
    let steps: &[(&str, &str, &str)] = &[
        (
            "python",
            "import os\nx = 41\ndef twice(v):\n    return 2 * v",
            "",
        ),
        (
            "python",
            "os.makedirs('sub', exist_ok=True); os.chdir('sub')",
            "",
        ),
        ("python", "print(twice(x) - x)\nx + 1", "41\n42\n"),
        ("python", "os.path.basename(os.getcwd())", "'sub'\n"),
        ("py", "None", ""),
        (
            "javascript",
            "var n = 20; let m = 2; function add(a, b) { return a + b; }",
            "",
        ),
        ("js", "add(n, m)", "22\n"),
        ("bash", "v=7; greet() { echo \"hi $1\"; }; cd /tmp", ""),
        ("bash", "greet $v; pwd", "hi 7\n/tmp\n"),
    ];
    for (language, code, stdout) in steps {
        let run = cell(&mut t.client, "notebook", language, code).await;
        assert_eq!(run.status(), ExecStatus::Ok, "{code}: {}", run.stderr());
        assert_eq!(run.stdout(), *stdout, "{code}");
    }
    let listed = t
        .client
        .list_sessions(ListSessionsRequest {})
        .await
        .unwrap()
        .into_inner()
        .sessions;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].session_id, "notebook");
    assert_eq!(listed[0].executions, steps.len() as u64);
    assert_eq!(listed[0].languages, ["python", "bash", "javascript"]);
}

#[tokio::test]
async fn a_failing_cell_reports_its_error_and_keeps_the_state() {
    let mut t = start_agent(|_| {}).await;
    open(&mut t.client, "s", &[]).await;
    cell(&mut t.client, "s", "python", "kept = 'yes'").await;
    let failed = cell(&mut t.client, "s", "python", "1 / 0").await;
    assert_eq!(failed.status(), ExecStatus::NonzeroExit);
    assert_eq!(failed.finished().exit_code, Some(1));
    assert!(
        failed.stderr().contains("ZeroDivisionError") && failed.stderr().contains("<cell 2>"),
        "{}",
        failed.stderr()
    );
    assert!(!failed.stderr().contains("driver"), "{}", failed.stderr());
    let exited = cell(&mut t.client, "s", "python", "import sys; sys.exit(3)").await;
    assert_eq!(exited.finished().exit_code, Some(3));
    assert!(!exited.finished().state_lost);
    let after = cell(&mut t.client, "s", "python", "kept").await;
    assert_eq!(after.stdout(), "'yes'\n");
}

#[tokio::test]
async fn a_cell_past_its_timeout_is_interrupted_and_the_state_survives() {
    let mut t = start_agent(|_| {}).await;
    open(&mut t.client, "s", &["python"]).await;
    cell(&mut t.client, "s", "python", "import time\ncount = 5").await;
    let slow = cell_with(
        &mut t.client,
        "s",
        "python",
        "print('started', flush=True)\nwhile True:\n    time.sleep(0.01)",
        500,
    )
    .await
    .unwrap();
    assert_eq!(slow.status(), ExecStatus::Timeout);
    assert!(!slow.finished().state_lost, "{:?}", slow.finished());
    assert_eq!(slow.stdout(), "started\n");
    let after = cell(&mut t.client, "s", "python", "count").await;
    assert_eq!(after.stdout(), "5\n");
}

#[tokio::test]
async fn a_cell_that_ignores_the_interrupt_is_killed_and_the_loss_reported() {
    let mut t = start_agent(|_| {}).await;
    open(&mut t.client, "s", &["python"]).await;
    cell(&mut t.client, "s", "python", "lost = 1").await;
    let stubborn = cell_with(
        &mut t.client,
        "s",
        "python",
        "import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True:\n    pass",
        300,
    )
    .await
    .unwrap();
    assert_eq!(stubborn.status(), ExecStatus::Timeout);
    assert!(stubborn.finished().state_lost);
    assert!(
        stubborn.finished().message.contains("did not stop"),
        "{}",
        stubborn.finished().message
    );
    let after = cell(&mut t.client, "s", "python", "'lost' in globals()").await;
    assert_eq!(after.status(), ExecStatus::Ok, "{}", after.stderr());
    assert_eq!(after.stdout(), "False\n");
}

#[tokio::test]
async fn an_interpreter_that_exits_is_restarted_with_the_loss_reported() {
    let mut t = start_agent(|_| {}).await;
    open(&mut t.client, "s", &[]).await;
    let exited = cell(&mut t.client, "s", "python", "import os; os._exit(4)").await;
    assert_eq!(exited.status(), ExecStatus::NonzeroExit);
    assert_eq!(exited.finished().exit_code, Some(4));
    assert!(exited.finished().state_lost);
    let again = cell(&mut t.client, "s", "python", "6 * 7").await;
    assert_eq!(again.stdout(), "42\n");
}

#[tokio::test]
async fn memory_over_the_session_limit_ends_the_interpreter() {
    let mut t = start_agent(|_| {}).await;
    t.client
        .open_session(OpenSessionRequest {
            session_id: "small".into(),
            limits: Some(ExecLimits {
                memory_bytes: 96 * 1024 * 1024,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    let hog = cell(
        &mut t.client,
        "small",
        "python",
        "blocks = []\nwhile True:\n    blocks.append(bytearray(16 * 1024 * 1024))",
    )
    .await;
    // Cgroups kill the interpreter; RLIMIT_AS alone makes Python raise MemoryError.
    match hog.status() {
        ExecStatus::MemoryLimit => assert!(hog.finished().state_lost),
        ExecStatus::NonzeroExit => assert!(
            hog.stderr().contains("MemoryError"),
            "{:?} {}",
            hog.finished(),
            hog.stderr()
        ),
        other => panic!("{other:?}: {:?}", hog.finished()),
    }
    let next = cell(&mut t.client, "small", "python", "'alive'").await;
    assert_eq!(next.stdout(), "'alive'\n");
}

#[tokio::test]
async fn output_streams_before_the_cell_ends() {
    let mut t = start_agent(|_| {}).await;
    open(&mut t.client, "s", &["python"]).await;
    let mut stream = t
        .client
        .execute_in_session(SessionExecuteRequest {
            session_id: "s".into(),
            language: "python".into(),
            code: "import time\nprint('first')\ntime.sleep(30)".into(),
            timeout_ms: 60_000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let started = tokio::time::Instant::now();
    let mut printed = Vec::new();
    while printed != b"first\n" {
        let event = tokio::time::timeout(Duration::from_secs(20), stream.message())
            .await
            .expect("no output within 20 s")
            .unwrap()
            .unwrap();
        if let Some(kowalski_exo_common::proto::exec_event::Event::Output(chunk)) = event.event {
            printed.extend_from_slice(&chunk.data);
        }
    }
    assert!(started.elapsed() < Duration::from_secs(20));
    drop(stream);
    // The caller went away: the cell is interrupted and the session serves the next one.
    let next = cell(&mut t.client, "s", "python", "'next'").await;
    assert_eq!(next.stdout(), "'next'\n");
}

#[tokio::test]
async fn sessions_are_bounded_named_and_closed() {
    let mut t = start_agent(|c| c.sessions.max_sessions = 2).await;
    open(&mut t.client, "one", &[]).await;
    open(&mut t.client, "two", &[]).await;
    let full = t
        .client
        .open_session(OpenSessionRequest {
            session_id: "three".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(full.code(), Code::ResourceExhausted);
    assert!(
        full.message().contains("--max-sessions"),
        "{}",
        full.message()
    );
    let taken = t
        .client
        .open_session(OpenSessionRequest {
            session_id: "one".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(taken.code(), Code::AlreadyExists);
    let bad = t
        .client
        .open_session(OpenSessionRequest {
            session_id: "../escape".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    let no_repl = cell_with(&mut t.client, "one", "rust", "fn main() {}", 0)
        .await
        .unwrap_err();
    assert_eq!(no_repl.code(), Code::InvalidArgument);
    assert!(
        no_repl.message().contains("python"),
        "{}",
        no_repl.message()
    );
    t.client
        .close_session(CloseSessionRequest {
            session_id: "one".into(),
        })
        .await
        .unwrap();
    let gone = cell_with(&mut t.client, "one", "python", "1", 0)
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);
    open(&mut t.client, "three", &[]).await;
}

#[tokio::test]
async fn an_idle_session_closes_and_its_interpreter_and_directory_go() {
    let mut t = start_agent(|c| c.sessions.idle = Duration::from_millis(600)).await;
    open(&mut t.client, "idle", &["python"]).await;
    let run = cell(
        &mut t.client,
        "idle",
        "python",
        "import os; print(os.getpid()); os.getcwd()",
    )
    .await;
    let pid: i32 = run.stdout().lines().next().unwrap().parse().unwrap();
    let dir = run
        .stdout()
        .lines()
        .nth(1)
        .unwrap()
        .trim_matches('\'')
        .to_string();
    assert!(process_alive(pid));
    let mut client = t.client.clone();
    eventually("the idle session closes", || {
        let mut client = client.clone();
        async move {
            client
                .list_sessions(ListSessionsRequest {})
                .await
                .unwrap()
                .into_inner()
                .sessions
                .is_empty()
        }
    })
    .await;
    eventually(
        "its interpreter ends",
        || async move { !process_alive(pid) },
    )
    .await;
    eventually("its work directory is removed", || {
        let dir = dir.clone();
        async move { !std::path::Path::new(&dir).exists() }
    })
    .await;
    let gone = cell_with(&mut client, "idle", "python", "1", 0)
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);
}

#[tokio::test]
async fn code_on_a_stand_alone_agent_is_told_it_cannot_ask_models() {
    let mut t = start_agent(|_| {}).await;
    open(&mut t.client, "s", &[]).await;
    let run = cell(
        &mut t.client,
        "s",
        "python",
        "try:\n    llm_query('hello')\nexcept RuntimeError as e:\n    print(e)",
    )
    .await;
    assert!(run.stdout().contains("stand-alone"), "{}", run.stdout());
    let bash = cell(&mut t.client, "s", "bash", "llm_query hello").await;
    assert!(bash.stdout().starts_with("Error: "), "{}", bash.stdout());
    assert_eq!(bash.status(), ExecStatus::Ok, "{:?}", bash.finished());
}

#[tokio::test]
async fn more_prompts_in_flight_than_the_session_allows_raise_a_clear_error() {
    let mut t = start_agent(|_| {}).await;
    t.client
        .open_session(OpenSessionRequest {
            session_id: "bounded".into(),
            max_subcalls_in_flight: 2,
            ..Default::default()
        })
        .await
        .unwrap();
    let run = cell(
        &mut t.client,
        "bounded",
        "python",
        "try:\n    llm_query_batched(['a', 'b', 'c'])\nexcept RuntimeError as e:\n    print(e)",
    )
    .await;
    assert!(
        run.stdout().contains("limit of 2 in flight"),
        "{}",
        run.stdout()
    );
}

#[tokio::test]
async fn code_in_a_session_reaches_neither_the_network_nor_another_sessions_files() {
    let mut t = start_agent(|_| {}).await;
    let layers: Vec<IsolationLayer> = t
        .client
        .describe(DescribeRequest {})
        .await
        .unwrap()
        .into_inner()
        .isolation_layers()
        .collect();
    let contained = [IsolationLayer::Network, IsolationLayer::Landlock]
        .iter()
        .all(|layer| layers.contains(layer));
    if !contained {
        kowalski_exo_tests::cannot_contain_here(&format!(
            "sessions are contained by the network and Landlock layers; this host gives {layers:?}"
        ));
        return;
    }
    open(&mut t.client, "owner", &["python"]).await;
    open(&mut t.client, "intruder", &["python"]).await;
    let owner = cell(
        &mut t.client,
        "owner",
        "python",
        "open('secret.txt', 'w').write('kept'); import os; os.path.abspath('secret.txt')",
    )
    .await;
    let secret = owner.stdout().trim().trim_matches('\'').to_string();
    assert!(secret.ends_with("secret.txt"), "{}", owner.stdout());
    let port = t.agent.addr.port();
    let probe = format!(
        "import socket\n\
         try:\n    print(open({secret:?}).read())\nexcept OSError as e:\n    print('file blocked', type(e).__name__)\n\
         try:\n    socket.create_connection(('127.0.0.1', {port}), timeout=2)\n    print('connected')\n\
         except OSError as e:\n    print('network blocked', type(e).__name__)"
    );
    let intruder = cell(&mut t.client, "intruder", "python", &probe).await;
    assert_eq!(intruder.status(), ExecStatus::Ok, "{}", intruder.stderr());
    let out = intruder.stdout();
    assert!(out.contains("file blocked"), "{out}");
    assert!(out.contains("network blocked"), "{out}");
    assert!(!out.contains("kept") && !out.contains("connected"), "{out}");
}

#[tokio::test]
async fn a_cell_that_catches_the_first_interrupt_is_interrupted_again_and_keeps_the_state() {
    let mut t = start_agent(|_| {}).await;
    open(&mut t.client, "s", &["python"]).await;
    cell(&mut t.client, "s", "python", "kept = 7").await;
    let stubborn_once = cell_with(
        &mut t.client,
        "s",
        "python",
        "import time\ntry:\n    time.sleep(30)\nexcept KeyboardInterrupt:\n    print('caught one')\ntime.sleep(30)",
        300,
    )
    .await
    .unwrap();
    assert_eq!(stubborn_once.status(), ExecStatus::Timeout);
    assert!(
        !stubborn_once.finished().state_lost,
        "{:?}",
        stubborn_once.finished()
    );
    assert_eq!(
        cell(&mut t.client, "s", "python", "kept").await.stdout(),
        "7\n"
    );
}
