//! Shared helpers for the node agent's integration tests: an in-process agent on a port the OS
//! picks, a client, and a record of one run's events.

#![allow(dead_code)]

use std::{future::Future, path::PathBuf, time::Duration};

use kowalski_exo_common::proto::{
    DescribeRequest, ExecEvent, ExecFinished, ExecStarted, ExecStatus, ExecuteRequest,
    IsolationLevel, OutputChunk, OutputStream, exec_event::Event,
    node_agent_client::NodeAgentClient,
};
use kowalski_exo_node_agent::{AgentConfig, RunningAgent, exec::ExecDirs};
use tempfile::TempDir;
use tonic::{Status, Streaming, transport::Channel};

pub use kowalski_exo_tests::process_alive;

/// An agent running inside the test process.
pub struct TestAgent {
    pub agent: RunningAgent,
    pub client: NodeAgentClient<Channel>,
    pub work_root: PathBuf,
    _dirs: TempDir,
}

/// Starts an agent on 127.0.0.1:0 with its own work and cache directories.
pub async fn start_agent(configure: impl FnOnce(&mut AgentConfig)) -> TestAgent {
    let dirs = tempfile::tempdir().unwrap();
    let work_root = dirs.path().join("work");
    let mut config = AgentConfig {
        listen: "127.0.0.1:0".into(),
        coordinator: None,
        dirs: ExecDirs {
            work_root: work_root.clone(),
            cache_dir: dirs.path().join("cache"),
        },
        ..AgentConfig::default()
    };
    configure(&mut config);
    let agent = kowalski_exo_node_agent::start(config).await.unwrap();
    let client = NodeAgentClient::connect(format!("http://{}", agent.addr))
        .await
        .unwrap();
    TestAgent {
        agent,
        client,
        work_root,
        _dirs: dirs,
    }
}

impl TestAgent {
    /// The isolation level the agent reached.
    pub async fn isolation(&mut self) -> IsolationLevel {
        self.client
            .describe(DescribeRequest {})
            .await
            .unwrap()
            .into_inner()
            .isolation()
    }
}

/// Reads events until the first output chunk, and parses it as a pid the program printed.
pub async fn first_printed_pid(stream: &mut Streaming<ExecEvent>) -> i32 {
    loop {
        let event = stream.message().await.unwrap().expect("stream ended first");
        if let Some(Event::Output(chunk)) = event.event {
            return String::from_utf8_lossy(&chunk.data).trim().parse().unwrap();
        }
    }
}

/// Everything one run sent.
#[derive(Debug, Default)]
pub struct RunRecord {
    pub started: Vec<ExecStarted>,
    pub chunks: Vec<OutputChunk>,
    pub finished: Option<ExecFinished>,
}

impl RunRecord {
    pub fn output(&self, stream: OutputStream) -> Vec<u8> {
        self.chunks
            .iter()
            .filter(|c| c.stream == stream as i32)
            .flat_map(|c| c.data.iter().copied())
            .collect()
    }

    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.output(OutputStream::Stdout)).into_owned()
    }

    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.output(OutputStream::Stderr)).into_owned()
    }

    pub fn finished(&self) -> &ExecFinished {
        self.finished
            .as_ref()
            .expect("the run sent no finished event")
    }

    pub fn status(&self) -> ExecStatus {
        self.finished().status()
    }

    /// The pid the program printed on its first stdout line.
    pub fn printed_pid(&self) -> i32 {
        self.stdout()
            .lines()
            .next()
            .and_then(|l| l.trim().parse().ok())
            .unwrap_or_else(|| panic!("no pid printed; stdout: {:?}", self.stdout()))
    }
}

/// Runs a request to its end and records its events in order.
pub async fn execute(
    client: &mut NodeAgentClient<Channel>,
    request: ExecuteRequest,
) -> Result<RunRecord, Status> {
    let stream = client.execute(request).await?.into_inner();
    collect(stream).await
}

pub async fn collect(mut stream: Streaming<ExecEvent>) -> Result<RunRecord, Status> {
    let mut record = RunRecord::default();
    let ceiling = Duration::from_secs(120);
    while let Some(event) = tokio::time::timeout(ceiling, stream.message())
        .await
        .expect("the run did not end within 120 s")?
    {
        match event.event {
            Some(Event::Started(s)) => record.started.push(s),
            Some(Event::Output(c)) => {
                assert!(record.finished.is_none(), "output after finished");
                assert_eq!(
                    c.seq,
                    record.chunks.len() as u64,
                    "sequence numbers in order"
                );
                record.chunks.push(c)
            }
            Some(Event::Finished(f)) => record.finished = Some(f),
            None => panic!("empty event"),
        }
    }
    Ok(record)
}

pub fn request(language: &str, code: &str) -> ExecuteRequest {
    ExecuteRequest {
        language: language.into(),
        code: code.into(),
        ..Default::default()
    }
}

/// Polls `condition` until it holds or the generous ceiling passes.
pub async fn eventually<F, Fut>(what: &str, condition: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = bool>,
{
    let ceiling = Duration::from_secs(20);
    let start = tokio::time::Instant::now();
    while !condition().await {
        assert!(start.elapsed() < ceiling, "{what}: not within {ceiling:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
