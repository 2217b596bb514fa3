//! Counting the conversation's tokens for folding: with the root model's own tokenizer, asked
//! of a node whose backend offers one (llama.cpp's servers, llama-cpp-python, vLLM), else with a
//! BPE tokenizer (tiktoken's cl100k), never words. Each distinct message is counted once a run.

use std::{
    collections::HashMap,
    hash::{DefaultHasher, Hash, Hasher},
};

use kowalski_exo_common::proto::ChatMessage;
use tracing::debug;

use crate::inference::chat::Chats;

/// Tokens each message costs beyond its content (role and framing), as chat templates add.
pub const PER_MESSAGE: u64 = 4;

/// Which tokenizer counted, as `AskFolded.tokenizer` names it.
pub const MODEL: &str = "model";
pub const CL100K: &str = "cl100k";

/// Counts a run's conversation, remembering each message's count.
pub struct TokenCounter {
    chats: Chats,
    model: String,
    /// The model's own tokenizer could not count; cl100k counts from then on.
    own_failed: bool,
    /// Tokens of each content counted, by its hash.
    counted: HashMap<u64, u64>,
}

impl TokenCounter {
    pub fn new(chats: Chats, model: &str) -> Self {
        TokenCounter {
            chats,
            model: model.to_string(),
            own_failed: false,
            counted: HashMap::new(),
        }
    }

    /// The tokenizer counting now.
    pub fn tokenizer(&self) -> &'static str {
        if self.own_failed { CL100K } else { MODEL }
    }

    /// Tokens of `messages`, by the model's own tokenizer while it answers, else by cl100k.
    pub async fn count(&mut self, messages: &[ChatMessage]) -> u64 {
        let mut new: Vec<String> = Vec::new();
        for m in messages {
            if !self.counted.contains_key(&key(&m.content)) && !new.contains(&m.content) {
                new.push(m.content.clone());
            }
        }
        if !new.is_empty() && !self.own_failed {
            match self.chats.count_tokens(&self.model, new.clone()).await {
                Ok(counts) if counts.len() == new.len() => {
                    for (text, count) in new.iter().zip(counts) {
                        self.counted.insert(key(text), count);
                    }
                    new.clear();
                }
                outcome => {
                    debug!(model = %self.model, ?outcome, "counting tokens with cl100k");
                    // Counts of two tokenizers do not add up: count everything again.
                    self.own_failed = true;
                    self.counted.clear();
                    return self.by_bpe(messages);
                }
            }
        }
        for text in new {
            self.counted.insert(key(&text), bpe(&text));
        }
        messages
            .iter()
            .map(|m| self.counted[&key(&m.content)] + PER_MESSAGE)
            .sum()
    }

    fn by_bpe(&mut self, messages: &[ChatMessage]) -> u64 {
        messages
            .iter()
            .map(|m| {
                let count = *self
                    .counted
                    .entry(key(&m.content))
                    .or_insert_with(|| bpe(&m.content));
                count + PER_MESSAGE
            })
            .sum()
    }
}

fn key(text: &str) -> u64 {
    let mut hasher = DefaultHasher::new();
    text.hash(&mut hasher);
    hasher.finish()
}

/// Tokens of `text` by cl100k.
pub fn bpe(text: &str) -> u64 {
    tiktoken_rs::cl100k_base_singleton()
        .encode_ordinary(text)
        .len() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_counted_by_the_tokenizer_not_by_words() {
        assert_eq!(bpe("hello world"), 2);
        assert!(bpe("antidisestablishmentarianism") > 1);
    }
}
