//! Which isolation layers this host gives runs, found once at start, with the reason for each
//! one it cannot give.

use std::{fmt, io, os::unix::process::CommandExt, process::Stdio};

use kowalski_exo_common::{
    isolation::{self, ALL},
    proto::IsolationLayer,
};

use super::steps::{self, landlock};

/// What this host offers.
#[derive(Clone, Debug, Default)]
pub struct Layers {
    pub cgroup: bool,
    pub user: bool,
    pub network: bool,
    pub mount: bool,
    /// The Landlock ABI, 0 without Landlock.
    pub landlock_abi: u32,
    /// Why each missing layer is missing.
    pub missing: Vec<(IsolationLayer, String)>,
}

impl Layers {
    /// Finds the layers. `cgroup` says whether the agent got its cgroups, and if not why.
    pub fn detect(cgroup: Result<(), String>) -> Layers {
        let mut layers = Layers::default();
        match cgroup {
            Ok(()) => layers.cgroup = true,
            Err(reason) => layers.missing.push((IsolationLayer::Cgroup, reason)),
        }
        let root = nix::unistd::geteuid().is_root();
        let not_root =
            || "the agent does not run as root (run it as root to get this layer)".to_string();
        if root {
            layers.user = true;
        } else {
            layers.missing.push((IsolationLayer::User, not_root()));
        }
        let network = if root {
            probe(libc::CLONE_NEWNET, None)
        } else {
            Err(not_root())
        };
        match network {
            Ok(()) => layers.network = true,
            Err(reason) => layers.missing.push((IsolationLayer::Network, reason)),
        }
        let mount = if root {
            probe(0, Some(steps::mount_probe()))
        } else {
            Err(not_root())
        };
        match mount {
            Ok(()) => layers.mount = true,
            Err(reason) => layers.missing.push((IsolationLayer::Mount, reason)),
        }
        layers.landlock_abi = landlock::abi();
        if layers.landlock_abi == 0 {
            layers.missing.push((
                IsolationLayer::Landlock,
                "the kernel has no Landlock, or it is not enabled (Linux 5.13+, lsm=landlock)"
                    .to_string(),
            ));
        }
        layers
    }

    pub fn has(&self, layer: IsolationLayer) -> bool {
        match layer {
            IsolationLayer::Cgroup => self.cgroup,
            IsolationLayer::User => self.user,
            IsolationLayer::Network => self.network,
            IsolationLayer::Mount => self.mount,
            IsolationLayer::Landlock => self.landlock_abi > 0,
            IsolationLayer::Unspecified => false,
        }
    }

    /// The layers achieved, in report order.
    pub fn achieved(&self) -> Vec<IsolationLayer> {
        ALL.into_iter().filter(|layer| self.has(*layer)).collect()
    }
}

impl fmt::Display for Layers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let achieved: Vec<i32> = self.achieved().into_iter().map(|l| l as i32).collect();
        write!(f, "{}", isolation::names(&achieved))
    }
}

/// Starts `true` in the namespace kinds `flags`, after running `steps` (see
/// [`steps::mount_probe`]), to see whether this host allows them.
fn probe(flags: libc::c_int, steps: Option<steps::Steps>) -> Result<(), String> {
    let steps = steps.unwrap_or_default();
    let mut scratch = [0u8; 8];
    let mut command = std::process::Command::new("/bin/true");
    command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: the hook makes raw syscalls only, as a pre-exec hook must.
    unsafe {
        command.pre_exec(move || {
            if flags != 0 && libc::unshare(flags) != 0 {
                return Err(io::Error::last_os_error());
            }
            steps::run(steps.as_bytes(), &mut scratch)
                .map_err(|(errno, _)| io::Error::from_raw_os_error(errno))
        });
    }
    match command.status() {
        Ok(status) if status.success() => Ok(()),
        Ok(status) => Err(format!("a probe in a new namespace failed: {status}")),
        Err(e) => Err(format!("the host refuses a new namespace: {e}")),
    }
}
