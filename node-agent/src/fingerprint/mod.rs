//! Runtime fingerprinting: which languages this device can run, with which real executable.
//!
//! Each runtime is asked for its own executable path and version ([`probe`]), which resolves
//! pyenv, asdf and rustup shims to the real interpreter (a Python start through a pyenv shim
//! costs ~100 ms more). [`watch`] re-probes periodically and publishes changes.

mod probe;
mod search_path;
mod watch;

use std::{
    path::PathBuf,
    time::{SystemTime, UNIX_EPOCH},
};

use kowalski_exo_common::{Language, proto};
use serde::Serialize;

pub use probe::probe_all;
pub use search_path::SearchPath;
pub use watch::{FingerprintWatch, spawn_refresh};

/// Health of one runtime.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "health", content = "reason", rename_all = "snake_case")]
pub enum RuntimeHealth {
    Healthy,
    /// Found on PATH, but its probe failed; the reason says how.
    Broken(String),
    /// No executable for it on PATH.
    Missing,
}

/// One language runtime as found on this device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RuntimeInfo {
    pub language: Language,
    pub version: String,
    /// The real executable, after shims are resolved.
    pub executable: Option<PathBuf>,
    /// What was found on PATH (may be a shim).
    pub found_as: Option<PathBuf>,
    #[serde(flatten)]
    pub health: RuntimeHealth,
}

impl RuntimeInfo {
    pub fn missing(language: Language) -> Self {
        RuntimeInfo {
            language,
            version: String::new(),
            executable: None,
            found_as: None,
            health: RuntimeHealth::Missing,
        }
    }

    /// The real executable, when the runtime is healthy.
    pub fn healthy_executable(&self) -> Option<&PathBuf> {
        match self.health {
            RuntimeHealth::Healthy => self.executable.as_ref(),
            _ => None,
        }
    }
}

/// Every known language with what this device has of it, probed at one moment.
#[derive(Clone, Debug, Serialize)]
pub struct RuntimeFingerprint {
    pub runtimes: Vec<RuntimeInfo>,
    #[serde(skip)]
    pub probed_at: SystemTime,
}

impl RuntimeFingerprint {
    /// The entry for a language (every known language has one, missing or not).
    pub fn get(&self, language: Language) -> RuntimeInfo {
        self.runtimes
            .iter()
            .find(|r| r.language == language)
            .cloned()
            .unwrap_or_else(|| RuntimeInfo::missing(language))
    }

    /// Canonical names of the languages that are healthy here.
    pub fn healthy_languages(&self) -> Vec<&'static str> {
        self.runtimes
            .iter()
            .filter(|r| r.health == RuntimeHealth::Healthy)
            .map(|r| r.language.name())
            .collect()
    }

    /// True when both list the same runtimes, whenever they were probed.
    pub fn same_runtimes(&self, other: &RuntimeFingerprint) -> bool {
        self.runtimes == other.runtimes
    }

    pub fn to_proto(&self) -> proto::RuntimeFingerprint {
        let probed_at_unix_ms = self
            .probed_at
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or_default();
        proto::RuntimeFingerprint {
            runtimes: self.runtimes.iter().map(runtime_to_proto).collect(),
            probed_at_unix_ms,
        }
    }

    /// A fixed-width table for `node-agent runtimes`.
    pub fn table(&self) -> String {
        let mut out = format!(
            "{:<11} {:<9} {:<10} {}\n",
            "LANGUAGE", "HEALTH", "VERSION", "EXECUTABLE"
        );
        for r in &self.runtimes {
            let (health, detail) = match &r.health {
                RuntimeHealth::Healthy => ("healthy", String::new()),
                RuntimeHealth::Broken(reason) => ("broken", format!("  ({reason})")),
                RuntimeHealth::Missing => ("missing", String::new()),
            };
            let exe = r
                .executable
                .as_ref()
                .or(r.found_as.as_ref())
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "-".into());
            let shim = match (&r.found_as, &r.executable) {
                (Some(found), Some(real)) if found != real => {
                    format!("  (found as {})", found.display())
                }
                _ => String::new(),
            };
            let version = if r.version.is_empty() {
                "-"
            } else {
                &r.version
            };
            out.push_str(&format!(
                "{:<11} {:<9} {:<10} {exe}{shim}{detail}\n",
                r.language.name(),
                health,
                version
            ));
        }
        out
    }
}

fn runtime_to_proto(r: &RuntimeInfo) -> proto::Runtime {
    let (health, reason) = match &r.health {
        RuntimeHealth::Healthy => (proto::RuntimeHealth::Healthy, String::new()),
        RuntimeHealth::Broken(reason) => (proto::RuntimeHealth::Broken, reason.clone()),
        RuntimeHealth::Missing => (
            proto::RuntimeHealth::Missing,
            format!("no {} executable on PATH", r.language),
        ),
    };
    let path = |p: &Option<PathBuf>| {
        p.as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    };
    proto::Runtime {
        language: r.language.name().to_string(),
        version: r.version.clone(),
        executable: path(&r.executable),
        found_as: path(&r.found_as),
        health: health as i32,
        reason,
    }
}
