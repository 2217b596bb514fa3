//! Attacks from inside executed code, through the real `node-agent` binary running as root: each
//! test asserts the attack is contained, the agent survives, and the next run succeeds.
//!
//! These need root (and the layers root gives). Without it they print why and pass, except under
//! CI (`CI=true`), where a containment test that cannot run fails instead.

use std::{
    net::TcpListener,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};

use kowalski_exo_common::proto::{
    ExecFinished, ExecLimits, ExecStatus, ExecuteRequest, IsolationLayer, exec_event::Event,
    node_agent_client::NodeAgentClient,
};
use kowalski_exo_tests::{
    CEILING, Daemon, binary, cannot_contain_here, describe, eventually, outcome, process_alive,
};
use tempfile::TempDir;

const AGENT_READY: &str = "node agent listening";
const SECRET: &str = "hunter2-agent-secret";

/// An agent binary with a secret in its environment and a key file in its data directory.
struct Target {
    agent: Daemon,
    dirs: TempDir,
}

impl Target {
    /// Starts the agent, or says why it cannot (None) when not root outside CI.
    async fn start(extra: &[&str]) -> Option<Target> {
        if !nix::unistd::geteuid().is_root() {
            cannot_contain_here(
                "the attack suite needs root (a user, network and mount layer per run)",
            );
            return None;
        }
        let dirs = tempfile::tempdir().unwrap();
        let data = dirs.path().join("data");
        std::fs::create_dir(&data).unwrap();
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700)).unwrap();
        let key = data.join("node.key");
        std::fs::write(&key, "-----BEGIN PRIVATE KEY----- secret").unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        let mut args = standalone_args(dirs.path(), &data);
        args.extend(extra.iter().map(|a| a.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let agent = Daemon::start(
            "node-agent",
            &args,
            &[("SECRET_TOKEN", SECRET)],
            AGENT_READY,
        );
        let target = Target { agent, dirs };
        let layers: Vec<IsolationLayer> = describe(&target.agent.url())
            .await
            .isolation_layers()
            .collect();
        for layer in [
            IsolationLayer::Cgroup,
            IsolationLayer::User,
            IsolationLayer::Network,
            IsolationLayer::Mount,
            IsolationLayer::Landlock,
        ] {
            assert!(
                layers.contains(&layer),
                "running as root, the agent should have the {layer:?} layer: {:?}",
                target.agent.log()
            );
        }
        Some(target)
    }

    fn data_dir(&self) -> PathBuf {
        self.dirs.path().join("data")
    }

    fn cache_dir(&self) -> PathBuf {
        self.dirs.path().join("cache")
    }

    fn work_dir(&self) -> PathBuf {
        self.dirs.path().join("work")
    }

    async fn run(&self, request: ExecuteRequest) -> Ran {
        run(&self.agent.url(), request).await
    }

    async fn python(&self, code: &str, args: &[&str]) -> Ran {
        self.run(python(code, args)).await
    }

    /// The agent lives on, and a plain run right after the attack works.
    async fn survived(&self) {
        assert!(process_alive(self.agent.pid()), "the agent died");
        let after = self.python("print('still here')", &[]).await;
        assert_eq!(after.stdout, "still here\n", "{}", after.stderr);
    }
}

/// A standalone agent on loopback with its work and cache directories under `dir`.
fn standalone_args(dir: &Path, data: &Path) -> Vec<String> {
    let path = |p: &Path| p.to_str().unwrap().to_string();
    vec![
        "--standalone".into(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--work-dir".into(),
        path(&dir.join("work")),
        "--cache-dir".into(),
        path(&dir.join("cache")),
        "--data-dir".into(),
        path(data),
    ]
}

fn python(code: &str, args: &[&str]) -> ExecuteRequest {
    ExecuteRequest {
        language: "python".into(),
        code: code.into(),
        args: args.iter().map(|a| a.to_string()).collect(),
        ..Default::default()
    }
}

/// What a run printed and how it ended.
struct Ran {
    stdout: String,
    stderr: String,
    finished: ExecFinished,
}

async fn run(url: &str, request: ExecuteRequest) -> Ran {
    let mut client = NodeAgentClient::connect(url.to_string()).await.unwrap();
    let mut stream = client.execute(request).await.unwrap().into_inner();
    let (mut stdout, mut stderr, mut finished) = (Vec::new(), Vec::new(), None);
    while let Some(event) = tokio::time::timeout(CEILING, stream.message())
        .await
        .expect("run hung")
        .unwrap()
    {
        match event.event {
            Some(Event::Output(chunk)) if chunk.stream == 2 => stderr.extend(chunk.data),
            Some(Event::Output(chunk)) => stdout.extend(chunk.data),
            Some(Event::Finished(f)) => finished = Some(f),
            _ => {}
        }
    }
    Ran {
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
        finished: finished.expect("no finished event"),
    }
}

/// Python that tries each named attempt and prints `name: ok` or `name: ErrorName`.
const TRY: &str = r#"
import os, sys
def attempt(name, action):
    try:
        action()
        print(f"{name}: ok", flush=True)
    except Exception as e:
        print(f"{name}: {type(e).__name__}", flush=True)
"#;

#[tokio::test]
async fn the_agents_environment_memory_and_signals_are_out_of_reach() {
    let Some(t) = Target::start(&[]).await else {
        return;
    };
    let agent = t.agent.pid().to_string();
    let code = format!(
        r#"{TRY}
agent = int(sys.argv[1])
print("env:", os.environ.get("SECRET_TOKEN", "absent"))
attempt("environ", lambda: open(f"/proc/{{agent}}/environ", "rb").read())
attempt("mem", lambda: open(f"/proc/{{agent}}/mem", "rb").read(1))
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
def ptrace():
    if libc.ptrace(16, agent, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "ptrace")
attempt("ptrace", ptrace)
attempt("kill", lambda: os.kill(agent, 9))
attempt("kill-all", lambda: os.kill(-1, 9))
print("visible:", sorted(p for p in os.listdir("/proc") if p.isdigit()) == [str(os.getpid())])
"#
    );
    let ran = t.python(&code, &[&agent]).await;
    let lines: Vec<&str> = ran.stdout.lines().collect();
    assert_eq!(lines.len(), 7, "{}{}", ran.stdout, ran.stderr);
    assert_eq!(lines[0], "env: absent");
    for line in &lines[1..5] {
        assert!(!line.ends_with(": ok"), "an attempt succeeded: {line}");
    }
    // kill(-1) reaches only the run's own processes, never the agent.
    assert!(lines[5].starts_with("kill-all: "), "{}", lines[5]);
    assert_eq!(lines[6], "visible: True", "other processes show in /proc");
    t.survived().await;
}

#[tokio::test]
async fn host_secrets_and_the_agents_files_cannot_be_read_even_through_symlinks() {
    let Some(t) = Target::start(&[]).await else {
        return;
    };
    let key = t.data_dir().join("node.key");
    let code = format!(
        r#"{TRY}
os.symlink("/etc/shadow", "shadow")
os.symlink(sys.argv[1], "key")
os.symlink("/etc", "etc")
attempt("shadow", lambda: open("/etc/shadow").read())
attempt("shadow-link", lambda: open("shadow").read())
attempt("key", lambda: open(sys.argv[1]).read())
attempt("key-link", lambda: open("key").read())
attempt("data-dir", lambda: os.listdir(sys.argv[2]))
attempt("cache-dir", lambda: os.listdir(sys.argv[3]))
attempt("write-etc-link", lambda: open("etc/kowalski-was-here", "w").write("x"))
attempt("root-home", lambda: os.listdir("/root/.ssh"))
"#
    );
    let ran = t
        .python(
            &code,
            &[
                key.to_str().unwrap(),
                t.data_dir().to_str().unwrap(),
                t.cache_dir().to_str().unwrap(),
            ],
        )
        .await;
    for line in ran.stdout.lines() {
        assert!(
            !line.ends_with(": ok"),
            "an attempt succeeded: {line}\n{}",
            ran.stdout
        );
    }
    assert_eq!(
        ran.stdout.lines().count(),
        8,
        "{}{}",
        ran.stdout,
        ran.stderr
    );
    assert!(!Path::new("/etc/kowalski-was-here").exists());
    t.survived().await;
}

/// Python that gets (`create`) or looks up a System V shared memory segment by a fixed key.
fn sysv_segment(create: bool) -> String {
    let flags = if create { "0o1000 | 0o666" } else { "0" };
    format!(
        "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nid = libc.shmget(0x4b584c, 4096, {flags})\nprint('segment', 'found' if id >= 0 else 'absent')\n"
    )
}

#[tokio::test]
async fn shared_memory_and_host_sockets_stay_out_of_reach() {
    let Some(t) = Target::start(&[]).await else {
        return;
    };
    let ran = t.python(&sysv_segment(true), &[]).await;
    assert_eq!(ran.stdout, "segment found\n", "{}", ran.stderr);
    let ran = t.python(&sysv_segment(false), &[]).await;
    assert_eq!(
        ran.stdout, "segment absent\n",
        "a later run met the segment"
    );
    // The host's service sockets (/run/dbus/...) are not there for a run without network.
    let ran = t
        .python(
            "import os\nprint(sorted(p for p, _, files in os.walk('/run') for f in files if f.endswith('.sock') or 'bus' in f))",
            &[],
        )
        .await;
    assert_eq!(ran.stdout, "[]\n", "{}", ran.stderr);
    t.survived().await;
}

#[tokio::test]
async fn temp_files_stay_inside_the_run_that_wrote_them() {
    let Some(t) = Target::start(&[]).await else {
        return;
    };
    let marker = format!("kowalski-leak-{}", std::process::id());
    let write = format!(
        r#"{TRY}
for d in ("/tmp", "/var/tmp", "/dev/shm"):
    attempt(d, lambda: open(f"{{d}}/{marker}", "w").write("left behind"))
"#
    );
    let ran = t.python(&write, &[]).await;
    assert_eq!(
        ran.stdout, "/tmp: ok\n/var/tmp: ok\n/dev/shm: ok\n",
        "a run may use its temp directories: {}",
        ran.stderr
    );
    let read = format!(
        r#"
import os
print([d for d in ("/tmp", "/var/tmp", "/dev/shm") if os.path.exists(f"{{d}}/{marker}")])
"#
    );
    let ran = t.python(&read, &[]).await;
    assert_eq!(ran.stdout, "[]\n", "{}", ran.stderr);
    for dir in ["/tmp", "/var/tmp", "/dev/shm"] {
        assert!(
            !Path::new(dir).join(&marker).exists(),
            "the host's {dir} got the file"
        );
    }
    t.survived().await;
}

#[tokio::test]
async fn cgroup_limits_cannot_be_raised_nor_left() {
    let Some(t) = Target::start(&[]).await else {
        return;
    };
    let code = format!(
        r#"{TRY}
own = {{}}
for line in open("/proc/self/cgroup"):
    _, controllers, path = line.strip().split(":", 2)
    for c in controllers.split(","):
        own[c] = path
memory = "/sys/fs/cgroup/memory" + own["memory"]
pids = "/sys/fs/cgroup/pids" + own["pids"]
attempt("raise-memory", lambda: open(memory + "/memory.limit_in_bytes", "w").write(str(8 << 30)))
attempt("raise-pids", lambda: open(pids + "/pids.max", "w").write("max"))
attempt("move-to-parent", lambda: open(os.path.dirname(pids) + "/cgroup.procs", "w").write(str(os.getpid())))
attempt("nest", lambda: os.mkdir(pids + "/nested"))
print("limit", open(memory + "/memory.limit_in_bytes").read().strip())
"#
    );
    let ran = t.python(&code, &[]).await;
    let limit = (512u64 << 20).to_string();
    assert_eq!(
        ran.stdout,
        format!(
            "raise-memory: PermissionError\nraise-pids: PermissionError\nmove-to-parent: PermissionError\nnest: PermissionError\nlimit {limit}\n"
        ),
        "{}",
        ran.stderr
    );
    t.survived().await;
}

#[tokio::test]
async fn the_network_is_loopback_only_unless_the_owner_and_the_request_allow_it() {
    let Some(t) = Target::start(&[]).await else {
        return;
    };
    // A port on the host's loopback (as the coordinator's would be) and the agent's own port.
    let host = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = host.local_addr().unwrap().port().to_string();
    let agent_port = t.agent.addr.port().to_string();
    let code = format!(
        r#"{TRY}
import socket
for p in sys.argv[1:]:
    attempt(p, lambda: socket.create_connection(("127.0.0.1", int(p)), timeout=2).close())
attempt("outside", lambda: socket.create_connection(("192.0.2.1", 80), timeout=2).close())
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen()
attempt("own-loopback", lambda: socket.create_connection(s.getsockname(), timeout=2).close())
"#
    );
    let ran = t.python(&code, &[&port, &agent_port]).await;
    assert_eq!(
        ran.stdout,
        format!(
            "{port}: ConnectionRefusedError\n{agent_port}: ConnectionRefusedError\noutside: OSError\nown-loopback: ok\n"
        ),
        "{}",
        ran.stderr
    );
    // The caller alone cannot turn the network on.
    let mut asked = python(&code, &[&port]);
    asked.network = true;
    let mut client = NodeAgentClient::connect(t.agent.url()).await.unwrap();
    let refused = client.execute(asked.clone()).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert!(
        refused.message().contains("--allow-network"),
        "{}",
        refused.message()
    );
    t.survived().await;

    // With the owner's consent and the request asking, the host's port answers.
    let Some(open) = Target::start(&["--allow-network"]).await else {
        return;
    };
    assert!(describe(&open.agent.url()).await.allows_network);
    let ran = open.run(asked).await;
    assert!(
        ran.stdout.starts_with(&format!("{port}: ok\n")),
        "{}{}",
        ran.stdout,
        ran.stderr
    );
    // Without asking, a run on that agent is still cut off.
    let ran = open.python(&code, &[&port]).await;
    assert!(
        ran.stdout
            .starts_with(&format!("{port}: ConnectionRefusedError\n")),
        "{}",
        ran.stdout
    );
}

#[tokio::test]
async fn a_disk_fill_stops_at_the_runs_cap_with_enospc() {
    let Some(t) = Target::start(&[]).await else {
        return;
    };
    let code = r#"
import errno, os
chunk = b"x" * (8 << 20)
written = 0
try:
    for i in range(64):
        with open(f"/tmp/fill-{i}", "wb") as f:
            for _ in range(4):
                f.write(chunk)
                written += len(chunk)
    print("no cap", written)
except OSError as e:
    print(errno.errorcode[e.errno], written >> 20)
"#;
    let mut request = python(code, &[]);
    request.limits = Some(ExecLimits {
        disk_bytes: 64 << 20,
        memory_bytes: 1 << 30,
        ..Default::default()
    });
    let ran = t.run(request).await;
    let (code, mib) = ran.stdout.trim().split_once(' ').unwrap();
    assert_eq!(code, "ENOSPC", "{}{}", ran.stdout, ran.stderr);
    let mib: u64 = mib.parse().unwrap();
    assert!((48..=64).contains(&mib), "stopped after {mib} MiB");
    t.survived().await;
}

#[tokio::test]
async fn concurrent_runs_cannot_read_each_others_files_nor_replace_cached_programs() {
    let Some(t) = Target::start(&[]).await else {
        return;
    };
    // A compiled program lands in the build cache.
    let c = ExecuteRequest {
        language: "c".into(),
        code: "#include <stdio.h>\nint main(void){puts(\"genuine\");return 0;}\n".into(),
        ..Default::default()
    };
    let ran = t.run(c.clone()).await;
    assert_eq!(ran.stdout, "genuine\n", "{}", ran.stderr);
    let victim = t.python(
        "import os, time\nopen('secret.txt', 'w').write('private')\nprint(os.getcwd(), flush=True)\ntime.sleep(3)",
        &[],
    );
    let attacker = async {
        let work = t.work_dir();
        let cache = t.cache_dir().join("builds");
        let mut found = None;
        for _ in 0..60 {
            found = std::fs::read_dir(&work).ok().and_then(|dir| {
                dir.flatten()
                    .map(|e| e.path())
                    .find(|p| p.join("secret.txt").exists())
            });
            if found.is_some() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        let victim_dir = found.expect("the victim's work directory");
        let code = format!(
            r#"{TRY}
victim, cache = sys.argv[1], sys.argv[2]
attempt("read", lambda: open(victim + "/secret.txt").read())
attempt("list", lambda: os.listdir(victim))
attempt("list-work-root", lambda: os.listdir(os.path.dirname(victim)).index(os.path.basename(victim)))
attempt("cache", lambda: os.listdir(cache))
attempt("victims-mount", lambda: [l for l in open("/proc/self/mountinfo") if victim in l][0])
"#
        );
        t.python(
            &code,
            &[victim_dir.to_str().unwrap(), cache.to_str().unwrap()],
        )
        .await
    };
    let (victim, attack) = tokio::join!(victim, attacker);
    assert_eq!(
        victim.finished.status(),
        ExecStatus::Ok,
        "{}",
        victim.stderr
    );
    assert_eq!(
        attack.stdout.lines().count(),
        5,
        "{}{}",
        attack.stdout,
        attack.stderr
    );
    for line in attack.stdout.lines() {
        assert!(!line.ends_with(": ok"), "an attempt succeeded: {line}");
    }
    // The cached program is the genuine one, run from a copy.
    let again = t.run(c).await;
    assert!(again.finished.cached_build);
    assert_eq!(again.stdout, "genuine\n");
    t.survived().await;
}

#[tokio::test]
async fn storms_floods_bombs_and_escapes_are_contained() {
    let Some(t) = Target::start(&[]).await else {
        return;
    };
    let storm = t
        .run(ExecuteRequest {
            limits: Some(ExecLimits {
                max_processes: 32,
                ..Default::default()
            }),
            ..python(
                "import os, time\nforks = 0\ntry:\n    while True:\n        if os.fork() == 0:\n            time.sleep(30)\n            os._exit(0)\n        forks += 1\nexcept OSError as e:\n    print('stopped', forks < 32, e.errno)",
                &[],
            )
        })
        .await;
    assert_eq!(storm.stdout, "stopped True 11\n", "{}", storm.stderr);
    let flood = t.python("while True: print('x' * 4096)", &[]).await;
    assert_eq!(flood.finished.status(), ExecStatus::OutputLimit);
    let stubborn = t
        .run(ExecuteRequest {
            timeout_ms: 1000,
            ..python(
                "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nwhile True: time.sleep(0.1)",
                &[],
            )
        })
        .await;
    assert_eq!(stubborn.finished.status(), ExecStatus::Timeout);
    let bomb = t
        .run(ExecuteRequest {
            limits: Some(ExecLimits {
                memory_bytes: 128 << 20,
                ..Default::default()
            }),
            ..python(
                "blocks = []\nwhile True: blocks.append(bytearray(16 << 20))",
                &[],
            )
        })
        .await;
    assert_eq!(bomb.finished.status(), ExecStatus::MemoryLimit);
    let escape = t
        .python(
            "import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n        print(os.getpid(), flush=True)\n        time.sleep(1000)\n    os._exit(0)\ntime.sleep(0.5)",
            &[],
        )
        .await;
    let escaped: i32 = escape.stdout.trim().parse().unwrap();
    eventually("the double-forked child is killed", || {
        !process_alive(escaped)
    });
    t.survived().await;
}

#[tokio::test]
async fn an_agent_without_root_keeps_runs_out_of_its_files_with_landlock() {
    if !nix::unistd::geteuid().is_root() {
        cannot_contain_here("starting an agent as another user needs root");
        return;
    }
    // The agent runs as nobody: no user, network or mount layer, Landlock only.
    let nobody = 65534;
    let dirs = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dirs.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let home = dirs.path().join("home");
    let data = home.join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("node.key"), "-----BEGIN PRIVATE KEY----- secret").unwrap();
    for path in [&home, &data, &data.join("node.key")] {
        std::os::unix::fs::chown(path, Some(nobody), Some(nobody)).unwrap();
    }
    let work = home.join("work");
    let args = standalone_args(&home, &data);
    let agent = Daemon::start_as(
        Some(nobody),
        "node-agent",
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        &[("HOME", home.to_str().unwrap())],
        AGENT_READY,
    );
    let layers: Vec<IsolationLayer> = describe(&agent.url()).await.isolation_layers().collect();
    if !layers.contains(&IsolationLayer::Landlock) {
        cannot_contain_here("this kernel has no Landlock");
        return;
    }
    assert_eq!(layers, [IsolationLayer::Landlock]);
    let code = format!(
        r#"{TRY}
attempt("key", lambda: open(sys.argv[1] + "/node.key").read())
attempt("data-dir", lambda: os.listdir(sys.argv[1]))
attempt("work-root", lambda: os.listdir(sys.argv[2]))
attempt("write-home", lambda: open(sys.argv[3] + "/planted", "w").write("x"))
attempt("signal-agent", lambda: os.kill(os.getppid(), 0))
import socket
attempt("tcp", lambda: socket.create_connection(("127.0.0.1", int(sys.argv[4])), timeout=2).close())
attempt("own-dir", lambda: open("mine.txt", "w").write("x"))
attempt("system", lambda: open("/etc/hostname").read())
"#
    );
    let port = agent.addr.port().to_string();
    let ran = run(
        &agent.url(),
        python(
            &code,
            &[
                data.to_str().unwrap(),
                work.to_str().unwrap(),
                home.to_str().unwrap(),
                &port,
            ],
        ),
    )
    .await;
    assert_eq!(
        ran.stdout,
        "key: PermissionError\ndata-dir: PermissionError\nwork-root: PermissionError\nwrite-home: PermissionError\nsignal-agent: PermissionError\ntcp: PermissionError\nown-dir: ok\nsystem: ok\n",
        "{}",
        ran.stderr
    );
    assert!(!home.join("planted").exists());
}

#[tokio::test]
async fn an_oversized_request_is_refused_naming_the_limit() {
    let Some(t) = Target::start(&[]).await else {
        return;
    };
    let huge = format!("# {}\nprint(1)", "x".repeat(10 << 20));
    let mut client = NodeAgentClient::connect(t.agent.url()).await.unwrap();
    let err = client.execute(python(&huge, &[])).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains("at most 1048576 bytes"),
        "{}",
        err.message()
    );
    t.survived().await;

    // The same at the coordinator, through the CLI: exit 2 (bad input) and the limit named.
    let file = t.dirs.path().join("huge.py");
    std::fs::write(&file, &huge).unwrap();
    let (code, _, stderr) = outcome(
        std::process::Command::new(binary("coordinator"))
            .args(["exec", "--local", "--lang", "python"])
            .arg(&file)
            .output()
            .unwrap(),
    );
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("at most 1048576 bytes"), "{stderr}");
}
