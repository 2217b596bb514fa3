//! What the root model is told: the system prompt (the session, its functions, how to answer),
//! the first turn (the question and a description of the context, never the context itself),
//! and block output cut to a head and a tail.

/// Characters of the context shown as its preview.
const PREVIEW_CHARS: usize = 400;

/// The system prompt; `languages` are the session languages the cluster runs.
pub fn system(languages: &[&str]) -> String {
    format!(
        "You answer a question about a context that may be far larger than your window. The \
context is not in this conversation: it is loaded in a persistent Python REPL session as the \
variable `context`. You see only its type, size and a short preview.

Write Python in fenced blocks tagged ```repl (or ```python). Each block runs in the session, in \
order; variables, imports and functions persist across blocks and turns. You are shown what each \
block prints (stdout and stderr, cut in the middle when long), so print what you need to see, and \
keep large values in variables instead of printing them. The session also runs {languages} \
blocks, each language in an interpreter of its own.

The session has these functions:
- llm_query(prompt, model=None, **options) -> str: asks a language model on the cluster one \
prompt; use it to read, extract from or summarise a piece of the context.
- llm_query_batched(prompts, model=None, **options) -> list[str]: asks every prompt at once, \
spread over every device of the cluster; far faster than calling llm_query in a loop. A prompt \
that fails comes back as a string starting with \"Error:\".
- rlm_query(prompt, context=None, model=None) -> str: starts a child run like this one, with a \
session of its own holding `context`, and returns its final answer; for a piece too hard for one \
llm_query. rlm_query_batched(prompts, contexts=None, model=None) -> list[str] runs children at \
once over the cluster.
Options are temperature, top_p, max_tokens, stop and seed. In JavaScript blocks these functions \
return promises; in bash, `llm_query PROMPT` and `rlm_query PROMPT [CONTEXT]` print the answer.

Work in steps: look at the context's structure, split it into pieces, ask about the pieces with \
llm_query_batched, keep the answers in variables, then combine them.

When you know the answer, give it on a line of its own, outside any code block, as FINAL(your \
answer), or as FINAL_VAR(name) to answer with the value of a session variable. Code may instead \
set answer = {{\"content\": ..., \"ready\": True}}. Do not give a final answer before you have \
looked at the context.",
        languages = languages.join(", ")
    )
}

/// The first user turn: the question and what the context is.
pub fn first_turn(question: &str, kind: &str, length: u64, preview: &str) -> String {
    format!(
        "The context is a {kind} of {length} {unit}. Its beginning:\n<<<\n{preview}\n>>>\n\n\
Question: {question}",
        unit = if kind == "str" { "characters" } else { "items" },
    )
}

/// The start of the context's text, for its preview.
pub fn preview(text: &str) -> &str {
    match text.char_indices().nth(PREVIEW_CHARS) {
        Some((at, _)) => &text[..at],
        None => text,
    }
}

/// The user turn after a reply with neither code nor a final answer.
pub const NO_CODE: &str = "Your reply had no code block and no final answer. Write a ```repl \
block to look at the context, or give FINAL(answer).";

/// The user turn that asks for an answer when the turns ran out.
pub const LAST_TURN: &str = "You have no turns left. Give your best answer now, as FINAL(answer) \
on a line of its own.";

/// `output` cut to at most `max` characters: its head and tail with a marker saying how much was
/// cut from the middle.
pub fn cut(output: &str, max: usize) -> String {
    let count = output.chars().count();
    if count <= max {
        return output.to_string();
    }
    let keep = max / 2;
    let head: String = output.chars().take(keep).collect();
    let tail: String = output.chars().skip(count - keep).collect();
    format!(
        "{head}\n[... {} characters cut ...]\n{tail}",
        count - 2 * keep
    )
}

/// How a block's output is shown to the model.
pub fn block_output(index: usize, blocks: usize, output: &str) -> String {
    let output = if output.trim().is_empty() {
        "(no output)"
    } else {
        output
    };
    if blocks > 1 {
        format!("Output of block {index}:\n{output}")
    } else {
        format!("Output:\n{output}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_output_keeps_its_head_and_tail_and_says_how_much_was_cut() {
        let output: String = (0..100)
            .map(|i| char::from(b'a' + (i % 26) as u8))
            .collect();
        let cut_output = cut(&output, 20);
        assert!(cut_output.starts_with("abcdefghij\n[... 80 characters cut ...]\n"));
        assert!(cut_output.ends_with(&output[90..]));
        assert_eq!(cut("short", 20), "short");
    }

    #[test]
    fn the_preview_is_the_start_of_the_context() {
        let long = "é".repeat(1000);
        assert_eq!(preview(&long).chars().count(), PREVIEW_CHARS);
        assert_eq!(preview("tiny"), "tiny");
    }

    #[test]
    fn the_system_prompt_lists_every_function_and_the_other_languages() {
        let prompt = system(&["javascript", "bash"]);
        for function in [
            "llm_query(",
            "llm_query_batched(",
            "rlm_query(",
            "rlm_query_batched(",
            "`rlm_query PROMPT [CONTEXT]`",
        ] {
            assert!(prompt.contains(function), "{function}");
        }
        assert!(prompt.contains("runs javascript, bash blocks"), "{prompt}");
    }
}
