//! Isolation layers by name, as agents report them and `--require-isolation` and the block
//! attribute `isolation=` take them.

use crate::proto::{IsolationLayer, PlacementConstraints};

/// Every layer, in the order they are reported.
pub const ALL: [IsolationLayer; 5] = [
    IsolationLayer::Cgroup,
    IsolationLayer::User,
    IsolationLayer::Network,
    IsolationLayer::Mount,
    IsolationLayer::Landlock,
];

/// The short name of a layer.
pub fn name(layer: IsolationLayer) -> &'static str {
    match layer {
        IsolationLayer::Cgroup => "cgroup",
        IsolationLayer::User => "user",
        IsolationLayer::Network => "network",
        IsolationLayer::Mount => "mount",
        IsolationLayer::Landlock => "landlock",
        IsolationLayer::Unspecified => "unspecified",
    }
}

/// Names of the layers with these proto numbers, comma-separated ("none" for none).
pub fn names(layers: &[i32]) -> String {
    let names: Vec<&str> = layers
        .iter()
        .filter_map(|l| IsolationLayer::try_from(*l).ok())
        .map(name)
        .collect();
    if names.is_empty() {
        "none".to_string()
    } else {
        names.join(",")
    }
}

impl PlacementConstraints {
    /// The layers asked for, without unknown numbers.
    pub fn required_layers(&self) -> Vec<IsolationLayer> {
        self.require_isolation()
            .filter(|l| *l != IsolationLayer::Unspecified)
            .collect()
    }
}

/// One layer by its name, in any case.
pub fn parse_name(text: &str) -> Result<IsolationLayer, String> {
    let text = text.trim();
    ALL.into_iter()
        .find(|layer| name(*layer).eq_ignore_ascii_case(text))
        .ok_or_else(|| {
            let known: Vec<&str> = ALL.into_iter().map(name).collect();
            format!(
                "'{text}' is not an isolation layer; known: {}",
                known.join(", ")
            )
        })
}

/// A comma-separated list of layer names, such as `network,user`.
pub fn parse_list(text: &str) -> Result<Vec<IsolationLayer>, String> {
    text.split(',')
        .filter(|n| !n.trim().is_empty())
        .map(parse_name)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_lists_parse_by_name_and_unknown_ones_are_named() {
        assert_eq!(
            parse_list("network, User"),
            Ok(vec![IsolationLayer::Network, IsolationLayer::User])
        );
        let err = parse_list("network,chroot").unwrap_err();
        assert!(
            err.contains("'chroot'") && err.contains("landlock"),
            "{err}"
        );
        assert_eq!(
            names(&[
                IsolationLayer::Cgroup as i32,
                IsolationLayer::Landlock as i32
            ]),
            "cgroup,landlock"
        );
        assert_eq!(names(&[]), "none");
    }
}
