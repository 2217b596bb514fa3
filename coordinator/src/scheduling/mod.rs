//! Choosing a node for each run: [`placement`] is the pure choice, [`dispatch`] runs the code
//! there and moves it elsewhere when a node fails, reaching agents through [`agents`].

pub mod agents;
pub mod dispatch;
pub mod placement;
