//! The live view of the cluster: every node that registered, with its runtimes and last load.
//! Only registration and stream state live here for now; liveness by silence, placement and
//! draining come with the coordinator issue (#3).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Instant,
};

use kowalski_exo_common::proto::{self, NodeInfo};

/// State of a node as the coordinator sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeState {
    /// Its registry stream is open.
    Ready,
    /// Its registry stream closed.
    Down,
}

impl NodeState {
    pub fn name(self) -> &'static str {
        match self {
            NodeState::Ready => "ready",
            NodeState::Down => "down",
        }
    }
}

/// One node as last reported.
#[derive(Clone, Debug)]
struct Node {
    id: String,
    registration: proto::Register,
    load: proto::NodeLoad,
    state: NodeState,
    last_seen: Instant,
}

/// Every known node, shared by the registry stream handlers and the client API.
#[derive(Clone, Default)]
pub struct NodeRegistry {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Default)]
struct Inner {
    nodes: HashMap<String, Node>,
    next_id: u64,
}

impl NodeRegistry {
    /// Records a registration. A node that presents an id this coordinator knows keeps it;
    /// otherwise it gets a new one.
    pub fn register(&self, registration: proto::Register, now: Instant) -> String {
        let mut inner = self.inner.lock().expect("registry lock poisoned");
        let id = if inner.nodes.contains_key(&registration.node_id) {
            registration.node_id.clone()
        } else {
            inner.next_id += 1;
            format!("node-{}", inner.next_id)
        };
        let node = Node {
            id: id.clone(),
            registration,
            load: proto::NodeLoad::default(),
            state: NodeState::Ready,
            last_seen: now,
        };
        inner.nodes.insert(id.clone(), node);
        id
    }

    /// Records a heartbeat: any message is a sign of life.
    pub fn heartbeat(&self, id: &str, heartbeat: proto::Heartbeat, now: Instant) {
        let mut inner = self.inner.lock().expect("registry lock poisoned");
        if let Some(node) = inner.nodes.get_mut(id) {
            node.last_seen = now;
            node.state = NodeState::Ready;
            if let Some(load) = heartbeat.load {
                node.load = load;
            }
            if let Some(runtimes) = heartbeat.runtimes {
                node.registration.runtimes = Some(runtimes);
            }
        }
    }

    /// The node's stream closed: it is unschedulable at once.
    pub fn stream_closed(&self, id: &str) {
        let mut inner = self.inner.lock().expect("registry lock poisoned");
        if let Some(node) = inner.nodes.get_mut(id) {
            node.state = NodeState::Down;
        }
    }

    /// Every node, ordered by name then id.
    pub fn list(&self, now: Instant) -> Vec<NodeInfo> {
        let inner = self.inner.lock().expect("registry lock poisoned");
        let mut nodes: Vec<NodeInfo> = inner
            .nodes
            .values()
            .map(|n| NodeInfo {
                id: n.id.clone(),
                name: n.registration.name.clone(),
                address: n.registration.address.clone(),
                state: n.state.name().to_string(),
                labels: n.registration.labels.clone(),
                runtimes: n.registration.runtimes.clone(),
                capacity: n.registration.capacity,
                load: Some(n.load),
                isolation: n.registration.isolation,
                version: n.registration.version.clone(),
                last_seen_ms_ago: now.saturating_duration_since(n.last_seen).as_millis() as u64,
            })
            .collect();
        nodes.sort_by(|a, b| (&a.name, &a.id).cmp(&(&b.name, &b.id)));
        nodes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn register(name: &str, node_id: &str) -> proto::Register {
        proto::Register {
            name: name.into(),
            node_id: node_id.into(),
            ..Default::default()
        }
    }

    #[test]
    fn reconnecting_node_keeps_its_id() {
        let registry = NodeRegistry::default();
        let now = Instant::now();
        let id = registry.register(register("laptop", ""), now);
        registry.stream_closed(&id);
        assert_eq!(registry.list(now)[0].state, "down");
        let again = registry.register(register("laptop", &id), now);
        assert_eq!(again, id);
        let nodes = registry.list(now);
        assert_eq!(nodes.len(), 1);
        assert_eq!(nodes[0].state, "ready");
    }

    #[test]
    fn unknown_node_id_gets_a_fresh_one() {
        let registry = NodeRegistry::default();
        let now = Instant::now();
        let a = registry.register(register("a", "node-from-another-coordinator"), now);
        let b = registry.register(register("b", ""), now);
        assert_ne!(a, "node-from-another-coordinator");
        assert_ne!(a, b);
    }

    #[test]
    fn heartbeat_updates_load_and_runtimes() {
        let registry = NodeRegistry::default();
        let now = Instant::now();
        let id = registry.register(register("box", ""), now);
        let heartbeat = proto::Heartbeat {
            load: Some(proto::NodeLoad {
                running: 2,
                cpu_percent: 50.0,
                ..Default::default()
            }),
            runtimes: Some(proto::RuntimeFingerprint {
                runtimes: vec![proto::Runtime {
                    language: "python".into(),
                    ..Default::default()
                }],
                probed_at_unix_ms: 1,
            }),
        };
        registry.heartbeat(&id, heartbeat, now);
        let node = &registry.list(now)[0];
        assert_eq!(node.load.unwrap().running, 2);
        assert_eq!(
            node.runtimes.as_ref().unwrap().runtimes[0].language,
            "python"
        );
    }
}
