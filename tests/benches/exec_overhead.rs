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

    let mut through_agent = Samples {
        name: "NodeAgent.Execute",
        times: Vec::new(),
    };
    let mut direct = Samples {
        name: "direct spawn",
        times: Vec::new(),
    };
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

/// `Coordinator.Execute` of print(1) through a plaintext cluster and a TLS one, interleaved.
async fn tls_overhead(iterations: usize) {
    let dirs = tempfile::tempdir().unwrap();
    let plain = Daemon::start(
        "coordinator",
        &["serve", "--listen", "127.0.0.1:0", "--http", "off"],
        &[],
        "coordinator listening",
    );
    let plain_url = plain.url();
    let _plain_agent = Daemon::start(
        "node-agent",
        &[
            "--coordinator",
            &plain_url,
            "--name",
            "plain",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            dirs.path().join("plain").to_str().unwrap(),
        ],
        &[],
        "node agent listening",
    );
    let data = dirs.path().join("coordinator");
    // No rate limit: the bench's one key makes thousands of calls a second.
    let secure = tls_coordinator_with(&data, &["--rate-limit", "0"]);
    let _secure_agent = joined_agent(
        &secure,
        "secure",
        &dirs.path().join("node"),
        Some(&token(&data)),
    );
    let mut plain_client = CoordinatorClient::connect(plain_url).await.unwrap();
    let mut secure_client = keyed_client(&secure.url(), &data, &api_key(&data, "bench")).await;
    wait_for_node(&mut plain_client, &mut secure_client).await;
    let mut plaintext = Samples {
        name: "plaintext",
        times: Vec::new(),
    };
    let mut tls = Samples {
        name: "TLS + API key",
        times: Vec::new(),
    };
    for i in 0..WARMUP + iterations {
        for secure_first in [i % 2 == 0, i % 2 != 0] {
            let start = Instant::now();
            if secure_first {
                cluster_execute(&mut secure_client).await;
            } else {
                cluster_execute_plain(&mut plain_client).await;
            }
            let elapsed = start.elapsed();
            if i >= WARMUP {
                match secure_first {
                    true => tls.times.push(elapsed),
                    false => plaintext.times.push(elapsed),
                }
            }
        }
    }
    println!();
    println!(
        "Coordinator.Execute of print(1) on one agent, {iterations} interleaved runs each (connections kept open)"
    );
    println!("{:<20} {:>9} {:>9}", "cluster", "p50 ms", "p95 ms");
    for samples in [&plaintext, &tls] {
        println!(
            "{:<20} {:>9.2} {:>9.2}",
            samples.name,
            ms(samples.percentile(0.5)),
            ms(samples.percentile(0.95))
        );
    }
    println!(
        "TLS adds {:.2} ms at the median (goal <= 1 ms)",
        ms(tls.percentile(0.5)) - ms(plaintext.percentile(0.5))
    );
    // The same without a Python start in each sample: one unary call, many times.
    let calls = iterations * 10;
    let mut plain_calls = Samples {
        name: "ListNodes plaintext",
        times: Vec::new(),
    };
    let mut tls_calls = Samples {
        name: "ListNodes TLS + key",
        times: Vec::new(),
    };
    for i in 0..calls {
        for secure_first in [i % 2 == 0, i % 2 != 0] {
            let start = Instant::now();
            if secure_first {
                secure_client.list_nodes(ListNodesRequest {}).await.unwrap();
                tls_calls.times.push(start.elapsed());
            } else {
                plain_client.list_nodes(ListNodesRequest {}).await.unwrap();
                plain_calls.times.push(start.elapsed());
            }
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

async fn wait_for_node(
    plain: &mut CoordinatorClient<tonic::transport::Channel>,
    secure: &mut KeyedClient,
) {
    for _ in 0..200 {
        let plain_ready = plain
            .list_nodes(ListNodesRequest {})
            .await
            .unwrap()
            .into_inner();
        let secure_ready = secure
            .list_nodes(ListNodesRequest {})
            .await
            .unwrap()
            .into_inner();
        let ready = |nodes: &[kowalski_exo_common::proto::NodeInfo]| {
            nodes.iter().any(|n| n.state == "ready")
        };
        if ready(&plain_ready.nodes) && ready(&secure_ready.nodes) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the agents never became ready");
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

async fn cluster_execute(client: &mut KeyedClient) {
    let stream = client.execute(print_one()).await.unwrap().into_inner();
    check_cluster_run(stream).await;
}

async fn cluster_execute_plain(client: &mut CoordinatorClient<tonic::transport::Channel>) {
    let stream = client.execute(print_one()).await.unwrap().into_inner();
    check_cluster_run(stream).await;
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
