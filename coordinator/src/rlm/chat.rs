//! The loop behind the chat APIs: every model is also served as `rlm:MODEL`. A chat request to
//! it runs the loop with the last user message as the question and the request's `context`
//! (else the earlier messages' content) as the context; the root model's turns stream as the
//! answer's text, and the final answer ends it, after a separator.

use kowalski_exo_common::proto::{
    Answering, AskEvent, AskRequest, ChatEvent, ChatFinished, ChatRequest, GenerateDelta,
    ask_event, chat_event,
};
use tokio::sync::mpsc;
use tonic::Status;

use crate::error::CoordinatorError;

/// The prefix that asks for the loop instead of one answer.
pub const PREFIX: &str = "rlm:";
/// Between the root model's turns and the final answer in the answer's text.
pub const SEPARATOR: &str = "\n\n---\nFinal answer:\n";

/// The loop's request for a chat request to `rlm:MODEL`; `None` for any other model.
pub fn ask_request(chat: &ChatRequest) -> Option<Result<AskRequest, CoordinatorError>> {
    let model = chat.model.strip_prefix(PREFIX)?;
    let Some(last) = chat.messages.iter().rposition(|m| m.role == "user") else {
        return Some(Err(CoordinatorError::MissingField(
            "messages (a user message)",
        )));
    };
    let context = if chat.context.is_empty() {
        let earlier: Vec<&str> = chat.messages[..last]
            .iter()
            .filter(|m| m.role != "system")
            .map(|m| m.content.as_str())
            .collect();
        earlier.join("\n\n").into_bytes()
    } else {
        chat.context.clone()
    };
    Some(Ok(AskRequest {
        model: model.to_string(),
        question: chat.messages[last].content.clone(),
        context,
        context_is_json: chat.context_is_json && !chat.context.is_empty(),
        options: chat.options.clone(),
        ..Default::default()
    }))
}

/// The `context` field of an HTTP request body as a chat request carries it: a string is text,
/// any other JSON value is JSON; absent or null, none.
pub fn context_field(value: Option<serde_json::Value>) -> (Vec<u8>, bool) {
    match value {
        None | Some(serde_json::Value::Null) => (Vec::new(), false),
        Some(serde_json::Value::String(text)) => (text.into_bytes(), false),
        Some(json) => (json.to_string().into_bytes(), true),
    }
}

/// The names the chat APIs list: every model the cluster serves, then each as `rlm:MODEL`.
pub fn listed(models: Vec<String>) -> Vec<String> {
    let loops: Vec<String> = models.iter().map(|m| format!("{PREFIX}{m}")).collect();
    models.into_iter().chain(loops).collect()
}

/// The loop's events as a chat answer's.
pub fn as_chat(
    mut asked: mpsc::Receiver<Result<AskEvent, Status>>,
    chat: mpsc::Sender<Result<ChatEvent, Status>>,
) {
    tokio::spawn(async move {
        while let Some(event) = asked.recv().await {
            let event = match event {
                Err(status) => Err(status),
                Ok(AskEvent { event: Some(event) }) => match event {
                    ask_event::Event::Started(started) => {
                        Ok(chat_event::Event::Answering(Answering {
                            node_id: String::new(),
                            node_name: started.node,
                            attempt: 1,
                        }))
                    }
                    ask_event::Event::Delta(delta) => Ok(chat_event::Event::Delta(delta)),
                    ask_event::Event::Turn(_) => Ok(chat_event::Event::Delta(GenerateDelta {
                        text: "\n\n".to_string(),
                    })),
                    ask_event::Event::Block(_)
                    | ask_event::Event::Subcall(_)
                    | ask_event::Event::Folded(_)
                    | ask_event::Event::Failover(_) => continue,
                    ask_event::Event::Finished(finished) => {
                        if finished.error.is_empty() {
                            let text = format!("{SEPARATOR}{}", finished.answer);
                            let delta = chat_event::Event::Delta(GenerateDelta { text });
                            if chat
                                .send(Ok(ChatEvent { event: Some(delta) }))
                                .await
                                .is_err()
                            {
                                return;
                            }
                        }
                        Ok(chat_event::Event::Finished(ChatFinished {
                            error: finished.error,
                            finish_reason: "stop".to_string(),
                            prompt_tokens: finished.prompt_tokens.min(u64::from(u32::MAX)) as u32,
                            completion_tokens: finished.completion_tokens.min(u64::from(u32::MAX))
                                as u32,
                            ..Default::default()
                        }))
                    }
                },
                Ok(AskEvent { event: None }) => continue,
            };
            let event = event.map(|event| ChatEvent { event: Some(event) });
            if chat.send(event).await.is_err() {
                return;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use kowalski_exo_common::proto::ChatMessage;

    use super::*;

    fn message(role: &str, content: &str) -> ChatMessage {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }

    #[test]
    fn the_last_user_message_is_the_question_and_the_earlier_ones_the_context() {
        let chat = ChatRequest {
            model: "rlm:tiny".into(),
            messages: vec![
                message("system", "be brief"),
                message("user", "first document"),
                message("assistant", "noted"),
                message("user", "what did I send?"),
            ],
            ..Default::default()
        };
        let ask = ask_request(&chat).unwrap().unwrap();
        assert_eq!(
            (ask.model.as_str(), ask.question.as_str()),
            ("tiny", "what did I send?")
        );
        assert_eq!(ask.context, b"first document\n\nnoted");
        let plain = ChatRequest {
            model: "tiny".into(),
            ..chat.clone()
        };
        assert!(ask_request(&plain).is_none());
        // A context field stands in for the earlier messages.
        let (context, context_is_json) = context_field(Some(serde_json::json!([1, 2])));
        let with_field = ChatRequest {
            context,
            context_is_json,
            ..chat
        };
        let ask = ask_request(&with_field).unwrap().unwrap();
        assert_eq!(
            (ask.context.as_slice(), ask.context_is_json),
            (&b"[1,2]"[..], true)
        );
        assert_eq!(
            context_field(Some("text".into())),
            (b"text".to_vec(), false)
        );
        assert_eq!(
            context_field(Some(serde_json::Value::Null)),
            (Vec::new(), false)
        );
    }

    #[test]
    fn every_model_is_listed_also_as_its_loop() {
        assert_eq!(
            listed(vec!["a".into(), "b".into()]),
            ["a", "b", "rlm:a", "rlm:b"]
        );
    }
}
