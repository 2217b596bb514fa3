//! `run --plan`: what would run where.

use kowalski_exo_common::proto::{PlanRequest, PlannedBlock, SkipKind};
use serde::Serialize;

use super::{Failure, connect::Client, print_json};
use crate::json_events::skip_name;

/// One fenced block as `run --plan --json` prints it. Field names are stable.
#[derive(Serialize, Debug, PartialEq)]
pub struct PlanLine {
    /// Position among the document's fenced blocks, from 1 (as `run` numbers them).
    pub block: u32,
    /// 1-based line of the opening fence.
    pub line: u32,
    /// Canonical language, or null when the block has none or an unknown one.
    pub language: Option<String>,
    /// The code exactly as the block holds it.
    pub code: String,
    /// The node it would run on, or null when skipped.
    pub node: Option<String>,
    /// Why it would be skipped (or wait), or null.
    pub reason: Option<String>,
    /// Why it would be skipped: no_language, no_node or invalid; null when it would run.
    pub skip: Option<&'static str>,
}

impl From<&PlannedBlock> for PlanLine {
    fn from(b: &PlannedBlock) -> Self {
        let some = |s: &str| (!s.is_empty()).then(|| s.to_string());
        PlanLine {
            block: b.block + 1,
            line: b.line,
            language: some(&b.language),
            code: b.code.clone(),
            node: some(&b.node_name),
            reason: some(&b.reason),
            skip: (b.kind() != SkipKind::Unspecified).then(|| skip_name(b.kind())),
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
            line.block,
            line.line,
            line.language.as_deref().unwrap_or("-"),
            line.node.as_deref().unwrap_or("-"),
            match (line.skip, line.reason.as_deref()) {
                (Some(_), Some(reason)) => format!("skipped: {reason}"),
                (None, Some(reason)) => reason.to_string(),
                _ => String::new(),
            }
        ));
    }
    out
}

/// `coordinator run --plan`. Fails as `run` would before running anything: 3 when a block no
/// node can run would stop the document, 2 when a block is invalid.
pub async fn show(
    mut client: Client,
    addr: &str,
    request: PlanRequest,
    json: bool,
) -> Result<u8, Failure> {
    let blocks = client
        .plan(request)
        .await
        .map_err(|s| Failure::from_status(s, addr))?
        .into_inner()
        .blocks;
    if json {
        for block in &blocks {
            print_json(&PlanLine::from(block));
        }
    } else {
        print!("{}", plan_table(&blocks));
    }
    let Some(blocking) = blocks
        .iter()
        .find(|b| matches!(b.kind(), SkipKind::NoNode | SkipKind::Invalid))
    else {
        return Ok(0);
    };
    let status = match blocking.kind() {
        SkipKind::NoNode => super::EXIT_NO_NODE,
        _ => super::EXIT_USAGE,
    };
    Err(Failure {
        block: Some((blocking.block + 1, blocking.line)),
        ..Failure::new(
            status,
            format!(
                "block {} (line {}) would not run: {}",
                blocking.block + 1,
                blocking.line,
                blocking.reason
            ),
        )
    })
}
