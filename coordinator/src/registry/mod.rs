//! The live view of the cluster: every node that registered, what it runs, how loaded it is,
//! (through [`liveness`]) whether it is alive, and (through [`moves`]) the work lately moved
//! off nodes that failed it. Changes are published on a watch channel so dispatch can wake
//! when a node comes, goes, or frees a slot.

pub mod liveness;
pub mod moves;
pub mod profile;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, Weak},
    time::Duration,
};

use kowalski_exo_common::proto::{self, NodeInfo};
use tokio::{sync::watch, time::Instant};

pub use liveness::{LivenessConfig, NodeState};
use liveness::{Observation, assess, in_flight_lost};
use moves::RecentMoves;
use profile::NameKey;
pub use profile::{Profile, Sketch};

/// A node whose stream has been closed this long, with nothing in flight, is forgotten.
const FORGET_AFTER: Duration = Duration::from_secs(3600);
/// How often states are re-assessed for silence.
const ASSESS_PERIOD: Duration = Duration::from_millis(100);

thread_local! {
    /// Set while [`NodeRegistry::with_nodes`] reads under the lock: calling the registry then
    /// would wait for itself forever (checked in debug builds, as tests run).
    static READING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// [`READING`] set until dropped, on every path out.
struct Reading;

impl Reading {
    fn begin() -> Self {
        READING.set(true);
        Reading
    }
}

impl Drop for Reading {
    fn drop(&mut self) {
        READING.set(false);
    }
}

/// One node as last reported. Placement reads every node on each decision: what it does not
/// read is boxed, to keep the nodes small and close together in memory.
#[derive(Clone, Debug)]
struct Node {
    about: Box<About>,
    /// The CPU use its last heartbeat reported.
    cpu_percent: f32,
    observation: Observation,
    /// The state as last published.
    state: NodeState,
    /// Runs placed here and not finished.
    in_flight: u32,
    /// Which registry stream is the current one (a reconnect opens a new one).
    stream: u64,
    /// What placement reads of it, rebuilt when the registration or `generations` change.
    profile: Box<Profile>,
    /// `profile`'s sketch, kept beside the node so a decision does not follow the box.
    sketch: Sketch,
}

/// What placement does not read of a node.
#[derive(Clone, Debug)]
struct About {
    id: String,
    registration: proto::Register,
    load: proto::NodeLoad,
    /// Generations placed here and not finished, by every model this coordinator has placed
    /// here (zero included). Heartbeats report the node's own count, up to a beat late either
    /// way; this one is right the moment a generation starts or ends.
    generations: HashMap<String, u32>,
}

impl Node {
    fn refresh_profile(&mut self) {
        let about = &self.about;
        let profile = Profile::of(&about.id, &about.registration, &about.generations);
        self.sketch = profile.sketch();
        *self.profile = profile;
    }
}

/// A node as it stands at one moment, for whoever decides where work goes.
#[derive(Clone, Debug)]
pub struct NodeSnapshot {
    pub id: String,
    pub state: NodeState,
    /// What the node said of itself, runtimes updated by its heartbeats.
    pub registration: proto::Register,
    pub load: proto::NodeLoad,
    /// Runs placed there and not finished.
    pub in_flight: u32,
    /// Generations placed there and not finished, by every model placed there (zero included).
    pub generations: HashMap<String, u32>,
}

/// A node as it stands now, borrowed from the registry: what placement reads without copying
/// every node's registration.
#[derive(Clone, Copy, Debug)]
pub struct NodeView<'a> {
    pub id: &'a str,
    pub state: NodeState,
    pub registration: &'a proto::Register,
    pub load: &'a proto::NodeLoad,
    /// The load's CPU use, read without following `load`.
    pub cpu_percent: f32,
    pub in_flight: u32,
    pub generations: &'a HashMap<String, u32>,
    pub profile: &'a Profile,
    pub sketch: Sketch,
}

/// What a piece of work counts against its node while it runs.
#[derive(Clone, Copy, Debug)]
pub enum Load<'a> {
    /// A code run: one of the node's run slots.
    Run,
    /// A generation of this model.
    Generation(&'a str),
}

/// Every known node, shared by the registry streams, dispatch and the client API.
#[derive(Clone)]
pub struct NodeRegistry {
    inner: Arc<Mutex<Inner>>,
    config: LivenessConfig,
    changes: Arc<watch::Sender<u64>>,
    moves: RecentMoves,
}

#[derive(Default)]
struct Inner {
    nodes: HashMap<String, Node>,
    next_id: u64,
    next_stream: u64,
    generation: u64,
}

/// A node the operator named that cannot be told apart.
#[derive(Debug, thiserror::Error)]
pub enum NodeLookupError {
    #[error("no node is called '{0}'")]
    Unknown(String),
    #[error("'{0}' names several live nodes; use an id from `coordinator nodes`")]
    Ambiguous(String),
}

impl Default for NodeRegistry {
    fn default() -> Self {
        Self::new(LivenessConfig::default())
    }
}

impl NodeRegistry {
    pub fn new(config: LivenessConfig) -> Self {
        let (changes, _) = watch::channel(0);
        NodeRegistry {
            inner: Arc::new(Mutex::new(Inner::default())),
            config,
            changes: Arc::new(changes),
            moves: RecentMoves::default(),
        }
    }

    /// The work lately moved off nodes that failed it.
    pub fn moves(&self) -> &RecentMoves {
        &self.moves
    }

    pub fn config(&self) -> LivenessConfig {
        self.config
    }

    /// Wakes on any change of node states, load, or in-flight counts.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        debug_assert!(
            !READING.get(),
            "the registry was called while its nodes were being read under its lock"
        );
        self.inner.lock().expect("registry lock poisoned")
    }

    fn publish(&self, inner: &mut Inner) {
        inner.generation += 1;
        self.changes.send_replace(inner.generation);
    }

    /// Records a registration and returns (node id, stream number). A node keeps its id:
    /// the one it presents (after a reconnect or a coordinator restart) unless a live node of
    /// another name holds it, else the id of a gone node of the same name (the device came
    /// back after a restart); otherwise it gets a fresh one. State (drain, in-flight runs)
    /// carries over only to the same name.
    pub fn register(&self, registration: proto::Register, now: Instant) -> (String, u64) {
        let mut inner = self.lock();
        let name = registration.name.clone();
        let live_elsewhere =
            |n: &Node| n.observation.stream_open && n.about.registration.name != name;
        let presented = Some(registration.node_id.clone())
            .filter(|id| !id.is_empty())
            .filter(|id| !inner.nodes.get(id).is_some_and(live_elsewhere));
        let key = NameKey::of(&name);
        let same_name_gone = || {
            inner
                .nodes
                .iter()
                .filter(|(_, n)| !n.observation.stream_open && n.sketch.name_key == key)
                .filter(|(_, n)| n.about.registration.name == name)
                .map(|(id, _)| id.clone())
                .min()
        };
        let id = match presented.or_else(same_name_gone) {
            Some(id) => id,
            None => loop {
                inner.next_id += 1;
                let id = fresh_id(&name, inner.next_id);
                if !inner.nodes.contains_key(&id) {
                    break id;
                }
            },
        };
        inner.next_stream += 1;
        let stream = inner.next_stream;
        let previous = inner
            .nodes
            .remove(&id)
            .filter(|p| p.about.registration.name == name);
        let observation = Observation {
            last_seen: now,
            stream_open: true,
            draining: previous.as_ref().is_some_and(|p| p.observation.draining),
        };
        let mut node = Node {
            about: Box::new(About {
                id: id.clone(),
                registration,
                load: proto::NodeLoad::default(),
                generations: previous
                    .as_ref()
                    .map(|p| p.about.generations.clone())
                    .unwrap_or_default(),
            }),
            cpu_percent: 0.0,
            observation,
            state: assess(&observation, now, &self.config),
            in_flight: previous.as_ref().map_or(0, |p| p.in_flight),
            stream,
            profile: Box::default(),
            sketch: Sketch::default(),
        };
        node.refresh_profile();
        inner.nodes.insert(id.clone(), node);
        self.publish(&mut inner);
        (id, stream)
    }

    /// Records a message on a node's current stream: any message is a sign of life.
    pub fn heartbeat(&self, id: &str, stream: u64, heartbeat: proto::Heartbeat, now: Instant) {
        let mut inner = self.lock();
        let Some(node) = inner.nodes.get_mut(id).filter(|n| n.stream == stream) else {
            return;
        };
        node.observation.last_seen = now;
        if let Some(load) = heartbeat.load {
            node.cpu_percent = load.cpu_percent;
            node.about.load = load;
        }
        let described = heartbeat.runtimes.is_some() || heartbeat.models.is_some();
        if let Some(runtimes) = heartbeat.runtimes {
            node.about.registration.runtimes = Some(runtimes);
        }
        if let Some(models) = heartbeat.models {
            node.about.registration.models = Some(models);
        }
        if described {
            node.refresh_profile();
        }
        let fresh = assess(&node.observation, now, &self.config);
        let changed = fresh != node.state;
        node.state = fresh;
        if changed {
            self.publish(&mut inner);
        }
    }

    /// A node's stream closed: it is unschedulable at once. Stale streams are ignored.
    pub fn stream_closed(&self, id: &str, stream: u64, now: Instant) {
        let mut inner = self.lock();
        if let Some(node) = inner.nodes.get_mut(id).filter(|n| n.stream == stream) {
            node.observation.stream_open = false;
            node.state = assess(&node.observation, now, &self.config);
            self.publish(&mut inner);
        }
    }

    /// Re-assesses every node against the clock, and forgets nodes down for an hour with
    /// nothing in flight; publishes when anything changed.
    pub fn reassess(&self, now: Instant) {
        let mut inner = self.lock();
        let before = inner.nodes.len();
        inner.nodes.retain(|_, n| {
            let gone = n.in_flight == 0
                && n.about.generations.values().all(|g| *g == 0)
                && !n.observation.stream_open
                && now.saturating_duration_since(n.observation.last_seen) >= FORGET_AFTER;
            if gone {
                tracing::info!(node_id = %n.about.id, name = %n.about.registration.name, "forgetting a node gone for {FORGET_AFTER:?}");
            }
            !gone
        });
        let mut changed = inner.nodes.len() != before;
        for node in inner.nodes.values_mut() {
            let fresh = assess(&node.observation, now, &self.config);
            if fresh != node.state {
                tracing::info!(node_id = %node.about.id, name = %node.about.registration.name, state = fresh.name(), "node state changed");
                node.state = fresh;
                changed = true;
            }
        }
        if changed {
            self.publish(&mut inner);
        }
    }

    /// Drains (or undrains) a node given by id, or by name when one live node (or else one
    /// node) has it.
    pub fn set_draining(
        &self,
        node: &str,
        draining: bool,
        now: Instant,
    ) -> Result<NodeInfo, NodeLookupError> {
        let mut inner = self.lock();
        let id = if inner.nodes.contains_key(node) {
            node.to_string()
        } else {
            let named: Vec<&Node> = inner
                .nodes
                .values()
                .filter(|n| n.about.registration.name == node)
                .collect();
            let live: Vec<&Node> = named
                .iter()
                .copied()
                .filter(|n| n.observation.stream_open)
                .collect();
            match (live.as_slice(), named.as_slice()) {
                ([one], _) | ([], [one]) => one.about.id.clone(),
                ([], []) => return Err(NodeLookupError::Unknown(node.to_string())),
                _ => return Err(NodeLookupError::Ambiguous(node.to_string())),
            }
        };
        let found = inner.nodes.get_mut(&id).expect("id found above");
        found.observation.draining = draining;
        found.state = assess(&found.observation, now, &self.config);
        let info = info(found, now);
        self.publish(&mut inner);
        Ok(info)
    }

    /// Every node, ordered by name then id.
    pub fn list(&self, now: Instant) -> Vec<NodeInfo> {
        let inner = self.lock();
        let mut nodes: Vec<NodeInfo> = inner.nodes.values().map(|n| info(n, now)).collect();
        nodes.sort_by(|a, b| (&a.name, &a.id).cmp(&(&b.name, &b.id)));
        nodes
    }

    /// Every node as it stands now, ordered by name then id.
    pub fn snapshot(&self, now: Instant) -> Vec<NodeSnapshot> {
        self.each(now, |node| NodeSnapshot {
            id: node.id.to_string(),
            state: node.state,
            registration: node.registration.clone(),
            load: *node.load,
            in_flight: node.in_flight,
            generations: node.generations.clone(),
        })
    }

    /// `read` of every node as it stands now, ordered by name then id, under the registry's
    /// lock (so `read` must be quick).
    pub fn each<T>(&self, now: Instant, mut read: impl FnMut(NodeView<'_>) -> T) -> Vec<T> {
        let inner = self.lock();
        let mut nodes: Vec<(&String, &Node)> = inner.nodes.iter().collect();
        nodes.sort_by(|(a_id, a), (b_id, b)| {
            (&a.about.registration.name, a_id).cmp(&(&b.about.registration.name, b_id))
        });
        nodes
            .into_iter()
            .map(|(id, n)| read(self.view(id, n, now)))
            .collect()
    }

    /// `read` of every node as it stands now, in no particular order, borrowed in place under
    /// the registry's lock (so `read` must be quick).
    pub fn with_nodes<T>(
        &self,
        now: Instant,
        read: impl FnOnce(&mut dyn Iterator<Item = NodeView<'_>>) -> T,
    ) -> T {
        let inner = self.lock();
        let _reading = Reading::begin();
        read(&mut inner.nodes.iter().map(|(id, n)| self.view(id, n, now)))
    }

    /// Node `n`, known by `id` (the map's key: reading the node's own copy would follow its box).
    fn view<'n>(&self, id: &'n str, n: &'n Node, now: Instant) -> NodeView<'n> {
        NodeView {
            id,
            state: assess(&n.observation, now, &self.config),
            registration: &n.about.registration,
            load: &n.about.load,
            cpu_percent: n.cpu_percent,
            in_flight: n.in_flight,
            generations: &n.about.generations,
            profile: &n.profile,
            sketch: n.sketch,
        }
    }

    /// A node's state now, if the coordinator knows it.
    pub fn state(&self, id: &str) -> Option<NodeState> {
        let inner = self.lock();
        let node = inner.nodes.get(id)?;
        Some(assess(&node.observation, Instant::now(), &self.config))
    }

    /// What placement reads of a node, if the coordinator knows it.
    pub fn profile(&self, id: &str) -> Option<Profile> {
        self.lock().nodes.get(id).map(|n| (*n.profile).clone())
    }

    /// The address to dial a node at.
    pub fn address(&self, id: &str) -> Option<String> {
        self.lock()
            .nodes
            .get(id)
            .map(|n| n.about.registration.address.clone())
    }

    /// When silence will have lasted past the deadline, if the node stays quiet.
    pub fn silence_deadline(&self, id: &str) -> Option<Instant> {
        self.lock()
            .nodes
            .get(id)
            .map(|n| n.observation.last_seen + self.config.down_after)
    }

    /// True when work running on the node must be moved: it has been silent past the deadline.
    pub fn in_flight_lost(&self, id: &str, now: Instant) -> bool {
        self.lock()
            .nodes
            .get(id)
            .is_none_or(|n| in_flight_lost(&n.observation, now, &self.config))
    }

    /// Counts work placed on a node until the returned guard is dropped.
    pub fn begin(&self, id: &str, load: Load<'_>) -> InFlight {
        self.count(id, load, true);
        InFlight {
            registry: self.clone(),
            id: id.to_string(),
            model: match load {
                Load::Run => None,
                Load::Generation(model) => Some(model.to_string()),
            },
        }
    }

    fn count(&self, id: &str, load: Load<'_>, up: bool) {
        let step = |n: &mut u32| *n = if up { *n + 1 } else { n.saturating_sub(1) };
        let mut inner = self.lock();
        if let Some(node) = inner.nodes.get_mut(id) {
            match load {
                Load::Run => step(&mut node.in_flight),
                Load::Generation(model) => {
                    step(node.about.generations.entry(model.to_string()).or_default());
                    node.refresh_profile();
                }
            }
        }
        self.publish(&mut inner);
    }

    /// Re-assesses states every 100 ms until every handle to the registry is gone.
    pub fn spawn_liveness_ticker(&self) {
        let weak: Weak<Mutex<Inner>> = Arc::downgrade(&self.inner);
        let config = self.config;
        let changes = self.changes.clone();
        let moves = self.moves.clone();
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(ASSESS_PERIOD);
            loop {
                ticker.tick().await;
                let Some(inner) = weak.upgrade() else { return };
                NodeRegistry {
                    inner,
                    config,
                    changes: changes.clone(),
                    moves: moves.clone(),
                }
                .reassess(Instant::now());
            }
        });
    }
}

/// Work counted against a node's in-flight totals; dropping it ends the count on every path.
pub struct InFlight {
    registry: NodeRegistry,
    id: String,
    /// The model of a generation; none for a run.
    model: Option<String>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let load = match &self.model {
            None => Load::Run,
            Some(model) => Load::Generation(model),
        };
        self.registry.count(&self.id, load, false);
    }
}

/// A node id unlikely to be reused by another coordinator or after a restart.
fn fresh_id(name: &str, serial: u64) -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write(name.as_bytes());
    hasher.write_u64(serial);
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    format!("node-{:08x}", hasher.finish() as u32)
}

fn info(n: &Node, now: Instant) -> NodeInfo {
    NodeInfo {
        id: n.about.id.clone(),
        name: n.about.registration.name.clone(),
        address: n.about.registration.address.clone(),
        state: n.state.name().to_string(),
        labels: n.about.registration.labels.clone(),
        runtimes: n.about.registration.runtimes.clone(),
        capacity: n.about.registration.capacity,
        load: Some(n.about.load),
        isolation: n.about.registration.isolation,
        isolation_layers: n.about.registration.isolation_layers.clone(),
        allows_network: n.about.registration.allows_network,
        version: n.about.registration.version.clone(),
        last_seen_ms_ago: now
            .saturating_duration_since(n.observation.last_seen)
            .as_millis() as u64,
        in_flight: n.in_flight,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn register(name: &str, node_id: &str) -> proto::Register {
        proto::Register {
            name: name.into(),
            node_id: node_id.into(),
            capacity: 2,
            ..Default::default()
        }
    }

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "while its nodes were being read")]
    fn calling_the_registry_while_reading_its_nodes_is_caught_not_a_hang() {
        let registry = NodeRegistry::default();
        let (id, _) = registry.register(register("box", ""), Instant::now());
        registry.with_nodes(Instant::now(), |_| registry.state(&id));
    }

    #[tokio::test(start_paused = true)]
    async fn reconnecting_node_keeps_its_id_and_a_stale_close_is_ignored() {
        let registry = NodeRegistry::default();
        let (id, first) = registry.register(register("laptop", ""), Instant::now());
        let (again, second) = registry.register(register("laptop", &id), Instant::now());
        assert_eq!(again, id);
        registry.stream_closed(&id, first, Instant::now());
        assert_eq!(registry.list(Instant::now())[0].state, "ready");
        registry.stream_closed(&id, second, Instant::now());
        assert_eq!(registry.list(Instant::now())[0].state, "down");
    }

    #[tokio::test(start_paused = true)]
    async fn ids_survive_a_coordinator_restart_but_cannot_be_taken_over() {
        let registry = NodeRegistry::default();
        let (a, _) = registry.register(register("a", "node-7"), Instant::now());
        assert_eq!(a, "node-7");
        let (b, _) = registry.register(register("b", "node-7"), Instant::now());
        assert_ne!(b, "node-7");
        assert_eq!(registry.list(Instant::now()).len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_restarted_agent_gets_its_old_entry_back_by_name() {
        let registry = NodeRegistry::default();
        let (id, stream) = registry.register(register("laptop", ""), Instant::now());
        registry
            .set_draining("laptop", true, Instant::now())
            .unwrap();
        registry.stream_closed(&id, stream, Instant::now());
        // A restarted agent has forgotten its id.
        let (again, _) = registry.register(register("laptop", ""), Instant::now());
        assert_eq!(again, id);
        let nodes = registry.list(Instant::now());
        assert_eq!(nodes.len(), 1);
        assert_eq!(nodes[0].state, "draining");
    }

    #[tokio::test(start_paused = true)]
    async fn a_name_shared_by_two_live_nodes_cannot_be_drained_by_name() {
        let registry = NodeRegistry::default();
        let (first, _) = registry.register(register("twin", ""), Instant::now());
        registry.register(register("twin", ""), Instant::now());
        let err = registry
            .set_draining("twin", true, Instant::now())
            .unwrap_err();
        assert!(err.to_string().contains("several live nodes"), "{err}");
        assert!(registry.set_draining(&first, true, Instant::now()).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn silent_node_turns_suspect_then_down_and_its_work_is_lost() {
        let registry = NodeRegistry::default();
        let mut changes = registry.subscribe();
        let (id, stream) = registry.register(register("box", ""), Instant::now());
        changes.borrow_and_update();
        tokio::time::advance(Duration::from_millis(1600)).await;
        registry.reassess(Instant::now());
        assert!(changes.has_changed().unwrap());
        assert_eq!(registry.list(Instant::now())[0].state, "suspect");
        assert!(!registry.in_flight_lost(&id, Instant::now()));
        tokio::time::advance(Duration::from_secs(4)).await;
        registry.reassess(Instant::now());
        assert_eq!(registry.list(Instant::now())[0].state, "down");
        assert!(registry.in_flight_lost(&id, Instant::now()));
        registry.heartbeat(&id, stream, proto::Heartbeat::default(), Instant::now());
        assert_eq!(registry.list(Instant::now())[0].state, "ready");
    }

    #[tokio::test(start_paused = true)]
    async fn a_node_gone_for_an_hour_is_forgotten_unless_work_is_still_counted_on_it() {
        let registry = NodeRegistry::default();
        let (gone, gone_stream) = registry.register(register("gone", ""), Instant::now());
        let (busy, busy_stream) = registry.register(register("busy", ""), Instant::now());
        let held = registry.begin(&busy, Load::Run);
        registry.stream_closed(&gone, gone_stream, Instant::now());
        registry.stream_closed(&busy, busy_stream, Instant::now());
        tokio::time::advance(FORGET_AFTER - Duration::from_secs(1)).await;
        registry.reassess(Instant::now());
        assert_eq!(registry.list(Instant::now()).len(), 2);
        tokio::time::advance(Duration::from_secs(1)).await;
        registry.reassess(Instant::now());
        let names: Vec<String> = registry
            .list(Instant::now())
            .into_iter()
            .map(|n| n.name)
            .collect();
        assert_eq!(names, vec!["busy".to_string()]);
        drop(held);
    }

    #[tokio::test(start_paused = true)]
    async fn drain_and_in_flight_counts_show_in_the_snapshot() {
        let registry = NodeRegistry::default();
        let (id, _) = registry.register(register("box", ""), Instant::now());
        let run = registry.begin(&id, Load::Run);
        assert_eq!(registry.snapshot(Instant::now())[0].in_flight, 1);
        drop(run);
        assert_eq!(registry.snapshot(Instant::now())[0].in_flight, 0);
        let info = registry.set_draining("box", true, Instant::now()).unwrap();
        assert_eq!(info.state, "draining");
        assert_eq!(
            registry.snapshot(Instant::now())[0].state,
            NodeState::Draining
        );
        registry.set_draining(&id, false, Instant::now()).unwrap();
        assert_eq!(registry.list(Instant::now())[0].state, "ready");
        assert!(registry.set_draining("nope", true, Instant::now()).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn heartbeat_updates_load_and_runtimes() {
        let registry = NodeRegistry::default();
        let (id, stream) = registry.register(register("box", ""), Instant::now());
        let heartbeat = proto::Heartbeat {
            load: Some(proto::NodeLoad {
                running: 2,
                cpu_percent: 50.0,
                ..Default::default()
            }),
            runtimes: Some(proto::RuntimeFingerprint {
                runtimes: vec![proto::Runtime {
                    language: "python".into(),
                    health: proto::RuntimeHealth::Healthy as i32,
                    ..Default::default()
                }],
                probed_at_unix_ms: 1,
            }),
            models: None,
        };
        registry.heartbeat(&id, stream, heartbeat, Instant::now());
        let node = &registry.snapshot(Instant::now())[0];
        let runtimes = &node.registration.runtimes.as_ref().unwrap().runtimes;
        assert_eq!(runtimes[0].language, "python");
        assert_eq!(node.load.cpu_percent, 50.0);
    }
}
