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

/// True when a gRPC status is the transport failing (the peer died, the connection broke or
/// could not be made) rather than an answer the peer gave: tonic and hyper make these, in their
/// own words. An agent's own "the backend at ... does not answer: connection refused" is not one.
pub fn broken_transport(status: &tonic::Status) -> bool {
    const TRANSPORT: [&str; 9] = [
        "h2 protocol error",
        "transport error",
        "error trying to connect",
        "tcp connect error",
        "connection reset",
        "connection closed",
        "broken pipe",
        "error reading a body",
        // hyper's word for a connection that died under a request
        "operation was canceled",
    ];
    use tonic::Code;
    let message = status.message().to_ascii_lowercase();
    matches!(
        status.code(),
        Code::Unavailable | Code::Unknown | Code::Internal | Code::Cancelled
    ) && TRANSPORT.iter().any(|words| message.contains(words))
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

    #[test]
    fn a_broken_connection_is_told_from_an_answer_about_a_backend() {
        let broken = tonic::Status::unavailable("error trying to connect: tcp connect error");
        assert!(broken_transport(&broken));
        let reset = tonic::Status::unknown("h2 protocol error: connection reset");
        assert!(broken_transport(&reset));
        assert!(broken_transport(&tonic::Status::cancelled(
            "operation was canceled"
        )));
        let answer = tonic::Status::unavailable(
            "the backend at http://127.0.0.1:8000/v1 does not answer: Connection refused (os error 111)",
        );
        assert!(!broken_transport(&answer));
        assert!(!broken_transport(&tonic::Status::invalid_argument(
            "transport error"
        )));
    }
}
