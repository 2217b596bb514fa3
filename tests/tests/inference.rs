//! Generation through a node agent against a real LLM server: llama.cpp's, serving a tiny
//! random-weight model over the genuine OpenAI streaming protocol.

use std::time::Duration;

use kowalski_exo_common::proto::{
    BackendKind, BackendState, ChatMessage, GenerateRequest, ModelOffer, SamplingOptions,
    generate_event::Event, node_agent_client::NodeAgentClient,
};
use kowalski_exo_tests::{CEILING, Daemon, LlamaServer, describe};

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
    let mut backend = match LlamaServer::start() {
        Ok(backend) => backend,
        Err(why) => {
            println!("skipped: {why}");
            return;
        }
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
