//! Periodic re-probing: the current fingerprint lives in a watch channel, so executions and
//! heartbeats always see the latest runtimes without a restart.

use std::{sync::Arc, time::Duration};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{RuntimeFingerprint, SearchPath, probe_all};

/// The latest fingerprint; `changed()` wakes when the runtimes change.
pub type FingerprintWatch = watch::Receiver<Arc<RuntimeFingerprint>>;

/// Probes once, then re-probes every `interval` until `shutdown`. Only a change in the runtimes
/// (not a new probe time) notifies watchers.
pub async fn spawn_refresh(
    search: SearchPath,
    interval: Duration,
    shutdown: CancellationToken,
) -> FingerprintWatch {
    let first = probe_all(&search).await;
    let (tx, rx) = watch::channel(Arc::new(first));
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tx.closed() => return,
                _ = ticker.tick() => {}
            }
            let fresh = probe_all(&search).await;
            tx.send_if_modified(|current| {
                let changed = !current.same_runtimes(&fresh);
                if changed {
                    tracing::info!(languages = ?fresh.healthy_languages(), "runtimes changed");
                }
                *current = Arc::new(fresh);
                changed
            });
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fingerprint::RuntimeHealth;
    use kowalski_exo_common::Language;

    #[tokio::test]
    async fn a_runtime_installed_later_shows_up_without_restart() {
        let Some(perl) = SearchPath::from_env().find("perl") else {
            eprintln!("skipped: no perl on PATH to install later");
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let shutdown = CancellationToken::new();
        let search = SearchPath::from_os(dir.path().as_os_str());
        let mut watch = spawn_refresh(search, Duration::from_millis(50), shutdown.clone()).await;
        assert_eq!(
            watch.borrow().get(Language::Perl).health,
            RuntimeHealth::Missing
        );
        std::os::unix::fs::symlink(&perl, dir.path().join("perl")).unwrap();
        tokio::time::timeout(Duration::from_secs(30), watch.changed())
            .await
            .expect("no refresh within 30 s")
            .unwrap();
        assert_eq!(
            watch.borrow().get(Language::Perl).health,
            RuntimeHealth::Healthy
        );
        shutdown.cancel();
    }
}
