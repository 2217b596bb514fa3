//! A scripted OpenAI-compatible LLM server on loopback, for tests and benchmarks that need a
//! backend whose every answer (and every way of failing) is chosen in advance.
//!
//! It is a real HTTP server: `GET /v1/models` lists its models and `POST /v1/chat/completions`
//! streams OpenAI server-sent chunks (or, for a request without `"stream": true`, answers with
//! one chat completion), so whatever talks to it (a node agent, reqwest, the OpenAI SDK) goes
//! through the genuine protocol. Each chat request takes the next [`Step`] from a queue the test
//! fills, else the step its responder picks from the request (a model answering on cue); what
//! is left, and every health probe (a request for one token, as node agents send at start and
//! every poll), gets the default step. The server keeps every chat request body
//! it received and counts the answers whose client went away before their end.

use std::{
    collections::VecDeque,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    thread::JoinHandle,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use axum::{
    Json, Router,
    body::Body,
    extract::State,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
    serve::ListenerExt,
};
use futures_util::{Stream, StreamExt, stream};
use serde_json::{Value, json};
use tokio::sync::oneshot;

/// What the server does with one chat completion request.
#[derive(Clone, Debug)]
pub enum Step {
    /// Streams these tokens (cut at the request's `max_tokens`, finishing with `length` then,
    /// `stop` otherwise), then usage when asked and `[DONE]`.
    Answer {
        /// One chunk's text each.
        tokens: Vec<String>,
        /// The wait before each token; zero sends the whole answer at once.
        delay: Duration,
    },
    /// Streams `k` tokens, then closes the connection in the middle of the body.
    CloseAfter(usize),
    /// Streams `k` tokens, then an event whose data is not JSON, then `[DONE]`.
    MalformedAfter(usize),
    /// Streams `k` tokens, then sends nothing more while keeping the connection open.
    StallAfter(usize),
    /// Answers with this HTTP status and an OpenAI error body carrying `message`.
    Refuse { status: u16, message: String },
}

impl Step {
    /// Answers `tokens` back to back.
    pub fn answer<T: Into<String>>(tokens: impl IntoIterator<Item = T>) -> Step {
        Step::Answer {
            tokens: tokens.into_iter().map(Into::into).collect(),
            delay: Duration::ZERO,
        }
    }

    /// Answers `n` tokens (`t0 `, `t1 `, ...), waiting `delay` before each.
    pub fn tokens(n: usize, delay: Duration) -> Step {
        Step::Answer {
            tokens: numbered(n),
            delay,
        }
    }
}

/// The step a backend takes while its queue is empty: one short answer.
fn default_step() -> Step {
    Step::answer(["OK"])
}

/// `n` distinct token strings, so a test can see order and loss.
fn numbered(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("t{i} ")).collect()
}

/// Picks the step for a chat request from its body, or leaves it to the default step.
pub type Responder = Box<dyn Fn(&Value) -> Option<Step> + Send + Sync>;

/// A running scripted backend; stopped on drop.
pub struct ScriptedBackend {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

/// What the server and the test both see.
struct Shared {
    /// The models `GET /v1/models` lists and chat requests may name.
    models: Vec<String>,
    /// The server they are listed as owned by.
    owned_by: String,
    /// Steps for the next chat requests, in order.
    queue: Mutex<VecDeque<Step>>,
    /// The step for a request when the queue is empty, and for every health probe.
    default: Mutex<Step>,
    /// Every chat request body received, in order, probes included.
    requests: Mutex<Vec<Value>>,
    /// Answers whose body was dropped before it ended: the client went away.
    abandoned: AtomicUsize,
    /// Picks the step for a request the queue has none for, from the request itself.
    responder: Mutex<Option<Responder>>,
    /// Answer one request at a time, as a server with one slot does (probes aside).
    one_at_a_time: AtomicBool,
    /// Held by the answer being sent while `one_at_a_time`.
    turn: Arc<tokio::sync::Mutex<()>>,
}

impl ScriptedBackend {
    /// Starts a server on `127.0.0.1` with an OS-chosen port, serving `models`. It runs on a
    /// thread of its own, so it neither needs nor disturbs the caller's runtime. Its models are
    /// `owned_by` "scripted": an agent takes it for a server that cannot continue a prefix.
    pub fn start(models: &[&str]) -> ScriptedBackend {
        Self::start_as(models, "scripted")
    }

    /// The same, with the models `owned_by` this server name (e.g. "llamacpp": an agent then
    /// takes it for llama.cpp's server, which continues a trailing assistant message).
    pub fn start_as(models: &[&str], owned_by: &str) -> ScriptedBackend {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        let addr = listener.local_addr().expect("bound address");
        listener.set_nonblocking(true).expect("non-blocking socket");
        let shared = Arc::new(Shared {
            models: models.iter().map(|m| m.to_string()).collect(),
            owned_by: owned_by.to_string(),
            queue: Mutex::default(),
            default: Mutex::new(default_step()),
            requests: Mutex::default(),
            responder: Mutex::default(),
            abandoned: AtomicUsize::new(0),
            one_at_a_time: AtomicBool::new(false),
            turn: Arc::default(),
        });
        let app = Router::new()
            .route("/v1/models", get(list_models))
            .route("/v1/chat/completions", post(chat_completions))
            .with_state(shared.clone());
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("backend runtime");
            runtime.block_on(async move {
                // Without TCP_NODELAY a token written while the previous one is unacknowledged
                // waits for the client's delayed ACK (~40 ms); real servers set it.
                let listener = tokio::net::TcpListener::from_std(listener)
                    .expect("listener")
                    .tap_io(|tcp| {
                        let _ = tcp.set_nodelay(true);
                    });
                // Dropping the server future (and then the runtime) ends every connection,
                // stalled ones included, where a graceful shutdown would wait for them.
                tokio::select! {
                    served = axum::serve(listener, app) => served.expect("scripted backend"),
                    _ = stopped => {}
                }
            });
        });
        ScriptedBackend {
            addr,
            shared,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// The API base the OpenAI SDK and `node-agent --openai` take: `http://127.0.0.1:PORT/v1`.
    pub fn api_base(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Queues `step` for the next chat request that is not a health probe.
    pub fn push(&self, step: Step) {
        self.shared.queue.lock().unwrap().push_back(step);
    }

    /// Sets the step for requests arriving while the queue is empty, and for health probes.
    pub fn set_default(&self, step: Step) {
        *self.shared.default.lock().unwrap() = step;
    }

    /// Answers the requests the queue has no step for with the step `responder` picks from
    /// each request's body, where it picks one: a model that writes code on cue.
    pub fn respond_with(&self, responder: impl Fn(&Value) -> Option<Step> + Send + Sync + 'static) {
        *self.shared.responder.lock().unwrap() = Some(Box::new(responder));
    }

    /// Answers one request at a time from now on: the others wait their turn (health probes
    /// are answered at once).
    pub fn one_at_a_time(&self) {
        self.shared.one_at_a_time.store(true, Ordering::SeqCst);
    }

    /// Every chat request body received so far, in order, health probes included.
    pub fn requests(&self) -> Vec<Value> {
        self.shared.requests.lock().unwrap().clone()
    }

    /// The chat requests received so far that were not health probes, in order.
    pub fn chats(&self) -> Vec<Value> {
        self.requests()
            .into_iter()
            .filter(|r| !is_probe(r))
            .collect()
    }

    /// How many answers were cut short because their client went away (the response body was
    /// dropped before its end), as when an agent cancels a generation.
    pub fn abandoned(&self) -> usize {
        self.shared.abandoned.load(Ordering::SeqCst)
    }
}

impl Drop for ScriptedBackend {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn list_models(State(shared): State<Arc<Shared>>) -> Json<Value> {
    let data: Vec<Value> = shared
        .models
        .iter()
        .map(|id| json!({"id": id, "object": "model", "created": 0, "owned_by": shared.owned_by}))
        .collect();
    Json(json!({"object": "list", "data": data}))
}

/// The answer's length limit the request sets, if any.
fn max_tokens(request: &Value) -> Option<usize> {
    let limit = &request["max_completion_tokens"];
    let limit = if limit.is_null() {
        &request["max_tokens"]
    } else {
        limit
    };
    limit.as_u64().map(|n| n as usize)
}

/// A health probe, as a node agent sends one: a single token asked for. It never takes a
/// queued step, so a probe arriving between a test's `push` and its request cannot steal it.
fn is_probe(request: &Value) -> bool {
    max_tokens(request) == Some(1)
}

async fn chat_completions(State(shared): State<Arc<Shared>>, Json(body): Json<Value>) -> Response {
    shared.requests.lock().unwrap().push(body.clone());
    let model = body["model"].as_str().unwrap_or_default();
    if !shared.models.iter().any(|m| m == model) {
        return error(
            StatusCode::NOT_FOUND,
            &format!("the model '{model}' does not exist"),
            Some("model_not_found"),
        );
    }
    let probe = is_probe(&body);
    let turn = if !probe && shared.one_at_a_time.load(Ordering::SeqCst) {
        Some(shared.turn.clone().lock_owned().await)
    } else {
        None
    };
    let step = if probe { None } else { shared.next_step(&body) };
    let step = step.unwrap_or_else(|| shared.default.lock().unwrap().clone());
    if body["stream"] != true {
        return whole(step, &body).await;
    }
    let (frames, ending) = match plan(step, &body) {
        Ok(planned) => planned,
        Err((status, message)) => return error(status, &message, None),
    };
    let body = Watched {
        inner: events(frames, ending),
        ended: false,
        shared,
        turn,
    };
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(body))
        .expect("a valid response")
}

impl Shared {
    /// The queued step for a chat request, else the one its responder picks.
    fn next_step(&self, request: &Value) -> Option<Step> {
        let queued = self.queue.lock().unwrap().pop_front();
        queued.or_else(|| {
            let responder = self.responder.lock().unwrap();
            responder.as_ref().and_then(|respond| respond(request))
        })
    }
}

/// The answer to a request that did not ask to stream: one chat completion, sent once every
/// token's wait has passed. Steps that fail mid-stream have no such form and are refused.
async fn whole(step: Step, request: &Value) -> Response {
    let (tokens, delay) = match step {
        Step::Refuse { .. } => {
            let refused = plan(step, request).err().expect("a refusal");
            return error(refused.0, &refused.1, None);
        }
        Step::Answer { tokens, delay } => (tokens, delay),
        other => {
            return error(
                StatusCode::BAD_REQUEST,
                &format!("the scripted step {other:?} only streams: send \"stream\": true"),
                None,
            );
        }
    };
    let said = &tokens[..tokens.len().min(max_tokens(request).unwrap_or(usize::MAX))];
    tokio::time::sleep(delay * said.len() as u32).await;
    let reason = if said.len() < tokens.len() {
        "length"
    } else {
        "stop"
    };
    let answer = Answer::new(request);
    let prompt_tokens = prompt_words(request);
    Json(json!({
        "id": "chatcmpl-scripted", "object": "chat.completion",
        "created": answer.created, "model": request["model"],
        "choices": [{
            "index": 0, "finish_reason": reason,
            "message": {"role": "assistant", "content": said.concat()},
        }],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": said.len(),
            "total_tokens": prompt_tokens + said.len(),
        },
    }))
    .into_response()
}

/// The events `step` sends in answer to `request` and how its body ends, or the status and
/// message it refuses with.
fn plan(step: Step, request: &Value) -> Result<(Frames, Ending), (StatusCode, String)> {
    let answer = Answer::new(request);
    Ok(match step {
        Step::Refuse { status, message } => {
            return Err(match StatusCode::from_u16(status) {
                Ok(status) => (status, message),
                Err(_) => (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("the scripted status {status} is not an HTTP status"),
                ),
            });
        }
        Step::Answer { tokens, delay } => {
            let said = &tokens[..tokens.len().min(max_tokens(request).unwrap_or(usize::MAX))];
            let reason = if said.len() < tokens.len() {
                "length"
            } else {
                "stop"
            };
            let mut frames = answer.tokens(said, delay);
            frames.extend(answer.ending(reason, said.len()));
            (frames, Ending::Done)
        }
        Step::CloseAfter(k) => (answer.tokens(&numbered(k), Duration::ZERO), Ending::Close),
        Step::MalformedAfter(k) => {
            let mut frames = answer.tokens(&numbered(k), Duration::ZERO);
            frames.push((Duration::ZERO, "data: this is not JSON\n\n".into()));
            frames.push((Duration::ZERO, "data: [DONE]\n\n".into()));
            (frames, Ending::Done)
        }
        Step::StallAfter(k) => (answer.tokens(&numbered(k), Duration::ZERO), Ending::Stall),
    })
}

/// An OpenAI error body with `status`.
fn error(status: StatusCode, message: &str, code: Option<&str>) -> Response {
    let kind = if status.is_server_error() {
        "server_error"
    } else {
        "invalid_request_error"
    };
    let body = json!({"error": {"message": message, "type": kind, "param": null, "code": code}});
    (status, Json(body)).into_response()
}

/// Server-sent events of one answer, each with the wait before it.
type Frames = Vec<(Duration, String)>;

/// How an answer's body ends after its frames.
enum Ending {
    /// The body ends normally.
    Done,
    /// The body fails, which makes the server drop the connection mid-body.
    Close,
    /// The body never ends.
    Stall,
}

/// The chunks of one answer, shaped like OpenAI's.
struct Answer<'a> {
    request: &'a Value,
    created: u64,
}

impl<'a> Answer<'a> {
    fn new(request: &'a Value) -> Self {
        let created = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        Answer { request, created }
    }

    fn chunk(&self, choices: Value) -> Value {
        json!({
            "id": "chatcmpl-scripted", "object": "chat.completion.chunk",
            "created": self.created, "model": self.request["model"], "choices": choices,
        })
    }

    fn event(value: &Value) -> String {
        format!("data: {value}\n\n")
    }

    /// The role, then one chunk per token, `delay` before each token.
    fn tokens(&self, tokens: &[String], delay: Duration) -> Frames {
        let role = json!([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}]);
        let mut frames = vec![(Duration::ZERO, Self::event(&self.chunk(role)))];
        frames.extend(tokens.iter().map(|token| {
            let choices = json!([{"index": 0, "delta": {"content": token}, "finish_reason": null}]);
            (delay, Self::event(&self.chunk(choices)))
        }));
        frames
    }

    /// The finish reason, usage when the request asked for it, and `[DONE]`.
    fn ending(&self, reason: &str, completion_tokens: usize) -> Frames {
        let finish = json!([{"index": 0, "delta": {}, "finish_reason": reason}]);
        let mut frames = vec![(Duration::ZERO, Self::event(&self.chunk(finish)))];
        if self.request["stream_options"]["include_usage"] == true {
            let prompt_tokens = prompt_words(self.request);
            let mut usage = self.chunk(json!([]));
            usage["usage"] = json!({
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            });
            frames.push((Duration::ZERO, Self::event(&usage)));
        }
        frames.push((Duration::ZERO, "data: [DONE]\n\n".into()));
        frames
    }
}

/// Words in the request's messages, standing in for its prompt tokens.
fn prompt_words(request: &Value) -> usize {
    request["messages"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m["content"].as_str())
        .map(|text| text.split_whitespace().count())
        .sum()
}

/// A body stream of `frames`, each after its wait, closed as `ending` says.
type EventStream = Pin<Box<dyn Stream<Item = Result<String, io::Error>> + Send>>;

fn events(frames: Frames, ending: Ending) -> EventStream {
    let frames = stream::iter(frames).then(|(delay, frame)| async move {
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        Ok(frame)
    });
    match ending {
        Ending::Done => frames.boxed(),
        Ending::Close => frames
            .chain(stream::once(async {
                // Once pending first, so the server flushes the tokens before it drops the
                // connection; a body failing while its frames are still buffered loses them.
                tokio::task::yield_now().await;
                Err(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    "scripted: close the connection mid-answer",
                ))
            }))
            .boxed(),
        Ending::Stall => frames.chain(stream::pending()).boxed(),
    }
}

/// An answer's body that counts itself abandoned when dropped before it ended.
struct Watched {
    inner: EventStream,
    /// The body reached its end, normal or scripted: its client did not leave early.
    ended: bool,
    shared: Arc<Shared>,
    /// The server's one slot, while it answers one request at a time; given up at the end.
    turn: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl Stream for Watched {
    type Item = Result<String, io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let next = self.inner.poll_next_unpin(cx);
        if matches!(next, Poll::Ready(None | Some(Err(_)))) {
            self.ended = true;
            self.turn = None;
        }
        next
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        if !self.ended {
            self.shared.abandoned.fetch_add(1, Ordering::SeqCst);
        }
    }
}
