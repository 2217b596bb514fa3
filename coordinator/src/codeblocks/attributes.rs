//! The attribute list of a fence's info string: `{node=NAME timeout=SECONDS key=value ...}`.
//! `node` pins the block to a node, `timeout` sets its wall-clock limit, any other key is a
//! label the chosen node must carry with that value.

use std::collections::BTreeMap;

/// What a block's attributes ask for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlockAttributes {
    pub node: Option<String>,
    pub timeout_seconds: Option<u32>,
    pub labels: BTreeMap<String, String>,
}

/// Parses the text after the language word. Empty text means no attributes.
pub fn parse_attributes(text: &str) -> Result<BlockAttributes, String> {
    let text = text.trim();
    if text.is_empty() {
        return Ok(BlockAttributes::default());
    }
    let inner = text
        .strip_prefix('{')
        .and_then(|t| t.strip_suffix('}'))
        .ok_or_else(|| format!("attributes '{text}' are not in braces: use {{key=value ...}}"))?;
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
                let seconds = value.trim_end_matches('s');
                attributes.timeout_seconds =
                    Some(seconds.parse().map_err(|_| {
                        format!("timeout '{value}' is not a whole number of seconds")
                    })?)
            }
            _ if key.is_empty() => return Err(format!("attribute '{pair}' has no key")),
            _ => {
                attributes.labels.insert(key.to_string(), value.to_string());
            }
        }
    }
    Ok(attributes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commas_quotes_and_suffixes_are_accepted() {
        let a = parse_attributes("{node=\"box\", timeout=5s}").unwrap();
        assert_eq!(a.node.as_deref(), Some("box"));
        assert_eq!(a.timeout_seconds, Some(5));
    }

    #[test]
    fn malformed_attributes_name_the_problem() {
        assert!(
            parse_attributes("node=box")
                .unwrap_err()
                .contains("not in braces")
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
