//! The sub-call relay: the prompts code in a session sends up its agent's registry stream
//! (`llm_query`, `llm_query_batched`). Every prompt of a call goes out at once, each answered
//! like a chat request (placed on the least busy node serving the model, moved when its node
//! fails); one failed prompt fails alone. Answers are cached per session, so executions replayed
//! after a session moved do not ask again.

use std::{
    num::NonZeroUsize,
    sync::{Arc, Mutex},
};

use futures_util::future::join_all;
use kowalski_exo_common::proto::{
    AskRequest, ChatMessage, ChatRequest, PromptAnswer, SamplingOptions, Subcall, SubcallAnswer,
};
use lru::LruCache;
use metrics::counter;
use prost::Message;
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use crate::{
    cluster_metrics,
    inference::{Chats, models},
    registry::NodeRegistry,
    rlm::Rlm,
    sessions::{ClusterSessions, RunNote, SubcallNote},
};

/// Answers kept, over every session.
const CACHED_ANSWERS: NonZeroUsize = NonZeroUsize::new(10_000).expect("not zero");

/// What makes two prompts the same call: the session, then a hash of model, prompt and options.
type CacheKey = (String, [u8; 32]);

/// Answers sub-calls with the cluster's models.
#[derive(Clone)]
pub struct SubcallRelay {
    chats: Chats,
    registry: NodeRegistry,
    sessions: ClusterSessions,
    /// Starts the child runs of rlm_query.
    rlm: Rlm,
    cache: Arc<Mutex<LruCache<CacheKey, String>>>,
}

impl SubcallRelay {
    pub fn new(chats: Chats, registry: NodeRegistry, sessions: ClusterSessions, rlm: Rlm) -> Self {
        SubcallRelay {
            chats,
            registry,
            sessions,
            rlm,
            cache: Arc::new(Mutex::new(LruCache::new(CACHED_ANSWERS))),
        }
    }

    /// Answers every prompt of a call from `node_id`, all at once.
    pub async fn answer(&self, call: Subcall, node_id: &str) -> SubcallAnswer {
        let model = match self.model(&call.model) {
            Ok(model) => model,
            Err(error) => {
                counter!(cluster_metrics::SUBCALLS, "model" => call.model.clone(), "outcome" => "refused")
                    .increment(call.prompts.len() as u64);
                return SubcallAnswer {
                    call_id: call.call_id,
                    error,
                    ..Default::default()
                };
            }
        };
        let options = call.options.unwrap_or_default();
        // A session the coordinator placed keeps its answers wherever it moves; one opened on
        // the node directly keeps them on that node.
        let session = match self.sessions.incarnation(&call.session_id) {
            Some(incarnation) => format!("cluster:{incarnation}"),
            None => format!("node:{node_id}:{}", call.session_id),
        };
        let watch = self.sessions.subcall_watch(&call.session_id);
        // rlm_query within the run's depth limit starts child runs; past it, or outside a run,
        // its prompts are asked as llm_query's are.
        let children = watch.as_ref().filter(|w| {
            let most = match w.children.max_depth {
                0 => crate::rlm::DEFAULT_MAX_DEPTH,
                n => n,
            };
            call.recursive && w.depth < most
        });
        if let Some(watch) = children {
            let runs = call.prompts.into_iter().enumerate().map(|(i, prompt)| {
                let context = call.contexts.get(i).cloned().unwrap_or_default();
                let template = AskRequest {
                    model: model.clone(),
                    ..watch.children.clone()
                };
                async move {
                    let at = Instant::now();
                    let run = self
                        .rlm
                        .child(
                            &template,
                            watch.depth + 1,
                            watch.budget.clone(),
                            prompt,
                            context,
                        )
                        .await;
                    let answer = match run.answer() {
                        Ok(text) => PromptAnswer {
                            text,
                            error: String::new(),
                        },
                        Err(error) => PromptAnswer {
                            text: String::new(),
                            error,
                        },
                    };
                    let _ = watch.notes.send(RunNote::Subcall(SubcallNote {
                        node: run.node.clone(),
                        model: template.model.clone(),
                        wall_ms: at.elapsed().as_millis() as u64,
                        error: answer.error.clone(),
                        tokens: run.tokens(),
                        child: true,
                        iterations: run.finished.iterations,
                        subcalls: run.finished.subcalls,
                        ..Default::default()
                    }));
                    answer
                }
            });
            return SubcallAnswer {
                call_id: call.call_id,
                answers: join_all(runs).await,
                error: String::new(),
            };
        }
        let answers = call.prompts.into_iter().map(|prompt| {
            let (session, model, options, watch) = (&session, &model, &options, watch.clone());
            async move {
                // A run refuses the prompts past its budgets.
                if let Some(Err(error)) = watch.as_ref().map(|w| w.budget.take_subcall()) {
                    return PromptAnswer {
                        text: String::new(),
                        error,
                    };
                }
                let at = Instant::now();
                let (answer, note) = self.one(session, model, prompt, options).await;
                if let Some(watch) = watch {
                    watch.budget.spend_tokens(note.tokens);
                    let _ = watch.notes.send(RunNote::Subcall(SubcallNote {
                        wall_ms: at.elapsed().as_millis() as u64,
                        error: answer.error.clone(),
                        ..note
                    }));
                }
                answer
            }
        });
        SubcallAnswer {
            call_id: call.call_id,
            answers: join_all(answers).await,
            error: String::new(),
        }
    }

    /// The model a call asks: the one it names, if some node serves it, else the only one the
    /// cluster serves.
    fn model(&self, asked: &str) -> Result<String, String> {
        let served: Vec<String> = models::list(&self.registry, Instant::now())
            .into_iter()
            .map(|m| m.name)
            .collect();
        match (asked, served.as_slice()) {
            (_, []) => Err("the cluster serves no model".to_string()),
            ("", [only]) => Ok(only.clone()),
            ("", several) => Err(format!(
                "the cluster serves several models ({}): name one, as in llm_query(prompt, model=\"{}\")",
                several.join(", "),
                several[0]
            )),
            (asked, served) if served.iter().any(|m| m == asked) => Ok(asked.to_string()),
            (asked, served) => Err(format!(
                "no node serves model '{asked}'; the cluster serves {}",
                served.join(", ")
            )),
        }
    }

    /// Answers one prompt (from the cache when it can); says where and with how many tokens.
    async fn one(
        &self,
        session: &str,
        model: &str,
        prompt: String,
        options: &SamplingOptions,
    ) -> (PromptAnswer, SubcallNote) {
        let mut note = SubcallNote {
            model: model.to_string(),
            ..Default::default()
        };
        let mut hash = Sha256::new();
        for part in [
            model.as_bytes(),
            prompt.as_bytes(),
            &options.encode_to_vec(),
        ] {
            hash.update((part.len() as u64).to_le_bytes());
            hash.update(part);
        }
        let key = (session.to_string(), hash.finalize().into());
        if let Some(text) = self.cache.lock().expect("cache poisoned").get(&key) {
            counter!(cluster_metrics::SUBCALLS, "model" => model.to_string(), "outcome" => "cached")
                .increment(1);
            note.cached = true;
            let answer = PromptAnswer {
                text: text.clone(),
                error: String::new(),
            };
            return (answer, note);
        }
        let request = ChatRequest {
            model: model.to_string(),
            messages: vec![ChatMessage {
                role: "user".to_string(),
                content: prompt,
            }],
            options: Some(options.clone()),
            ..Default::default()
        };
        let whole = self.chats.whole(request).await;
        note.node = whole.node;
        note.tokens = whole.tokens;
        let (text, error) = (whole.text, whole.error);
        let outcome = if error.is_some() {
            "failed"
        } else {
            "answered"
        };
        counter!(cluster_metrics::SUBCALLS, "model" => model.to_string(), "outcome" => outcome)
            .increment(1);
        let answer = match error {
            Some(error) => PromptAnswer {
                text: String::new(),
                error,
            },
            None => {
                self.cache
                    .lock()
                    .expect("cache poisoned")
                    .put(key, text.clone());
                PromptAnswer {
                    text,
                    error: String::new(),
                }
            }
        };
        (answer, note)
    }
}
