//! Chat answers through a real coordinator and real agents whose backend misbehaves on cue (a
//! scripted OpenAI-compatible server): it breaks off, sends a line that is not JSON, stalls, or
//! refuses, and a client goes away. Two agents front the same backend, so its one queue of
//! steps scripts the answer wherever it is placed.

use std::time::Duration;

use futures_util::StreamExt;
use kowalski_exo_common::proto::{
    ChatFinished, ChatMessage, ChatRequest, Failover, SamplingOptions, chat_event,
};
use kowalski_exo_tests::{CEILING, InferenceCluster, ScriptedBackend, Step, eventually};
use serde_json::{Value, json};

const MODEL: &str = "tiny";

fn question(max_tokens: u32) -> ChatRequest {
    ChatRequest {
        model: MODEL.into(),
        messages: vec![ChatMessage {
            role: "user".into(),
            content: "Count.".into(),
        }],
        options: Some(SamplingOptions {
            max_tokens,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// What a client of `Coordinator.Chat` saw.
struct Seen {
    text: String,
    failovers: Vec<Failover>,
    finished: ChatFinished,
}

async fn chat(cluster: &InferenceCluster, request: ChatRequest) -> Seen {
    let mut stream = cluster
        .client()
        .await
        .chat(request)
        .await
        .unwrap()
        .into_inner();
    let (mut text, mut failovers, mut finished) = (String::new(), Vec::new(), None);
    while let Some(event) = tokio::time::timeout(CEILING, stream.message())
        .await
        .expect("the answer hung")
        .unwrap()
    {
        match event.event.unwrap() {
            chat_event::Event::Delta(d) => text.push_str(&d.text),
            chat_event::Event::Failover(f) => failovers.push(f),
            chat_event::Event::Finished(f) => finished = Some(f),
            chat_event::Event::Answering(_) => {}
        }
    }
    Seen {
        text,
        failovers,
        finished: finished.expect("no finished event"),
    }
}

/// Two agents in front of `backend`, both serving the model.
async fn cluster_of_two(backend: &ScriptedBackend, coordinator_args: &[&str]) -> InferenceCluster {
    let api = backend.api_base();
    let cluster = InferenceCluster::start(&[&api, &api], coordinator_args, 3600);
    cluster.served_by(MODEL, 2).await;
    cluster
}

/// The chat requests the backend got, health probes left out.
fn answers_asked(backend: &ScriptedBackend) -> Vec<Value> {
    backend
        .requests()
        .into_iter()
        .filter(|r| r["max_tokens"] != 1)
        .collect()
}

fn numbered(range: std::ops::Range<usize>) -> String {
    range.map(|i| format!("t{i} ")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_breaks_off_is_continued_elsewhere_from_the_text_sent() {
    // llama.cpp's server continues a trailing assistant message.
    let backend = ScriptedBackend::start_as(&[MODEL], "llamacpp");
    let cluster = cluster_of_two(&backend, &[]).await;
    backend.push(Step::CloseAfter(4));
    backend.push(Step::answer((4..10).map(|i| format!("t{i} "))));

    let seen = chat(&cluster, question(10)).await;
    assert_eq!(seen.text, numbered(0..10), "repeated or missing text");
    assert_eq!(seen.finished.error, "");
    assert_eq!(seen.finished.completion_tokens, 10);
    assert_eq!(seen.failovers.len(), 1);
    let failover = &seen.failovers[0];
    assert!(!failover.regenerated);
    assert_eq!(failover.tokens_so_far, 4);
    assert_ne!(failover.from_node, failover.to_node);

    let asked = answers_asked(&backend);
    let continued = &asked[1];
    let last = continued["messages"].as_array().unwrap().last().unwrap();
    assert_eq!(
        last,
        &json!({"role": "assistant", "content": numbered(0..4)})
    );
    assert_eq!(continued["max_tokens"], 6, "the budget left");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_line_that_is_not_json_moves_the_answer_and_is_never_shown() {
    let backend = ScriptedBackend::start_as(&[MODEL], "llamacpp");
    let cluster = cluster_of_two(&backend, &[]).await;
    backend.push(Step::MalformedAfter(3));
    backend.push(Step::answer((3..6).map(|i| format!("t{i} "))));

    let seen = chat(&cluster, question(0)).await;
    assert_eq!(seen.text, numbered(0..6));
    assert_eq!(seen.failovers.len(), 1);
    assert!(
        seen.failovers[0].reason.contains("not JSON"),
        "{:?}",
        seen.failovers[0]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_cannot_continue_a_prefix_answers_again_and_the_client_sees_each_token_once()
{
    // Not a server known to continue a prefix: the other node generates the answer again.
    let backend = ScriptedBackend::start(&[MODEL]);
    let cluster = cluster_of_two(&backend, &[]).await;
    backend.push(Step::CloseAfter(4));
    backend.push(Step::tokens(10, Duration::ZERO));

    let seen = chat(&cluster, question(10)).await;
    assert_eq!(seen.text, numbered(0..10), "repeated or missing text");
    assert!(seen.failovers[0].regenerated);
    assert!(!seen.finished.prefix_diverged);
    assert_eq!(seen.finished.completion_tokens, 10);

    let asked = answers_asked(&backend);
    assert_eq!(
        asked[1]["messages"], asked[0]["messages"],
        "asked again as it was"
    );
    assert_eq!(asked[1]["max_tokens"], 10, "the whole budget");
    assert!(asked[0]["seed"].is_number(), "the coordinator pins a seed");
    assert_eq!(asked[1]["seed"], asked[0]["seed"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_backend_loses_the_answer_at_the_stall_timeout() {
    let backend = ScriptedBackend::start_as(&[MODEL], "llamacpp");
    let cluster = cluster_of_two(&backend, &["--stall-timeout", "1"]).await;
    backend.push(Step::StallAfter(2));
    backend.push(Step::answer((2..5).map(|i| format!("t{i} "))));

    let seen = chat(&cluster, question(0)).await;
    assert_eq!(seen.text, numbered(0..5));
    assert_eq!(seen.failovers.len(), 1);
    assert_eq!(seen.failovers[0].reason, "no token for 1s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_refusal_reaches_the_http_client_with_its_message_and_moves_nothing() {
    let backend = ScriptedBackend::start_as(&[MODEL], "llamacpp");
    let cluster = cluster_of_two(&backend, &[]).await;
    backend.push(Step::Refuse {
        status: 400,
        message: "the prompt is longer than the context window".into(),
    });
    let response = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", cluster.http_url()))
        .json(&json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("longer than the context window"),
        "{message}"
    );
    assert_eq!(
        answers_asked(&backend).len(),
        1,
        "a refusal is not tried elsewhere"
    );

    // Streamed, the refusal still comes as an HTTP error, not as 200 and an error chunk.
    backend.push(Step::Refuse {
        status: 400,
        message: "the prompt is longer than the context window".into(),
    });
    let streamed = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", cluster.http_url()))
        .json(&json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(streamed.status(), 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_will_not_continue_an_answer_passes_it_on_instead_of_ending_it() {
    let backend = ScriptedBackend::start_as(&[MODEL], "llamacpp");
    let api = backend.api_base();
    let cluster = InferenceCluster::start(&[&api, &api, &api], &[], 3600);
    cluster.served_by(MODEL, 3).await;
    backend.push(Step::CloseAfter(3));
    backend.push(Step::Refuse {
        status: 400,
        message: "assistant prefill is not supported with thinking".into(),
    });
    backend.push(Step::answer((3..6).map(|i| format!("t{i} "))));

    let seen = chat(&cluster, question(0)).await;
    assert_eq!(seen.finished.error, "");
    assert_eq!(seen.text, numbered(0..6));
    assert_eq!(seen.failovers.len(), 2);
    assert!(
        seen.failovers[1]
            .reason
            .contains("would not continue the answer"),
        "{:?}",
        seen.failovers[1]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_goes_away_stops_the_generation_on_the_backend() {
    let backend = ScriptedBackend::start_as(&[MODEL], "llamacpp");
    let cluster = cluster_of_two(&backend, &[]).await;
    backend.push(Step::tokens(100_000, Duration::from_millis(10)));
    let response = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", cluster.http_url()))
        .json(&json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": true}))
        .send()
        .await
        .unwrap();
    let mut body = response.bytes_stream();
    let mut received = String::new();
    while !received.contains("t2 ") {
        let chunk = tokio::time::timeout(CEILING, body.next()).await.unwrap();
        received.push_str(&String::from_utf8_lossy(&chunk.unwrap().unwrap()));
    }
    assert_eq!(backend.abandoned(), 0);
    drop(body);
    eventually("the backend request is dropped", || {
        backend.abandoned() == 1
    });
    assert_eq!(
        answers_asked(&backend).len(),
        1,
        "not moved to another node"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tools_and_several_choices_are_refused_in_every_api_before_a_backend_sees_them() {
    let backend = ScriptedBackend::start_as(&[MODEL], "llamacpp");
    let cluster = cluster_of_two(&backend, &[]).await;
    let base = cluster.http_url();
    let hi = json!([{"role": "user", "content": "hi"}]);
    let tool = json!([{"type": "function", "function": {"name": "f", "parameters": {}}}]);
    let refused = [
        (
            "/v1/chat/completions",
            json!({"model": MODEL, "messages": hi, "tools": tool}),
        ),
        (
            "/v1/chat/completions",
            json!({"model": MODEL, "messages": hi, "n": 2}),
        ),
        (
            "/api/chat",
            json!({"model": MODEL, "messages": hi, "tools": tool}),
        ),
        (
            "/v1/messages",
            json!({"model": MODEL, "max_tokens": 4, "messages": hi, "tools": [{"name": "f", "input_schema": {}}]}),
        ),
    ];
    let http = reqwest::Client::new();
    for (path, body) in refused {
        let response = http
            .post(format!("{base}{path}"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "{path} {body}");
        let text = response.text().await.unwrap();
        assert!(text.contains("not supported"), "{path}: {text}");
    }
    // An empty tool list is no tools.
    let empty = http
        .post(format!("{base}/v1/chat/completions"))
        .json(&json!({"model": MODEL, "messages": hi, "tools": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(empty.status(), 200);
    assert_eq!(answers_asked(&backend).len(), 1);
}
