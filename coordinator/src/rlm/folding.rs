//! Context folding: when the conversation passes 85% of the root model's window, the turns
//! between the opening and the last one are summarised by the model, and the conversation goes
//! on with the summary in their place. [`super::tokens`] counts the tokens.

use kowalski_exo_common::proto::ChatMessage;

/// The share of the window past which the conversation is folded.
const FOLD_AT: f64 = 0.85;
/// Messages kept at the start (the system prompt and the question) and at the end (the last
/// turn and its output).
const KEEP_HEAD: usize = 2;
const KEEP_TAIL: usize = 2;

/// Whether `tokens` passes the share of `window` that calls for folding.
pub fn over(tokens: u64, window: u32) -> bool {
    tokens as f64 > FOLD_AT * f64::from(window)
}

/// The messages a fold summarises (between the kept head and tail), if there are any.
pub fn foldable(messages: &[ChatMessage]) -> Option<&[ChatMessage]> {
    let end = messages.len().checked_sub(KEEP_TAIL)?;
    (end > KEEP_HEAD).then(|| &messages[KEEP_HEAD..end])
}

/// The request that asks the model to summarise `turns`.
pub fn summary_request(turns: &[ChatMessage]) -> Vec<ChatMessage> {
    let transcript: String = turns
        .iter()
        .map(|m| format!("[{}]\n{}\n\n", m.role, m.content))
        .collect();
    vec![
        ChatMessage {
            role: "system".to_string(),
            content:
                "Summarise these earlier turns of work on a question for the one doing the work. \
Keep every finding, number, variable name and function defined in the session, and what is \
left to do; drop the rest."
                    .to_string(),
        },
        ChatMessage {
            role: "user".to_string(),
            content: transcript,
        },
    ]
}

/// The conversation with `summary` in place of the folded turns.
pub fn folded(messages: &[ChatMessage], summary: &str) -> Vec<ChatMessage> {
    let end = messages.len() - KEEP_TAIL;
    let mut out = messages[..KEEP_HEAD].to_vec();
    out.push(ChatMessage {
        role: "user".to_string(),
        content: format!(
            "Summary of the earlier turns (the whole conversation is in the session as `history`):\n{summary}"
        ),
    });
    out.extend_from_slice(&messages[end..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(role: &str, content: &str) -> ChatMessage {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }

    #[test]
    fn a_conversation_past_85_percent_of_the_window_is_over() {
        assert!(over(90, 100) && !over(80, 100));
    }

    #[test]
    fn the_turns_between_the_opening_and_the_last_one_are_folded() {
        let conversation: Vec<ChatMessage> =
            ["system", "user", "assistant", "user", "assistant", "user"]
                .iter()
                .enumerate()
                .map(|(i, role)| message(role, &format!("m{i}")))
                .collect();
        assert_eq!(foldable(&conversation).unwrap().len(), 2);
        assert!(foldable(&conversation[..4]).is_none());
        let after = folded(&conversation, "S");
        let contents: Vec<&str> = after.iter().map(|m| m.content.as_str()).collect();
        assert_eq!(contents[..2], ["m0", "m1"]);
        assert!(contents[2].ends_with("\nS"));
        assert_eq!(contents[3..], ["m4", "m5"]);
    }
}
