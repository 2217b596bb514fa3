//! Generation through a node agent against a real LLM server: llama.cpp's, serving a tiny
//! random-weight model over the genuine OpenAI streaming protocol.

use std::time::Duration;

use kowalski_exo_common::proto::{
    BackendKind, BackendState, ChatMessage, ChatRequest, CountTokensRequest, GenerateRequest,
    ModelOffer, SamplingOptions, chat_event, generate_event::Event,
    node_agent_client::NodeAgentClient,
};
use kowalski_exo_tests::{
    CEILING, Daemon, InferenceCluster, LlamaServer, binary, describe, outcome,
};
use nix::sys::signal::Signal;

/// A real llama.cpp server, or None after saying why the test skips.
fn llama_server() -> Option<LlamaServer> {
    LlamaServer::start()
        .map_err(|why| println!("skipped: {why}"))
        .ok()
}

/// A standalone agent fronting `api_base`, polling its backend every second.
fn agent_for(api_base: &str, work: &std::path::Path) -> Daemon {
    Daemon::start(
        "node-agent",
        &[
            "--standalone",
            "--listen",
            "127.0.0.1:0",
            "--work-dir",
            work.to_str().unwrap(),
            "--openai",
            api_base,
            "--model-poll-interval",
            "1",
        ],
        &[],
        "node agent listening",
    )
}

/// Waits until the agent reports the model in `state`.
async fn offer_in_state(url: &str, state: BackendState) -> ModelOffer {
    let start = std::time::Instant::now();
    loop {
        let offers = describe(url).await.models;
        if let Some(offer) = offers
            .iter()
            .find(|o| o.name == LlamaServer::MODEL && o.state() == state)
        {
            return offer.clone();
        }
        assert!(start.elapsed() < CEILING, "no {state:?} model: {offers:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn request(model: &str, max_tokens: u32) -> GenerateRequest {
    GenerateRequest {
        model: model.into(),
        messages: vec![ChatMessage {
            role: "user".into(),
            content: "Say something.".into(),
        }],
        options: Some(SamplingOptions {
            temperature: Some(0.0),
            max_tokens,
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_streams_a_real_backends_answer_and_reports_its_state() {
    let Some(mut backend) = llama_server() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let agent = agent_for(&backend.api_base, dir.path());
    let offer = offer_in_state(&agent.url(), BackendState::Ready).await;
    assert_eq!(offer.backend(), BackendKind::Openai);
    assert_eq!(offer.backend_url, backend.api_base);

    let mut client = NodeAgentClient::connect(agent.url()).await.unwrap();
    let mut stream = client
        .generate(request(LlamaServer::MODEL, 8))
        .await
        .unwrap()
        .into_inner();
    let (mut text, mut deltas, mut finished) = (String::new(), 0, None);
    while let Some(event) = tokio::time::timeout(CEILING, stream.message())
        .await
        .expect("generation hung")
        .unwrap()
    {
        assert!(finished.is_none(), "an event after finished: {event:?}");
        match event.event.unwrap() {
            Event::Delta(delta) => {
                deltas += 1;
                text.push_str(&delta.text);
            }
            Event::Finished(f) => finished = Some(f),
        }
    }
    let finished = finished.expect("no finished event");
    assert_eq!(finished.finish_reason, "length");
    // llama-cpp-python sends no usage while streaming: the agent counts its chunks.
    assert_eq!(finished.completion_tokens, 8);
    assert!(deltas > 1, "the answer came in one piece: {text:?}");
    assert!(!text.is_empty());

    let unknown = client
        .generate(request("no-such-model", 4))
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);
    assert_eq!(
        unknown.message(),
        "no model 'no-such-model' here; this node serves: tiny"
    );

    // Tokens are counted by the model's own tokenizer, as the server itself counts them.
    let texts = vec![
        "hello world".to_string(),
        "a longer text, with more bytes".into(),
    ];
    let counted = client
        .count_tokens(CountTokensRequest {
            model: LlamaServer::MODEL.into(),
            texts: texts.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .counts;
    let http = reqwest::Client::new();
    let root = backend.api_base.trim_end_matches("/v1");
    let mut direct = Vec::new();
    for text in &texts {
        let answer: serde_json::Value = http
            .post(format!("{root}/extras/tokenize"))
            .json(&serde_json::json!({"model": LlamaServer::MODEL, "input": text}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        direct.push(answer["tokens"].as_array().unwrap().len() as u64);
    }
    assert_eq!(counted, direct);
    // A byte-level vocabulary: about a token a byte, where cl100k makes 2 of "hello world".
    assert!(counted[0] >= 11, "{counted:?}");

    backend.kill();
    let offer = offer_in_state(&agent.url(), BackendState::Down).await;
    assert!(offer.reason.contains("does not answer"), "{}", offer.reason);
    let down = client
        .generate(request(LlamaServer::MODEL, 4))
        .await
        .unwrap_err();
    assert_eq!(down.code(), tonic::Code::Unavailable, "{down:?}");
    assert!(down.message().contains("is down"), "{}", down.message());
}

fn chat_request(max_tokens: u32) -> ChatRequest {
    let generate = request(LlamaServer::MODEL, max_tokens);
    ChatRequest {
        model: generate.model,
        messages: generate.messages,
        options: generate.options,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chat_through_the_coordinator_survives_its_agent_being_killed_mid_answer() {
    // Two devices, each with its own llama.cpp server.
    let (Some(a), Some(b)) = (llama_server(), llama_server()) else {
        return;
    };
    let backends = [a, b];
    let api_bases: Vec<&str> = backends.iter().map(|b| b.api_base.as_str()).collect();
    let cluster = InferenceCluster::start(&api_bases, &[], 1);
    let mut client = cluster.client().await;
    cluster.served_by(LlamaServer::MODEL, 2).await;

    // Streaming in order through coordinator, agent and backend.
    let mut stream = client.chat(chat_request(8)).await.unwrap().into_inner();
    let mut kinds = Vec::new();
    while let Some(event) = stream.message().await.unwrap() {
        kinds.push(match event.event.unwrap() {
            chat_event::Event::Answering(_) => "answering",
            chat_event::Event::Delta(_) => "delta",
            chat_event::Event::Failover(_) => "failover",
            chat_event::Event::Finished(f) => {
                assert_eq!(
                    (f.finish_reason.as_str(), f.completion_tokens),
                    ("length", 8)
                );
                "finished"
            }
        });
    }
    assert_eq!(kinds.first(), Some(&"answering"));
    assert_eq!(kinds.last(), Some(&"finished"));
    assert_eq!(kinds.iter().filter(|k| **k == "delta").count(), 8);

    // Two answers at once go to different nodes: the coordinator counts the first before any
    // heartbeat could.
    let (mut first, mut second) = (client.clone(), client.clone());
    let (first, second) = tokio::join!(first.chat(chat_request(40)), second.chat(chat_request(40)));
    let mut answering = Vec::new();
    for stream in [first, second] {
        let mut stream = stream.unwrap().into_inner();
        while let Some(event) = stream.message().await.unwrap() {
            if let chat_event::Event::Answering(a) = event.event.unwrap() {
                answering.push(a.node_name);
            }
        }
    }
    assert_eq!(answering.len(), 2);
    assert_ne!(answering[0], answering[1], "both answers went to one node");

    // A long answer whose agent is SIGKILLed after its first text goes on elsewhere. It samples
    // (no temperature 0, no seed of the caller's): llama-cpp-python answers a trailing assistant
    // message as a new turn, so the other node generates the answer again, and only the seed the
    // coordinator pinned makes it repeat the text already sent.
    let mut sampled = chat_request(300);
    sampled.options.as_mut().unwrap().temperature = Some(0.9);
    let mut stream = client.chat(sampled).await.unwrap().into_inner();
    let (mut deltas, mut failovers, mut finished) = (0, Vec::new(), None);
    let mut answering: Option<String> = None;
    while let Some(event) = tokio::time::timeout(CEILING, stream.message())
        .await
        .expect("the answer hung")
        .unwrap()
    {
        match event.event.unwrap() {
            chat_event::Event::Answering(a) if a.attempt == 1 => answering = Some(a.node_name),
            chat_event::Event::Answering(_) => {}
            chat_event::Event::Delta(_) => {
                deltas += 1;
                // Killed once its first text has reached the client.
                if let Some(node) = answering.take() {
                    cluster.agent(&node).signal(Signal::SIGKILL);
                }
            }
            chat_event::Event::Failover(f) => failovers.push(f),
            chat_event::Event::Finished(f) => finished = Some(f),
        }
    }
    let finished = finished.expect("no finished event");
    assert_eq!(
        finished.error,
        "",
        "{finished:?}\nbackend 0: {}\nbackend 1: {}",
        backends[0].log(),
        backends[1].log()
    );
    assert_eq!(failovers.len(), 1, "{failovers:?}");
    assert_eq!(finished.failovers, 1);
    assert_ne!(failovers[0].from_node, failovers[0].to_node);
    assert!(failovers[0].regenerated, "{failovers:?}");
    assert!(
        !finished.prefix_diverged,
        "the repeat differed from the text sent"
    );
    // Nothing repeated, nothing missing: every token the client saw is counted once.
    assert_eq!(finished.completion_tokens, 300);
    assert_eq!(deltas, 300);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_lists_models_and_streams_a_chat() {
    let Some(backend) = llama_server() else {
        return;
    };
    let cluster = InferenceCluster::start(&[&backend.api_base], &[], 1);
    cluster.served_by(LlamaServer::MODEL, 1).await;
    let url = cluster.coordinator.url();

    let (status, stdout, _) = cli(&["models", "--json", "--addr", &url]);
    assert_eq!(status, Some(0));
    let model: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(model["model"], "tiny");
    assert_eq!(model["served_by"][0]["node"], "agent-0");
    assert_eq!(model["served_by"][0]["state"], "ready");

    let (status, stdout, stderr) = cli(&[
        "chat",
        "--json",
        "--addr",
        &url,
        "--model",
        "tiny",
        "--max-tokens",
        "5",
        "hello",
    ]);
    assert_eq!(status, Some(0), "{stderr}");
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines[0]["event"], "answering");
    assert_eq!(lines.iter().filter(|l| l["event"] == "delta").count(), 5);
    let last = lines.last().unwrap();
    assert_eq!(
        (&last["event"], &last["completion_tokens"]),
        (&"finished".into(), &5.into())
    );

    let (status, _, stderr) = cli(&["chat", "--addr", &url, "--model", "nope", "hi"]);
    assert_eq!(status, Some(3));
    assert!(
        stderr.contains("no node serves the model 'nope': agent-0 serves tiny"),
        "{stderr}"
    );
}

/// Runs the coordinator CLI; returns (exit code, stdout, stderr).
fn cli(args: &[&str]) -> (Option<i32>, String, String) {
    outcome(
        std::process::Command::new(binary("coordinator"))
            .args(args)
            .output()
            .unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_api_answers_streaming_and_not() {
    let Some(backend) = llama_server() else {
        return;
    };
    let cluster = InferenceCluster::start(&[&backend.api_base], &[], 1);
    cluster.served_by(LlamaServer::MODEL, 1).await;
    let base = cluster.http_url();
    let http = reqwest::Client::new();

    let health = http.get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let models: serde_json::Value = http
        .get(format!("{base}/v1/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["data"][0]["id"], "tiny");

    let ask = |stream: bool| {
        serde_json::json!({
            "model": "tiny",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 5,
            "temperature": 0,
            "stream": stream,
            "stream_options": {"include_usage": true},
        })
    };
    let whole: serde_json::Value = http
        .post(format!("{base}/v1/chat/completions"))
        .json(&ask(false))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(whole["object"], "chat.completion");
    assert_eq!(whole["choices"][0]["finish_reason"], "length");
    assert_eq!(whole["usage"]["completion_tokens"], 5);
    let text = whole["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(!text.is_empty());

    let streamed = http
        .post(format!("{base}/v1/chat/completions"))
        .json(&ask(true))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let data: Vec<&str> = streamed
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(data.last(), Some(&"[DONE]"), "{streamed}");
    let chunks: Vec<serde_json::Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let streamed_text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(streamed_text, text, "temperature 0 answers alike");
    let usage = chunks.last().unwrap();
    assert_eq!(usage["usage"]["completion_tokens"], 5, "{usage}");
    assert_eq!(
        chunks[chunks.len() - 2]["choices"][0]["finish_reason"],
        "length"
    );

    let unknown = http
        .post(format!("{base}/v1/chat/completions"))
        .json(
            &serde_json::json!({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);
    let error: serde_json::Value = unknown.json().await.unwrap();
    assert_eq!(error["error"]["code"], "model_not_found");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("'nope'")
    );

    // curl, streaming, as the README shows it.
    let curl = std::process::Command::new("curl")
        .args(["-sS", "-N", &format!("{base}/v1/chat/completions")])
        .args(["-H", "content-type: application/json", "-d"])
        .arg(ask(true).to_string())
        .output()
        .expect("curl runs");
    let (code, out, err) = outcome(curl);
    assert_eq!(code, Some(0), "{err}");
    let curled: String = out
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .filter_map(|d| serde_json::from_str::<serde_json::Value>(d).ok())
        .filter_map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect();
    assert_eq!(curled, text, "{out}");
    assert!(out.trim_end().ends_with("data: [DONE]"), "{out}");

    // What the answers above left in the metrics.
    let metrics = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let value = |series: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {series} in\n{metrics}"))
    };
    assert_eq!(value("kowalski_nodes{state=\"ready\"}"), 1.0);
    assert_eq!(
        value("kowalski_tokens_generated_total{model=\"tiny\"}"),
        15.0
    );
    assert_eq!(
        value("kowalski_chat_answers_total{model=\"tiny\",outcome=\"finished\"}"),
        3.0
    );
    assert_eq!(
        value("kowalski_time_to_first_token_seconds_count{model=\"tiny\"}"),
        3.0
    );
    assert_eq!(value("kowalski_generations_in_flight{model=\"tiny\"}"), 0.0);
}

/// What the real Python clients do against the coordinator's HTTP API.
const PYTHON_CLIENTS: &str = r#"
import sys, openai, ollama, anthropic
base = sys.argv[1]
client = openai.OpenAI(base_url=base + "/v1", api_key="unused")
whole = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0)
streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
    model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0, stream=True) if c.choices)
assert streamed == whole.choices[0].message.content, (streamed, whole)
assert whole.usage.completion_tokens == 4, whole.usage
local = ollama.Client(host=base)
assert [m.model for m in local.list().models] == ["tiny", "rlm:tiny"]
chunks = list(local.chat(model="tiny", messages=[{"role": "user", "content": "hi"}], stream=True, options={"num_predict": 4, "temperature": 0}))
assert chunks[-1].done and chunks[-1].eval_count == 4, chunks[-1]
said = "".join(c.message.content for c in chunks)
assert said == streamed, (said, streamed)
generated = local.generate(model="tiny", prompt="hi", options={"num_predict": 3})
assert generated.done and len(generated.response) > 0, generated
try:
    local.chat(model="nope", messages=[{"role": "user", "content": "hi"}])
    raise SystemExit("an unknown model was answered")
except ollama.ResponseError as e:
    assert e.status_code == 404 and "nope" in e.error, e
claude = anthropic.Anthropic(base_url=base, api_key="unused")
reply = claude.messages.create(model="tiny", max_tokens=4, messages=[{"role": "user", "content": "hi"}])
assert len(reply.content[0].text) > 0 and reply.stop_reason == "max_tokens", reply
assert reply.usage.output_tokens == 4, reply.usage
with claude.messages.stream(model="tiny", max_tokens=4, system="Be brief.", messages=[{"role": "user", "content": "hi"}]) as stream:
    told = "".join(stream.text_stream)
    final = stream.get_final_message()
assert len(told) > 0 and final.stop_reason == "max_tokens" and final.usage.output_tokens == 4, final
try:
    claude.messages.create(model="nope", max_tokens=4, messages=[{"role": "user", "content": "hi"}])
    raise SystemExit("an unknown model was answered")
except anthropic.NotFoundError:
    pass
print("clients ok")
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_ollama_and_anthropic_python_clients_work_against_the_cluster() {
    let clients = std::process::Command::new("python3")
        .args(["-c", "import openai, ollama, anthropic"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !clients {
        println!(
            "skipped: the openai, ollama and anthropic Python packages are not installed (.ci/run installs them)"
        );
        return;
    }
    let Some(backend) = llama_server() else {
        return;
    };
    let cluster = InferenceCluster::start(&[&backend.api_base], &[], 1);
    cluster.served_by(LlamaServer::MODEL, 1).await;
    let base = cluster.http_url();
    let (status, stdout, stderr) = outcome(
        std::process::Command::new("python3")
            .args(["-c", PYTHON_CLIENTS, &base])
            .output()
            .unwrap(),
    );
    assert_eq!(status, Some(0), "{stdout}{stderr}");
    assert_eq!(stdout.trim(), "clients ok");
}
