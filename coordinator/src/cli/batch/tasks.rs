//! The tasks of a batch file: one JSON object per line, each an exec task (`{"id", "lang",
//! "code", ...}`) or an ask task (`{"id", "ask", "model", "context"?}`), with an id unique in the
//! file. The whole file is checked before anything runs; an error names the line.

use std::collections::HashSet;

use kowalski_exo_common::{Language, request_size::MAX_CODE_BYTES};
use serde::Deserialize;
use serde_json::Value;

use crate::cli::Failure;

/// One task of the file.
#[derive(Clone, Debug, PartialEq)]
pub struct Task {
    pub id: String,
    pub work: Work,
}

/// What a task asks for.
#[derive(Clone, Debug, PartialEq)]
pub enum Work {
    /// Code run on a node (or in one of the batch's warm sessions).
    Exec {
        language: Language,
        code: String,
        stdin: String,
        args: Vec<String>,
        /// 0: the batch's timeout.
        timeout_ms: u32,
    },
    /// A question answered by the Recursive Language Model loop.
    Ask {
        question: String,
        model: String,
        /// Text, or JSON when `context_is_json`.
        context: Vec<u8>,
        context_is_json: bool,
    },
}

/// A line as written; which fields it has decides its kind.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    id: Value,
    lang: Option<String>,
    code: Option<String>,
    stdin: Option<String>,
    #[serde(default)]
    args: Vec<String>,
    /// Seconds, fractions allowed.
    timeout: Option<f64>,
    ask: Option<String>,
    model: Option<String>,
    context: Option<Value>,
}

/// The tasks of `text`, in file order; blank lines are skipped.
pub fn parse(text: &str) -> Result<Vec<Task>, Failure> {
    let mut tasks = Vec::new();
    let mut ids = HashSet::new();
    for (index, raw) in text.lines().enumerate() {
        if raw.trim().is_empty() {
            continue;
        }
        let at = index + 1;
        let task = task(raw).map_err(|why| Failure::usage(format!("line {at}: {why}")))?;
        if !ids.insert(task.id.clone()) {
            return Err(Failure::usage(format!(
                "line {at}: the id {} is already a task's (ids are unique in a batch)",
                task.id
            )));
        }
        tasks.push(task);
    }
    if tasks.is_empty() {
        return Err(Failure::usage("the batch file holds no task"));
    }
    Ok(tasks)
}

fn task(raw: &str) -> Result<Task, String> {
    let line: Line = serde_json::from_str(raw).map_err(|e| format!("not a task ({e})"))?;
    let id = match line.id {
        Value::String(id) if !id.is_empty() => id,
        Value::Number(n) => n.to_string(),
        other => {
            return Err(format!(
                "the id must be a non-empty string or a number, not {other}"
            ));
        }
    };
    let work = match (line.code, line.ask) {
        (Some(_), Some(_)) => return Err("a task has `code` or `ask`, not both".into()),
        (None, None) => {
            return Err("a task needs `code` (with `lang`) or `ask` (with `model`)".into());
        }
        (Some(code), None) => {
            let lang = line.lang.ok_or("an exec task needs `lang`")?;
            let language = Language::parse(&lang).map_err(|e| e.to_string())?;
            if code.len() > MAX_CODE_BYTES {
                return Err(format!(
                    "the code takes {} bytes, over the limit of {MAX_CODE_BYTES}",
                    code.len()
                ));
            }
            if line.model.is_some() || line.context.is_some() {
                return Err("`model` and `context` are for ask tasks".into());
            }
            let timeout_ms = match line.timeout {
                None => 0,
                Some(s) if s > 0.0 && s * 1000.0 <= f64::from(u32::MAX) => (s * 1000.0) as u32,
                Some(s) => return Err(format!("the timeout {s} is not a number of seconds")),
            };
            Work::Exec {
                language,
                code,
                stdin: line.stdin.unwrap_or_default(),
                args: line.args,
                timeout_ms,
            }
        }
        (None, Some(question)) => {
            let model = line.model.ok_or("an ask task needs `model`")?;
            if line.lang.is_some() || line.stdin.is_some() || !line.args.is_empty() {
                return Err("`lang`, `stdin` and `args` are for exec tasks".into());
            }
            let (context, context_is_json) = crate::rlm::chat::context_field(line.context);
            Work::Ask {
                question,
                model,
                context,
                context_is_json,
            }
        }
    };
    Ok(Task { id, work })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error(text: &str) -> String {
        parse(text).unwrap_err().message
    }

    #[test]
    fn exec_and_ask_tasks_are_told_apart_by_their_fields() {
        let tasks = parse(concat!(
            r#"{"id": "a", "lang": "py", "code": "print(1)", "timeout": 2.5}"#,
            "\n\n",
            r#"{"id": 7, "ask": "How many?", "model": "m", "context": {"n": [1, 2]}}"#,
            "\n",
        ))
        .unwrap();
        assert_eq!(tasks.len(), 2);
        assert_eq!(
            tasks[0].work,
            Work::Exec {
                language: Language::Python,
                code: "print(1)".into(),
                stdin: String::new(),
                args: Vec::new(),
                timeout_ms: 2500,
            }
        );
        assert_eq!(tasks[1].id, "7");
        assert_eq!(
            tasks[1].work,
            Work::Ask {
                question: "How many?".into(),
                model: "m".into(),
                context: br#"{"n":[1,2]}"#.to_vec(),
                context_is_json: true,
            }
        );
    }

    #[test]
    fn a_bad_line_is_named_before_anything_runs() {
        let ok = r#"{"id": "a", "lang": "py", "code": "1"}"#;
        assert!(error(&format!("{ok}\n{{nope")).starts_with("line 2: not a task"));
        assert!(error(&format!("{ok}\n{ok}")).contains("line 2: the id a is already"));
        assert!(error(r#"{"id": "b", "lang": "cobol", "code": "1"}"#).contains("cobol"));
        assert!(error(r#"{"id": "b", "code": "1"}"#).contains("needs `lang`"));
        assert!(error(r#"{"id": "b", "ask": "q"}"#).contains("needs `model`"));
        assert!(error(r#"{"id": "b"}"#).contains("`code` (with `lang`) or `ask`"));
        assert!(error(r#"{"id": "", "ask": "q", "model": "m"}"#).contains("non-empty"));
        assert!(error(r#"{"id": "b", "ask": "q", "model": "m", "colour": 1}"#).contains("colour"));
        assert!(error(r#"{"id": 1, "lang": "py", "code": "1", "timeout": -1}"#).contains("-1"));
        assert_eq!(error("\n\n"), "the batch file holds no task");
    }
}
