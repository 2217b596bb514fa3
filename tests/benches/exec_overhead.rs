//! Benchmark: `print(1)` in Python through NodeAgent.Execute on loopback against spawning the
//! same interpreter directly, interleaved in one run. Prints p50, p95 and the ratio of medians.
//! Then what TLS adds to a cluster exec: `Coordinator.Execute` through a plaintext cluster and
//! through one run with `--tls` (mutual TLS to its agent, an API key), interleaved.
//!
//! Run with `scripts/bench-exec.sh` (builds the release binaries first). Options:
//! `--iterations N` (default 200), `--no-cgroups` (agent without cgroups), `--cluster-iterations
//! N` (default 100; 0 skips the TLS comparison).

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use kowalski_exo_common::{
    isolation,
    proto::{
        ClusterExecuteRequest, ExecStatus, ExecuteRequest, ListNodesRequest, cluster_event,
        coordinator_client::CoordinatorClient, exec_event::Event,
        node_agent_client::NodeAgentClient,
    },
};
use kowalski_exo_tests::{
    Daemon,
    bench::{arg, ms},
    describe,
    tls_cluster::{KeyedClient, api_key, joined_agent, keyed_client, tls_coordinator_with, token},
};

const WARMUP: usize = 10;

struct Samples {
    name: &'static str,
    times: Vec<Duration>,
}

impl Samples {
    fn named(name: &'static str) -> Self {
        Samples {
            name,
            times: Vec::new(),
        }
    }

    fn percentile(&self, p: f64) -> Duration {
        let mut sorted = self.times.clone();
        sorted.sort();
        let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
        sorted[index]
    }
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let iterations = arg("--iterations", 200);
    let cluster_iterations = arg("--cluster-iterations", 100);
    let no_cgroups = args.iter().any(|a| a == "--no-cgroups");

    let work = tempfile::tempdir().unwrap();
    let mut agent_args = vec![
        "--standalone",
        "--listen",
        "127.0.0.1:0",
        "--work-dir",
        work.path().to_str().unwrap(),
    ];
    if no_cgroups {
        agent_args.push("--no-cgroups");
    }
    let agent = Daemon::start("node-agent", &agent_args, &[], "node agent listening");
    let mut client = NodeAgentClient::connect(agent.url()).await.unwrap();
    let description = describe(&agent.url()).await;
    let level = description.isolation();
    let layers: Vec<i32> = description.isolation_layers.clone();
    let python = description
        .runtimes
        .unwrap()
        .runtimes
        .into_iter()
        .find(|r| r.language == "python" && !r.executable.is_empty())
        .expect("no healthy python on this machine")
        .executable;
    let script_dir = tempfile::tempdir().unwrap();
    let script = script_dir.path().join("main.py");
    std::fs::write(&script, "print(1)\n").unwrap();

    let mut through_agent = Samples::named("NodeAgent.Execute");
    let mut direct = Samples::named("direct spawn");
    for i in 0..WARMUP + iterations {
        // Alternate which goes first so neither always runs on a warmer cache.
        let order = if i % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        for via_agent in order {
            let start = Instant::now();
            if via_agent {
                execute(&mut client).await;
            } else {
                let output = Command::new(&python)
                    .arg(&script)
                    .stdin(Stdio::null())
                    .output()
                    .unwrap();
                assert_eq!(output.stdout, b"1\n");
            }
            let elapsed = start.elapsed();
            if i >= WARMUP {
                if via_agent {
                    through_agent.times.push(elapsed);
                } else {
                    direct.times.push(elapsed);
                }
            }
        }
    }
    println!(
        "print(1) in Python, {iterations} interleaved runs each, isolation {level:?}, layers {}, interpreter {python}",
        isolation::names(&layers)
    );
    println!("{:<20} {:>9} {:>9}", "path", "p50 ms", "p95 ms");
    for samples in [&direct, &through_agent] {
        println!(
            "{:<20} {:>9.2} {:>9.2}",
            samples.name,
            ms(samples.percentile(0.5)),
            ms(samples.percentile(0.95))
        );
    }
    let ratio = ms(through_agent.percentile(0.5)) / ms(direct.percentile(0.5));
    let ratio95 = ms(through_agent.percentile(0.95)) / ms(direct.percentile(0.95));
    println!(
        "ratio of medians (agent / direct): {ratio:.3} (goal <= 1.10); p95 ratio {ratio95:.3}"
    );
    if cluster_iterations > 0 {
        tls_overhead(cluster_iterations).await;
    }
}

/// A client of one of the compared clusters.
enum Client {
    Plain(CoordinatorClient<tonic::transport::Channel>),
    Keyed(KeyedClient),
}

impl Client {
    async fn execute(&mut self) {
        let stream = match self {
            Client::Plain(client) => client.execute(print_one()).await,
            Client::Keyed(client) => client.execute(print_one()).await,
        };
        check_cluster_run(stream.unwrap().into_inner()).await;
    }

    async fn list_nodes(&mut self) -> Vec<kowalski_exo_common::proto::NodeInfo> {
        let response = match self {
            Client::Plain(client) => client.list_nodes(ListNodesRequest {}).await,
            Client::Keyed(client) => client.list_nodes(ListNodesRequest {}).await,
        };
        response.unwrap().into_inner().nodes
    }
}

/// A plaintext coordinator on loopback with one agent, `name`.
async fn plaintext_cluster(dir: &std::path::Path, name: &str) -> (Daemon, Daemon, Client) {
    let coordinator = Daemon::start(
        "coordinator",
        &["serve", "--listen", "127.0.0.1:0", "--http", "off"],
        &[],
        "coordinator listening",
    );
    let agent = Daemon::start(
        "node-agent",
        &[
            "--coordinator",
            &coordinator.url(),
            "--name",
            name,
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            dir.join(name).to_str().unwrap(),
        ],
        &[],
        "node agent listening",
    );
    let client = CoordinatorClient::connect(coordinator.url()).await.unwrap();
    (coordinator, agent, Client::Plain(client))
}

/// `Coordinator.Execute` of print(1) through a plaintext cluster, a second plaintext one (the
/// noise floor: two clusters alike differ by this much) and a TLS one, interleaved; then one
/// unary call, plaintext against TLS.
async fn tls_overhead(iterations: usize) {
    let dirs = tempfile::tempdir().unwrap();
    let (_plain, _plain_agent, plain) = plaintext_cluster(dirs.path(), "plain").await;
    let (_control, _control_agent, control) = plaintext_cluster(dirs.path(), "control").await;
    let data = dirs.path().join("coordinator");
    // No rate limit: the bench's one key makes thousands of calls a second.
    let secure = tls_coordinator_with(&data, &["--rate-limit", "0"]);
    let _secure_agent = joined_agent(
        &secure,
        "secure",
        &dirs.path().join("node"),
        Some(&token(&data)),
    );
    let secure_client = keyed_client(&secure.url(), &data, &api_key(&data, "bench")).await;
    let mut clusters = [
        (plain, Samples::named("plaintext")),
        (control, Samples::named("plaintext again")),
        (
            Client::Keyed(secure_client),
            Samples::named("TLS + API key"),
        ),
    ];
    for (client, _) in clusters.iter_mut() {
        wait_for_node(client).await;
    }
    for i in 0..WARMUP + iterations {
        // Each cluster goes first, second and third in turn.
        for turn in 0..clusters.len() {
            let (client, samples) = &mut clusters[(i + turn) % 3];
            let start = Instant::now();
            client.execute().await;
            if i >= WARMUP {
                samples.times.push(start.elapsed());
            }
        }
    }
    println!();
    println!(
        "Coordinator.Execute of print(1) on one agent, {iterations} interleaved runs each (connections kept open)"
    );
    println!("{:<20} {:>9} {:>9}", "cluster", "p50 ms", "p95 ms");
    for (_, samples) in &clusters {
        println!(
            "{:<20} {:>9.2} {:>9.2}",
            samples.name,
            ms(samples.percentile(0.5)),
            ms(samples.percentile(0.95))
        );
    }
    let median = |k: usize| ms(clusters[k].1.percentile(0.5));
    println!(
        "TLS adds {:.2} ms at the median (goal <= 1 ms); two plaintext clusters differ by {:.2} ms",
        median(2) - median(0),
        median(1) - median(0)
    );
    // The same without a Python start in each sample: one unary call, many times.
    let calls = iterations * 10;
    let [(plain, _), _, (secure, _)] = &mut clusters;
    let mut plain_calls = Samples::named("ListNodes plaintext");
    let mut tls_calls = Samples::named("ListNodes TLS + key");
    for i in 0..calls {
        for secure_first in [i % 2 == 0, i % 2 != 0] {
            let (client, samples) = match secure_first {
                true => (&mut *secure, &mut tls_calls),
                false => (&mut *plain, &mut plain_calls),
            };
            let start = Instant::now();
            client.list_nodes().await;
            samples.times.push(start.elapsed());
        }
    }
    println!();
    println!("{calls} interleaved ListNodes calls each");
    println!("{:<20} {:>9} {:>9}", "call", "p50 ms", "p95 ms");
    for samples in [&plain_calls, &tls_calls] {
        println!(
            "{:<20} {:>9.3} {:>9.3}",
            samples.name,
            ms(samples.percentile(0.5)),
            ms(samples.percentile(0.95))
        );
    }
    println!(
        "TLS and the key check add {:.3} ms to a call at the median",
        ms(tls_calls.percentile(0.5)) - ms(plain_calls.percentile(0.5))
    );
}

async fn wait_for_node(client: &mut Client) {
    for _ in 0..200 {
        if client.list_nodes().await.iter().any(|n| n.state == "ready") {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the agent never became ready");
}

fn print_one() -> ClusterExecuteRequest {
    ClusterExecuteRequest {
        execution: Some(ExecuteRequest {
            language: "python".into(),
            code: "print(1)\n".into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

async fn check_cluster_run(mut stream: tonic::Streaming<kowalski_exo_common::proto::ClusterEvent>) {
    let mut output = Vec::new();
    while let Some(event) = stream.message().await.unwrap() {
        match event.event {
            Some(cluster_event::Event::Output(out)) => {
                output.extend(out.chunk.map(|c| c.data).unwrap_or_default())
            }
            Some(cluster_event::Event::Finished(f)) => assert_eq!(
                f.result.as_ref().map(|r| r.status()),
                Some(ExecStatus::Ok),
                "{f:?}"
            ),
            _ => {}
        }
    }
    assert_eq!(output, b"1\n");
}

async fn execute(client: &mut NodeAgentClient<tonic::transport::Channel>) {
    let request = ExecuteRequest {
        language: "python".into(),
        code: "print(1)\n".into(),
        ..Default::default()
    };
    let mut stream = client.execute(request).await.unwrap().into_inner();
    let mut output = Vec::new();
    while let Some(event) = stream.message().await.unwrap() {
        match event.event {
            Some(Event::Output(chunk)) => output.extend(chunk.data),
            Some(Event::Finished(f)) => assert_eq!(f.status(), ExecStatus::Ok, "{f:?}"),
            _ => {}
        }
    }
    assert_eq!(output, b"1\n");
}
