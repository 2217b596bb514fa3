//! Placement: hard filters (the capability the work needs, node pin, labels, not already tried,
//! ready, room), then the least loaded node, with a deterministic tie-break. A pure function
//! of the nodes and the requirements; [`with_candidates`] turns the registry's view into its
//! input.

use std::{cmp::Ordering, collections::BTreeMap, fmt};

use kowalski_exo_common::{Language, isolation, proto::IsolationLayer};
use tokio::time::Instant;

use crate::registry::{
    NodeRegistry, NodeState, NodeView, Profile,
    profile::{Capabilities, Sketch},
};

/// A node as placement sees it: its profile, kept by the registry, and how it stands now.
/// What every decision reads of the profile is copied in, so that a decision among thousands
/// of nodes reads one array.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Candidate<'a> {
    pub profile: &'a Profile,
    pub state: NodeState,
    /// Runs placed there and not finished.
    pub in_flight: u32,
    pub cpu_percent: f32,
    sketch: Sketch,
}

impl<'a> Candidate<'a> {
    fn of(node: NodeView<'a>) -> Self {
        Candidate {
            profile: node.profile,
            state: node.state,
            in_flight: node.in_flight,
            cpu_percent: node.cpu_percent,
            sketch: node.sketch,
        }
    }

    pub fn id(&self) -> &'a str {
        &self.profile.id
    }

    pub fn name(&self) -> &'a str {
        &self.profile.name
    }

    fn capabilities(&self) -> &'a Capabilities {
        &self.profile.capabilities
    }
}

/// `decide` with every node as placement sees it now, read in place under the registry's lock
/// (so `decide` must be quick, and must not call the registry: work out the requirements
/// first), in no particular order: placement's choice does not depend on it (ties end on name
/// and id), and refusals list nodes by name.
pub fn with_candidates<T>(
    registry: &NodeRegistry,
    now: Instant,
    decide: impl FnOnce(&[Candidate<'_>]) -> T,
) -> T {
    registry.with_nodes(now, |nodes| {
        decide(&nodes.map(Candidate::of).collect::<Vec<_>>())
    })
}

/// What a piece of work needs of its node.
#[derive(Clone, Debug, Default)]
pub struct Requirements<'a> {
    /// A code run's language.
    pub language: Option<Language>,
    /// A generation's model.
    pub model: Option<&'a str>,
    /// A generation goes on from text already sent: a node whose backend continues a prefix
    /// beats one that must generate the answer again.
    pub continuing: bool,
    /// A node to choose when it fits (a conversation's last node).
    pub prefer: Option<&'a str>,
    /// Node name or id the run is pinned to.
    pub node: Option<&'a str>,
    pub labels: BTreeMap<String, String>,
    /// Isolation layers the node must give the run.
    pub isolation: &'a [IsolationLayer],
    /// The run uses the network: only a node whose owner allows it.
    pub network: bool,
    /// Node ids already tried for this run.
    pub exclude: &'a [String],
}

/// Why no node was chosen.
#[derive(Clone, Debug, PartialEq)]
pub enum Unplaceable {
    /// No node has the runtime: nothing will change that soon.
    NoRuntime {
        language: String,
        /// Each node's name with the languages it offers.
        offered: Vec<(String, Vec<String>)>,
        /// The node the run was pinned to, if any.
        pinned: Option<String>,
    },
    /// The pinned node is not known.
    UnknownNode { node: String, known: Vec<String> },
    /// Nodes list the model, but the backend serving it is down on each.
    ModelDown {
        model: String,
        /// Each such node's name with why its backend is down.
        down: Vec<(String, String)>,
    },
    /// No node serves the model with a working backend.
    NoModel {
        model: String,
        /// Each node's name with the models it serves.
        offered: Vec<(String, Vec<String>)>,
    },
    /// No node with the runtime carries the labels.
    NoLabelMatch {
        labels: BTreeMap<String, String>,
        /// Each node with the runtime, with the labels it carries.
        carried: Vec<(String, BTreeMap<String, String>)>,
    },
    /// No fitting node gives every isolation layer asked for.
    NoIsolation {
        required: Vec<IsolationLayer>,
        /// Each fitting node's name with the layers it gives.
        offered: Vec<(String, Vec<IsolationLayer>)>,
    },
    /// No fitting node lets runs use the network.
    NoNetwork { nodes: Vec<String> },
    /// Every fitting node was already tried.
    Exhausted { tried: usize },
    /// Fitting nodes exist but none is ready (suspect or down; some may be draining).
    NoneReady { states: Vec<(String, NodeState)> },
    /// Every fitting node is draining: an operator's choice that waiting does not undo.
    Draining { nodes: Vec<String> },
    /// Every fitting ready node is running all it can.
    AllBusy,
}

impl Unplaceable {
    /// True when waiting may help (a node may come back or free a slot).
    pub fn is_transient(&self) -> bool {
        matches!(self, Unplaceable::NoneReady { .. } | Unplaceable::AllBusy)
    }
}

impl fmt::Display for Unplaceable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unplaceable::NoRuntime {
                language, offered, ..
            } if offered.is_empty() => {
                write!(f, "no node can run {language}: the cluster has no nodes")
            }
            Unplaceable::NoRuntime {
                language,
                offered,
                pinned: Some(node),
            } => write!(
                f,
                "the run is pinned to '{node}', which cannot run {language}: it offers {}",
                offered
                    .iter()
                    .flat_map(|(_, languages)| languages.clone())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Unplaceable::NoRuntime {
                language, offered, ..
            } => {
                let offers: Vec<String> = offered
                    .iter()
                    .map(|(name, languages)| format!("{name} offers {}", languages.join(", ")))
                    .collect();
                write!(f, "no node can run {language}: {}", some(&offers, "; "))
            }
            Unplaceable::NoModel { model, offered } => {
                let offers: Vec<String> = offered
                    .iter()
                    .map(|(name, models)| {
                        if models.is_empty() {
                            format!("{name} serves none")
                        } else {
                            format!("{name} serves {}", models.join(", "))
                        }
                    })
                    .collect();
                if offers.is_empty() {
                    write!(
                        f,
                        "no node serves the model '{model}': the cluster has no nodes"
                    )
                } else {
                    write!(
                        f,
                        "no node serves the model '{model}': {}",
                        some(&offers, "; ")
                    )
                }
            }
            Unplaceable::ModelDown { model, down } => {
                let down: Vec<String> = down
                    .iter()
                    .map(|(name, reason)| format!("{name}: {reason}"))
                    .collect();
                write!(
                    f,
                    "every backend serving the model '{model}' is down ({})",
                    some(&down, "; ")
                )
            }
            Unplaceable::UnknownNode { node, known } => write!(
                f,
                "no node is called '{node}'; known nodes: {}",
                if known.is_empty() {
                    "none".to_string()
                } else {
                    some(known, ", ")
                }
            ),
            Unplaceable::NoLabelMatch { labels, carried } => {
                let pairs = |labels: &BTreeMap<String, String>| {
                    let pairs: Vec<String> =
                        labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    if pairs.is_empty() {
                        "no labels".to_string()
                    } else {
                        pairs.join(", ")
                    }
                };
                let carried: Vec<String> = carried
                    .iter()
                    .map(|(name, labels)| format!("{name} has {}", pairs(labels)))
                    .collect();
                write!(
                    f,
                    "no node with the runtime carries the labels {} ({})",
                    pairs(labels),
                    some(&carried, "; ")
                )
            }
            Unplaceable::NoIsolation { required, offered } => {
                let names = |layers: &[IsolationLayer]| {
                    let numbers: Vec<i32> = layers.iter().map(|l| *l as i32).collect();
                    isolation::names(&numbers)
                };
                let offered: Vec<String> = offered
                    .iter()
                    .map(|(name, layers)| format!("{name} gives {}", names(layers)))
                    .collect();
                write!(
                    f,
                    "no node gives the isolation asked for ({}): {}",
                    names(required),
                    some(&offered, "; ")
                )
            }
            Unplaceable::NoNetwork { nodes } => write!(
                f,
                "no node lets runs use the network ({} do not; their owners can allow it with node-agent --allow-network)",
                some(nodes, ", ")
            ),
            Unplaceable::Exhausted { tried } => {
                write!(f, "no other node can take it after {tried} tried")
            }
            Unplaceable::NoneReady { states } => {
                let states: Vec<String> = states
                    .iter()
                    .map(|(name, state)| format!("{name} is {}", state.name()))
                    .collect();
                write!(f, "no fitting node is ready: {}", some(&states, ", "))
            }
            Unplaceable::Draining { nodes } if nodes.len() == 1 => write!(
                f,
                "node '{0}' is draining and takes no new work (`coordinator undrain {0}` takes it back)",
                nodes[0]
            ),
            Unplaceable::Draining { nodes } => write!(
                f,
                "every fitting node is draining and takes no new work: {}",
                some(nodes, ", ")
            ),
            Unplaceable::AllBusy => write!(f, "every fitting node is busy"),
        }
    }
}

impl std::error::Error for Unplaceable {}

/// Nodes a refusal names, in a message that stays readable on a large cluster.
const NAMED_AT_MOST: usize = 12;

/// The first `NAMED_AT_MOST` of `items` joined by `separator`, with how many more there are.
fn some(items: &[String], separator: &str) -> String {
    let shown = items[..items.len().min(NAMED_AT_MOST)].join(separator);
    match items.len().saturating_sub(NAMED_AT_MOST) {
        0 => shown,
        more => format!("{shown}{separator}and {more} more"),
    }
}

/// Chooses the node for a run.
pub fn place<'c, 'a>(
    candidates: &'c [Candidate<'a>],
    wanted: &Requirements<'_>,
) -> Result<&'c Candidate<'a>, Unplaceable> {
    let mut fitting: Vec<&Candidate> = candidates.iter().collect();
    if let Some(node) = wanted.node {
        fitting.retain(|c| c.name() == node || c.id() == node);
        if fitting.is_empty() {
            return Err(Unplaceable::UnknownNode {
                node: node.to_string(),
                known: in_name_order(&candidates.iter().collect::<Vec<_>>())
                    .iter()
                    .map(|c| c.name().to_string())
                    .collect(),
            });
        }
    }
    // Each filter keeps the nodes it was given (references: cheap), to explain an empty result
    // from them; the explanation is built only then.
    if let Some(language) = wanted.language {
        let before = fitting.clone();
        fitting.retain(|c| c.sketch.languages.contains(language));
        if fitting.is_empty() {
            let offered = in_name_order(&before)
                .iter()
                .map(|c| (c.name().to_string(), c.capabilities().languages.names()))
                .collect();
            return Err(Unplaceable::NoRuntime {
                language: language.name().to_string(),
                offered,
                pinned: wanted.node.map(str::to_string),
            });
        }
    }
    if let Some(model) = wanted.model {
        let before = fitting.clone();
        fitting.retain(|c| c.capabilities().serving(model).is_some());
        if fitting.is_empty() {
            let down: Vec<(String, String)> = in_name_order(&before)
                .iter()
                .filter_map(|c| Some((c.name().to_string(), c.capabilities().down_reason(model)?)))
                .collect();
            if !down.is_empty() {
                return Err(Unplaceable::ModelDown {
                    model: model.to_string(),
                    down,
                });
            }
            let offered = in_name_order(&before)
                .iter()
                .map(|c| (c.name().to_string(), c.capabilities().model_names()))
                .collect();
            return Err(Unplaceable::NoModel {
                model: model.to_string(),
                offered,
            });
        }
    }
    if !wanted.labels.is_empty() {
        let before = fitting.clone();
        fitting.retain(|c| {
            wanted
                .labels
                .iter()
                .all(|(k, v)| c.profile.labels.get(k) == Some(v))
        });
        if fitting.is_empty() {
            let carried = in_name_order(&before)
                .iter()
                .map(|c| {
                    (
                        c.name().to_string(),
                        c.profile.labels.clone().into_iter().collect(),
                    )
                })
                .collect();
            return Err(Unplaceable::NoLabelMatch {
                labels: wanted.labels.clone(),
                carried,
            });
        }
    }
    if !wanted.isolation.is_empty() {
        let before = fitting.clone();
        fitting.retain(|c| {
            wanted
                .isolation
                .iter()
                .all(|l| c.profile.layers.contains(l))
        });
        if fitting.is_empty() {
            let offered = in_name_order(&before)
                .iter()
                .map(|c| (c.name().to_string(), c.profile.layers.clone()))
                .collect();
            return Err(Unplaceable::NoIsolation {
                required: wanted.isolation.to_vec(),
                offered,
            });
        }
    }
    if wanted.network {
        let before = fitting.clone();
        fitting.retain(|c| c.profile.allows_network);
        if fitting.is_empty() {
            let nodes = in_name_order(&before)
                .iter()
                .map(|c| c.name().to_string())
                .collect();
            return Err(Unplaceable::NoNetwork { nodes });
        }
    }
    fitting.retain(|c| !wanted.exclude.iter().any(|tried| tried == c.id()));
    if fitting.is_empty() {
        return Err(Unplaceable::Exhausted {
            tried: wanted.exclude.len(),
        });
    }
    let before = fitting.clone();
    fitting.retain(|c| c.state == NodeState::Ready);
    if fitting.is_empty() {
        let states: Vec<(String, NodeState)> = in_name_order(&before)
            .iter()
            .map(|c| (c.name().to_string(), c.state))
            .collect();
        if states
            .iter()
            .all(|(_, state)| *state == NodeState::Draining)
        {
            return Err(Unplaceable::Draining {
                nodes: states.into_iter().map(|(name, _)| name).collect(),
            });
        }
        return Err(Unplaceable::NoneReady { states });
    }
    if let Some(model) = wanted.model {
        let continues = |c: &&Candidate| {
            c.capabilities()
                .serving(model)
                .is_some_and(|m| m.continues_prefix)
        };
        if wanted.continuing && fitting.iter().any(continues) {
            fitting.retain(continues);
        }
        // Backends queue generations themselves: no slot to wait for, fewest in flight first.
        // A conversation's node keeps it while no other is less busy: a warm prompt cache is not
        // worth waiting behind another answer.
        let generations =
            |c: &Candidate| c.capabilities().serving(model).map_or(0, |m| m.in_flight);
        let least = fitting.iter().map(|c| generations(c)).min();
        if let Some(preferred) = fitting
            .iter()
            .find(|c| Some(c.id()) == wanted.prefer && Some(generations(c)) == least)
        {
            return Ok(preferred);
        }
        return fitting
            .into_iter()
            .min_by(|a, b| {
                generations(a)
                    .cmp(&generations(b))
                    .then_with(|| load_order(a, b))
            })
            .ok_or(Unplaceable::AllBusy);
    }
    fitting.retain(|c| c.in_flight < c.sketch.capacity);
    if let Some(preferred) = fitting.iter().find(|c| Some(c.id()) == wanted.prefer) {
        return Ok(preferred);
    }
    fitting
        .into_iter()
        .min_by(|a, b| load_order(a, b))
        .ok_or(Unplaceable::AllBusy)
}

/// `nodes` ordered by name then id, as refusals list them (candidates come in no order).
fn in_name_order<'c, 'a>(nodes: &[&'c Candidate<'a>]) -> Vec<&'c Candidate<'a>> {
    let mut ordered = nodes.to_vec();
    ordered.sort_by(|a, b| by_name(a, b));
    ordered
}

/// Least loaded first: share of capacity in use, then CPU, then name and id.
fn load_order(a: &Candidate, b: &Candidate) -> Ordering {
    let share = |c: &Candidate| f64::from(c.in_flight) / f64::from(c.sketch.capacity);
    share(a)
        .total_cmp(&share(b))
        .then(a.cpu_percent.total_cmp(&b.cpu_percent))
        .then_with(|| by_name(a, b))
}

/// By name then id, the names' keys first.
fn by_name(a: &Candidate, b: &Candidate) -> Ordering {
    a.sketch
        .name_key
        .cmp(&b.sketch.name_key)
        .then_with(|| a.name().cmp(b.name()))
        .then_with(|| a.id().cmp(b.id()))
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::registry::profile::ServedModel;

    /// A node as the registry holds it: its profile and how it stands.
    #[derive(Clone, Debug)]
    struct Node {
        profile: Profile,
        state: NodeState,
        in_flight: u32,
        cpu_percent: f32,
    }

    fn node(name: &str, in_flight: u32, capacity: u32, cpu: f32) -> Node {
        let profile = Profile {
            id: format!("id-{name}"),
            name: name.to_string(),
            capabilities: Capabilities {
                languages: [Language::Python, Language::Bash].into_iter().collect(),
                models: Vec::new(),
            },
            capacity,
            layers: vec![IsolationLayer::Cgroup],
            ..Default::default()
        };
        Node {
            profile,
            state: NodeState::Ready,
            in_flight,
            cpu_percent: cpu,
        }
    }

    /// The name of the node placement chooses among `nodes`.
    fn choose(nodes: &[Node], wanted: &Requirements<'_>) -> Result<String, Unplaceable> {
        let candidates: Vec<Candidate> = nodes
            .iter()
            .map(|n| Candidate {
                profile: &n.profile,
                state: n.state,
                in_flight: n.in_flight,
                cpu_percent: n.cpu_percent,
                sketch: n.profile.sketch(),
            })
            .collect();
        place(&candidates, wanted).map(|c| c.name().to_string())
    }

    #[test]
    fn required_layers_and_network_keep_work_off_weaker_nodes() {
        let mut strong = node("strong", 3, 4, 0.0);
        strong.profile.layers = isolation::ALL.to_vec();
        let nodes = [node("weak", 0, 4, 0.0), strong];
        let layers = [IsolationLayer::Network, IsolationLayer::User];
        let contained = Requirements {
            isolation: &layers,
            ..python()
        };
        assert_eq!(choose(&nodes, &contained).unwrap(), "strong");
        let err = choose(&nodes[..1], &contained).unwrap_err();
        assert!(!err.is_transient());
        assert_eq!(
            err.to_string(),
            "no node gives the isolation asked for (network,user): weak gives cgroup"
        );
        let online = Requirements {
            network: true,
            ..python()
        };
        assert!(
            choose(&nodes, &online)
                .unwrap_err()
                .to_string()
                .contains("no node lets runs use the network (strong, weak do not")
        );
        let mut open = nodes.clone();
        open[1].profile.allows_network = true;
        assert_eq!(choose(&open, &online).unwrap(), "strong");
    }

    fn python() -> Requirements<'static> {
        Requirements {
            language: Some(Language::Python),
            ..Default::default()
        }
    }

    #[test]
    fn least_loaded_share_wins_then_cpu_then_name() {
        let table = [
            (vec![node("a", 2, 4, 0.0), node("b", 1, 4, 90.0)], "b"),
            (vec![node("a", 1, 2, 0.0), node("b", 1, 4, 0.0)], "b"),
            (vec![node("a", 0, 2, 50.0), node("b", 0, 2, 10.0)], "b"),
            (vec![node("b", 0, 2, 10.0), node("a", 0, 2, 10.0)], "a"),
        ];
        for (nodes, want) in table {
            assert_eq!(choose(&nodes, &python()).unwrap(), want, "{nodes:?}");
        }
    }

    #[test]
    fn hard_filters_remove_unfit_nodes() {
        let mut suspect = node("suspect", 0, 2, 0.0);
        suspect.state = NodeState::Suspect;
        let mut draining = node("draining", 0, 2, 0.0);
        draining.state = NodeState::Draining;
        let full = node("full", 2, 2, 0.0);
        let mut no_python = node("nopy", 0, 2, 0.0);
        no_python.profile.capabilities.languages = [Language::Bash].into_iter().collect();
        let busy_but_fit = node("fit", 1, 2, 99.0);
        let nodes = [suspect, draining, full, no_python, busy_but_fit];
        assert_eq!(choose(&nodes, &python()).unwrap(), "fit");
    }

    #[test]
    fn pin_labels_and_exclusions_narrow_the_choice() {
        let mut gpu = node("gpu-box", 3, 4, 0.0);
        gpu.profile.labels.insert("gpu".into(), "yes".into());
        let nodes = [node("laptop", 0, 4, 0.0), gpu];
        let pinned = Requirements {
            node: Some("gpu-box"),
            ..python()
        };
        assert_eq!(choose(&nodes, &pinned).unwrap(), "gpu-box");
        let by_id = Requirements {
            node: Some("id-laptop"),
            ..python()
        };
        assert_eq!(choose(&nodes, &by_id).unwrap(), "laptop");
        let labelled = Requirements {
            labels: [("gpu".to_string(), "yes".to_string())].into(),
            ..python()
        };
        assert_eq!(choose(&nodes, &labelled).unwrap(), "gpu-box");
        let tried = vec!["id-laptop".to_string()];
        let retry = Requirements {
            exclude: &tried,
            ..python()
        };
        assert_eq!(choose(&nodes, &retry).unwrap(), "gpu-box");
    }

    #[test]
    fn reasons_name_what_was_missing() {
        let nodes = [node("laptop", 0, 2, 0.0)];
        let rust = Requirements {
            language: Some(Language::Rust),
            ..Default::default()
        };
        let err = choose(&nodes, &rust).unwrap_err();
        assert!(!err.is_transient());
        assert_eq!(
            err.to_string(),
            "no node can run rust: laptop offers python, bash"
        );
        let pinned = Requirements {
            node: Some("nas"),
            ..python()
        };
        assert_eq!(
            choose(&nodes, &pinned).unwrap_err().to_string(),
            "no node is called 'nas'; known nodes: laptop"
        );
        let pinned_rust = Requirements {
            node: Some("laptop"),
            ..rust.clone()
        };
        assert_eq!(
            choose(&nodes, &pinned_rust).unwrap_err().to_string(),
            "the run is pinned to 'laptop', which cannot run rust: it offers python, bash"
        );
        let tried = vec!["id-laptop".to_string()];
        let retry = Requirements {
            exclude: &tried,
            ..python()
        };
        assert_eq!(
            choose(&nodes, &retry).unwrap_err(),
            Unplaceable::Exhausted { tried: 1 }
        );
        let busy = [node("laptop", 2, 2, 0.0)];
        assert!(choose(&busy, &python()).unwrap_err().is_transient());
        let mut down = node("laptop", 0, 2, 0.0);
        down.state = NodeState::Down;
        let err = choose(&[down], &python()).unwrap_err();
        assert!(err.is_transient());
        assert_eq!(err.to_string(), "no fitting node is ready: laptop is down");
    }

    #[test]
    fn a_refusal_on_a_large_cluster_names_a_few_nodes_and_counts_the_rest() {
        let nodes: Vec<Node> = (10..40)
            .map(|i| node(&format!("n{i}"), 0, 2, 0.0))
            .collect();
        let rust = Requirements {
            language: Some(Language::Rust),
            ..Default::default()
        };
        let message = choose(&nodes, &rust).unwrap_err().to_string();
        assert!(
            message.starts_with("no node can run rust: n10 offers python, bash; n11 offers"),
            "{message}"
        );
        assert!(
            message.ends_with("; n21 offers python, bash; and 18 more"),
            "{message}"
        );
        let unknown = Requirements {
            node: Some("nas"),
            ..python()
        };
        let message = choose(&nodes, &unknown).unwrap_err().to_string();
        assert!(message.ends_with("n20, n21, and 18 more"), "{message}");
    }

    #[test]
    fn a_pinned_draining_node_is_a_lasting_refusal_naming_the_way_back() {
        let mut draining = node("laptop", 0, 2, 0.0);
        draining.state = NodeState::Draining;
        let pinned = Requirements {
            node: Some("laptop"),
            ..python()
        };
        let err = choose(&[draining, node("desk", 0, 2, 0.0)], &pinned).unwrap_err();
        assert!(!err.is_transient());
        assert_eq!(
            err.to_string(),
            "node 'laptop' is draining and takes no new work (`coordinator undrain laptop` takes it back)"
        );
    }

    #[test]
    fn unmatched_labels_list_the_labels_nodes_carry() {
        let mut gpu = node("gpu-box", 0, 2, 0.0);
        gpu.profile.labels.insert("gpu".into(), "no".into());
        let wanted = Requirements {
            labels: [("gpu".to_string(), "yes".to_string())].into(),
            ..python()
        };
        assert_eq!(
            choose(&[gpu, node("laptop", 0, 2, 0.0)], &wanted)
                .unwrap_err()
                .to_string(),
            "no node with the runtime carries the labels gpu=yes (gpu-box has gpu=no; laptop has no labels)"
        );
    }

    /// A node serving model `m` with `in_flight` generations, its backend down with `down`.
    fn serving(name: &str, in_flight: u32, down: Option<&str>) -> Node {
        let mut node = node(name, 0, 2, 0.0);
        node.profile.capabilities.models = vec![ServedModel {
            name: "m".into(),
            in_flight,
            down: down.map(str::to_string),
            continues_prefix: true,
        }];
        node
    }

    fn model_m<'a>(prefer: Option<&'a str>) -> Requirements<'a> {
        Requirements {
            model: Some("m"),
            prefer,
            ..Default::default()
        }
    }

    #[test]
    fn a_generation_goes_to_the_node_with_fewest_in_flight() {
        let nodes = [serving("a", 2, None), serving("b", 1, None)];
        assert_eq!(choose(&nodes, &model_m(None)).unwrap(), "b");
    }

    #[test]
    fn a_conversation_keeps_its_node_only_while_no_other_is_less_busy() {
        let idle = [serving("a", 0, None), serving("b", 0, None)];
        assert_eq!(choose(&idle, &model_m(Some("id-b"))).unwrap(), "b");
        let busy = [serving("a", 0, None), serving("b", 1, None)];
        assert_eq!(choose(&busy, &model_m(Some("id-b"))).unwrap(), "a");
    }

    #[test]
    fn a_model_whose_backends_are_down_is_unavailable_not_unknown() {
        let nodes = [serving("a", 0, Some("connection refused"))];
        let down = choose(&nodes, &model_m(None)).unwrap_err();
        assert_eq!(
            down.to_string(),
            "every backend serving the model 'm' is down (a: connection refused)"
        );
        assert!(!down.is_transient());
        let unknown = Requirements {
            model: Some("other"),
            ..Default::default()
        };
        assert_eq!(
            choose(&nodes, &unknown).unwrap_err().to_string(),
            "no node serves the model 'other': a serves none"
        );
    }
}
