//! The attribute list of a fence's info string: `{node=NAME timeout=SECONDS key=value ...}`.
//! `node` pins the block to a node, `timeout` sets its wall-clock limit (seconds, fractions
//! allowed), `isolation=network+user` names layers the node must give the run, `network=true`
//! lets it use the network, any other key is a label the chosen node must carry with that value.
//! Words outside the braces (```` ```python title="x.py" ````) are meant for other tools and
//! ignored.

use std::collections::BTreeMap;

use kowalski_exo_common::{isolation, proto::IsolationLayer};

/// What a block's attributes ask for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlockAttributes {
    pub node: Option<String>,
    /// Wall-clock timeout in milliseconds; 0 means the default.
    pub timeout_ms: Option<u32>,
    pub labels: BTreeMap<String, String>,
    /// Isolation layers the node must give the run.
    pub isolation: Vec<IsolationLayer>,
    /// The run may use the network.
    pub network: Option<bool>,
}

/// Parses the text after the language word: the part in braces, if any.
pub fn parse_attributes(text: &str) -> Result<BlockAttributes, String> {
    let Some(open) = text.find('{') else {
        return Ok(BlockAttributes::default());
    };
    let inner = text[open + 1..]
        .rfind('}')
        .map(|close| &text[open + 1..open + 1 + close])
        .ok_or_else(|| format!("attributes '{}' have no closing brace", &text[open..]))?;
    let mut attributes = BlockAttributes::default();
    for pair in inner
        .split(|c: char| c.is_whitespace() || c == ',')
        .filter(|p| !p.is_empty())
    {
        let (key, value) = pair
            .split_once('=')
            .ok_or_else(|| format!("attribute '{pair}' is not key=value"))?;
        let value = value.trim_matches('"');
        match key {
            "node" => attributes.node = Some(value.to_string()),
            "timeout" => {
                attributes.timeout_ms = Some(
                    timeout_ms(value.trim_end_matches('s'))
                        .ok_or_else(|| format!("timeout '{value}' is not a number of seconds"))?,
                )
            }
            "isolation" => attributes
                .isolation
                .extend(isolation::parse_list(&value.replace('+', ","))?),
            "network" => {
                attributes.network = Some(match value {
                    "true" | "yes" | "on" => true,
                    "false" | "no" | "off" => false,
                    _ => return Err(format!("network '{value}' is not true or false")),
                })
            }
            _ if key.is_empty() => return Err(format!("attribute '{pair}' has no key")),
            _ => {
                attributes.labels.insert(key.to_string(), value.to_string());
            }
        }
    }
    Ok(attributes)
}

/// Seconds (fractions allowed) as milliseconds, rounded up so a tiny timeout stays non-zero;
/// 0 stays 0, which means the default.
pub fn timeout_ms(seconds: &str) -> Option<u32> {
    let seconds: f64 = seconds.trim().parse().ok()?;
    if !seconds.is_finite() || seconds < 0.0 {
        return None;
    }
    Some((seconds * 1000.0).ceil().min(f64::from(u32::MAX)) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commas_quotes_and_suffixes_are_accepted() {
        let a = parse_attributes("{node=\"box\", timeout=5s}").unwrap();
        assert_eq!(a.node.as_deref(), Some("box"));
        assert_eq!(a.timeout_ms, Some(5000));
    }

    #[test]
    fn isolation_and_network_are_read_and_checked() {
        let a = parse_attributes("{isolation=network+user network=true}").unwrap();
        assert_eq!(
            a.isolation,
            vec![IsolationLayer::Network, IsolationLayer::User]
        );
        assert_eq!(a.network, Some(true));
        assert!(a.labels.is_empty());
        assert!(
            parse_attributes("{isolation=jail}")
                .unwrap_err()
                .contains("'jail' is not an isolation layer")
        );
        assert!(
            parse_attributes("{network=maybe}")
                .unwrap_err()
                .contains("'maybe'")
        );
    }

    #[test]
    fn fractional_and_zero_timeouts_are_accepted() {
        assert_eq!(
            parse_attributes("{timeout=0.5}").unwrap().timeout_ms,
            Some(500)
        );
        assert_eq!(parse_attributes("{timeout=0}").unwrap().timeout_ms, Some(0));
        assert_eq!(timeout_ms("-1"), None);
        assert_eq!(timeout_ms("0.0001"), Some(1));
    }

    #[test]
    fn words_outside_the_braces_are_ignored() {
        let a = parse_attributes("title=\"x.py\" {node=box} linenums").unwrap();
        assert_eq!(a.node.as_deref(), Some("box"));
        assert_eq!(
            parse_attributes("title=\"x.py\"").unwrap(),
            BlockAttributes::default()
        );
    }

    #[test]
    fn malformed_attributes_name_the_problem() {
        assert!(
            parse_attributes("{node=box")
                .unwrap_err()
                .contains("no closing brace")
        );
        assert!(
            parse_attributes("{node}")
                .unwrap_err()
                .contains("'node' is not key=value")
        );
        assert!(
            parse_attributes("{timeout=soon}")
                .unwrap_err()
                .contains("'soon'")
        );
    }
}
