//! Cluster benchmarks with real processes on loopback:
//! - detection: SIGKILL or SIGSTOP of an agent until the coordinator marks it (down / suspect);
//! - failover: SIGKILL mid-task until the task finishes elsewhere, minus the task's own length;
//! - throughput: trivial Python tasks through the coordinator to 3 agents against spawning the
//!   interpreter directly with the same parallelism, in one run.
//!
//! Run with `scripts/bench-cluster.sh` (builds the release binaries first). Options:
//! `--rounds N` (detection and failover, default 5), `--tasks N` (throughput, default 300),
//! `--no-cgroups` (throughput with agents that contain runs by process group only).

use std::{
    process::{Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use kowalski_exo_common::proto::{ClusterEvent, ExecStatus, cluster_event::Event};
use kowalski_exo_tests::{
    Cluster,
    bench::{arg, ms},
    python_request, real_executable,
};
use nix::sys::signal::Signal;
use tokio::sync::Semaphore;
use tonic::Streaming;

fn summary(samples: &mut [Duration]) -> String {
    samples.sort();
    let median = samples[samples.len() / 2];
    let max = samples[samples.len() - 1];
    format!(
        "median {:>8.1} ms   min {:>8.1} ms   max {:>8.1} ms   ({} rounds)",
        ms(median),
        ms(samples[0]),
        ms(max),
        samples.len()
    )
}

/// Polls the coordinator every millisecond until the node is in `state`.
async fn time_until(cluster: &Cluster, name: &str, state: &str, since: Instant) -> Duration {
    loop {
        if cluster.state_of(name).await.as_deref() == Some(state) {
            return since.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

async fn next_event(stream: &mut Streaming<ClusterEvent>) -> Event {
    stream
        .message()
        .await
        .expect("stream failed")
        .expect("stream ended")
        .event
        .expect("empty event")
}

/// CPU seconds (user + system) a process used itself, children not included.
fn cpu_seconds(pid: i32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let Some(after) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
        return 0.0;
    };
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // Fields 14 and 15 of /proc/PID/stat, counted from the state field (3) here.
    (ticks(11) + ticks(12)) / 100.0
}

/// (coordinator, all agents) CPU seconds so far.
fn cluster_cpu(cluster: &Cluster) -> (f64, f64) {
    let agents = (0..3)
        .map(|i| cpu_seconds(cluster.agent(&format!("agent-{i}")).pid()))
        .sum();
    (cpu_seconds(cluster.coordinator.pid()), agents)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let rounds = arg("--rounds", 5);
    let tasks = arg("--tasks", 300);

    let mut killed = Vec::new();
    let mut stopped = Vec::new();
    for _ in 0..rounds {
        let cluster = Cluster::start(3, 2, &[]).await;
        let at = Instant::now();
        cluster.agent("agent-0").signal(Signal::SIGKILL);
        killed.push(time_until(&cluster, "agent-0", "down", at).await);
        let at = Instant::now();
        cluster.agent("agent-1").signal(Signal::SIGSTOP);
        stopped.push(time_until(&cluster, "agent-1", "suspect", at).await);
        cluster.agent("agent-1").signal(Signal::SIGCONT);
    }
    println!("detection (coordinator marks the node; polled every 1 ms)");
    println!("  SIGKILL -> down     {}", summary(&mut killed));
    println!("  SIGSTOP -> suspect  {}", summary(&mut stopped));

    let task = "import time\nprint('started', flush=True)\ntime.sleep(1)\nprint('done')";
    let mut overheads = Vec::new();
    for _ in 0..rounds {
        let cluster = Cluster::start(3, 2, &[]).await;
        let mut client = cluster.client().await;
        // The task's own length, from its first output to its end, on a healthy node.
        let mut stream = client
            .execute(python_request(task))
            .await
            .unwrap()
            .into_inner();
        let mut first_output = None;
        let own_length = loop {
            match next_event(&mut stream).await {
                Event::Output(_) if first_output.is_none() => first_output = Some(Instant::now()),
                Event::Finished(_) => break first_output.unwrap().elapsed(),
                _ => {}
            }
        };
        let mut stream = client
            .execute(python_request(task))
            .await
            .unwrap()
            .into_inner();
        let mut node = String::new();
        let killed_at = loop {
            match next_event(&mut stream).await {
                Event::Placed(p) => node = p.node_name,
                Event::Output(_) => {
                    cluster.agent(&node).signal(Signal::SIGKILL);
                    break Instant::now();
                }
                _ => {}
            }
        };
        loop {
            if let Event::Finished(f) = next_event(&mut stream).await {
                assert_eq!(f.result.unwrap().status(), ExecStatus::Ok);
                assert_eq!(f.attempt, 2);
                break;
            }
        }
        // From the kill, the second attempt must start over and run the task's whole length.
        let total = killed_at.elapsed();
        overheads.push(total.saturating_sub(own_length));
    }
    println!("failover (SIGKILL mid-task until finished elsewhere, minus the task's own length)");
    println!("  overhead            {}", summary(&mut overheads));

    let no_cgroups = std::env::args().any(|a| a == "--no-cgroups");
    let env: &[(&str, &str)] = if no_cgroups {
        &[("KOWALSKI_NO_CGROUPS", "true")]
    } else {
        &[]
    };
    let cluster = Cluster::start(3, 2, env).await;
    let parallelism = 6;
    let python_exe = real_executable("python3");
    let slots = Arc::new(Semaphore::new(parallelism));
    let shared = cluster.client().await;
    let cpu_before = cluster_cpu(&cluster);
    let started = Instant::now();
    let mut handles = Vec::new();
    for _ in 0..tasks {
        let permit = slots.clone().acquire_owned().await.unwrap();
        let mut client = shared.clone();
        handles.push(tokio::spawn(async move {
            let mut stream = client
                .execute(python_request("print(1)"))
                .await
                .unwrap()
                .into_inner();
            loop {
                if let Event::Finished(f) = next_event(&mut stream).await {
                    assert_eq!(f.result.unwrap().status(), ExecStatus::Ok);
                    break;
                }
            }
            drop(permit);
        }));
    }
    for handle in handles {
        handle.await.unwrap();
    }
    let through_cluster = tasks as f64 / started.elapsed().as_secs_f64();
    let cpu_after = cluster_cpu(&cluster);
    let script = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(script.path(), "print(1)\n").unwrap();
    let started = Instant::now();
    let mut handles = Vec::new();
    for _ in 0..tasks {
        let permit = slots.clone().acquire_owned().await.unwrap();
        let (exe, path) = (python_exe.clone(), script.path().to_path_buf());
        handles.push(tokio::task::spawn_blocking(move || {
            let output = Command::new(exe)
                .arg(path)
                .stdin(Stdio::null())
                .output()
                .unwrap();
            assert_eq!(output.stdout, b"1\n");
            drop(permit);
        }));
    }
    for handle in handles {
        handle.await.unwrap();
    }
    let direct = tasks as f64 / started.elapsed().as_secs_f64();
    println!("throughput ({tasks} print(1) tasks, {parallelism} at a time, 3 agents x 2 slots)");
    println!("  direct spawn        {direct:>8.1} tasks/s");
    println!(
        "  through coordinator {through_cluster:>8.1} tasks/s   ({:.0}% of direct)",
        100.0 * through_cluster / direct
    );
    let per_task = |before: f64, after: f64| (after - before) * 1000.0 / tasks as f64;
    println!(
        "  CPU per task, own processes only: coordinator {:.2} ms, agents {:.2} ms",
        per_task(cpu_before.0, cpu_after.0),
        per_task(cpu_before.1, cpu_after.1)
    );
}
