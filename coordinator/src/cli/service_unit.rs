//! The systemd unit of an installed coordinator (`coordinator install-service`): it runs as
//! the system user `kowalski-exo`, with no capabilities, its state (the cluster's authority,
//! join token, keys) in /var/lib/kowalski-exo/coordinator readable by that user alone, and
//! the rest of the system hidden or read-only.

use std::path::Path;

use kowalski_exo_common::service_unit::{COORDINATOR_USER, STATE_ROOT, Unit, absolute};

/// The unit running `bin serve` with `args` added to the flags the unit sets itself.
pub fn unit(bin: &Path, args: &[String]) -> String {
    let mut exec_start = vec![
        absolute(bin),
        "serve".to_string(),
        "--data-dir".to_string(),
        format!("{STATE_ROOT}/coordinator"),
    ];
    exec_start.extend(args.iter().cloned());
    let user = format!("User={COORDINATOR_USER}");
    let group = format!("Group={COORDINATOR_USER}");
    Unit {
        description: "Kowalski Exo coordinator: the cluster's live view, placement and APIs",
        exec_start,
        service: &[
            &user,
            &group,
            "StateDirectory=kowalski-exo/coordinator",
            "StateDirectoryMode=0700",
            "NoNewPrivileges=yes",
            "CapabilityBoundingSet=",
            "ProtectSystem=strict",
            "ProtectHome=yes",
            "PrivateTmp=yes",
            "PrivateDevices=yes",
            "ProtectKernelTunables=yes",
            "ProtectKernelModules=yes",
            "ProtectKernelLogs=yes",
            "ProtectControlGroups=yes",
            "ProtectClock=yes",
            "ProtectHostname=yes",
            "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX AF_NETLINK",
            "RestrictNamespaces=yes",
            "RestrictRealtime=yes",
            "RestrictSUIDSGID=yes",
            "LockPersonality=yes",
            "MemoryDenyWriteExecute=yes",
            "SystemCallArchitectures=native",
        ],
    }
    .render()
}
