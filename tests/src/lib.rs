//! Harness for tests that run the real `node-agent` and `coordinator` binaries: start them on
//! ports the OS picks, read the address they report, signal them, and clean up on drop.
//!
//! The binaries come from the same cargo target directory as the test. Cargo builds a package's
//! binaries when its integration tests are selected, and both `node-agent` and `coordinator`
//! have some, so `cargo test --workspace` builds both before any test runs.
//!
//! LLM backends for inference tests: [`LlamaServer`] runs llama.cpp's real server with a tiny
//! model, and [`ScriptedBackend`] is an OpenAI-compatible server whose answers and failures a
//! test chooses in advance; [`InferenceCluster`] puts a coordinator and agents in front of them.

pub mod bench;
mod inference_cluster;
pub mod lan;
mod scripted_backend;
pub mod tls_cluster;

pub use inference_cluster::InferenceCluster;
pub use scripted_backend::{ScriptedBackend, Step};

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use kowalski_exo_common::proto::{
    ClusterExecuteRequest, ClusterSessionExecuteRequest, ClusterSessionInfo, DescribeRequest,
    ExecStatus, ExecuteRequest, ListNodesRequest, ListSessionsRequest, NodeDescription, NodeInfo,
    SessionExecuteRequest, SessionMoved, cluster_event::Event,
    coordinator_client::CoordinatorClient, node_agent_client::NodeAgentClient,
};
use nix::{sys::signal::Signal, unistd::Pid};
use tonic::transport::Channel;

/// Generous ceiling for anything a test waits on; only catches hangs.
pub const CEILING: Duration = Duration::from_secs(30);

/// Path of a workspace binary next to the running test executable.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("test executable lives in target/<profile>/deps");
    let path = profile_dir.join(name);
    assert!(
        path.exists(),
        "{} is not built; run `cargo test --workspace` (or `cargo build --workspace`) first",
        path.display()
    );
    path
}

/// A running binary whose stderr is collected line by line.
pub struct Daemon {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
    /// The address it reported listening on.
    pub addr: SocketAddr,
}

impl Daemon {
    /// Starts `bin` and waits until it logs `ready` followed by `addr=HOST:PORT`.
    pub fn start(bin: &str, args: &[&str], env: &[(&str, &str)], ready: &str) -> Daemon {
        Self::start_as(None, bin, args, env, ready)
    }

    /// [`Daemon::start`], as the user `uid` when given (the test must be root).
    pub fn start_as(
        uid: Option<u32>,
        bin: &str,
        args: &[&str],
        env: &[(&str, &str)],
        ready: &str,
    ) -> Daemon {
        let mut command = Command::new(binary(bin));
        if let Some(uid) = uid {
            std::os::unix::process::CommandExt::uid(&mut command, uid);
            std::os::unix::process::CommandExt::gid(&mut command, uid);
        }
        Self::launch(command, bin, args, env, Some(ready))
    }

    /// Starts `bin` in the network namespace `netns` (a host of a [`lan::Lan`]); waits for
    /// `ready` as [`Daemon::start`] does, or not at all without it (its `addr` is then
    /// unspecified).
    pub fn start_in(netns: &lan::Host, bin: &str, args: &[&str], ready: Option<&str>) -> Daemon {
        let mut command = Command::new(binary(bin));
        netns.enter_on_exec(&mut command);
        Self::launch(command, bin, args, &[], ready)
    }

    fn launch(
        mut command: Command,
        bin: &str,
        args: &[&str],
        env: &[(&str, &str)],
        ready: Option<&str>,
    ) -> Daemon {
        command
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (key, value) in env {
            command.env(key, value);
        }
        let mut child = command.spawn().expect("spawn binary");
        let log = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        let Some(ready) = ready else {
            return Daemon {
                child,
                log,
                addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            };
        };
        let start = Instant::now();
        let addr = loop {
            let found = log
                .lock()
                .unwrap()
                .iter()
                .find_map(|line| logged_addr(line, ready));
            if let Some(addr) = found {
                break addr;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("{bin} exited with {status}: {:?}", log.lock().unwrap());
            }
            assert!(start.elapsed() < CEILING, "{bin} never logged '{ready}'");
            std::thread::sleep(Duration::from_millis(20));
        };
        Daemon { child, log, addr }
    }

    /// The address logged on a line containing `marker`, as `addr=HOST:PORT`.
    pub fn logged_addr(&self, marker: &str) -> SocketAddr {
        let mut found = None;
        eventually(&format!("a line with '{marker}' and addr="), || {
            found = self.log().iter().find_map(|line| logged_addr(line, marker));
            found.is_some()
        });
        found.unwrap()
    }

    /// `http://ADDR`, for gRPC clients.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, signal: Signal) {
        nix::sys::signal::kill(Pid::from_raw(self.pid()), signal).expect("signal daemon");
    }

    /// Waits for the process to exit, within the ceiling.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("wait daemon") {
                return status;
            }
            assert!(
                start.elapsed() < CEILING,
                "daemon did not exit: {:?}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Everything it logged so far.
    pub fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `addr=HOST:PORT` of a log line containing `marker`.
fn logged_addr(line: &str, marker: &str) -> Option<SocketAddr> {
    if !line.contains(marker) {
        return None;
    }
    let rest = &line[line.find("addr=")? + 5..];
    rest.split_whitespace().next()?.parse().ok()
}

/// A connection to the gRPC server at `url`, dialled as the binaries dial each other.
pub async fn channel(url: &str) -> Result<Channel, tonic::transport::Error> {
    kowalski_exo_common::transport::endpoint(url, None)?
        .connect()
        .await
}

/// An agent's `Describe` answer.
pub async fn describe(url: &str) -> NodeDescription {
    let mut client = NodeAgentClient::new(
        channel(url)
            .await
            .unwrap_or_else(|e| panic!("cannot connect to {url}: {e}")),
    );
    client
        .describe(DescribeRequest {})
        .await
        .expect("Describe failed")
        .into_inner()
}

/// What one execution in a cluster session printed and came to.
#[derive(Debug, Default)]
pub struct SessionRun {
    pub stdout: String,
    /// The status it finished with; `None` when no attempt could finish.
    pub status: Option<ExecStatus>,
    /// The `session_moved` events on the way.
    pub moves: Vec<SessionMoved>,
}

/// Runs code in the named session (opened on first use) through the coordinator, to its end.
pub async fn run_in_session(
    client: &mut CoordinatorClient<Channel>,
    session: &str,
    language: &str,
    code: &str,
) -> SessionRun {
    let mut stream = client
        .execute_in_session(ClusterSessionExecuteRequest {
            execution: Some(SessionExecuteRequest {
                session_id: session.into(),
                language: language.into(),
                code: code.into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect("ExecuteInSession")
        .into_inner();
    let mut run = SessionRun::default();
    while let Some(event) = stream.message().await.expect("the session's stream failed") {
        match event.event {
            Some(Event::Output(o)) => run
                .stdout
                .push_str(&String::from_utf8_lossy(&o.chunk.unwrap_or_default().data)),
            Some(Event::SessionMoved(moved)) => run.moves.push(moved),
            Some(Event::Finished(f)) => run.status = f.result.map(|r| r.status()),
            _ => {}
        }
    }
    run
}

/// A `Coordinator.Execute` request for Python code.
pub fn python_request(code: &str) -> ClusterExecuteRequest {
    ClusterExecuteRequest {
        execution: Some(ExecuteRequest {
            language: "python".into(),
            code: code.into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A coordinator and agents, each a real process on loopback.
pub struct Cluster {
    pub coordinator: Daemon,
    /// What `coordinator serve` was given besides its addresses.
    coordinator_args: Vec<String>,
    /// Agents named `agent-0`, `agent-1`, ...
    pub agents: Vec<Daemon>,
    pub port: u16,
    dirs: tempfile::TempDir,
}

impl Cluster {
    /// Starts a coordinator and `agents` agents (each with `capacity` slots and `env` added to
    /// its environment), and waits until every agent is ready.
    pub async fn start(agents: usize, capacity: usize, env: &[(&str, &str)]) -> Cluster {
        Cluster::start_with(agents, capacity, env, &[]).await
    }

    /// The same, with `coordinator_args` added to `coordinator serve`'s (kept for restarts).
    pub async fn start_with(
        agents: usize,
        capacity: usize,
        env: &[(&str, &str)],
        coordinator_args: &[&str],
    ) -> Cluster {
        let port = free_port();
        let coordinator_args: Vec<String> =
            coordinator_args.iter().map(|a| a.to_string()).collect();
        let coordinator = start_coordinator(port, &coordinator_args);
        let dirs = tempfile::tempdir().expect("temp dir");
        let agents = (0..agents)
            .map(|i| start_agent(port, i, capacity, dirs.path(), env))
            .collect();
        let cluster = Cluster {
            coordinator,
            coordinator_args,
            agents,
            port,
            dirs,
        };
        for i in 0..cluster.agents.len() {
            cluster.wait_for_state(&format!("agent-{i}"), "ready").await;
        }
        cluster
    }

    /// `http://127.0.0.1:PORT` of the coordinator.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// `http://ADDR` of the coordinator's HTTP API.
    pub fn http_url(&self) -> String {
        format!(
            "http://{}",
            self.coordinator.logged_addr("http api listening")
        )
    }

    /// The coordinator's `/metrics`, as Prometheus would scrape it.
    pub async fn metrics(&self) -> String {
        reqwest::get(format!("{}/metrics", self.http_url()))
            .await
            .and_then(|r| r.error_for_status())
            .expect("GET /metrics")
            .text()
            .await
            .expect("the metrics body")
    }

    pub async fn client(&self) -> CoordinatorClient<Channel> {
        CoordinatorClient::new(
            channel(&self.url())
                .await
                .expect("connect to the coordinator"),
        )
    }

    /// Every node as the coordinator lists it (empty while the coordinator is unreachable).
    pub async fn nodes(&self) -> Vec<NodeInfo> {
        match channel(&self.url()).await {
            Ok(channel) => CoordinatorClient::new(channel)
                .list_nodes(ListNodesRequest {})
                .await
                .map(|r| r.into_inner().nodes)
                .unwrap_or_default(),
            Err(_) => Vec::new(),
        }
    }

    /// Every named session the coordinator holds.
    pub async fn sessions(&self) -> Vec<ClusterSessionInfo> {
        self.client()
            .await
            .list_sessions(ListSessionsRequest {})
            .await
            .expect("ListSessions")
            .into_inner()
            .sessions
    }

    /// The state of the node called `name`, if listed.
    pub async fn state_of(&self, name: &str) -> Option<String> {
        self.nodes()
            .await
            .into_iter()
            .find(|n| n.name == name)
            .map(|n| n.state)
    }

    /// Polls until the node is in `state`; returns how long that took.
    pub async fn wait_for_state(&self, name: &str, state: &str) -> Duration {
        let start = Instant::now();
        loop {
            if self.state_of(name).await.as_deref() == Some(state) {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < CEILING,
                "{name} not {state} within {CEILING:?}: {:?}",
                self.nodes()
                    .await
                    .iter()
                    .map(|n| (&n.name, &n.state))
                    .collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Replaces the coordinator with a fresh process on the same port.
    pub fn restart_coordinator(&mut self) {
        self.coordinator.signal(Signal::SIGKILL);
        self.coordinator.wait_exit();
        self.coordinator = start_coordinator(self.port, &self.coordinator_args);
    }

    /// The agent called `name`.
    pub fn agent(&self, name: &str) -> &Daemon {
        let index: usize = name
            .strip_prefix("agent-")
            .and_then(|i| i.parse().ok())
            .unwrap_or_else(|| panic!("no agent called {name}"));
        &self.agents[index]
    }

    /// Where agents keep their work directories.
    pub fn work_root(&self) -> &std::path::Path {
        self.dirs.path()
    }
}

fn start_coordinator(port: u16, extra: &[String]) -> Daemon {
    let listen = format!("127.0.0.1:{port}");
    let mut args = vec!["serve", "--listen", &listen, "--http", "127.0.0.1:0"];
    args.extend(extra.iter().map(String::as_str));
    Daemon::start("coordinator", &args, &[], "coordinator listening")
}

fn start_agent(
    port: u16,
    index: usize,
    capacity: usize,
    work_root: &std::path::Path,
    env: &[(&str, &str)],
) -> Daemon {
    let coordinator = format!("http://127.0.0.1:{port}");
    let name = format!("agent-{index}");
    let work = work_root.join(&name);
    let capacity = capacity.to_string();
    Daemon::start(
        "node-agent",
        &[
            "--coordinator",
            &coordinator,
            "--listen",
            "127.0.0.1:0",
            "--name",
            &name,
            "--capacity",
            &capacity,
            "--work-dir",
            work.to_str().expect("UTF-8 temp path"),
        ],
        env,
        "node agent listening",
    )
}

/// The real executable behind a tool on PATH (past pyenv-style shims).
pub fn real_executable(tool: &str) -> std::path::PathBuf {
    let probe = match tool {
        "python3" => "import sys; print(sys.executable)",
        _ => "",
    };
    if probe.is_empty() {
        let found = std::env::split_paths(&std::env::var_os("PATH").unwrap())
            .map(|d| d.join(tool))
            .find(|p| p.exists())
            .unwrap_or_else(|| panic!("{tool} not on PATH"));
        return std::fs::canonicalize(found).unwrap();
    }
    let output = Command::new(tool).args(["-c", probe]).output().unwrap();
    String::from_utf8(output.stdout).unwrap().trim().into()
}

/// A finished command's exit code, stdout and stderr (as text).
pub fn outcome(output: std::process::Output) -> (Option<i32>, String, String) {
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// A real OpenAI-compatible LLM server: llama.cpp's, from the `llama-cpp-python` package,
/// serving the tiny random-weight model `tests/fixtures/tiny_model.py` writes. Killed on drop.
pub struct LlamaServer {
    child: Child,
    /// The API base the OpenAI SDK takes, `http://127.0.0.1:PORT/v1`.
    pub api_base: String,
    _dir: tempfile::TempDir,
}

impl LlamaServer {
    /// The model name it serves.
    pub const MODEL: &'static str = "tiny";

    /// Starts the server with a 512-token window, or says why it cannot (`llama_cpp.server`
    /// not installed).
    pub fn start() -> Result<LlamaServer, String> {
        Self::start_with_window(512)
    }

    /// The same with a window of `tokens` (the tiny model's vocabulary is bytes: a token a
    /// byte).
    pub fn start_with_window(tokens: u32) -> Result<LlamaServer, String> {
        let installed = Command::new("python3")
            .args(["-c", "import llama_cpp.server, gguf"])
            .output()
            .is_ok_and(|o| o.status.success());
        if !installed {
            return Err(
                "llama-cpp-python[server] and gguf are not installed (.ci/run installs them)"
                    .into(),
            );
        }
        let dir = tempfile::tempdir().expect("temp dir");
        let model = dir.path().join("tiny.gguf");
        let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/tiny_model.py");
        let written = Command::new("python3")
            .arg(fixture)
            .arg(&model)
            .status()
            .expect("run the model fixture");
        assert!(written.success(), "tiny_model.py failed");
        let port = free_port();
        let child = Command::new("python3")
            .args(["-m", "llama_cpp.server", "--model"])
            .arg(&model)
            .args([
                "--model_alias",
                Self::MODEL,
                "--host",
                "127.0.0.1",
                "--n_ctx",
                &tokens.to_string(),
            ])
            .args(["--port", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.path().join("access.log")).expect("log file"))
            .stderr(std::fs::File::create(dir.path().join("server.log")).expect("log file"))
            .spawn()
            .expect("start llama_cpp.server");
        let server = LlamaServer {
            child,
            api_base: format!("http://127.0.0.1:{port}/v1"),
            _dir: dir,
        };
        eventually("llama_cpp.server answers", || {
            http_get(port, "/v1/models").is_some_and(|body| body.contains(Self::MODEL))
        });
        Ok(server)
    }

    /// What the server logged.
    pub fn log(&self) -> String {
        ["access.log", "server.log"]
            .map(|f| std::fs::read_to_string(self._dir.path().join(f)).unwrap_or_default())
            .join("\n")
    }

    /// Kills it, as a backend that dies.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for LlamaServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The body of a plain HTTP GET on loopback, if it answers.
fn http_get(port: u16, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    Some(response.split_once("\r\n\r\n")?.1.to_string())
}

/// A port that was free a moment ago, for a server that must start after its clients.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral port")
}

/// True while the process exists and is not a zombie.
pub fn process_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat[stat.rfind(')').unwrap() + 1..]
                .split_whitespace()
                .next()
                .unwrap_or("");
            state != "Z" && state != "X"
        }
        Err(_) => false,
    }
}

/// A containment test that cannot run on this machine (no root, no cgroups): says why, and
/// fails under CI (`CI=true`), where every containment test must run rather than pass vacuously.
pub fn cannot_contain_here(reason: &str) {
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "under CI every containment test must run: {reason}"
    );
    println!("skipped: {reason}");
}

/// Polls `condition` every 20 ms until it holds, failing after the ceiling.
pub fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let start = Instant::now();
    while !condition() {
        assert!(start.elapsed() < CEILING, "{what}: not within {CEILING:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}
