//! `coordinator nodes`: a table for people, one JSON object per node for scripts.

use kowalski_exo_common::proto::{NodeInfo, RuntimeHealth};
use serde::Serialize;

/// One node as `coordinator nodes --json` prints it. Field names are stable.
#[derive(Serialize, Debug, PartialEq)]
pub struct NodeLine {
    pub id: String,
    pub name: String,
    pub state: String,
    pub address: String,
    /// Languages whose runtime is healthy on the node.
    pub runtimes: Vec<String>,
    pub running: u32,
    pub capacity: u32,
    pub cpu_percent: f32,
}

impl From<&NodeInfo> for NodeLine {
    fn from(node: &NodeInfo) -> Self {
        let load = node.load.unwrap_or_default();
        NodeLine {
            id: node.id.clone(),
            name: node.name.clone(),
            state: node.state.clone(),
            address: node.address.clone(),
            runtimes: node
                .runtimes
                .iter()
                .flat_map(|f| &f.runtimes)
                .filter(|r| r.health() == RuntimeHealth::Healthy)
                .map(|r| r.language.clone())
                .collect(),
            running: load.running,
            capacity: node.capacity,
            cpu_percent: load.cpu_percent,
        }
    }
}

/// The `coordinator nodes` table.
pub fn nodes_table(nodes: &[NodeInfo]) -> String {
    let mut out = format!(
        "{:<8} {:<16} {:<7} {:<24} {:>7} {:>5}  {}\n",
        "ID", "NAME", "STATE", "ADDRESS", "RUNNING", "CPU%", "RUNTIMES"
    );
    for node in nodes {
        let line = NodeLine::from(node);
        out.push_str(&format!(
            "{:<8} {:<16} {:<7} {:<24} {:>7} {:>5.0}  {}\n",
            line.id,
            line.name,
            line.state,
            line.address,
            format!("{}/{}", line.running, line.capacity),
            line.cpu_percent,
            line.runtimes.join(",")
        ));
    }
    out
}
