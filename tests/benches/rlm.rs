//! The Recursive Language Model loop's own cost per iteration, with real processes on loopback:
//! a run of many turns against a scripted root model that answers at once with a trivial
//! block, each iteration's wall time against the model's turn and the block's execution as the
//! run reports them. What is left is the loop: prompts, the `answer` check, events.
//!
//! Run with `scripts/bench-rlm.sh` (builds the release binaries first). Options: `--turns N`
//! (default 30), `--runs N` (default 5).

use std::time::Instant;

use kowalski_exo_common::proto::{AskRequest, ask_event::Event};
use kowalski_exo_tests::{
    InferenceCluster, ScriptedBackend, Step,
    bench::{arg, ms},
};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let turns = arg("--turns", 30) as u32;
    let runs = arg("--runs", 5);
    let root = ScriptedBackend::start(&["root"]);
    let cluster = InferenceCluster::start(&[&root.api_base()], &[], 1);
    cluster.served_by("root", 1).await;
    let mut client = cluster.client().await;
    let mut overheads = Vec::new();
    let (mut model_ms, mut code_ms, mut total_ms) = (0.0, 0.0, 0.0);
    for _ in 0..runs {
        for turn in 0..turns {
            root.push(Step::answer([format!("```repl\nx = {turn}\n```\n")]));
        }
        root.push(Step::answer(["FINAL(done)"]));
        let started = Instant::now();
        let mut stream = client
            .ask(AskRequest {
                model: "root".into(),
                question: "q".into(),
                context: b"a small context".to_vec(),
                max_iterations: turns + 1,
                ..Default::default()
            })
            .await
            .expect("Ask")
            .into_inner();
        let (mut model, mut code, mut loop_started) = (0u64, 0u64, None);
        while let Some(event) = stream.message().await.expect("the Ask stream") {
            match event.event {
                Some(Event::Started(_)) => loop_started = Some(Instant::now()),
                Some(Event::Turn(t)) => model += t.wall_ms,
                Some(Event::Block(b)) => code += b.wall_ms,
                Some(Event::Finished(f)) => {
                    assert_eq!(f.reason, "final", "{f:?}");
                    assert_eq!(f.iterations, turns + 1);
                }
                _ => {}
            }
        }
        let looped = ms(loop_started.expect("started").elapsed());
        let iterations = f64::from(turns + 1);
        overheads.push((looped - (model + code) as f64) / iterations);
        model_ms += model as f64 / iterations;
        code_ms += code as f64 / iterations;
        total_ms += ms(started.elapsed());
    }
    overheads.sort_by(f64::total_cmp);
    let per_run = runs as f64;
    println!(
        "RLM loop, {} iterations per run, {runs} runs (scripted root model answering at once)",
        turns + 1
    );
    println!(
        "  per iteration: model turn {:.2} ms, block {:.2} ms",
        model_ms / per_run,
        code_ms / per_run
    );
    println!(
        "  loop overhead per iteration: median {:.2} ms (min {:.2}, max {:.2})   goal < 5 ms\n  (an upper bound: turns and blocks are reported in whole milliseconds, so a sub-millisecond\n  turn or block counts here as loop)",
        overheads[overheads.len() / 2],
        overheads[0],
        overheads[overheads.len() - 1]
    );
    println!(
        "  whole run, context loading and session included: {:.0} ms",
        total_ms / per_run
    );
}
