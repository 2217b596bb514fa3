//! `run --plan`: what would run where.

use kowalski_exo_common::proto::PlannedBlock;
use serde::Serialize;

/// One fenced block as `run --plan --json` prints it. Field names are stable.
#[derive(Serialize, Debug, PartialEq)]
pub struct PlanLine {
    /// Index among the document's fenced blocks, from 0.
    pub block: u32,
    /// 1-based line of the opening fence.
    pub line: u32,
    /// Canonical language, or null when the block has none or an unknown one.
    pub language: Option<String>,
    /// The code exactly as the block holds it.
    pub code: String,
    /// The node it would run on, or null when skipped.
    pub node: Option<String>,
    /// Why it would be skipped, or null.
    pub reason: Option<String>,
}

impl From<&PlannedBlock> for PlanLine {
    fn from(b: &PlannedBlock) -> Self {
        let some = |s: &str| (!s.is_empty()).then(|| s.to_string());
        PlanLine {
            block: b.block,
            line: b.line,
            language: some(&b.language),
            code: b.code.clone(),
            node: some(&b.node_name),
            reason: some(&b.reason),
        }
    }
}

/// The `run --plan` table.
pub fn plan_table(blocks: &[PlannedBlock]) -> String {
    let mut out = format!(
        "{:<6} {:<5} {:<11} {:<16} {}\n",
        "BLOCK", "LINE", "LANGUAGE", "NODE", "NOTE"
    );
    for b in blocks {
        let line = PlanLine::from(b);
        out.push_str(&format!(
            "{:<6} {:<5} {:<11} {:<16} {}\n",
            line.block + 1,
            line.line,
            line.language.as_deref().unwrap_or("-"),
            line.node.as_deref().unwrap_or("-"),
            line.reason
                .as_deref()
                .map_or(String::new(), |r| format!("skipped: {r}"))
        ));
    }
    out
}
