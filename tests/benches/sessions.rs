//! Session benchmarks with real processes on loopback, each beside its baseline in the same run:
//! - latency: a warm `print(1)` in a session through the coordinator, from a gRPC client,
//!   against a cold run of the same code (`Execute`), and opening a session (Python started);
//! - throughput: trivial executions in warm sessions over 3 agents, against cold runs;
//! - sub-calls: `llm_query_batched` prompts against scripted backends that answer one request at
//!   a time in 100 ms, one backend per agent, over 1, 2 and 3 agents.
//!
//! Run with `scripts/bench-sessions.sh` (builds the release binaries first). Options:
//! `--rounds N` (latency samples, default 300), `--tasks N` (warm throughput, default 1000),
//! `--cold-tasks N` (default 200), `--prompts N` (default 64).

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use kowalski_exo_common::proto::{
    CloseSessionRequest, ClusterOpenSessionRequest, ExecStatus, OpenSessionRequest,
    cluster_event::Event, coordinator_client::CoordinatorClient,
};
use kowalski_exo_tests::{
    Cluster, InferenceCluster, ScriptedBackend, Step,
    bench::{arg, ms},
    python_request, run_in_session,
};
use tokio::sync::Semaphore;
use tonic::{Streaming, transport::Channel};

/// Sessions the throughput run spreads its executions over (two per agent).
const SESSIONS: usize = 6;
/// Cold runs at once: every agent slot.
const COLD_PARALLELISM: usize = 6;

fn percentiles(samples: &mut [Duration]) -> String {
    samples.sort();
    let at = |p: f64| ms(samples[((samples.len() - 1) as f64 * p).round() as usize]);
    format!(
        "p50 {:>7.2} ms   p90 {:>7.2} ms   p99 {:>7.2} ms   ({} runs)",
        at(0.5),
        at(0.9),
        at(0.99),
        samples.len()
    )
}

/// Follows a stream to its finished event; asserts the code ran ok.
async fn finish(mut stream: Streaming<kowalski_exo_common::proto::ClusterEvent>) {
    while let Some(event) = stream.message().await.expect("stream failed") {
        if let Some(Event::Finished(f)) = event.event {
            let status = f.result.map(|r| r.status());
            assert_eq!(status, Some(ExecStatus::Ok), "{}", f.error);
            return;
        }
    }
    panic!("the stream ended without a finished event");
}

async fn in_session(client: &mut CoordinatorClient<Channel>, session: &str, code: &str) {
    let run = run_in_session(client, session, "python", code).await;
    assert_eq!(run.status, Some(ExecStatus::Ok), "{}", run.stdout);
}

async fn cold(client: &mut CoordinatorClient<Channel>, code: &str) {
    let stream = client
        .execute(python_request(code))
        .await
        .expect("Execute")
        .into_inner();
    finish(stream).await;
}

async fn open(client: &mut CoordinatorClient<Channel>, session: &str) -> String {
    client
        .open_session(ClusterOpenSessionRequest {
            session: Some(OpenSessionRequest {
                session_id: session.into(),
                languages: vec!["python".into()],
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect("OpenSession")
        .into_inner()
        .node_name
}

async fn latency(rounds: usize) {
    let cluster = Cluster::start(1, 2, &[]).await;
    let mut client = cluster.client().await;
    open(&mut client, "latency").await;
    for _ in 0..20 {
        in_session(&mut client, "latency", "print(1)").await;
        cold(&mut client, "print(1)").await;
    }
    let mut warm = Vec::new();
    for _ in 0..rounds {
        let at = Instant::now();
        in_session(&mut client, "latency", "print(1)").await;
        warm.push(at.elapsed());
    }
    let mut cold_runs = Vec::new();
    for _ in 0..(rounds / 4).max(10) {
        let at = Instant::now();
        cold(&mut client, "print(1)").await;
        cold_runs.push(at.elapsed());
    }
    let mut opens = Vec::new();
    for i in 0..(rounds / 10).max(10) {
        let name = format!("opened-{i}");
        let at = Instant::now();
        open(&mut client, &name).await;
        opens.push(at.elapsed());
        client
            .close_session(CloseSessionRequest { session_id: name })
            .await
            .expect("CloseSession");
    }
    println!("latency of print(1) through the coordinator (1 agent, one at a time)");
    println!("  warm session  {}", percentiles(&mut warm));
    println!("  cold run      {}", percentiles(&mut cold_runs));
    println!("  open session  {}", percentiles(&mut opens));
}

async fn throughput(tasks: usize, cold_tasks: usize) {
    let cluster = Cluster::start(3, 2, &[]).await;
    let mut client = cluster.client().await;
    let mut homes = Vec::new();
    for i in 0..SESSIONS {
        homes.push(open(&mut client, &format!("s{i}")).await);
        in_session(&mut client, &format!("s{i}"), "print(1)").await;
    }
    homes.sort();
    let started = Instant::now();
    let mut handles = Vec::new();
    for i in 0..SESSIONS {
        let mut client = client.clone();
        let share = tasks / SESSIONS + usize::from(i < tasks % SESSIONS);
        handles.push(tokio::spawn(async move {
            for _ in 0..share {
                in_session(&mut client, &format!("s{i}"), "print(1)").await;
            }
        }));
    }
    for handle in handles {
        handle.await.unwrap();
    }
    let warm = tasks as f64 / started.elapsed().as_secs_f64();
    let slots = Arc::new(Semaphore::new(COLD_PARALLELISM));
    let started = Instant::now();
    let mut handles = Vec::new();
    for _ in 0..cold_tasks {
        let permit = slots.clone().acquire_owned().await.unwrap();
        let mut client = client.clone();
        handles.push(tokio::spawn(async move {
            cold(&mut client, "print(1)").await;
            drop(permit);
        }));
    }
    for handle in handles {
        handle.await.unwrap();
    }
    let cold = cold_tasks as f64 / started.elapsed().as_secs_f64();
    println!(
        "throughput of print(1) over 3 agents (sessions on {})",
        homes.join(", ")
    );
    println!("  warm, {SESSIONS} sessions   {warm:>8.1} executions/s   ({tasks} executions)");
    println!(
        "  cold, {COLD_PARALLELISM} at a time  {cold:>8.1} runs/s         ({cold_tasks} runs)   warm/cold {:.1}x",
        warm / cold
    );
}

/// Seconds for `prompts` prompts in one `llm_query_batched` over `agents` agents.
async fn batch_seconds(agents: usize, prompts: usize) -> f64 {
    let backends: Vec<ScriptedBackend> = (0..agents)
        .map(|_| {
            let backend = ScriptedBackend::start(&["tiny"]);
            backend.set_default(Step::Answer {
                tokens: vec!["OK".into()],
                delay: Duration::from_millis(100),
            });
            backend.one_at_a_time();
            backend
        })
        .collect();
    let bases: Vec<String> = backends.iter().map(ScriptedBackend::api_base).collect();
    let bases: Vec<&str> = bases.iter().map(String::as_str).collect();
    let cluster = InferenceCluster::start(&bases, &[], 1);
    cluster.served_by("tiny", agents).await;
    let mut client = cluster.client().await;
    open(&mut client, "rlm").await;
    let code = format!(
        "answers = llm_query_batched([f'q{{i}}' for i in range({prompts})], max_tokens=8)\nassert answers.count('OK') == {prompts}, answers"
    );
    let at = Instant::now();
    in_session(&mut client, "rlm", &code).await;
    at.elapsed().as_secs_f64()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    latency(arg("--rounds", 300)).await;
    throughput(arg("--tasks", 1000), arg("--cold-tasks", 200)).await;
    let prompts = arg("--prompts", 64);
    println!(
        "sub-calls: {prompts} prompts in one llm_query_batched, backends answering one at a time in 100 ms"
    );
    let one = batch_seconds(1, prompts).await;
    println!("  1 agent    {one:>6.2} s");
    for agents in [2, 3] {
        let seconds = batch_seconds(agents, prompts).await;
        println!(
            "  {agents} agents   {seconds:>6.2} s   speed-up {:.2}x (goal {:.1}x)",
            one / seconds,
            0.8 * agents as f64
        );
    }
}
