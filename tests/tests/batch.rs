//! `coordinator batch` with real processes: a batch interrupted by Ctrl-C and by a SIGKILL of
//! the CLI, an agent SIGKILLed under it and the coordinator restarted, each time resumed, with
//! every task's result exactly once in the output and the database, and each the finishing
//! attempt's own; a batch in warm sessions closes them however it ends.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use kowalski_exo_tests::{CEILING, Cluster, binary, outcome};
use nix::{sys::signal, unistd::Pid};
use serde_json::Value;

/// A batch file of `count` Python tasks, each printing its own id, then waiting a little (so an
/// attempt lost to a dead node has printed: its output must not reach the result).
fn batch_file(dir: &Path, count: usize) -> PathBuf {
    let lines: Vec<String> = (0..count)
        .map(|i| {
            format!(
                r#"{{"id": "t{i}", "lang": "python", "code": "import time\nprint('t{i}', flush=True)\ntime.sleep(0.05)"}}"#
            )
        })
        .collect();
    let file = dir.join("tasks.jsonl");
    std::fs::write(&file, lines.join("\n")).unwrap();
    file
}

struct Batch {
    addr: String,
    file: PathBuf,
    db: PathBuf,
    out: PathBuf,
}

impl Batch {
    fn new(addr: String, dir: &Path, count: usize) -> Batch {
        Batch {
            addr,
            file: batch_file(dir, count),
            db: dir.join("batch.sqlite"),
            out: dir.join("out.jsonl"),
        }
    }

    fn command(&self, resume: bool) -> Command {
        let mut command = Command::new(binary("coordinator"));
        command.args(["batch", "--addr", &self.addr, "--concurrency", "6"]);
        command
            .arg("--db")
            .arg(&self.db)
            .arg("--out")
            .arg(&self.out);
        if resume {
            command.arg("--resume");
        }
        command.arg(&self.file);
        command
    }

    fn start(&self, resume: bool) -> Child {
        self.command(resume)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start coordinator batch")
    }

    /// The result lines written so far.
    fn results(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("a result line is JSON"))
            .collect()
    }

    /// Waits until at least `count` results are written.
    fn wait_for(&self, count: usize) {
        let start = Instant::now();
        while self.results().len() < count {
            assert!(
                start.elapsed() < CEILING,
                "{} results",
                self.results().len()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Every id once, each result ok and its output the task's own.
    fn assert_complete(&self, count: usize) {
        let results = self.results();
        let mut seen: HashMap<String, usize> = HashMap::new();
        for result in &results {
            let id = result["id"].as_str().unwrap().to_string();
            assert_eq!(result["status"], "ok", "{result}");
            assert_eq!(result["stdout"], format!("{id}\n"), "{result}");
            *seen.entry(id).or_default() += 1;
        }
        assert_eq!(results.len(), count, "one line per task");
        assert_eq!(seen.len(), count);
        assert!(seen.values().all(|n| *n == 1));
    }
}

fn signal_child(child: &Child, signal: signal::Signal) {
    signal::kill(Pid::from_raw(child.id() as i32), signal).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_interrupted_killed_and_losing_an_agent_resumes_with_every_result_once() {
    let cluster = Cluster::start(3, 4, &[]).await;
    let dir = tempfile::tempdir().unwrap();
    let batch = Batch::new(cluster.url(), dir.path(), 300);

    // Ctrl-C: the batch stops, says how to go on, and exits 130.
    let mut run = batch.start(false);
    batch.wait_for(40);
    signal_child(&run, signal::Signal::SIGINT);
    let (status, _, err) = outcome(run.wait_with_output().unwrap());
    assert_eq!(status, Some(130), "{err}");
    assert!(
        err.contains("interrupted (--resume goes on with it)"),
        "{err}"
    );

    // Without --resume the database is not taken over.
    let (status, _, err) = outcome(batch.command(false).output().unwrap());
    assert_eq!(status, Some(2), "{err}");
    assert!(err.contains("--resume"), "{err}");

    // SIGKILL of the CLI at 100.
    run = batch.start(true);
    batch.wait_for(100);
    run.kill().unwrap();
    run.wait().unwrap();

    // An agent SIGKILLed at 200: its runs move to the others.
    run = batch.start(true);
    batch.wait_for(200);
    cluster
        .agent("agent-1")
        .signal(nix::sys::signal::Signal::SIGKILL);
    let (status, _, err) = outcome(run.wait_with_output().unwrap());
    assert_eq!(status, Some(0), "{err}");
    assert!(
        err.contains("batch finished: 300 of 300 done (0 failed"),
        "{err}"
    );
    batch.assert_complete(300);
    let moved = batch
        .results()
        .iter()
        .filter(|r| r["attempts"].as_u64() > Some(1))
        .count();
    println!("{moved} tasks finished on a second attempt after agent-1 died");

    // The database holds the same, once each: a resume runs nothing and writes it all again.
    let (status, _, err) = outcome(batch.command(true).output().unwrap());
    assert_eq!(status, Some(0), "{err}");
    assert!(err.contains("300 tasks, 0 to run"), "{err}");
    batch.assert_complete(300);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_rides_out_a_coordinator_restart() {
    let mut cluster = Cluster::start(2, 4, &[]).await;
    let dir = tempfile::tempdir().unwrap();
    let batch = Batch::new(cluster.url(), dir.path(), 60);
    let run = batch.start(false);
    batch.wait_for(15);
    cluster.restart_coordinator();
    let (status, _, err) = outcome(run.wait_with_output().unwrap());
    assert_eq!(status, Some(0), "{err}");
    batch.assert_complete(60);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tasks_are_named_and_a_failing_task_is_recorded_as_failed() {
    let cluster = Cluster::start(1, 4, &[]).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tasks.jsonl");
    std::fs::write(
        &file,
        "{\"id\": 1, \"lang\": \"python\", \"code\": \"print(1)\"}\n{\"id\": 2, \"lang\": \"cobol\", \"code\": \"x\"}\n",
    )
    .unwrap();
    let batch = |args: &[&str]| {
        let mut command = Command::new(binary("coordinator"));
        command.args(["batch", "--addr", &cluster.url(), "--db"]);
        command
            .arg(dir.path().join("b.sqlite"))
            .args(args)
            .arg(&file);
        outcome(command.output().unwrap())
    };
    let (status, _, err) = batch(&[]);
    assert_eq!(status, Some(2), "{err}");
    assert!(err.contains("line 2: unknown language 'cobol'"), "{err}");

    std::fs::write(
        &file,
        "{\"id\": 1, \"lang\": \"python\", \"code\": \"print(1)\"}\n{\"id\": 2, \"lang\": \"bash\", \"code\": \"echo no >&2; exit 3\"}\n",
    )
    .unwrap();
    let (status, out, err) = batch(&[]);
    assert_eq!(status, Some(1), "{err}");
    let results: HashMap<String, Value> = out
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .map(|v| (v["id"].as_str().unwrap().to_string(), v))
        .collect();
    assert_eq!(results["1"]["stdout"], "1\n");
    let failed = &results["2"];
    assert_eq!(
        (&failed["status"], &failed["exit_code"], &failed["stderr"]),
        (
            &Value::from("nonzero_exit"),
            &Value::from(3),
            &Value::from("no\n")
        )
    );
}

/// The names of the sessions the coordinator holds.
async fn sessions(cluster: &Cluster) -> Vec<String> {
    let listed = cluster.sessions().await;
    listed.into_iter().map(|s| s.name).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_in_warm_sessions_closes_them_when_interrupted_and_when_done() {
    let cluster = Cluster::start(2, 4, &[]).await;
    let dir = tempfile::tempdir().unwrap();
    let batch = Batch::new(cluster.url(), dir.path(), 60);
    let warm = |resume: bool| {
        let mut command = batch.command(resume);
        command.args(["--sessions", "3"]);
        command
    };

    // Interrupted while every session holds a task: none is left open.
    let run = warm(false)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    batch.wait_for(10);
    assert!(!sessions(&cluster).await.is_empty(), "no warm session");
    signal_child(&run, signal::Signal::SIGINT);
    let (status, _, err) = outcome(run.wait_with_output().unwrap());
    assert_eq!(status, Some(130), "{err}");
    assert_eq!(sessions(&cluster).await, Vec::<String>::new());

    let (status, _, err) = outcome(warm(true).output().unwrap());
    assert_eq!(status, Some(0), "{err}");
    batch.assert_complete(60);
    assert_eq!(sessions(&cluster).await, Vec::<String>::new());
}
