//! A coordinator and three agents as real processes on loopback: load spreading, failover when
//! an agent is killed or hangs, recovery after a coordinator restart, and clear refusals.

use std::{collections::HashSet, process::Command};

use kowalski_exo_common::proto::{
    ClusterEvent, ClusterFinished, DrainRequest, ExecStatus, RunBlocksRequest, SkipKind,
    cluster_event::Event,
};
use kowalski_exo_tests::{
    CEILING, Cluster, binary, eventually, outcome, process_alive, python_request, real_executable,
};
use nix::sys::signal::Signal;
use tonic::Streaming;

/// Reads events until one matches, returning everything read.
async fn read_until(
    stream: &mut Streaming<ClusterEvent>,
    seen: &mut Vec<Event>,
    done: impl Fn(&Event) -> bool,
) {
    loop {
        let event = tokio::time::timeout(CEILING, stream.message())
            .await
            .expect("no event within the ceiling")
            .expect("stream failed")
            .expect("stream ended first")
            .event
            .expect("empty event");
        let matched = done(&event);
        seen.push(event);
        if matched {
            return;
        }
    }
}

async fn run_to_end(stream: &mut Streaming<ClusterEvent>) -> Vec<Event> {
    let mut seen = Vec::new();
    read_until(stream, &mut seen, |e| matches!(e, Event::Finished(_))).await;
    seen
}

/// Starts `code` (which prints, then sleeps), sends `signal` to the agent running it once its
/// first output arrives, and reads to the end. Returns that agent's name and every event.
async fn signal_mid_run(cluster: &Cluster, code: &str, signal: Signal) -> (String, Vec<Event>) {
    let mut client = cluster.client().await;
    let mut stream = client
        .execute(python_request(code))
        .await
        .unwrap()
        .into_inner();
    let mut events = Vec::new();
    read_until(&mut stream, &mut events, |e| matches!(e, Event::Output(_))).await;
    let (first, _) = placements(&events)[0].clone();
    cluster.agent(&first).signal(signal);
    read_until(&mut stream, &mut events, |e| {
        matches!(e, Event::Finished(_))
    })
    .await;
    (first, events)
}

/// The `finished` event that ends `events`.
fn last_finished(events: &[Event]) -> &ClusterFinished {
    match events.last() {
        Some(Event::Finished(finished)) => finished,
        other => panic!("expected finished last, got {other:?}"),
    }
}

fn placements(events: &[Event]) -> Vec<(String, u32)> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Placed(p) => Some((p.node_name.clone(), p.attempt)),
            _ => None,
        })
        .collect()
}

fn output_of_attempt(events: &[Event], attempt: u32) -> String {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Output(o) if o.attempt == attempt => o.chunk.as_ref(),
            _ => None,
        })
        .map(|c| String::from_utf8_lossy(&c.data).into_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_spreads_over_the_agents() {
    let cluster = Cluster::start(3, 2, &[]).await;
    let mut streams = Vec::new();
    for _ in 0..6 {
        let mut client = cluster.client().await;
        let stream = client
            .execute(python_request("import time\ntime.sleep(1.5)\nprint('ok')"))
            .await
            .unwrap()
            .into_inner();
        streams.push(stream);
    }
    let mut used = Vec::new();
    for mut stream in streams {
        let events = run_to_end(&mut stream).await;
        used.extend(placements(&events).into_iter().map(|(node, _)| node));
        match events.last() {
            Some(Event::Finished(f)) => {
                assert_eq!(f.result.as_ref().unwrap().status(), ExecStatus::Ok)
            }
            other => panic!("expected finished, got {other:?}"),
        }
    }
    let distinct: HashSet<&String> = used.iter().collect();
    assert_eq!(distinct.len(), 3, "six runs used only {used:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_agents_task_finishes_on_another_with_the_first_attempt_marked() {
    let cluster = Cluster::start(3, 2, &[]).await;
    let code = "import time\nprint('started', flush=True)\ntime.sleep(3)\nprint('done')";
    let (first_node, events) = signal_mid_run(&cluster, code, Signal::SIGKILL).await;

    let retry = events.iter().find_map(|e| match e {
        Event::Retrying(r) => Some(r),
        _ => None,
    });
    let retry = retry.expect("no retrying event");
    assert_eq!(
        (retry.attempt, retry.node_name.as_str()),
        (1, first_node.as_str())
    );
    let placed = placements(&events);
    assert_eq!(placed.len(), 2, "{placed:?}");
    assert_eq!(placed[1].1, 2);
    assert_ne!(placed[1].0, first_node, "retried on the node that died");
    // The kill came right after the first output arrived: attempt 1 got at least that far.
    assert!(output_of_attempt(&events, 1).starts_with("started"));
    assert_eq!(output_of_attempt(&events, 2), "started\ndone\n");
    let finished = last_finished(&events);
    assert_eq!(finished.attempt, 2);
    assert_eq!(finished.node_name, placed[1].0);
    assert_eq!(finished.result.as_ref().unwrap().status(), ExecStatus::Ok);
    cluster.wait_for_state(&first_node, "down").await;

    let metrics = cluster.metrics().await;
    for series in [
        "kowalski_nodes{state=\"ready\"} 2",
        "kowalski_nodes{state=\"down\"} 1",
        "kowalski_run_retries_total 1",
        "kowalski_runs_total{status=\"ok\"} 1",
        "kowalski_exec_seconds_count 1",
        "kowalski_runs_in_flight 0",
    ] {
        assert!(
            metrics.lines().any(|l| l == series),
            "no {series} in\n{metrics}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_agent_turns_suspect_then_down_with_its_work_moved_and_returns() {
    let cluster = Cluster::start(3, 2, &[]).await;
    let mut client = cluster.client().await;
    for other in ["agent-1", "agent-2"] {
        client
            .drain(DrainRequest { node: other.into() })
            .await
            .unwrap();
    }
    let code = "import time\nprint('started', flush=True)\ntime.sleep(2)\nprint('done')";
    let mut stream = client
        .execute(python_request(code))
        .await
        .unwrap()
        .into_inner();
    let mut events = Vec::new();
    read_until(&mut stream, &mut events, |e| matches!(e, Event::Output(_))).await;
    assert_eq!(placements(&events)[0].0, "agent-0");
    for other in ["agent-1", "agent-2"] {
        client
            .undrain(DrainRequest { node: other.into() })
            .await
            .unwrap();
    }

    let target = cluster.agent("agent-0");
    target.signal(Signal::SIGSTOP);
    cluster.wait_for_state("agent-0", "suspect").await;
    for _ in 0..4 {
        let mut quick = client
            .execute(python_request("print(1)"))
            .await
            .unwrap()
            .into_inner();
        let quick_events = run_to_end(&mut quick).await;
        assert_ne!(
            placements(&quick_events)[0].0,
            "agent-0",
            "new work went to a suspect node"
        );
    }
    cluster.wait_for_state("agent-0", "down").await;
    read_until(&mut stream, &mut events, |e| {
        matches!(e, Event::Finished(_))
    })
    .await;
    let placed = placements(&events);
    assert_eq!(placed.len(), 2, "{placed:?}");
    assert_ne!(placed[1].0, "agent-0");
    let finished = last_finished(&events);
    assert_eq!(finished.result.as_ref().unwrap().status(), ExecStatus::Ok);
    assert_eq!(output_of_attempt(&events, 2), "started\ndone\n");

    target.signal(Signal::SIGCONT);
    cluster.wait_for_state("agent-0", "ready").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_agent_comes_back_after_a_coordinator_restart() {
    let mut cluster = Cluster::start(3, 2, &[]).await;
    let before: HashSet<(String, String)> = cluster
        .nodes()
        .await
        .into_iter()
        .map(|n| (n.name, n.id))
        .collect();
    cluster.restart_coordinator();
    for name in ["agent-0", "agent-1", "agent-2"] {
        cluster.wait_for_state(name, "ready").await;
    }
    let after: HashSet<(String, String)> = cluster
        .nodes()
        .await
        .into_iter()
        .map(|n| (n.name, n.id))
        .collect();
    assert_eq!(before, after, "node ids changed across the restart");
    let mut client = cluster.client().await;
    let mut stream = client
        .execute(python_request("print('back')"))
        .await
        .unwrap()
        .into_inner();
    let events = run_to_end(&mut stream).await;
    assert_eq!(output_of_attempt(&events, 1), "back\n");
}

/// Agents whose PATH holds python and bash only.
async fn python_and_bash_cluster() -> (Cluster, tempfile::TempDir) {
    let bin = tempfile::tempdir().unwrap();
    for tool in ["python3", "bash"] {
        std::os::unix::fs::symlink(real_executable(tool), bin.path().join(tool)).unwrap();
    }
    let path = bin.path().to_str().unwrap().to_string();
    let cluster = Cluster::start(2, 2, &[("PATH", &path)]).await;
    (cluster, bin)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_language_no_node_has_is_refused_naming_it_and_what_nodes_offer() {
    let (cluster, _bin) = python_and_bash_cluster().await;
    let mut client = cluster.client().await;
    let mut request = python_request("print 1");
    request.execution.as_mut().unwrap().language = "perl".into();
    let err = client.execute(request).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    let message = err.message();
    assert!(message.contains("no node can run perl"), "{message}");
    assert!(message.contains("agent-0 offers python, bash"), "{message}");

    let output = Command::new(binary("coordinator"))
        .args([
            "exec",
            "--addr",
            &cluster.url(),
            "--lang",
            "perl",
            "-c",
            "print 1",
        ])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&output.stderr).contains("no node can run perl"));

    let document = "```perl\nprint 1\n```\n\n```bash\necho still runs\n```\n";
    let run = |keep_going| {
        let mut client = client.clone();
        async move {
            let request = RunBlocksRequest {
                document: document.into(),
                keep_going,
                ..Default::default()
            };
            let mut stream = client.run_blocks(request).await.unwrap().into_inner();
            let mut events = Vec::new();
            while let Some(event) = tokio::time::timeout(CEILING, stream.message())
                .await
                .unwrap()
                .unwrap()
            {
                events.push(event);
            }
            events
        }
    };
    let second_block_output = |events: &[ClusterEvent]| -> String {
        events
            .iter()
            .filter_map(|e| match &e.event {
                Some(Event::Output(o)) if e.block == 1 => o.chunk.as_ref(),
                _ => None,
            })
            .map(|c| String::from_utf8_lossy(&c.data).into_owned())
            .collect()
    };

    // A block no node can run stops the document like a failure...
    let events = run(false).await;
    match &events[0].event {
        Some(Event::Skipped(s)) => {
            assert_eq!(s.line, 1);
            assert_eq!(s.kind(), SkipKind::NoNode);
            assert!(s.reason.contains("perl"), "{}", s.reason);
        }
        other => panic!("expected the perl block skipped, got {other:?}"),
    }
    match &events[1].event {
        Some(Event::Skipped(s)) => {
            assert_eq!(s.kind(), SkipKind::NotRun);
            assert!(s.reason.contains("block 1 (line 1) failed"), "{}", s.reason);
        }
        other => panic!("expected the bash block not run, got {other:?}"),
    }
    assert_eq!(events.len(), 2, "{events:?}");
    assert_eq!(second_block_output(&events), "");
    // ...unless told to keep going.
    assert_eq!(second_block_output(&run(true).await), "still runs\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_stops_at_the_first_failing_block_and_exits_with_its_status() {
    let (cluster, _bin) = python_and_bash_cluster().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("doc.md");
    std::fs::write(
        &file,
        "```bash\necho one\n```\n```bash\nexit 5\n```\n```bash\necho never\n```\n",
    )
    .unwrap();
    let output = Command::new(binary("coordinator"))
        .args([
            "run",
            "--json",
            "--addr",
            &cluster.url(),
            file.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(
        output.status.code(),
        Some(5),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let finished: Vec<&serde_json::Value> =
        lines.iter().filter(|l| l["event"] == "finished").collect();
    assert_eq!(finished.len(), 2, "{lines:?}");
    assert_eq!(finished[1]["block"], 2, "blocks are numbered from 1");
    assert_eq!(finished[1]["exit_code"], 5);
    assert_eq!(finished[1]["status"], "nonzero_exit");
    assert!(lines.iter().all(|l| l["data"] != "never\n"));
    let not_run = &lines[lines.len() - 2];
    assert_eq!(
        (
            &not_run["event"],
            &not_run["skip"],
            &not_run["block"],
            &not_run["line"]
        ),
        (&"skipped".into(), &"not_run".into(), &3.into(), &7.into())
    );
    let last = lines.last().unwrap();
    assert_eq!(last["event"], "error", "{last}");
    assert_eq!(last["code"], "block_failed");
    assert_eq!(last["block"], 2);
    assert_eq!(
        last["message"],
        "block 2 (line 4) exited with 5; block 3 not run (--keep-going runs it)"
    );
    for line in &lines[..lines.len() - 1] {
        assert!(
            line["event"].is_string() && line["block"].is_u64(),
            "{line}"
        );
    }
}

/// The pid a program printed as its first output.
async fn printed_pid(stream: &mut Streaming<ClusterEvent>) -> i32 {
    let mut events = Vec::new();
    read_until(stream, &mut events, |e| matches!(e, Event::Output(_))).await;
    output_of_attempt(&events, 1).trim().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_goes_away_ends_the_run_on_the_agent() {
    let (cluster, _bin) = python_and_bash_cluster().await;
    let mut client = cluster.client().await;
    let code = "import os, time\nprint(os.getpid(), flush=True)\ntime.sleep(1000)";
    let mut stream = client
        .execute(python_request(code))
        .await
        .unwrap()
        .into_inner();
    let pid = printed_pid(&mut stream).await;
    assert!(process_alive(pid));
    drop(stream);
    eventually("run killed after the client left", || !process_alive(pid));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_clients_deadline_reaches_the_agent() {
    let (cluster, _bin) = python_and_bash_cluster().await;
    let mut client = cluster.client().await;
    let code = "import os, time\nprint(os.getpid(), flush=True)\ntime.sleep(1000)";
    let mut request = tonic::Request::new(python_request(code));
    request.set_timeout(std::time::Duration::from_secs(2));
    let mut stream = client.execute(request).await.unwrap().into_inner();
    let pid = printed_pid(&mut stream).await;
    // The run's timeout is set just inside the deadline, so the agent ends it and the client
    // still hears why.
    let mut status = None;
    while let Ok(Some(event)) = stream.message().await {
        if let Some(Event::Finished(f)) = event.event {
            status = f.result.map(|r| r.status());
        }
    }
    assert_eq!(status, Some(ExecStatus::Timeout));
    eventually("run killed at the deadline", || !process_alive(pid));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_shut_down_mid_run_has_its_run_finished_elsewhere() {
    let cluster = Cluster::start(2, 2, &[]).await;
    let code = "import time\nprint('started', flush=True)\ntime.sleep(2)\nprint('done')";
    let (first, events) = signal_mid_run(&cluster, code, Signal::SIGTERM).await;
    let placed = placements(&events);
    assert_eq!(placed.len(), 2, "{placed:?}");
    assert_ne!(placed[1].0, first);
    let finished = last_finished(&events);
    assert_eq!(finished.result.as_ref().unwrap().status(), ExecStatus::Ok);
    assert_eq!(output_of_attempt(&events, 2), "started\ndone\n");
}

/// Runs the coordinator CLI; returns (exit code, stdout, stderr).
fn cli(args: &[&str]) -> (Option<i32>, String, String) {
    outcome(
        Command::new(binary("coordinator"))
            .args(args)
            .output()
            .unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_and_run_refuse_a_block_pinned_to_a_draining_node_alike() {
    let cluster = Cluster::start(2, 2, &[]).await;
    let mut client = cluster.client().await;
    client
        .drain(DrainRequest {
            node: "agent-0".into(),
        })
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let doc = dir.path().join("doc.md");
    std::fs::write(
        &doc,
        "intro\n\n```python {node=agent-0}\nprint('pinned')\n```\n\n```bash\necho later\n```\n",
    )
    .unwrap();
    let url = cluster.url();
    let doc = doc.to_str().unwrap();
    let expected = "node 'agent-0' is draining and takes no new work (`coordinator undrain agent-0` takes it back)";

    let (status, stdout, _) = cli(&["run", "--plan", "--json", "--addr", &url, doc]);
    assert_eq!(status, Some(3), "{stdout}");
    let planned: serde_json::Value = serde_json::from_str(stdout.lines().next().unwrap()).unwrap();
    assert_eq!(
        (&planned["block"], &planned["line"]),
        (&1.into(), &3.into())
    );
    assert_eq!(
        (&planned["skip"], &planned["reason"]),
        (&"no_node".into(), &expected.into())
    );
    let last: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(
        (&last["event"], &last["code"]),
        (&"error".into(), &"no_node".into())
    );
    assert_eq!(
        last["message"],
        format!("block 1 (line 3) would not run: {expected}")
    );

    let (status, stdout, stderr) = cli(&["run", "--addr", &url, doc]);
    assert_eq!(status, Some(3), "{stderr}");
    assert_eq!(stdout, "", "the block after the refused one ran");
    assert!(
        stderr.contains(&format!("block 1 (line 3) skipped: {expected}")),
        "{stderr}"
    );
    assert!(
        stderr.contains("block 2 not run (--keep-going runs it)"),
        "{stderr}"
    );

    let (status, _, stderr) = cli(&[
        "exec", "--addr", &url, "--node", "agent-0", "--lang", "py", "-c", "1",
    ]);
    assert_eq!(status, Some(3), "{stderr}");
    assert!(stderr.contains(expected), "{stderr}");
}

/// Whether a run's work directory (`AGENT/run-N` under the cluster's work root) holds `name`:
/// the one place a run writes that the host sees.
fn some_run_wrote(cluster: &Cluster, name: &str) -> bool {
    let runs = std::fs::read_dir(cluster.work_root())
        .into_iter()
        .flatten()
        .flatten()
        .flat_map(|agent| {
            std::fs::read_dir(agent.path())
                .into_iter()
                .flatten()
                .flatten()
        });
    runs.into_iter().any(|run| run.path().join(name).exists())
}

/// Starts `coordinator exec` (with `extra` flags) on code that writes the file `started` in its
/// work directory and then sleeps; SIGKILLs the agent that runs it; returns the CLI's exit
/// code, stdout and stderr.
async fn kill_the_agent_under_cli_exec(
    cluster: &Cluster,
    extra: &[&str],
    code: &str,
) -> (Option<i32>, String, String) {
    let url = cluster.url();
    let mut args = vec![
        "exec",
        "--addr",
        url.as_str(),
        "--lang",
        "python",
        "-c",
        code,
    ];
    args.extend_from_slice(extra);
    let child = std::process::Command::new(binary("coordinator"))
        .args(&args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    eventually("the program started", || some_run_wrote(cluster, "started"));
    let busy = cluster
        .nodes()
        .await
        .into_iter()
        .find(|n| n.in_flight > 0)
        .expect("no node runs the program");
    cluster.agent(&busy.name).signal(Signal::SIGKILL);
    outcome(
        tokio::task::spawn_blocking(|| child.wait_with_output())
            .await
            .unwrap()
            .unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_failover_a_script_reading_stdout_sees_the_output_once() {
    let cluster = Cluster::start(2, 2, &[]).await;
    let code = "import time\nprint('started', flush=True)\nopen('started', 'w').close()\ntime.sleep(2)\nprint('done')";
    let (status, stdout, stderr) = kill_the_agent_under_cli_exec(&cluster, &[], code).await;
    assert_eq!(status, Some(0), "{stderr}");
    assert_eq!(stdout, "started\ndone\n");
    assert!(
        stderr.contains("was lost, and its output dropped"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_run_whose_node_dies_announces_no_retry() {
    let cluster = Cluster::start(2, 2, &[]).await;
    let code = "import time\nopen('started', 'w').close()\ntime.sleep(30)";
    let extra = ["--json", "--node", "agent-1"];
    let (status, stdout, _) = kill_the_agent_under_cli_exec(&cluster, &extra, code).await;
    assert_eq!(status, Some(4));
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(lines.iter().all(|l| l["event"] != "retrying"), "{lines:?}");
    let last = lines.last().unwrap();
    assert_eq!(
        (&last["event"], &last["status"]),
        (&"finished".into(), &"failed".into())
    );
    assert!(
        last["reason"]
            .as_str()
            .unwrap()
            .contains("the connection to the node was lost"),
        "{last}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_waits_for_a_node_of_a_cluster_that_is_starting() {
    let port = kowalski_exo_tests::free_port();
    let listen = format!("127.0.0.1:{port}");
    let _coordinator = kowalski_exo_tests::Daemon::start(
        "coordinator",
        &["serve", "--listen", &listen, "--http", "127.0.0.1:0"],
        &[],
        "coordinator listening",
    );
    let url = format!("http://{listen}");
    let exec = std::process::Command::new(binary("coordinator"))
        .args([
            "exec",
            "--addr",
            &url,
            "--wait-for-nodes",
            "20",
            "--lang",
            "py",
            "-c",
            "print('joined')",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let dir = tempfile::tempdir().unwrap();
    let _agent = kowalski_exo_tests::Daemon::start(
        "node-agent",
        &[
            "--coordinator",
            &url,
            "--listen",
            "127.0.0.1:0",
            "--work-dir",
            dir.path().to_str().unwrap(),
        ],
        &[],
        "node agent listening",
    );
    let output = tokio::task::spawn_blocking(|| exec.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(output.status.code(), Some(0));
    assert_eq!(String::from_utf8_lossy(&output.stdout), "joined\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placement_honours_required_isolation_and_the_owners_network_consent() {
    let cluster = Cluster::start(1, 2, &[]).await;
    let url = cluster.url();
    let node = cluster.nodes().await.remove(0);
    let layers: Vec<&str> = node
        .isolation_layers()
        .map(kowalski_exo_common::isolation::name)
        .collect();
    let (status, stdout, _) = cli(&["nodes", "--json", "--addr", &url]);
    assert_eq!(status, Some(0));
    let line: serde_json::Value = serde_json::from_str(stdout.lines().next().unwrap()).unwrap();
    assert_eq!(line["isolation"], serde_json::json!(layers));
    assert_eq!(line["allows_network"], false);
    if nix::unistd::geteuid().is_root() {
        assert_eq!(layers, ["cgroup", "user", "network", "mount", "landlock"]);
    }

    // What the node gives may be required; a layer it lacks keeps the run off it.
    let given = layers.join(",");
    let mut args = vec!["exec", "--addr", &url, "--lang", "py", "-c", "print(7)"];
    if !given.is_empty() {
        args.extend(["--require-isolation", &given]);
    }
    let (status, stdout, stderr) = cli(&args);
    assert_eq!((status, stdout.as_str()), (Some(0), "7\n"), "{stderr}");
    let refused = |extra: &[&str]| {
        let mut args = vec!["exec", "--addr", &url, "--lang", "py", "-c", "1"];
        args.extend_from_slice(extra);
        cli(&args)
    };
    let lacking = kowalski_exo_common::isolation::ALL
        .into_iter()
        .map(kowalski_exo_common::isolation::name)
        .find(|name| !layers.contains(name));
    if let Some(lacking) = lacking {
        let (status, _, stderr) = refused(&["--require-isolation", lacking]);
        assert_eq!(status, Some(3), "{stderr}");
        assert!(
            stderr.contains("no node gives the isolation asked for"),
            "{stderr}"
        );
    }
    let (status, _, stderr) = refused(&["--network"]);
    assert_eq!(status, Some(3), "{stderr}");
    assert!(
        stderr.contains("no node lets runs use the network (agent-0 do not"),
        "{stderr}"
    );
    let (status, _, stderr) = refused(&["--require-isolation", "chroot"]);
    assert_eq!(status, Some(2), "{stderr}");
    assert!(
        stderr.contains("'chroot' is not an isolation layer"),
        "{stderr}"
    );
}
