//! The final answer in a model's reply: `FINAL(...)` or `FINAL_VAR(name)` on a line of its own,
//! outside code blocks. The parentheses may nest and the value may run over several lines.

/// What a reply ends the loop with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Final {
    /// The answer itself.
    Text(String),
    /// The name of a session variable holding it.
    Variable(String),
}

/// The first final answer in `reply`, if it gives one.
pub fn find(reply: &str) -> Option<Final> {
    let prose = outside_code(reply);
    for (at, line) in line_starts(&prose) {
        let trimmed = line.trim_start();
        let offset = at + (line.len() - trimmed.len());
        for (marker, variable) in [("FINAL_VAR(", true), ("FINAL(", false)] {
            if trimmed.starts_with(marker) {
                let inner = balanced(&prose[offset + marker.len()..])?;
                let inner = inner.trim();
                return Some(if variable {
                    Final::Variable(inner.trim_matches(['"', '\'']).to_string())
                } else {
                    Final::Text(inner.to_string())
                });
            }
        }
    }
    None
}

/// The text up to the parenthesis that closes one already open, counting nested ones.
fn balanced(text: &str) -> Option<&str> {
    let mut depth = 1usize;
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth == 0 {
                    return Some(&text[..i]);
                }
            }
            _ => {}
        }
    }
    None
}

/// `reply` with the lines of fenced code blocks blanked (kept as empty lines).
fn outside_code(reply: &str) -> String {
    let mut fence: Option<&str> = None;
    let mut out = String::with_capacity(reply.len());
    for line in reply.split_inclusive('\n') {
        let trimmed = line.trim_start();
        let opener = ["```", "~~~"].into_iter().find(|f| trimmed.starts_with(f));
        match (fence, opener) {
            (None, Some(f)) => fence = Some(f),
            (Some(open), Some(f)) if open == f && trimmed.trim_end() == f => fence = None,
            (None, None) => {
                out.push_str(line);
                continue;
            }
            _ => {}
        }
        if line.ends_with('\n') {
            out.push('\n');
        }
    }
    out
}

/// Each line of `text` with the offset it starts at.
fn line_starts(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.split_inclusive('\n').scan(0, |at, line| {
        let start = *at;
        *at += line.len();
        Some((start, line))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn final_takes_nested_parentheses_and_several_lines() {
        let reply = "Done.\nFINAL(The sum (of all parts) is 42 (see f(x)).\nSecond line)\n";
        assert_eq!(
            find(reply),
            Some(Final::Text(
                "The sum (of all parts) is 42 (see f(x)).\nSecond line".into()
            ))
        );
    }

    #[test]
    fn final_var_names_a_variable() {
        assert_eq!(
            find("ok\n  FINAL_VAR(result)"),
            Some(Final::Variable("result".into()))
        );
        assert_eq!(
            find("FINAL_VAR('result')"),
            Some(Final::Variable("result".into()))
        );
    }

    #[test]
    fn only_a_line_of_its_own_outside_code_counts() {
        assert_eq!(find("I will call FINAL(x) later"), None);
        assert_eq!(find("```repl\nFINAL(inside code)\n```\n"), None);
        assert_eq!(
            find("```python\nprint(1)\n```\nFINAL(after)"),
            Some(Final::Text("after".into()))
        );
        assert_eq!(find("FINAL(never closed"), None);
    }
}
