//! Execution through the real NodeAgent gRPC service of an in-process agent: runtimes, output,
//! limits, containment and cleanup.

mod support;

use std::time::Duration;

use kowalski_exo_common::{
    Language,
    proto::{ExecLimits, ExecStage, ExecStatus, IsolationLayer, IsolationLevel, OutputStream},
};
use kowalski_exo_node_agent::fingerprint::{SearchPath, probe_all};
use support::*;

const HELLO: &[(Language, &str)] = &[
    (Language::Python, "print('hello from python')"),
    (Language::Bash, "echo \"hello from ${BASH:+bash}\""),
    (Language::Sh, "echo hello from sh"),
    (Language::Javascript, "console.log('hello from javascript')"),
    (Language::Ruby, "puts 'hello from ruby'"),
    (Language::Perl, "print \"hello from perl\\n\";"),
    (
        Language::Rust,
        "fn main() { println!(\"hello from rust\"); }",
    ),
    (
        Language::Java,
        "public class Main { public static void main(String[] a) { System.out.println(\"hello from java\"); } }",
    ),
    (
        Language::Go,
        "package main\nimport \"fmt\"\nfunc main() { fmt.Println(\"hello from go\") }\n",
    ),
    (
        Language::C,
        "#include <stdio.h>\nint main(void) { puts(\"hello from c\"); return 0; }\n",
    ),
];

/// Runs code that prints the pid of a child it left behind, and checks that the child is gone
/// once the run has ended.
async fn assert_detached_child_dies_with_the_run(
    t: &mut TestAgent,
    language: &str,
    code: &str,
    what: &str,
) {
    let run = execute(&mut t.client, request(language, code))
        .await
        .unwrap();
    assert_eq!(run.status(), ExecStatus::Ok, "{}", run.stderr());
    let child = run.printed_pid();
    eventually(what, || async move { !process_alive(child) }).await;
}

#[tokio::test]
async fn hello_world_runs_in_every_runtime_present() {
    let mut t = start_agent(|_| {}).await;
    let fingerprint = probe_all(&SearchPath::from_env()).await;
    let mut ran = Vec::new();
    for (language, code) in HELLO {
        if fingerprint.get(*language).healthy_executable().is_none() {
            println!("skipped {language}: no healthy runtime on this machine");
            continue;
        }
        let run = execute(&mut t.client, request(language.name(), code))
            .await
            .unwrap();
        assert_eq!(run.status(), ExecStatus::Ok, "{language}: {}", run.stderr());
        assert_eq!(run.stdout(), format!("hello from {language}\n"));
        ran.push(language.name());
    }
    assert!(
        ran.contains(&"python") && ran.contains(&"bash"),
        "ran {ran:?}"
    );
    println!("ran hello world in: {}", ran.join(", "));
}

#[tokio::test]
async fn stdout_and_stderr_are_kept_apart() {
    let mut t = start_agent(|_| {}).await;
    let code = "import sys\nprint('to out')\nprint('to err', file=sys.stderr)\nprint('out again')";
    let run = execute(&mut t.client, request("py", code)).await.unwrap();
    assert_eq!(run.stdout(), "to out\nout again\n");
    assert_eq!(run.stderr(), "to err\n");
    let started = &run.started[0];
    assert_eq!(started.stage(), ExecStage::Run);
    assert!(started.pid > 0);
}

#[tokio::test]
async fn non_utf8_bytes_come_back_unchanged() {
    let mut t = start_agent(|_| {}).await;
    let code = "import sys\nsys.stdout.buffer.write(bytes(range(256)))\nsys.stderr.buffer.write(b'\\xff\\xfe\\x00')";
    let run = execute(&mut t.client, request("python", code))
        .await
        .unwrap();
    assert_eq!(
        run.output(OutputStream::Stdout),
        (0u8..=255).collect::<Vec<_>>()
    );
    assert_eq!(run.output(OutputStream::Stderr), vec![0xff, 0xfe, 0x00]);
}

#[tokio::test]
async fn stdin_and_args_reach_the_program() {
    let mut t = start_agent(|_| {}).await;
    let mut req = request("bash", "echo \"args: $*\"; tr a-z A-Z");
    req.stdin = b"shout this".to_vec();
    req.args = vec!["one".into(), "two".into()];
    let run = execute(&mut t.client, req).await.unwrap();
    assert_eq!(run.stdout(), "args: one two\nSHOUT THIS");
}

#[tokio::test]
async fn nonzero_exit_is_a_result_with_its_code() {
    let mut t = start_agent(|_| {}).await;
    let run = execute(&mut t.client, request("sh", "echo failing >&2; exit 3"))
        .await
        .unwrap();
    assert_eq!(run.status(), ExecStatus::NonzeroExit);
    assert_eq!(run.finished().exit_code, Some(3));
    assert_eq!(run.stderr(), "failing\n");
}

#[tokio::test]
async fn endless_loop_is_killed_at_its_timeout() {
    let mut t = start_agent(|_| {}).await;
    let mut req = request(
        "python",
        "import os\nprint(os.getpid(), flush=True)\nwhile True: pass",
    );
    req.timeout_ms = 1000;
    let run = execute(&mut t.client, req).await.unwrap();
    assert_eq!(run.status(), ExecStatus::Timeout);
    assert!(
        run.finished().message.contains("timeout"),
        "{:?}",
        run.finished().message
    );
    assert!(run.finished().wall_micros >= 1_000_000);
    assert!(!process_alive(run.printed_pid()));
}

#[tokio::test]
async fn loop_ignoring_sigterm_is_still_killed() {
    let mut t = start_agent(|_| {}).await;
    let mut req = request("bash", "trap '' TERM INT HUP\necho $$\nwhile :; do :; done");
    req.timeout_ms = 800;
    let run = execute(&mut t.client, req).await.unwrap();
    assert_eq!(run.status(), ExecStatus::Timeout);
    assert!(!process_alive(run.printed_pid()));
}

#[tokio::test]
async fn background_child_does_not_outlive_the_run() {
    let mut t = start_agent(|_| {}).await;
    assert_detached_child_dies_with_the_run(
        &mut t,
        "bash",
        "sleep 1000 &\necho $!",
        "background sleep killed",
    )
    .await;
}

#[tokio::test]
async fn setsid_double_fork_does_not_outlive_the_run() {
    let mut t = start_agent(|_| {}).await;
    let isolation = t.isolation().await;
    if isolation == IsolationLevel::ProcessGroup {
        kowalski_exo_tests::cannot_contain_here(
            "no cgroups here (run as root where cgroups are writable)",
        );
        return;
    }
    let code = r#"
import os, sys, time
r, w = os.pipe()
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.close(r)
        os.write(w, str(os.getpid()).encode())
        os.close(w)
        for fd in (0, 1, 2):
            os.close(fd)
        time.sleep(1000)
    os._exit(0)
os.close(w)
print(os.read(r, 32).decode(), flush=True)
"#;
    assert_detached_child_dies_with_the_run(&mut t, "python", code, "setsid daemon killed").await;
}

#[tokio::test]
async fn endless_printing_stops_at_the_output_cap() {
    let mut t = start_agent(|_| {}).await;
    let mut req = request("python", "while True:\n    print('x' * 1000)");
    req.limits = Some(ExecLimits {
        output_bytes: 64 * 1024,
        ..Default::default()
    });
    let run = execute(&mut t.client, req).await.unwrap();
    assert_eq!(run.status(), ExecStatus::OutputLimit);
    assert_eq!(run.output(OutputStream::Stdout).len(), 64 * 1024);
    assert!(run.finished().bytes_dropped > 0);
}

#[tokio::test]
async fn process_storm_is_contained_and_the_next_run_succeeds() {
    let mut t = start_agent(|_| {}).await;
    let isolation = t.isolation().await;
    if isolation == IsolationLevel::ProcessGroup {
        kowalski_exo_tests::cannot_contain_here(
            "a fork bomb is only safe to run under a cgroup process limit",
        );
        return;
    }
    let limits = Some(ExecLimits {
        max_processes: 64,
        ..Default::default()
    });
    let storm = r#"
import os, time
pids = []
try:
    while True:
        pid = os.fork()
        if pid == 0:
            time.sleep(1000)
            os._exit(0)
        pids.append(pid)
except OSError as e:
    print(len(pids), e.errno)
    print(" ".join(map(str, pids)))
"#;
    let mut req = request("python", storm);
    req.limits = limits;
    let run = execute(&mut t.client, req).await.unwrap();
    let stdout = run.stdout();
    let mut lines = stdout.lines();
    let mut first = lines
        .next()
        .expect("storm printed nothing")
        .split_whitespace();
    let forked: usize = first.next().unwrap().parse().unwrap();
    assert!(forked < 64, "forked {forked} processes past a limit of 64");
    assert_eq!(first.next(), Some("11"), "fork should fail with EAGAIN");
    let children: Vec<i32> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    eventually("storm children killed", || {
        let alive = children.iter().any(|pid| process_alive(*pid));
        async move { !alive }
    })
    .await;

    let mut bomb = request("bash", "bomb() { bomb | bomb & }; bomb; sleep 30");
    bomb.timeout_ms = 2000;
    bomb.limits = limits;
    let run = execute(&mut t.client, bomb).await.unwrap();
    assert_eq!(run.status(), ExecStatus::Timeout);
    let next = execute(&mut t.client, request("python", "print('still here')"))
        .await
        .unwrap();
    assert_eq!(next.stdout(), "still here\n");
}

#[tokio::test]
async fn memory_hog_is_stopped_at_its_limit() {
    let mut t = start_agent(|_| {}).await;
    let mut req = request(
        "python",
        "x = bytearray(512 * 1024 * 1024)\nprint('allocated')",
    );
    req.limits = Some(ExecLimits {
        memory_bytes: 64 * 1024 * 1024,
        ..Default::default()
    });
    let run = execute(&mut t.client, req).await.unwrap();
    assert!(!run.stdout().contains("allocated"));
    let status = run.status();
    if t.isolation().await == IsolationLevel::ProcessGroup {
        // RLIMIT_AS: the allocation fails inside Python instead.
        assert_eq!(status, ExecStatus::NonzeroExit);
        assert!(run.stderr().contains("MemoryError"), "{}", run.stderr());
    } else {
        assert_eq!(status, ExecStatus::MemoryLimit, "{}", run.stderr());
    }
}

#[tokio::test]
async fn work_directories_are_gone_afterwards() {
    let mut t = start_agent(|_| {}).await;
    let run = execute(
        &mut t.client,
        request("bash", "pwd; touch left-behind; mkdir -p a/b"),
    )
    .await
    .unwrap();
    let workdir = std::path::PathBuf::from(run.stdout().trim());
    assert!(workdir.starts_with(&t.work_root), "{workdir:?}");
    eventually("work dir removed", || {
        let gone = !workdir.exists();
        async move { gone }
    })
    .await;
    let root = t.work_root.clone();
    eventually("work root empty", || {
        let empty = std::fs::read_dir(&root)
            .map(|d| d.count() == 0)
            .unwrap_or(true);
        async move { empty }
    })
    .await;
}

#[tokio::test]
async fn environment_is_cleared_to_the_allowlist() {
    let mut t = start_agent(|_| {}).await;
    let run = execute(
        &mut t.client,
        request(
            "python",
            "import os\nprint(sorted(os.environ))\nprint(os.environ['HOME'] == os.getcwd())",
        ),
    )
    .await
    .unwrap();
    let keys = run.stdout();
    for expected in ["'HOME'", "'LANG'", "'PATH'", "'TMPDIR'"] {
        assert!(keys.contains(expected), "{keys}");
    }
    assert!(!keys.contains("CARGO"), "agent environment leaked: {keys}");
    assert!(keys.ends_with("True\n"), "{keys}");
}

#[tokio::test]
async fn cancelling_the_stream_kills_the_run() {
    let mut t = start_agent(|_| {}).await;
    let req = request(
        "python",
        "import os, time\nprint(os.getpid(), flush=True)\ntime.sleep(1000)",
    );
    let mut stream = t.client.execute(req).await.unwrap().into_inner();
    let pid = first_printed_pid(&mut stream).await;
    assert!(process_alive(pid));
    drop(stream);
    eventually(
        "cancelled run killed",
        || async move { !process_alive(pid) },
    )
    .await;
}

#[tokio::test]
async fn concurrency_limit_answers_resource_exhausted() {
    let mut t = start_agent(|c| {
        c.capacity = 1;
        c.queue = 0;
    })
    .await;
    let mut long = t
        .client
        .execute(request("bash", "echo started; sleep 30"))
        .await
        .unwrap()
        .into_inner();
    long.message().await.unwrap();
    let err = execute(&mut t.client, request("bash", "echo second"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted);
    assert!(err.message().contains("busy"), "{}", err.message());
    drop(long);
    eventually("slot freed", || {
        let mut client = t.client.clone();
        async move {
            execute(&mut client, request("bash", "echo third"))
                .await
                .is_ok()
        }
    })
    .await;
}

#[tokio::test]
async fn bad_requests_get_errors_that_name_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let python = SearchPath::from_env().find("python3").unwrap();
    std::os::unix::fs::symlink(&python, dir.path().join("python3")).unwrap();
    let mut t = start_agent(|c| {
        c.search_path = SearchPath::from_os(dir.path().as_os_str());
        c.max_code_bytes = 1024;
    })
    .await;
    let err = execute(&mut t.client, request("cobol", "DISPLAY 'HI'"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("unknown language 'cobol'"),
        "{}",
        err.message()
    );
    assert!(err.message().contains("python, bash"), "{}", err.message());

    let err = execute(&mut t.client, request("perl", "print 1"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(err.message().contains("perl"), "{}", err.message());
    assert!(
        err.message().contains("healthy runtimes here: python"),
        "{}",
        err.message()
    );

    let err = execute(&mut t.client, request("python", &"#".repeat(2048)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("2048 bytes"), "{}", err.message());

    let ok = execute(&mut t.client, request("python", "print('fine')"))
        .await
        .unwrap();
    assert_eq!(ok.stdout(), "fine\n");
}

#[tokio::test]
async fn second_run_of_the_same_rust_code_skips_compiling() {
    let Some(_) = SearchPath::from_env().find("rustc") else {
        println!("skipped: no rustc on this machine");
        return;
    };
    let mut t = start_agent(|_| {}).await;
    let code = "fn main() { let v: Vec<u64> = (1..=10).collect(); println!(\"{}\", v.iter().sum::<u64>()); }";
    let first = execute(&mut t.client, request("rs", code)).await.unwrap();
    assert_eq!(first.stdout(), "55\n", "{}", first.stderr());
    assert_eq!(first.started[0].stage(), ExecStage::Compile);
    assert!(!first.finished().cached_build);
    let second = execute(&mut t.client, request("rust", code)).await.unwrap();
    assert_eq!(second.stdout(), "55\n");
    assert_eq!(second.started.len(), 1);
    assert_eq!(second.started[0].stage(), ExecStage::Run);
    assert!(second.finished().cached_build);
}

#[tokio::test]
async fn compile_errors_are_reported_with_the_compiler_output() {
    let Some(_) = SearchPath::from_env().find("cc") else {
        println!("skipped: no C compiler on this machine");
        return;
    };
    let mut t = start_agent(|_| {}).await;
    let run = execute(
        &mut t.client,
        request("c", "int main(void) { return undefined_name; }"),
    )
    .await
    .unwrap();
    assert_eq!(run.status(), ExecStatus::CompileError);
    assert!(run.stderr().contains("undefined_name"), "{}", run.stderr());
}

#[tokio::test]
async fn shutdown_kills_running_work_and_removes_directories() {
    let mut t = start_agent(|_| {}).await;
    let req = request("bash", "echo $$; sleep 1000");
    let mut stream = t.client.execute(req).await.unwrap().into_inner();
    let pid = first_printed_pid(&mut stream).await;
    let rest = tokio::spawn(collect(stream));
    tokio::time::timeout(Duration::from_secs(30), t.agent.stop())
        .await
        .expect("shutdown hung")
        .unwrap();
    assert!(!process_alive(pid));
    assert!(!t.work_root.exists(), "work root left behind");
    let err = rest.await.unwrap().unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable);
    assert!(err.message().contains("shutting down"), "{}", err.message());
}

#[tokio::test]
async fn a_child_moved_into_a_nested_cgroup_is_still_killed_or_cannot_move() {
    let mut t = start_agent(|_| {}).await;
    if t.isolation().await != IsolationLevel::CgroupV1 {
        println!("skipped: this escape attempt is written for cgroup v1 hierarchies");
        return;
    }
    let code = r#"
import os, time
own = [l for l in open('/proc/self/cgroup') if ':pids:' in l][0].strip().split(':', 2)[2]
nested = '/sys/fs/cgroup/pids' + own + '/nested'
try:
    os.mkdir(nested)
except PermissionError:
    print('refused', flush=True)
    raise SystemExit
r, w = os.pipe()
if os.fork() == 0:
    os.setsid()
    with open(nested + '/cgroup.procs', 'w') as f:
        f.write('0')
    os.write(w, str(os.getpid()).encode())
    os.close(w)
    for fd in (0, 1, 2):
        os.close(fd)
    time.sleep(1000)
    os._exit(0)
os.close(w)
print(os.read(r, 32).decode(), flush=True)
"#;
    let layers = t
        .client
        .describe(kowalski_exo_common::proto::DescribeRequest {})
        .await
        .unwrap()
        .into_inner()
        .isolation_layers()
        .collect::<Vec<_>>();
    if layers.contains(&IsolationLayer::User) {
        // Runs as a user of its own, the run cannot touch the cgroup tree at all.
        let run = execute(&mut t.client, request("python", code))
            .await
            .unwrap();
        assert_eq!(run.stdout(), "refused\n", "{}", run.stderr());
        return;
    }
    assert_detached_child_dies_with_the_run(
        &mut t,
        "python",
        code,
        "child in a nested cgroup killed",
    )
    .await;
}
