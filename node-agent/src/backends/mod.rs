//! The device's local LLM servers: Ollama's own API and any OpenAI-compatible server
//! (llama.cpp's server, vLLM, LM Studio, exo). Each is asked which models it serves, probed
//! with a one-token generation, and asked to generate, streaming text as it comes. The
//! [`catalog`] keeps what they serve and whether they work.

pub mod catalog;
mod ollama;
mod openai;
mod stream;

use std::{pin::Pin, time::Duration};

use futures_util::Stream;
use kowalski_exo_common::proto::{BackendKind, GenerateEvent, GenerateRequest};

pub use catalog::Catalog;

/// Ollama's address when the agent is given no backend.
pub const DEFAULT_OLLAMA_URL: &str = "http://127.0.0.1:11434";
/// A backend that does not answer a request's headers within this is unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Text deltas and one finished event, as the backend produces them.
pub type GenerationStream = Pin<Box<dyn Stream<Item = Result<GenerateEvent, BackendError>> + Send>>;

/// A model as its backend describes it.
#[derive(Clone, Debug, PartialEq)]
pub struct DiscoveredModel {
    pub name: String,
    /// Tokens, where the backend tells it.
    pub context_window: Option<u32>,
    /// The backend continues a trailing assistant message instead of answering it anew.
    pub continues_prefix: bool,
}

/// Why a backend could not answer.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("the backend at {url} does not answer: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("the backend at {url} answered {status}: {message}")]
    Refused {
        url: String,
        status: u16,
        message: String,
    },
    #[error("the backend at {url} sent what it should not: {reason}")]
    Malformed { url: String, reason: String },
    #[error("the backend at {url} offers no tokenizer")]
    NoTokenizer { url: String },
}

/// One local LLM server.
#[derive(Clone, Debug)]
pub enum Backend {
    Ollama(ollama::Ollama),
    OpenAi(openai::OpenAi),
}

impl Backend {
    /// Ollama's API at `url` (e.g. `http://127.0.0.1:11434`).
    pub fn ollama(url: &str) -> Self {
        Backend::Ollama(ollama::Ollama::new(url, client()))
    }

    /// An OpenAI-compatible server at its API base (e.g. `http://127.0.0.1:8000/v1`).
    pub fn openai(base: &str) -> Self {
        Backend::OpenAi(openai::OpenAi::new(base, client()))
    }

    pub fn kind(&self) -> BackendKind {
        match self {
            Backend::Ollama(_) => BackendKind::Ollama,
            Backend::OpenAi(_) => BackendKind::Openai,
        }
    }

    /// The address the agent was given.
    pub fn url(&self) -> &str {
        match self {
            Backend::Ollama(b) => b.url(),
            Backend::OpenAi(b) => b.url(),
        }
    }

    /// The models it serves now.
    pub async fn models(&self) -> Result<Vec<DiscoveredModel>, BackendError> {
        match self {
            Backend::Ollama(b) => b.models().await,
            Backend::OpenAi(b) => b.models().await,
        }
    }

    /// The tokens of each of `texts` as `model`'s own tokenizer counts them, where the backend
    /// offers its tokenizer (Ollama's API does not).
    pub async fn count_tokens(
        &self,
        model: &str,
        texts: &[String],
    ) -> Result<Vec<u64>, BackendError> {
        match self {
            Backend::Ollama(b) => Err(BackendError::NoTokenizer {
                url: b.url().to_string(),
            }),
            Backend::OpenAi(b) => {
                futures_util::future::try_join_all(texts.iter().map(|t| b.count_tokens(model, t)))
                    .await
            }
        }
    }

    /// Starts a generation; the stream ends after its finished event.
    pub async fn generate(
        &self,
        request: &GenerateRequest,
    ) -> Result<GenerationStream, BackendError> {
        match self {
            Backend::Ollama(b) => b.generate(request).await,
            Backend::OpenAi(b) => b.generate(request).await,
        }
    }
}

/// The HTTP client every backend uses: no overall timeout (answers stream for minutes), but a
/// bounded wait to connect.
fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        .build()
        .unwrap_or_default()
}

/// GETs `{url}{path}` and reads its JSON answer as `T`; `what` names it in the error.
async fn get_json<T: serde::de::DeserializeOwned>(
    client: &reqwest::Client,
    url: &str,
    path: &str,
    what: &str,
) -> Result<T, BackendError> {
    let response = client
        .get(format!("{url}{path}"))
        .send()
        .await
        .map_err(|e| unreachable(url, e))?;
    if !response.status().is_success() {
        return Err(refused(url, response).await);
    }
    response.json().await.map_err(|e| BackendError::Malformed {
        url: url.to_string(),
        reason: format!("{what}: {e}"),
    })
}

/// The error for a request that did not get an answer.
fn unreachable(url: &str, error: reqwest::Error) -> BackendError {
    BackendError::Unreachable {
        url: url.to_string(),
        reason: kowalski_exo_common::error_text::root_cause(&error),
    }
}

/// The error for a non-success answer, with the backend's own message where it gives one.
async fn refused(url: &str, response: reqwest::Response) -> BackendError {
    let status = response.status().as_u16();
    let body = response.text().await.unwrap_or_default();
    let message = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| {
            let error = v.get("error")?;
            error
                .get("message")
                .and_then(|m| m.as_str())
                .or(error.as_str())
                .map(str::to_string)
        })
        .unwrap_or(body);
    BackendError::Refused {
        url: url.to_string(),
        status,
        message,
    }
}
