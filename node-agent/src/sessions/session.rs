//! One session: a work directory that lasts, the interpreters started in it (one per
//! language), and its limits. Executions reach it one at a time, through its lock.

use std::collections::BTreeMap;

use kowalski_exo_common::{Language, proto};

use super::{
    MAX_SUBCALL_BYTES,
    interpreter::{CellEnd, Interpreter, Place, StartError},
    subcalls::Subcalls,
};
use crate::{
    exec::{ExecLimits, Executor, output::RunOutput},
    sandbox::Workspace,
};

/// A session's state, behind its lock.
pub struct Session {
    workspace: Option<Workspace>,
    /// The session's own limits: memory, processes and CPU seconds of each interpreter, disk.
    limits: ExecLimits,
    network: bool,
    interpreters: BTreeMap<Language, Interpreter>,
    subcalls: Subcalls,
}

impl Session {
    pub fn new(
        workspace: Workspace,
        limits: ExecLimits,
        network: bool,
        subcalls: Subcalls,
    ) -> Self {
        Session {
            workspace: Some(workspace),
            limits,
            network,
            interpreters: BTreeMap::new(),
            subcalls,
        }
    }

    pub fn limits(&self) -> &ExecLimits {
        &self.limits
    }

    /// The languages whose interpreters run now.
    pub fn languages(&self) -> Vec<Language> {
        self.interpreters.keys().copied().collect()
    }

    /// Starts `language`'s interpreter unless it runs already.
    pub async fn ensure(
        &mut self,
        executor: &Executor,
        language: Language,
    ) -> Result<(), StartError> {
        if self.interpreters.contains_key(&language) {
            return Ok(());
        }
        let Some(workspace) = self.workspace.as_ref() else {
            return Err(StartError::Failed("the session was closed".to_string()));
        };
        let place = Place {
            executor,
            workspace,
            limits: &self.limits,
            network: self.network,
            max_frame: MAX_SUBCALL_BYTES,
        };
        let interpreter = Interpreter::start(place, language).await?;
        self.interpreters.insert(language, interpreter);
        Ok(())
    }

    /// Runs a cell in `language`'s interpreter, which [`Session::ensure`] started. `cell_limits`
    /// are the session's with the cell's timeout and output cap.
    pub async fn run(
        &mut self,
        language: Language,
        code: &str,
        started: proto::ExecStarted,
        out: &mut RunOutput,
        cell_limits: &ExecLimits,
    ) -> proto::ExecFinished {
        let interpreter = self
            .interpreters
            .get_mut(&language)
            .expect("the interpreter was started for this cell");
        let CellEnd { finished, lost } = interpreter
            .run_cell(code, started, out, cell_limits, &self.subcalls)
            .await;
        if lost {
            self.interpreters.remove(&language);
        }
        finished
    }

    /// Ends every interpreter and removes the work directory.
    pub async fn close(&mut self) {
        for (_, interpreter) in std::mem::take(&mut self.interpreters) {
            interpreter.stop().await;
        }
        if let Some(workspace) = self.workspace.take() {
            Executor::remove_workspace(workspace);
        }
    }
}
