//! The systemd unit of an installed agent (`node-agent install-service`). The agent runs as
//! root, which the containment of runs needs (cgroups, users of their own, namespaces,
//! Landlock); the unit keeps the rest of the system read-only to it, its state in
//! /var/lib/kowalski-exo/node-agent, and its join token in a root-only environment file.

use std::path::Path;

use kowalski_exo_common::service_unit::{AGENT_ENV_FILE, STATE_ROOT, Unit, absolute};

/// The unit running `bin` with `args` added to the flags the unit sets itself.
pub fn unit(bin: &Path, args: &[String]) -> String {
    let mut exec_start = vec![
        absolute(bin),
        "--data-dir".to_string(),
        format!("{STATE_ROOT}/node-agent"),
        "--work-dir".to_string(),
        "/run/kowalski-exo/work".to_string(),
        "--cache-dir".to_string(),
        "/var/cache/kowalski-exo/node-agent".to_string(),
    ];
    exec_start.extend(args.iter().cloned());
    let env_file = format!("EnvironmentFile=-{AGENT_ENV_FILE}");
    Unit {
        description: "Kowalski Exo node agent: runs code and models for the cluster",
        exec_start,
        service: &[
            &env_file,
            "StateDirectory=kowalski-exo/node-agent",
            "StateDirectoryMode=0700",
            "CacheDirectory=kowalski-exo/node-agent",
            "RuntimeDirectory=kowalski-exo",
            "RuntimeDirectoryMode=0755",
            "TimeoutStopSec=15s",
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "ProtectHome=read-only",
            "PrivateTmp=yes",
            "ProtectKernelModules=yes",
            "ProtectKernelLogs=yes",
            "ProtectClock=yes",
            "ProtectHostname=yes",
            "RestrictRealtime=yes",
            "LockPersonality=yes",
        ],
    }
    .render()
}
