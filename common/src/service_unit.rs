//! systemd units for the binaries (`node-agent install-service`, `coordinator
//! install-service`, and `scripts/install.sh`, which writes what they print): where each keeps
//! its state, how it restarts, and the hardening it runs under.

use std::path::Path;

/// Where the state of the installed services lives (`StateDirectory=` under /var/lib).
pub const STATE_ROOT: &str = "/var/lib/kowalski-exo";
/// The environment file of an installed agent: `KOWALSKI_JOIN_TOKEN=...`, kept out of the
/// unit (which anyone may read) and readable by root alone.
pub const AGENT_ENV_FILE: &str = "/etc/kowalski-exo/node-agent.env";
/// The system user the coordinator runs as.
pub const COORDINATOR_USER: &str = "kowalski-exo";

/// One service's unit.
pub struct Unit<'a> {
    pub description: &'a str,
    /// The binary and its arguments.
    pub exec_start: Vec<String>,
    /// Lines of the `[Service]` section besides `ExecStart=` and restarting.
    pub service: &'a [&'a str],
}

impl Unit<'_> {
    pub fn render(&self) -> String {
        let exec: Vec<String> = self.exec_start.iter().map(|a| quote(a)).collect();
        let mut text = format!(
            "# Written by `install-service` of Kowalski Exo; `scripts/install.sh` installs it.\n\
[Unit]\n\
Description={}\n\
Wants=network-online.target\n\
After=network-online.target\n\
\n\
[Service]\n\
Type=exec\n\
ExecStart={}\n\
Restart=on-failure\n\
RestartSec=2s\n",
            self.description,
            exec.join(" ")
        );
        for line in self.service {
            text.push_str(line);
            text.push('\n');
        }
        text.push_str("\n[Install]\nWantedBy=multi-user.target\n");
        text
    }
}

/// An argument as systemd reads it on an `ExecStart=` line: quoted when it holds anything but
/// plain characters.
fn quote(arg: &str) -> String {
    let plain = !arg.is_empty()
        && arg
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=,@+".contains(c));
    if plain {
        return arg.to_string();
    }
    let escaped = arg
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('%', "%%")
        .replace('$', "$$");
    format!("\"{escaped}\"")
}

/// The path of `bin` as the unit runs it: absolute, as systemd wants.
pub fn absolute(bin: &Path) -> String {
    std::path::absolute(bin)
        .unwrap_or_else(|_| bin.to_path_buf())
        .display()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_unit_runs_its_command_with_arguments_quoted_for_systemd() {
        let unit = Unit {
            description: "d",
            exec_start: vec![
                "/bin/x".into(),
                "--label".into(),
                "k=v w".into(),
                "50%$".into(),
            ],
            service: &["User=u"],
        };
        let text = unit.render();
        assert!(
            text.contains("ExecStart=/bin/x --label \"k=v w\" \"50%%$$\"\n"),
            "{text}"
        );
        assert!(text.contains("Restart=on-failure\nRestartSec=2s\nUser=u\n"));
        assert!(text.ends_with("[Install]\nWantedBy=multi-user.target\n"));
    }
}
