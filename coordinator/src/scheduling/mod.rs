//! Choosing a node for each run: [`placement`] is the pure choice, [`dispatch`] runs the code
//! there and moves it elsewhere when a node fails.

pub mod dispatch;
pub mod placement;
