//! Code in a session asks the cluster's models (`llm_query`, `llm_query_batched`): from the
//! interpreter to its agent over the session's channel, up the agent's registry stream, and out
//! to every node serving the model; a node that dies takes its sub-calls with it. Real
//! processes; the models are scripted OpenAI-compatible backends, one per agent.

use std::time::Duration;

use kowalski_exo_common::proto::{
    ClusterOpenSessionRequest, ExecStatus, OpenSessionRequest, PlacementConstraints,
};
use kowalski_exo_tests::{InferenceCluster, ScriptedBackend, Step, eventually, run_in_session};
use nix::sys::signal::Signal;

/// Runs code in the session `session`; returns what it printed, asserting it finished ok.
async fn run(cluster: &InferenceCluster, session: &str, language: &str, code: &str) -> String {
    let run = run_in_session(&mut cluster.client().await, session, language, code).await;
    assert_eq!(run.status, Some(ExecStatus::Ok), "{code}: {}", run.stdout);
    run.stdout
}

/// The prompts a backend answered that came from the code (health probes left out).
fn prompts_seen(backend: &ScriptedBackend) -> Vec<String> {
    backend
        .requests()
        .iter()
        .filter_map(|r| r["messages"][0]["content"].as_str().map(str::to_string))
        .filter(|content| content.starts_with('q'))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_prompts_is_spread_over_every_node_serving_the_model() {
    let backends: Vec<ScriptedBackend> =
        (0..3).map(|_| ScriptedBackend::start(&["tiny"])).collect();
    let bases: Vec<String> = backends.iter().map(ScriptedBackend::api_base).collect();
    let bases: Vec<&str> = bases.iter().map(String::as_str).collect();
    let cluster = InferenceCluster::start(&bases, &[], 1);
    cluster.served_by("tiny", 3).await;

    let out = run(
        &cluster,
        "rlm",
        "python",
        "answers = llm_query_batched([f'q{i}' for i in range(30)])\nprint(len(answers), answers.count('OK'))",
    )
    .await;
    assert_eq!(out, "30 30\n");
    let seen: Vec<usize> = backends.iter().map(|b| prompts_seen(b).len()).collect();
    assert_eq!(seen.iter().sum::<usize>(), 30, "{seen:?}");
    assert!(
        seen.iter().all(|&n| n > 0),
        "every backend answers some: {seen:?}"
    );

    // The same prompts again come from the session's cache.
    run(
        &cluster,
        "rlm",
        "python",
        "llm_query_batched([f'q{i}' for i in range(30)])",
    )
    .await;
    let again: usize = backends.iter().map(|b| prompts_seen(b).len()).sum();
    assert_eq!(again, 30, "cached answers are not asked again");

    let out = run(
        &cluster,
        "sh",
        "js",
        "llm_query_batched(['q js 1', 'q js 2'])",
    )
    .await;
    assert_eq!(out, "[ 'OK', 'OK' ]\n");
    let out = run(
        &cluster,
        "rlm",
        "python",
        "llm_query('q single', max_tokens=5)",
    )
    .await;
    assert_eq!(out, "'OK'\n");
    let out = run(
        &cluster,
        "sh",
        "bash",
        "echo \"[$(llm_query 'q from bash')]\"",
    )
    .await;
    assert_eq!(out, "[OK]\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_prompt_fails_alone_and_a_refused_call_raises_in_the_code() {
    let backend = ScriptedBackend::start(&["tiny"]);
    let cluster = InferenceCluster::start(&[&backend.api_base()], &[], 1);
    cluster.served_by("tiny", 1).await;
    backend.push(Step::answer(["first"]));
    backend.push(Step::Refuse {
        status: 400,
        message: "this prompt is refused".into(),
    });
    let out = run(
        &cluster,
        "s",
        "python",
        "for a in llm_query_batched(['q1']) + llm_query_batched(['q2']): print(a)",
    )
    .await;
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "first");
    assert!(
        lines[1].starts_with("Error: ") && lines[1].contains("this prompt is refused"),
        "{out}"
    );

    let out = run(
        &cluster,
        "s",
        "python",
        "try:\n    llm_query('q', model='nope')\nexcept RuntimeError as e:\n    print(e)",
    )
    .await;
    assert!(
        out.contains("no node serves model 'nope'") && out.contains("tiny"),
        "{out}"
    );
    let out = run(
        &cluster,
        "s",
        "python",
        "try:\n    llm_query('q', temprature=0)\nexcept RuntimeError as e:\n    print(e)",
    )
    .await;
    assert!(out.contains("unknown option 'temprature'"), "{out}");
    let out = run(
        &cluster,
        "s",
        "python",
        "try:\n    llm_query('x' * 9_000_000)\nexcept ValueError as e:\n    print(e)",
    )
    .await;
    assert!(out.contains("over the session's limit"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sub_calls_of_a_node_that_dies_stop_generating() {
    let slow = ScriptedBackend::start(&["tiny"]);
    let other = ScriptedBackend::start(&["other"]);
    let cluster = InferenceCluster::start(&[&slow.api_base(), &other.api_base()], &[], 1);
    cluster.served_by("tiny", 1).await;
    cluster.served_by("other", 1).await;
    // The session lives on agent-1; the model it asks is served on agent-0 alone, slowly.
    let mut client = cluster.client().await;
    client
        .open_session(ClusterOpenSessionRequest {
            session: Some(OpenSessionRequest {
                session_id: "asker".into(),
                languages: vec!["python".into()],
                ..Default::default()
            }),
            placement: Some(PlacementConstraints {
                node: "agent-1".into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    slow.push(Step::tokens(2000, Duration::from_millis(20)));
    let asking = tokio::spawn(async move {
        run_in_session(
            &mut client,
            "asker",
            "python",
            "llm_query('q slow', model='tiny')",
        )
        .await
    });
    eventually("the prompt reaches the model", || {
        prompts_seen(&slow).len() == 1
    });
    // The asking code dies with its node: the answer has nowhere to go, and stops.
    cluster.agent("agent-1").signal(Signal::SIGKILL);
    eventually("the generation is dropped", || slow.abandoned() == 1);
    asking.abort();
}
