//! Choosing a node for each piece of work: [`placement`] is the pure choice, [`failover`] the
//! loop that moves work off a node that fails, whatever the work; [`dispatch`] runs code through
//! it, reaching agents through [`agents`]; [`document`] runs a Markdown document's blocks in
//! order.

pub mod agents;
pub mod dispatch;
pub mod document;
pub mod failover;
pub mod placement;
