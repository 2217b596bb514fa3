//! What a node is and offers, in the form placement reads: built when the node registers and
//! again only when its runtimes, its models or the coordinator's count of its generations
//! change, then shared (an `Arc`) with every placement decision instead of rebuilt for each.

use std::collections::HashMap;

use kowalski_exo_common::{
    Language,
    proto::{self, BackendState, IsolationLayer, RuntimeHealth},
};

/// A node's lasting side: who it is and what it can take on.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Profile {
    pub id: String,
    pub name: String,
    pub labels: HashMap<String, String>,
    pub capabilities: Capabilities,
    pub capacity: u32,
    /// Isolation layers its runs get.
    pub layers: Vec<IsolationLayer>,
    pub allows_network: bool,
}

/// What every placement decision reads of a profile, small enough to copy for each node.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Sketch {
    /// Runs it takes at once (at least one).
    pub capacity: u32,
    pub languages: LanguageSet,
    pub name_key: NameKey,
}

impl Profile {
    /// The node `id` as `registration` describes it, with the generations this coordinator
    /// counts on it by model.
    pub fn of(
        id: &str,
        registration: &proto::Register,
        generations: &HashMap<String, u32>,
    ) -> Self {
        Profile {
            id: id.to_string(),
            name: registration.name.clone(),
            labels: registration.labels.clone(),
            capabilities: Capabilities::of(registration, generations),
            capacity: registration.capacity,
            layers: registration
                .isolation_layers()
                .filter(|l| *l != IsolationLayer::Unspecified)
                .collect(),
            allows_network: registration.allows_network,
        }
    }

    pub fn sketch(&self) -> Sketch {
        Sketch {
            capacity: self.capacity.max(1),
            languages: self.capabilities.languages,
            name_key: NameKey::of(&self.name),
        }
    }
}

/// What a node can take on, as it reports it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Capabilities {
    /// The languages whose runtime is healthy on the node.
    pub languages: LanguageSet,
    /// Models its backends serve, working or not, in the node's order.
    pub models: Vec<ServedModel>,
}

/// A model one of a node's backends serves.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ServedModel {
    pub name: String,
    /// Generations in flight: the coordinator's own count once it has placed the model there
    /// (a heartbeat is up to a beat late, both when one starts and when one ends), else the
    /// node's last report (after a coordinator restart, say).
    pub in_flight: u32,
    /// Why its backend is down; none while it works.
    pub down: Option<String>,
    /// The backend continues a trailing assistant message.
    pub continues_prefix: bool,
}

impl Capabilities {
    fn of(registration: &proto::Register, generations: &HashMap<String, u32>) -> Self {
        Capabilities {
            languages: registration
                .runtimes
                .iter()
                .flat_map(|f| &f.runtimes)
                .filter(|r| r.health() == RuntimeHealth::Healthy)
                .filter_map(|r| Language::parse(&r.language).ok())
                .collect(),
            models: registration
                .models
                .iter()
                .flat_map(|c| &c.models)
                .map(|m| ServedModel {
                    name: m.name.clone(),
                    in_flight: generations.get(&m.name).copied().unwrap_or(m.in_flight),
                    down: (m.state() != BackendState::Ready).then(|| m.reason.clone()),
                    continues_prefix: m.continues_prefix,
                })
                .collect(),
        }
    }

    pub fn runs(&self, language: Language) -> bool {
        self.languages.contains(language)
    }

    /// The working backend's offer of `model` that the node would generate with (its first).
    pub fn serving(&self, model: &str) -> Option<&ServedModel> {
        self.models
            .iter()
            .find(|m| m.name == model && m.down.is_none())
    }

    /// Why `model` cannot be generated with here although a backend lists it.
    pub fn down_reason(&self, model: &str) -> Option<String> {
        if self.serving(model).is_some() {
            return None;
        }
        self.models
            .iter()
            .find(|m| m.name == model)
            .and_then(|m| m.down.clone())
    }

    /// Names of the models a working backend serves.
    pub fn model_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .models
            .iter()
            .filter(|m| m.down.is_none())
            .map(|m| m.name.clone())
            .collect();
        names.sort();
        names.dedup();
        names
    }
}

/// A name's first eight bytes as one number: names whose keys differ compare as their keys do,
/// so ordering nodes by name compares the strings themselves only when the keys tie.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct NameKey(u64);

impl NameKey {
    pub fn of(name: &str) -> Self {
        let mut first = [0; 8];
        let len = name.len().min(8);
        first[..len].copy_from_slice(&name.as_bytes()[..len]);
        NameKey(u64::from_be_bytes(first))
    }
}

/// Languages as one bit each: placement tests every node for one without reading further.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LanguageSet(u16);

impl LanguageSet {
    pub fn contains(self, language: Language) -> bool {
        self.0 & Self::bit(language) != 0
    }

    /// Canonical names, in the order tables list languages.
    pub fn names(self) -> Vec<String> {
        Language::ALL
            .into_iter()
            .filter(|l| self.contains(*l))
            .map(|l| l.name().to_string())
            .collect()
    }

    fn bit(language: Language) -> u16 {
        1 << language as u16
    }
}

impl FromIterator<Language> for LanguageSet {
    fn from_iter<I: IntoIterator<Item = Language>>(languages: I) -> Self {
        LanguageSet(languages.into_iter().map(Self::bit).fold(0, |a, b| a | b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kowalski_exo_common::proto::{ModelCatalog, ModelOffer, Register, Runtime};

    #[test]
    fn only_healthy_runtimes_are_capabilities() {
        let runtime = |language: &str, health: RuntimeHealth| Runtime {
            language: language.into(),
            health: health as i32,
            ..Default::default()
        };
        let registration = Register {
            name: "box".into(),
            capacity: 2,
            runtimes: Some(proto::RuntimeFingerprint {
                runtimes: vec![
                    runtime("python", RuntimeHealth::Healthy),
                    runtime("perl", RuntimeHealth::Broken),
                    runtime("go", RuntimeHealth::Missing),
                ],
                probed_at_unix_ms: 0,
            }),
            ..Default::default()
        };
        let profile = Profile::of("id-box", &registration, &HashMap::new());
        assert_eq!(profile.capabilities.languages.names(), ["python"]);
        assert_eq!((profile.name.as_str(), profile.capacity), ("box", 2));
        assert!(profile.capabilities.runs(Language::Python));
        assert!(!profile.capabilities.runs(Language::Go));
    }

    #[test]
    fn a_language_set_holds_each_language_once_and_lists_them_in_table_order() {
        let set: LanguageSet = [Language::C, Language::Python, Language::C]
            .into_iter()
            .collect();
        assert!(set.contains(Language::C) && set.contains(Language::Python));
        assert!(!set.contains(Language::Bash));
        assert_eq!(set.names(), ["python", "c"]);
        let every: LanguageSet = Language::ALL.into_iter().collect();
        assert!(Language::ALL.into_iter().all(|l| every.contains(l)));
        assert_eq!(LanguageSet::default().names(), Vec::<String>::new());
    }

    #[test]
    fn name_keys_order_names_as_the_names_do_or_tie() {
        let names = [
            "",
            "a",
            "ab",
            "b",
            "sim-1",
            "sim-10",
            "sim-1000",
            "sim-10000",
            "sim-2",
        ];
        for a in names {
            for b in names {
                let (key_a, key_b) = (NameKey::of(a), NameKey::of(b));
                if key_a != key_b {
                    assert_eq!(key_a.cmp(&key_b), a.cmp(b), "{a} against {b}");
                }
            }
        }
        assert_eq!(NameKey::of("sim-1000"), NameKey::of("sim-10000"));
        assert!(NameKey::of("laptop") < NameKey::of("nas"));
    }

    #[test]
    fn generations_the_coordinator_placed_count_over_what_a_late_heartbeat_says() {
        let registration = Register {
            name: "box".into(),
            models: Some(ModelCatalog {
                models: vec![ModelOffer {
                    name: "m".into(),
                    state: BackendState::Ready as i32,
                    in_flight: 1,
                    ..Default::default()
                }],
            }),
            ..Default::default()
        };
        let in_flight = |generations: Option<u32>| {
            let counted = generations.map(|g| ("m".to_string(), g)).into_iter();
            Profile::of("id-box", &registration, &counted.collect())
                .capabilities
                .serving("m")
                .expect("m is served")
                .in_flight
        };
        // Placed just now, before a beat; ended just now, after one; never placed by us.
        assert_eq!(in_flight(Some(3)), 3);
        assert_eq!(in_flight(Some(0)), 0);
        assert_eq!(in_flight(None), 1);
    }
}
