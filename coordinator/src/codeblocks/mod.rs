//! Code blocks out of LLM output: every fenced block of a CommonMark document, in document
//! order, with its language resolved through the alias table and its optional attributes
//! (```` ```python {node=gpu-box timeout=60} ````). Blocks that cannot run say why.

mod attributes;

use kowalski_exo_common::Language;
use pulldown_cmark::{CodeBlockKind, Event, Parser, Tag, TagEnd};

pub use attributes::{BlockAttributes, parse_attributes, timeout_ms};

/// One fenced block.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CodeBlock {
    /// Position among the fenced blocks, from 0.
    pub index: usize,
    /// 1-based line of the opening fence.
    pub line: usize,
    /// The language word of the info string, as written.
    pub info_language: String,
    /// The language, when the word is in the alias table.
    pub language: Option<Language>,
    /// The code exactly as the block holds it.
    pub code: String,
    pub attributes: BlockAttributes,
    /// Why the block cannot run, found from the block alone (no language, unknown language,
    /// malformed attributes).
    pub problem: Option<String>,
}

/// Every fenced block of `document`, in order.
pub fn parse(document: &str) -> Vec<CodeBlock> {
    let mut blocks = Vec::new();
    let mut open: Option<CodeBlock> = None;
    for (event, range) in Parser::new(document).into_offset_iter() {
        match event {
            Event::Start(Tag::CodeBlock(CodeBlockKind::Fenced(info))) => {
                let line = document[..range.start].matches('\n').count() + 1;
                open = Some(block_from_info(blocks.len(), line, &info));
            }
            Event::Text(text) => {
                if let Some(block) = open.as_mut() {
                    block.code.push_str(&text);
                }
            }
            Event::End(TagEnd::CodeBlock) => {
                if let Some(block) = open.take() {
                    blocks.push(block);
                }
            }
            _ => {}
        }
    }
    blocks
}

fn block_from_info(index: usize, line: usize, info: &str) -> CodeBlock {
    let info = info.trim();
    let (word, rest) = match info.find(|c: char| c.is_whitespace() || c == '{') {
        Some(at) => (&info[..at], info[at..].trim()),
        None => (info, ""),
    };
    let (attributes, attribute_problem) = match parse_attributes(rest) {
        Ok(attributes) => (attributes, None),
        Err(problem) => (BlockAttributes::default(), Some(problem)),
    };
    let (language, language_problem) = if word.is_empty() {
        (None, Some("the block names no language".to_string()))
    } else {
        match Language::parse(word) {
            Ok(language) => (Some(language), None),
            Err(unknown) => (None, Some(unknown.to_string())),
        }
    };
    CodeBlock {
        index,
        line,
        info_language: word.to_string(),
        language,
        code: String::new(),
        attributes,
        problem: language_problem.or(attribute_problem),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_after_the_language_that_are_not_attributes_are_ignored() {
        let blocks = parse("```python title=\"x.py\"\nprint(1)\n```\n");
        assert_eq!(blocks[0].language, Some(Language::Python));
        assert_eq!(blocks[0].problem, None);
    }

    #[test]
    fn fenced_blocks_come_in_document_order_with_lines_and_exact_code() {
        let doc =
            "# Title\n\n```python\nprint(1)\n```\n\ntext\n\n~~~bash\necho hi\n  indented\n~~~\n";
        let blocks = parse(doc);
        assert_eq!(blocks.len(), 2);
        assert_eq!(blocks[0].line, 3);
        assert_eq!(blocks[0].language, Some(Language::Python));
        assert_eq!(blocks[0].code, "print(1)\n");
        assert_eq!(blocks[1].line, 9);
        assert_eq!(blocks[1].language, Some(Language::Bash));
        assert_eq!(blocks[1].code, "echo hi\n  indented\n");
    }

    #[test]
    fn a_longer_fence_holds_a_shorter_one() {
        let doc = "````markdown\n```python\nprint(1)\n```\n````\n\n```py\nprint(2)\n```\n";
        let blocks = parse(doc);
        assert_eq!(blocks.len(), 2);
        assert_eq!(blocks[0].info_language, "markdown");
        assert_eq!(blocks[0].code, "```python\nprint(1)\n```\n");
        assert!(
            blocks[0]
                .problem
                .as_deref()
                .unwrap()
                .contains("unknown language 'markdown'")
        );
        assert_eq!(blocks[1].code, "print(2)\n");
    }

    #[test]
    fn indented_fences_and_fences_in_lists_are_found() {
        let doc = "- step one:\n\n  ```sh\n  echo in list\n  ```\n\n   ```js\n   console.log(1)\n   ```\n";
        let blocks = parse(doc);
        assert_eq!(blocks.len(), 2);
        assert_eq!(blocks[0].language, Some(Language::Sh));
        assert_eq!(blocks[0].code, "echo in list\n");
        assert_eq!(blocks[1].language, Some(Language::Javascript));
        assert_eq!(blocks[1].code, "console.log(1)\n");
    }

    #[test]
    fn indented_code_without_fences_is_not_a_block() {
        assert!(parse("text\n\n    print('not run')\n").is_empty());
    }

    #[test]
    fn a_block_without_language_is_skipped_with_a_reason() {
        let blocks = parse("```\nls\n```\n");
        assert_eq!(blocks[0].language, None);
        assert_eq!(
            blocks[0].problem.as_deref(),
            Some("the block names no language")
        );
    }

    #[test]
    fn attributes_pin_and_limit_a_block() {
        let blocks = parse("```python {node=gpu-box timeout=60 gpu=yes}\nprint(1)\n```\n");
        let attributes = &blocks[0].attributes;
        assert_eq!(attributes.node.as_deref(), Some("gpu-box"));
        assert_eq!(attributes.timeout_ms, Some(60_000));
        assert_eq!(
            attributes.labels.get("gpu").map(String::as_str),
            Some("yes")
        );
        assert_eq!(blocks[0].problem, None);
    }

    #[test]
    fn unclosed_fence_runs_to_the_end_of_the_document() {
        let blocks = parse("```python\nprint(1)\n");
        assert_eq!(blocks.len(), 1);
        assert_eq!(blocks[0].code, "print(1)\n");
    }
}
