//! Error text for people: an error with its causes, each said once, or just its root cause.

/// `outer: cause: root`, skipping a cause whose text the line already holds (transport errors
/// often repeat their source: "tcp connect error: tcp connect error").
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let said = cause.to_string();
        if !said.is_empty() && !text.contains(&said) {
            text.push_str(": ");
            text.push_str(&said);
        }
        source = cause.source();
    }
    text
}

/// The innermost cause, which usually says it plainly ("Connection refused (os error 111)")
/// where the outer layers name the machinery ("transport error").
pub fn root_cause(error: &dyn std::error::Error) -> String {
    let mut innermost = error;
    while let Some(cause) = innermost.source() {
        innermost = cause;
    }
    innermost.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("{text}")]
    struct Layer {
        text: &'static str,
        #[source]
        source: Option<Box<Layer>>,
    }

    #[test]
    fn each_cause_is_said_once() {
        let root = Layer {
            text: "Connection refused (os error 111)",
            source: None,
        };
        let repeated = Layer {
            text: "tcp connect error",
            source: Some(Box::new(root)),
        };
        let outer = Layer {
            text: "tcp connect error",
            source: Some(Box::new(repeated)),
        };
        assert_eq!(
            error_chain(&outer),
            "tcp connect error: Connection refused (os error 111)"
        );
        assert_eq!(root_cause(&outer), "Connection refused (os error 111)");
    }
}
