//! Choosing a node for each run: [`placement`] is the pure choice, [`dispatch`] runs the code
//! there and moves it elsewhere when a node fails, reaching agents through [`agents`];
//! [`document`] runs a Markdown document's blocks in order.

pub mod agents;
pub mod dispatch;
pub mod document;
pub mod placement;
