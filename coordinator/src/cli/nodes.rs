//! `coordinator nodes`, `drain` and `undrain`: a table for people, one JSON object per node for
//! scripts.

use std::collections::BTreeMap;

use kowalski_exo_common::{
    isolation,
    proto::{DrainRequest, IsolationLayer, ListNodesRequest, NodeInfo, RuntimeHealth},
};
use serde::Serialize;

use super::{Failure, connect::Client, print_json};

/// One node as `coordinator nodes --json` prints it. Field names are stable.
#[derive(Serialize, Debug, PartialEq)]
pub struct NodeLine {
    pub id: String,
    pub name: String,
    pub state: String,
    pub address: String,
    pub labels: BTreeMap<String, String>,
    /// Languages whose runtime is healthy on the node.
    pub runtimes: Vec<String>,
    /// Runs on the node now; a down node's runs have moved elsewhere or are about to.
    pub running: u32,
    pub capacity: u32,
    pub cpu_percent: f32,
    /// Isolation layers runs get there (cgroup, user, network, mount, landlock).
    pub isolation: Vec<String>,
    /// Runs that ask for the network may have it there.
    pub allows_network: bool,
}

impl From<&NodeInfo> for NodeLine {
    fn from(node: &NodeInfo) -> Self {
        let load = node.load.unwrap_or_default();
        // A down node's last heartbeat is stale; what the coordinator still has placed there
        // is what may run.
        let running = if node.state == "down" {
            node.in_flight
        } else {
            load.running
        };
        NodeLine {
            id: node.id.clone(),
            name: node.name.clone(),
            state: node.state.clone(),
            address: node.address.clone(),
            labels: node.labels.clone().into_iter().collect(),
            runtimes: node
                .runtimes
                .iter()
                .flat_map(|f| &f.runtimes)
                .filter(|r| r.health() == RuntimeHealth::Healthy)
                .map(|r| r.language.clone())
                .collect(),
            running,
            capacity: node.capacity,
            cpu_percent: load.cpu_percent,
            isolation: node
                .isolation_layers()
                .filter(|l| *l != IsolationLayer::Unspecified)
                .map(|l| isolation::name(l).to_string())
                .collect(),
            allows_network: node.allows_network,
        }
    }
}

/// What an empty cluster prints instead of a table.
pub const NO_NODES: &str = "no nodes yet; on each device run `node-agent --coordinator http://THIS_HOST:50051`, or start a one-device cluster with `coordinator serve --local-agent`";

/// The `coordinator nodes` table, columns as wide as their widest cell.
pub fn nodes_table(nodes: &[NodeInfo]) -> String {
    let header = [
        "ID",
        "NAME",
        "STATE",
        "ADDRESS",
        "RUNNING",
        "CPU%",
        "LABELS",
        "ISOLATION",
        "RUNTIMES",
    ];
    let rows: Vec<[String; 9]> = nodes
        .iter()
        .map(|node| {
            let line = NodeLine::from(node);
            let labels: Vec<String> = line
                .labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            [
                line.id,
                line.name,
                line.state,
                line.address,
                format!("{}/{}", line.running, line.capacity),
                format!("{:.0}", line.cpu_percent),
                if labels.is_empty() {
                    "-".into()
                } else {
                    labels.join(",")
                },
                match (line.isolation.is_empty(), line.allows_network) {
                    (true, _) => "-".into(),
                    (false, false) => line.isolation.join(","),
                    (false, true) => format!("{}+net", line.isolation.join(",")),
                },
                line.runtimes.join(","),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let format_row = |cells: Vec<&str>| {
        let mut line = String::new();
        for (i, (cell, width)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == cells.len() {
                line.push_str(cell);
            } else if i == 4 || i == 5 {
                line.push_str(&format!("{cell:>width$}  "));
            } else {
                line.push_str(&format!("{cell:<width$}  "));
            }
        }
        line.trim_end().to_string() + "\n"
    };
    let mut out = format_row(header.to_vec());
    for row in &rows {
        out.push_str(&format_row(row.iter().map(String::as_str).collect()));
    }
    out
}

/// `coordinator nodes`.
pub async fn list(mut client: Client, addr: &str, json: bool) -> Result<u8, Failure> {
    let nodes = client
        .list_nodes(ListNodesRequest {})
        .await
        .map_err(|s| Failure::from_status(s, addr))?
        .into_inner()
        .nodes;
    if json {
        for node in &nodes {
            print_json(&NodeLine::from(node));
        }
    } else if nodes.is_empty() {
        eprintln!("{} {NO_NODES}", super::PREFIX);
    } else {
        print!("{}", nodes_table(&nodes));
    }
    Ok(0)
}

/// `coordinator drain` (`draining`) and `undrain`.
pub async fn set_draining(
    mut client: Client,
    addr: &str,
    node: String,
    draining: bool,
    json: bool,
) -> Result<u8, Failure> {
    let request = DrainRequest { node };
    let response = if draining {
        client.drain(request).await
    } else {
        client.undrain(request).await
    }
    .map_err(|s| Failure::from_status(s, addr))?
    .into_inner();
    if let Some(node) = response.node {
        if json {
            print_json(&NodeLine::from(&node));
        } else {
            println!("{} ({}) is {}", node.name, node.id, node.state);
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use kowalski_exo_common::proto::NodeLoad;

    use super::*;

    fn node(name: &str, state: &str, running: u32, in_flight: u32) -> NodeInfo {
        NodeInfo {
            id: format!("id-{name}"),
            name: name.into(),
            state: state.into(),
            address: "http://127.0.0.1:50052".into(),
            capacity: 2,
            in_flight,
            load: Some(NodeLoad {
                running,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn columns_line_up_and_labels_show() {
        let mut gpu = node("a-much-longer-node-name", "ready", 1, 1);
        gpu.labels.insert("gpu".into(), "yes".into());
        let table = nodes_table(&[node("x", "ready", 0, 0), gpu]);
        let lines: Vec<&str> = table.lines().collect();
        let column = |line: &str| line.find("ready").or_else(|| line.find("STATE"));
        assert_eq!(column(lines[0]), column(lines[1]));
        assert_eq!(column(lines[1]), column(lines[2]));
        assert!(lines[2].contains("gpu=yes"), "{table}");
    }

    #[test]
    fn a_down_node_shows_only_work_still_placed_there() {
        assert_eq!(NodeLine::from(&node("gone", "down", 2, 0)).running, 0);
        assert_eq!(NodeLine::from(&node("up", "ready", 2, 0)).running, 2);
    }
}
