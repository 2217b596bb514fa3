//! Benchmark: `print(1)` in Python through NodeAgent.Execute on loopback against spawning the
//! same interpreter directly, interleaved in one run. Prints p50, p95 and the ratio of medians.
//!
//! Run with `scripts/bench-exec.sh` (builds the release agent first). Options:
//! `--iterations N` (default 200), `--no-cgroups` (agent without cgroups).

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use kowalski_exo_common::proto::{
    ExecStatus, ExecuteRequest, exec_event::Event, node_agent_client::NodeAgentClient,
};
use kowalski_exo_tests::{Daemon, bench::ms, describe};

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
    let iterations = args
        .iter()
        .position(|a| a == "--iterations")
        .and_then(|i| args.get(i + 1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(200usize);
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
    let isolation = description.isolation();
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
        "print(1) in Python, {iterations} interleaved runs each, isolation {isolation:?}, interpreter {python}"
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
