//! `coordinator sessions` and `coordinator session close`: a table for people, one JSON object
//! per session for scripts.

use kowalski_exo_common::proto::{CloseSessionRequest, ClusterSessionInfo, ListSessionsRequest};
use serde::Serialize;

use super::{Failure, connect::Client, print_json};

/// One session as `coordinator sessions --json` prints it. Field names are stable.
#[derive(Serialize, Debug, PartialEq)]
pub struct SessionLine {
    pub name: String,
    /// The node it lives on; empty before its first execution placed it.
    pub node: String,
    pub languages: Vec<String>,
    pub executions: u64,
    /// Seconds since its last execution ended (0 while one runs).
    pub idle_s: f64,
    pub model: String,
    /// Times it moved to another node with its executions replayed.
    pub moves: u32,
}

impl From<&ClusterSessionInfo> for SessionLine {
    fn from(session: &ClusterSessionInfo) -> Self {
        SessionLine {
            name: session.name.clone(),
            node: session.node_name.clone(),
            languages: session.languages.clone(),
            executions: session.executions,
            idle_s: session.idle_ms as f64 / 1000.0,
            model: session.model.clone(),
            moves: session.moves,
        }
    }
}

/// `coordinator sessions`.
pub async fn list(mut client: Client, addr: &str, json: bool) -> Result<u8, Failure> {
    let sessions = client
        .list_sessions(ListSessionsRequest {})
        .await
        .map_err(|s| Failure::from_status(s, addr))?
        .into_inner()
        .sessions;
    if json {
        for session in &sessions {
            print_json(&SessionLine::from(session));
        }
    } else if sessions.is_empty() {
        eprintln!("{} no sessions are open", super::PREFIX);
    } else {
        print!("{}", table(&sessions));
    }
    Ok(0)
}

/// `coordinator session close NAME`.
pub async fn close(
    mut client: Client,
    addr: &str,
    name: String,
    json: bool,
) -> Result<u8, Failure> {
    let session = client
        .close_session(CloseSessionRequest { session_id: name })
        .await
        .map_err(|s| Failure::from_status(s, addr))?
        .into_inner();
    if json {
        print_json(&SessionLine::from(&session));
    } else {
        println!(
            "session {} closed after {} executions",
            session.name, session.executions
        );
    }
    Ok(0)
}

fn table(sessions: &[ClusterSessionInfo]) -> String {
    let rows: Vec<[String; 5]> = sessions
        .iter()
        .map(|s| {
            [
                s.name.clone(),
                s.node_name.clone(),
                s.languages.join(","),
                s.executions.to_string(),
                format!("{:.0}", s.idle_ms as f64 / 1000.0),
            ]
        })
        .collect();
    let header = ["NAME", "NODE", "LANGUAGES", "EXECUTIONS", "IDLE_S"];
    let mut widths = header.map(str::len);
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.len());
        }
    }
    let mut out = String::new();
    for row in std::iter::once(header.map(String::from)).chain(rows) {
        let cells: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_lines_up_and_json_keeps_its_field_names() {
        let session = ClusterSessionInfo {
            name: "notebook".into(),
            node_name: "laptop".into(),
            languages: vec!["python".into(), "bash".into()],
            executions: 12,
            idle_ms: 4200,
            ..Default::default()
        };
        assert_eq!(
            table(std::slice::from_ref(&session)),
            "NAME      NODE    LANGUAGES    EXECUTIONS  IDLE_S\nnotebook  laptop  python,bash  12          4\n"
        );
        assert_eq!(
            serde_json::to_string(&SessionLine::from(&session)).unwrap(),
            r#"{"name":"notebook","node":"laptop","languages":["python","bash"],"executions":12,"idle_s":4.2,"model":"","moves":0}"#
        );
    }
}
