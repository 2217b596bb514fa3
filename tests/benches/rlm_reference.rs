//! Kowalski's Recursive Language Model loop side by side with the reference implementation
//! (PyPI `rlms`), in one run, both pointed at the same scripted single-slot model servers.
//!
//! The task: sum the secret numbers spread through a context of many lines. The root model
//! (the same servers, answering on cue) first writes a `repl` block that cuts the context into
//! chunks and asks a model about each through `llm_query_batched`, then one that sets the
//! `answer` dict. Each server answers one request at a time, after `--subcall-ms` for a chunk
//! and `--root-ms` for a root turn, so what differs is only how each loop spreads its sub-calls.
//! The reference runs against one server, then with its sub-calls on a second (its one other
//! backend, the most of three devices it can use); Kowalski runs on one agent, then on three.
//! Every run must come back with the right sum.
//!
//! Run with `scripts/bench-rlm.sh --reference` (needs `pip install rlms`). Options: `--chunks N`
//! (default 24), `--subcall-ms N` (default 100), `--root-ms N` (default 100), `--runs N`
//! (default 3).

use std::{path::Path, process::Command, time::Duration, time::Instant};

use kowalski_exo_common::proto::{AskRequest, ask_event::Event};
use kowalski_exo_tests::{
    InferenceCluster, ScriptedBackend, Step,
    bench::{arg, ms},
};
use serde_json::Value;

const MODEL: &str = "tiny";
const QUESTION: &str = "What is the sum of all the secret numbers in the context?";
/// How a sub-call's prompt starts; the servers answer such a prompt with its chunk's sum.
const ASK_CHUNK: &str = "Sum the secret numbers in this text; answer with the number alone.";
const LINES_PER_CHUNK: usize = 50;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let chunks = arg("--chunks", 24);
    let runs = arg("--runs", 3);
    let subcall = Duration::from_millis(arg("--subcall-ms", 100) as u64);
    let root_turn = Duration::from_millis(arg("--root-ms", 100) as u64);
    let reference = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/rlm_reference.py");
    let probe = Command::new("python3").args(["-c", "import rlm"]).output();
    if !probe.is_ok_and(|o| o.status.success()) {
        eprintln!("the reference implementation is not installed: pip install rlms");
        std::process::exit(2);
    }

    let (context, expected) = context(chunks);
    let work = tempfile::tempdir().expect("temp dir");
    let context_file = work.path().join("context.txt");
    std::fs::write(&context_file, &context).expect("write the context");
    let servers: Vec<ScriptedBackend> = (0..3)
        .map(|_| {
            let server = ScriptedBackend::start(&[MODEL]);
            server.one_at_a_time();
            server.respond_with(move |request| respond(request, subcall, root_turn));
            server
        })
        .collect();
    let bases: Vec<String> = servers.iter().map(ScriptedBackend::api_base).collect();

    let reference_run = |sub: Option<&str>| {
        let mut command = Command::new("python3");
        command
            .arg(&reference)
            .args(["--root", &bases[0], "--model", MODEL]);
        command.args(["--question", QUESTION, "--context"]);
        command.arg(&context_file);
        if let Some(sub) = sub {
            command.args(["--sub", sub]);
        }
        let out = command.output().expect("run python3");
        assert!(
            out.status.success(),
            "the reference failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let line: Value = serde_json::from_slice(&out.stdout).expect("the reference's JSON line");
        let answer = line["answer"]
            .as_str()
            .unwrap_or_default()
            .trim()
            .to_string();
        (answer, line["seconds"].as_f64().expect("seconds") * 1000.0)
    };
    let calls = || servers.iter().map(|s| s.chats().len()).sum::<usize>();
    let reference_one = median(runs, &expected, || reference_run(None));
    let reference_calls = calls() / runs;
    let reference_two = median(runs, &expected, || reference_run(Some(&bases[1])));
    let before = calls();

    let mut ours = Vec::new();
    for devices in [1, 3] {
        let apis: Vec<&str> = bases[..devices].iter().map(String::as_str).collect();
        let cluster = InferenceCluster::start(&apis, &[], 1);
        cluster.served_by(MODEL, devices).await;
        let mut times = Vec::new();
        for _ in 0..runs {
            let (answer, took) = ask(&cluster, &context).await;
            assert_eq!(answer, expected, "Kowalski's answer on {devices} devices");
            times.push(took);
        }
        ours.push(middle(times));
    }
    let our_calls = (calls() - before) / (2 * runs);

    println!(
        "Recursive Language Model loop vs the reference (rlms), {chunks} sub-calls of {} ms and 2 root turns of {} ms on single-slot servers, median of {runs} runs, every answer {expected}",
        subcall.as_millis(),
        root_turn.as_millis()
    );
    println!("  model calls per run: the reference {reference_calls}, Kowalski {our_calls}");
    println!(
        "  reference, 1 device:                          {:>6.0} ms",
        reference_one
    );
    println!(
        "  reference, sub-calls on a second device:      {:>6.0} ms",
        reference_two
    );
    println!(
        "  Kowalski, 1 device:                           {:>6.0} ms   {:.2}x the reference   goal >= 0.8x",
        ours[0],
        reference_one / ours[0]
    );
    println!(
        "  Kowalski, 3 devices:                          {:>6.0} ms   {:.2}x the reference   goal >= 2.4x",
        ours[1],
        reference_one / ours[1]
    );
}

/// The context: `chunks` blocks of lines, each line with a secret number, and their sum.
fn context(chunks: usize) -> (String, String) {
    let mut text = String::new();
    let mut sum = 0u64;
    for line in 0..chunks * LINES_PER_CHUNK {
        let secret = (line as u64 * 7919) % 1000;
        sum += secret;
        text.push_str(&format!(
            "Line {line}: the weather was mild, the meeting ran long, and secret={secret} was noted.\n"
        ));
    }
    (text, sum.to_string())
}

/// The servers' answer to `request`: a chunk's sum for a sub-call, else the root's next turn.
fn respond(request: &Value, subcall: Duration, root_turn: Duration) -> Option<Step> {
    let messages = request["messages"].as_array()?;
    let last = messages.last()?["content"].as_str()?;
    let (text, delay) = if let Some(chunk) = last.strip_prefix(ASK_CHUNK) {
        (chunk_sum(chunk).to_string(), subcall)
    } else if messages.iter().any(|m| m["role"] == "assistant") {
        (
            "```repl\nanswer[\"content\"] = str(total)\nanswer[\"ready\"] = True\n```\n".into(),
            root_turn,
        )
    } else {
        (
            format!(
                "```repl\nlines = context.splitlines()\nchunks = [\"\\n\".join(lines[i:i + {LINES_PER_CHUNK}]) for i in range(0, len(lines), {LINES_PER_CHUNK})]\nanswers = llm_query_batched([\"{ASK_CHUNK}\\n\" + c for c in chunks])\ntotal = sum(int(a) for a in answers)\nprint(len(chunks), total)\n```\n"
            ),
            root_turn,
        )
    };
    Some(Step::Answer {
        tokens: vec![text],
        delay,
    })
}

/// The sum of the `secret=N` numbers in `chunk`.
fn chunk_sum(chunk: &str) -> u64 {
    chunk
        .split("secret=")
        .skip(1)
        .filter_map(|rest| {
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            digits.parse::<u64>().ok()
        })
        .sum()
}

/// One question through Kowalski's loop: its answer and the wall time in milliseconds.
async fn ask(cluster: &InferenceCluster, context: &str) -> (String, f64) {
    let mut client = cluster.client().await;
    let started = Instant::now();
    let mut stream = client
        .ask(AskRequest {
            model: MODEL.into(),
            question: QUESTION.into(),
            context: context.as_bytes().to_vec(),
            ..Default::default()
        })
        .await
        .expect("Ask")
        .into_inner();
    while let Some(event) = stream.message().await.expect("the Ask stream") {
        if let Some(Event::Finished(f)) = event.event {
            assert_eq!(f.reason, "answer", "{f:?}");
            return (f.answer.trim().to_string(), ms(started.elapsed()));
        }
    }
    panic!("the Ask stream ended without its finish");
}

/// The median wall time of `runs` runs of `run`, each of which must answer `expected`.
fn median(runs: usize, expected: &str, mut run: impl FnMut() -> (String, f64)) -> f64 {
    let times = (0..runs)
        .map(|_| {
            let (answer, took) = run();
            assert_eq!(answer, expected, "the reference's answer");
            took
        })
        .collect();
    middle(times)
}

fn middle(mut times: Vec<f64>) -> f64 {
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}
