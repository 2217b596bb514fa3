//! The scripted OpenAI-compatible backend, checked with a plain HTTP client (what it streams
//! for each step, and that it notices a client going away mid-answer) and behind a real agent.

use std::time::Duration;

use futures_util::StreamExt;
use kowalski_exo_common::proto::{
    BackendState, ChatMessage, GenerateRequest, SamplingOptions, node_agent_client::NodeAgentClient,
};
use kowalski_exo_tests::{CEILING, Daemon, ScriptedBackend, Step, describe};
use serde_json::{Value, json};

fn chat(max_tokens: Option<u32>) -> Value {
    let mut body = json!({
        "model": "tiny",
        "messages": [{"role": "user", "content": "Say hello."}],
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    if let Some(max) = max_tokens {
        body["max_tokens"] = max.into();
    }
    body
}

async fn post(backend: &ScriptedBackend, body: &Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{}/chat/completions", backend.api_base()))
        .json(body)
        .send()
        .await
        .unwrap()
}

/// The `data:` payloads of a server-sent event stream.
fn payloads(stream: &str) -> Vec<&str> {
    stream
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect()
}

/// The text deltas among the payloads.
fn contents(data: &[&str]) -> Vec<String> {
    data.iter()
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .map(String::from)
        })
        .filter(|t| !t.is_empty())
        .collect()
}

#[tokio::test]
async fn answers_stream_their_tokens_in_order_with_usage_then_done() {
    let backend = ScriptedBackend::start(&["tiny", "small"]);
    let models: Value = reqwest::get(format!("{}/models", backend.api_base()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["data"][0]["id"], "tiny");
    assert_eq!(models["data"][1]["id"], "small");
    assert_eq!(models["data"][0]["owned_by"], "scripted");

    backend.push(Step::answer(["Hel", "lo", "!"]));
    let text = post(&backend, &chat(None)).await.text().await.unwrap();
    let data = payloads(&text);
    assert_eq!(contents(&data), ["Hel", "lo", "!"]);
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(
        chunks[chunks.len() - 2]["choices"][0]["finish_reason"],
        "stop"
    );
    assert_eq!(chunks[chunks.len() - 1]["usage"]["completion_tokens"], 3);
    assert_eq!(data.last(), Some(&"[DONE]"));

    // The queue is empty: the default answers, cut at max_tokens.
    backend.set_default(Step::tokens(5, Duration::ZERO));
    let text = post(&backend, &chat(Some(2))).await.text().await.unwrap();
    assert_eq!(contents(&payloads(&text)), ["t0 ", "t1 "]);
    assert!(text.contains(r#""finish_reason":"length""#), "{text}");

    assert_eq!(backend.requests().len(), 2);
    assert_eq!(backend.requests()[1]["max_tokens"], 2);
    assert_eq!(backend.abandoned(), 0);
}

#[tokio::test]
async fn failures_come_as_scripted() {
    let backend = ScriptedBackend::start(&["tiny"]);
    backend.push(Step::Refuse {
        status: 429,
        message: "too many requests".into(),
    });
    backend.push(Step::CloseAfter(2));
    backend.push(Step::MalformedAfter(1));

    let refused = post(&backend, &chat(None)).await;
    assert_eq!(refused.status(), 429);
    let error: Value = refused.json().await.unwrap();
    assert_eq!(error["error"]["message"], "too many requests");

    let mut closed = post(&backend, &chat(None)).await.bytes_stream();
    let mut received = String::new();
    // The body breaks off (no final chunk), after the tokens sent before the close.
    loop {
        match closed.next().await {
            Some(Ok(bytes)) => received.push_str(&String::from_utf8_lossy(&bytes)),
            Some(Err(_)) => break,
            None => panic!("the body ended normally: {received}"),
        }
    }
    assert_eq!(contents(&payloads(&received)), ["t0 ", "t1 "]);

    let text = post(&backend, &chat(None)).await.text().await.unwrap();
    let data = payloads(&text);
    assert_eq!(contents(&data), ["t0 "]);
    assert_eq!(data[2..], ["this is not JSON", "[DONE]"]);

    let unknown = post(&backend, &json!({"model": "nope", "stream": true})).await;
    assert_eq!(unknown.status(), 404);
}

#[tokio::test]
async fn a_client_leaving_mid_answer_is_counted_as_abandoned() {
    let backend = ScriptedBackend::start(&["tiny"]);
    backend.push(Step::StallAfter(2));
    let mut stream = post(&backend, &chat(None)).await.bytes_stream();
    let mut received = String::new();
    while contents(&payloads(&received)).len() < 2 {
        let bytes = tokio::time::timeout(CEILING, stream.next())
            .await
            .expect("the first tokens never came")
            .unwrap()
            .unwrap();
        received.push_str(&String::from_utf8_lossy(&bytes));
    }
    assert_eq!(backend.abandoned(), 0, "the answer is still going");
    drop(stream);
    // Polled without blocking: the client's connection task must run to close the socket.
    let left = async {
        while backend.abandoned() == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(CEILING, left)
        .await
        .expect("the backend never noticed the client left");

    // A probe (one token asked for) never takes a queued step.
    backend.push(Step::answer(["queued"]));
    let probe = post(&backend, &chat(Some(1))).await.text().await.unwrap();
    assert_eq!(contents(&payloads(&probe)), ["OK"]);
    let text = post(&backend, &chat(None)).await.text().await.unwrap();
    assert_eq!(contents(&payloads(&text)), ["queued"]);
    assert_eq!(backend.abandoned(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_whose_caller_leaves_cancels_its_backend_request() {
    let backend = ScriptedBackend::start(&["tiny"]);
    let work = tempfile::tempdir().unwrap();
    let api_base = backend.api_base();
    let agent = Daemon::start(
        "node-agent",
        &[
            "--standalone",
            "--listen",
            "127.0.0.1:0",
            "--work-dir",
            work.path().to_str().unwrap(),
            "--openai",
            &api_base,
        ],
        &[],
        "node agent listening",
    );
    let ready = async {
        while !describe(&agent.url())
            .await
            .models
            .iter()
            .any(|m| m.state() == BackendState::Ready)
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(CEILING, ready)
        .await
        .expect("the agent never found its backend ready");

    backend.push(Step::StallAfter(2));
    let mut client = NodeAgentClient::connect(agent.url()).await.unwrap();
    let request = GenerateRequest {
        model: "tiny".into(),
        messages: vec![ChatMessage {
            role: "user".into(),
            content: "Say hello.".into(),
        }],
        options: Some(SamplingOptions {
            max_tokens: 10,
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut stream = client.generate(request).await.unwrap().into_inner();
    for _ in 0..2 {
        tokio::time::timeout(CEILING, stream.message())
            .await
            .expect("no token")
            .unwrap()
            .expect("the stream ended");
    }
    drop(stream);
    let cancelled = async {
        while backend.abandoned() == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(CEILING, cancelled)
        .await
        .expect("the agent kept its backend request open");
    let generation = backend.requests().pop().unwrap();
    assert_eq!(generation["max_tokens"], 10);
    assert_eq!(generation["stream"], true);
}
