//! What the device's backends serve, kept fresh: every backend is asked for its models at start
//! and then every poll interval, and probed with a one-token generation, so a backend whose port
//! answers but which cannot generate is reported down. Generations in flight are counted per
//! model. Changes are published on a watch channel for heartbeats.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use kowalski_exo_common::proto::{
    BackendState, ChatMessage, GenerateRequest, ModelOffer, SamplingOptions,
};
use tokio::sync::{OwnedRwLockReadGuard, RwLock, watch};
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;

use super::{Backend, BackendError, DiscoveredModel};

/// Seconds between polls of every backend, unless configured.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(30);
/// A backend that has not listed its models and generated a probe token within this is down.
const POLL_TIMEOUT: Duration = Duration::from_secs(20);

/// The models the device serves, and the backends behind them.
#[derive(Clone)]
pub struct Catalog {
    backends: Arc<Vec<Backend>>,
    /// One per backend URL: generations share it, a poll takes it alone. Any request could cut
    /// a running answer short (llama-cpp-python's server interrupts a generation when another
    /// request, even a model list, arrives), so a backend is polled only while idle.
    turns: Arc<HashMap<String, Arc<RwLock<()>>>>,
    offers: watch::Sender<Vec<ModelOffer>>,
    in_flight: Arc<Mutex<HashMap<String, u32>>>,
}

/// A generation in flight; counted until dropped.
pub struct Generating {
    catalog: Catalog,
    model: String,
}

impl Drop for Generating {
    fn drop(&mut self) {
        self.catalog.count(&self.model, false);
    }
}

impl Catalog {
    /// A catalog of `backends`, empty until the first poll.
    pub fn new(backends: Vec<Backend>) -> Self {
        Catalog {
            turns: Arc::new(
                backends
                    .iter()
                    .map(|b| (b.url().to_string(), Arc::default()))
                    .collect(),
            ),
            backends: Arc::new(backends),
            offers: watch::channel(Vec::new()).0,
            in_flight: Arc::default(),
        }
    }

    /// Polls now, then every `interval` until `shutdown`.
    pub async fn spawn_refresh(&self, interval: Duration, shutdown: CancellationToken) {
        self.poll().await;
        let catalog = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(interval) => catalog.poll().await,
                }
            }
        });
    }

    /// Every model served now, with its state and generations in flight.
    pub fn offers(&self) -> Vec<ModelOffer> {
        let in_flight = self.in_flight.lock().expect("catalog lock poisoned");
        let mut offers = self.offers.borrow().clone();
        for offer in &mut offers {
            offer.in_flight = in_flight.get(&offer.name).copied().unwrap_or(0);
        }
        offers
    }

    /// Changes of the offers, including generations starting and ending.
    pub fn subscribe(&self) -> watch::Receiver<Vec<ModelOffer>> {
        self.offers.subscribe()
    }

    /// The backend that serves `model` and works, or why none does.
    pub fn backend_for(&self, model: &str) -> Result<Backend, ModelUnavailable> {
        let offers = self.offers.borrow();
        let serving: Vec<&ModelOffer> = offers.iter().filter(|o| o.name == model).collect();
        if serving.is_empty() {
            let mut names: Vec<String> = offers.iter().map(|o| o.name.clone()).collect();
            names.sort();
            names.dedup();
            return Err(ModelUnavailable::Unknown {
                model: model.to_string(),
                served: names,
            });
        }
        let ready = serving
            .iter()
            .find(|o| o.state() == BackendState::Ready)
            .and_then(|o| self.backends.iter().find(|b| b.url() == o.backend_url));
        match ready {
            Some(backend) => Ok(backend.clone()),
            None => Err(ModelUnavailable::Down {
                model: model.to_string(),
                reason: serving[0].reason.clone(),
            }),
        }
    }

    /// A generation's turn on `backend`, shared with other generations; held, it keeps polls
    /// away.
    pub async fn turn(&self, backend: &Backend) -> Option<OwnedRwLockReadGuard<()>> {
        Some(self.turns.get(backend.url())?.clone().read_owned().await)
    }

    /// Counts a generation of `model` until the guard is dropped.
    pub fn generating(&self, model: &str) -> Generating {
        self.count(model, true);
        Generating {
            catalog: self.clone(),
            model: model.to_string(),
        }
    }

    fn count(&self, model: &str, up: bool) {
        {
            let mut in_flight = self.in_flight.lock().expect("catalog lock poisoned");
            let n = in_flight.entry(model.to_string()).or_default();
            *n = if up { *n + 1 } else { n.saturating_sub(1) };
        }
        self.offers.send_modify(|_| {});
    }

    /// Asks every backend for its models and probes it.
    async fn poll(&self) {
        let previous = self.offers();
        let mut offers = Vec::new();
        for backend in self.backends.iter() {
            let idle = self
                .turns
                .get(backend.url())
                .and_then(|turn| turn.clone().try_write_owned().ok());
            let Some(_alone) = idle else {
                // Generating now: it proves itself; keep what it offered.
                offers.extend(
                    previous
                        .iter()
                        .filter(|o| o.backend_url == backend.url())
                        .cloned(),
                );
                continue;
            };
            let polled = tokio::time::timeout(POLL_TIMEOUT, offers_of(backend, &previous)).await;
            offers.extend(polled.unwrap_or_else(|_| {
                down(
                    backend,
                    &previous,
                    &format!("it did not answer within {POLL_TIMEOUT:?}"),
                )
            }));
        }
        for offer in &mut offers {
            offer.in_flight = 0;
        }
        self.offers.send_if_modified(|current| {
            let changed = *current != offers;
            *current = offers;
            changed
        });
    }
}

/// Why a model cannot be generated with here.
#[derive(Debug, thiserror::Error)]
pub enum ModelUnavailable {
    #[error("no model '{model}' here; this node serves: {}", if served.is_empty() { "none".to_string() } else { served.join(", ") })]
    Unknown { model: String, served: Vec<String> },
    #[error("the backend serving '{model}' is down: {reason}")]
    Down { model: String, reason: String },
}

/// A backend's models, each ready or down by the probe's verdict. A backend that stops
/// answering keeps the models it last served, marked down, so they leave placement while the
/// node stays.
async fn offers_of(backend: &Backend, previous: &[ModelOffer]) -> Vec<ModelOffer> {
    let offer = |model: DiscoveredModel| ModelOffer {
        name: model.name,
        backend: backend.kind() as i32,
        backend_url: backend.url().to_string(),
        context_window: model.context_window.unwrap_or(0),
        continues_prefix: model.continues_prefix,
        ..Default::default()
    };
    let models = match backend.models().await {
        Ok(models) => models,
        Err(e) => {
            tracing::debug!(backend = backend.url(), error = %e, "backend not answering");
            return down(backend, previous, &e.to_string());
        }
    };
    let verdict = match models.first() {
        Some(model) => probe(backend, &model.name).await,
        None => Ok(()),
    };
    models
        .into_iter()
        .map(|m| {
            let mut offer = offer(m);
            match &verdict {
                Ok(()) => offer.state = BackendState::Ready as i32,
                Err(e) => {
                    offer.state = BackendState::Down as i32;
                    offer.reason = e.to_string();
                }
            }
            offer
        })
        .collect()
}

/// The models `backend` last served, marked down with `reason`.
fn down(backend: &Backend, previous: &[ModelOffer], reason: &str) -> Vec<ModelOffer> {
    previous
        .iter()
        .filter(|o| o.backend_url == backend.url())
        .map(|o| ModelOffer {
            state: BackendState::Down as i32,
            reason: reason.to_string(),
            in_flight: 0,
            ..o.clone()
        })
        .collect()
}

/// Proves the backend generates: one token of `model`.
async fn probe(backend: &Backend, model: &str) -> Result<(), BackendError> {
    let request = GenerateRequest {
        model: model.to_string(),
        messages: vec![ChatMessage {
            role: "user".into(),
            content: "Say OK.".into(),
        }],
        options: Some(SamplingOptions {
            max_tokens: 1,
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut stream = backend.generate(&request).await?;
    while let Some(event) = stream.next().await {
        event?;
    }
    Ok(())
}
