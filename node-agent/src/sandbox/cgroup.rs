//! Control groups for runs: every run gets its own cgroup, so its whole process tree (setsid and
//! double-forked children included) is counted, limited, and killed together.
//!
//! cgroup v2 (unified) and v1 (separate pids, memory and freezer hierarchies) are both handled.
//! Each run's cgroup sits under `kowalski-exo/agent-PID-N` below the agent's own cgroup, so
//! several agents on one host never touch each other's runs.

use std::{
    fs::{self, File, OpenOptions},
    io,
    os::fd::{AsRawFd, RawFd},
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use kowalski_exo_common::proto::IsolationLevel;
use nix::{sys::signal::Signal, unistd::Pid};

/// Name of the directory holding every agent's run cgroups.
const RUNS_DIR: &str = "kowalski-exo";
/// Prefix of one agent's directory under [`RUNS_DIR`]; the agent's pid and instance follow.
const AGENT_PREFIX: &str = "agent-";
/// The leaf a cgroup v2 agent moves itself into, so its parent may enable controllers.
const V2_AGENT_LEAF: &str = "kowalski-exo-agent";
/// Rounds of freeze-and-kill before giving up on an emptied cgroup.
const KILL_ROUNDS: usize = 50;

/// Where run cgroups are created, found once at start.
#[derive(Clone, Debug)]
pub enum CgroupRoot {
    V1 {
        pids: PathBuf,
        memory: PathBuf,
        freezer: PathBuf,
    },
    V2 {
        runs: PathBuf,
    },
}

/// Limits a cgroup enforces on a whole process tree.
#[derive(Clone, Copy, Debug)]
pub struct CgroupLimits {
    pub memory_bytes: u64,
    pub max_processes: u32,
}

impl CgroupRoot {
    /// Finds writable cgroups (v2 with pids and memory, or v1 pids, memory and freezer) and
    /// prepares the runs directory; `None` when the host offers none to this process.
    pub fn detect() -> Option<CgroupRoot> {
        let mountinfo = fs::read_to_string("/proc/self/mountinfo").ok()?;
        let membership = fs::read_to_string("/proc/self/cgroup").ok()?;
        let shared =
            detect_v2(&mountinfo, &membership).or_else(|| detect_v1(&mountinfo, &membership))?;
        shared.remove_dead_agents();
        // Several agents may live in one process (tests, embedded mode): number them.
        static AGENTS: AtomicU64 = AtomicU64::new(0);
        let instance = AGENTS.fetch_add(1, Ordering::Relaxed);
        let root = shared.child(&format!("{AGENT_PREFIX}{}-{instance}", std::process::id()));
        for dir in root.run_parents() {
            if let Err(e) = fs::create_dir_all(dir) {
                tracing::debug!(dir = %dir.display(), error = %e, "cgroups not writable");
                return None;
            }
        }
        if let CgroupRoot::V2 { runs } = &root {
            fs::write(runs.join("cgroup.subtree_control"), "+pids +memory").ok()?;
        }
        Some(root)
    }

    pub fn level(&self) -> IsolationLevel {
        match self {
            CgroupRoot::V1 { .. } => IsolationLevel::CgroupV1,
            CgroupRoot::V2 { .. } => IsolationLevel::CgroupV2,
        }
    }

    fn run_parents(&self) -> Vec<&PathBuf> {
        match self {
            CgroupRoot::V1 {
                pids,
                memory,
                freezer,
            } => vec![pids, memory, freezer],
            CgroupRoot::V2 { runs } => vec![runs],
        }
    }

    /// The same hierarchies, one level down.
    fn child(&self, name: &str) -> CgroupRoot {
        match self {
            CgroupRoot::V1 {
                pids,
                memory,
                freezer,
            } => CgroupRoot::V1 {
                pids: pids.join(name),
                memory: memory.join(name),
                freezer: freezer.join(name),
            },
            CgroupRoot::V2 { runs } => CgroupRoot::V2 {
                runs: runs.join(name),
            },
        }
    }

    /// Creates an empty cgroup for one run; limits are set when the run is known.
    pub fn create_run(&self, name: &str) -> io::Result<RunCgroup> {
        let mut run = RunCgroup {
            version: self.clone(),
            procs: Vec::new(),
            dirs: self.run_parents().iter().map(|p| p.join(name)).collect(),
        };
        for dir in &run.dirs {
            fs::create_dir(dir)?;
        }
        for dir in run.dirs.clone() {
            run.procs.push(
                OpenOptions::new()
                    .write(true)
                    .open(dir.join("cgroup.procs"))?,
            );
        }
        Ok(run)
    }

    /// Kills the runs and removes the directories of agents that died without cleaning up.
    fn remove_dead_agents(&self) {
        let Ok(entries) = fs::read_dir(self.run_parents()[0]) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(pid) = name
                .strip_prefix(AGENT_PREFIX)
                .and_then(|rest| rest.split('-').next())
                .and_then(|pid| pid.parse::<i32>().ok())
            else {
                continue;
            };
            // EPERM means alive, only not ours to signal.
            if nix::sys::signal::kill(Pid::from_raw(pid), None) != Err(nix::errno::Errno::ESRCH) {
                continue;
            }
            tracing::warn!(cgroup = %name, "removing run cgroups left by an agent that is gone");
            self.child(&name).remove_all();
        }
    }

    /// A handle on an existing run cgroup of this agent.
    fn existing_run(&self, name: &std::ffi::OsStr) -> RunCgroup {
        RunCgroup {
            version: self.clone(),
            procs: Vec::new(),
            dirs: self.run_parents().iter().map(|p| p.join(name)).collect(),
        }
    }

    /// Names of this agent's run cgroups.
    fn run_names(&self) -> Vec<std::ffi::OsString> {
        fs::read_dir(self.run_parents()[0])
            .map(|entries| {
                entries
                    .flatten()
                    .filter(|e| e.path().is_dir())
                    .map(|e| e.file_name())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Kills every run under this agent's directory and removes it (at shutdown).
    pub fn remove_all(&self) {
        for name in self.run_names() {
            drop(self.existing_run(&name));
        }
        for dir in self.run_parents() {
            let _ = fs::remove_dir(dir);
        }
    }

    /// Kills every process of every run and leaves the directories, which the next agent to
    /// start removes. For the sentinel, which must not log (a handle's drop may).
    pub fn kill_runs(&self) {
        for name in self.run_names() {
            std::mem::ManuallyDrop::new(self.existing_run(&name)).kill_all();
        }
    }
}

fn detect_v2(mountinfo: &str, membership: &str) -> Option<CgroupRoot> {
    let mount = mountinfo.lines().find_map(|line| {
        let (pre, post) = line.split_once(" - ")?;
        (post.split_whitespace().next()? == "cgroup2").then(|| pre.split_whitespace().nth(4))?
    })?;
    let own = membership.lines().find_map(|l| l.strip_prefix("0::"))?;
    let own_dir = Path::new(mount).join(own.trim_start_matches('/'));
    let controllers = fs::read_to_string(own_dir.join("cgroup.controllers")).ok()?;
    if !(controllers.contains("pids") && controllers.contains("memory")) {
        return None;
    }
    // cgroup v2 lets a cgroup either hold processes or hand controllers to children: move the
    // agent into a leaf of its own, then enable pids and memory below its old cgroup.
    let enable = |dir: &Path| fs::write(dir.join("cgroup.subtree_control"), "+pids +memory");
    if enable(&own_dir).is_err() {
        let leaf = own_dir.join(V2_AGENT_LEAF);
        fs::create_dir_all(&leaf).ok()?;
        fs::write(leaf.join("cgroup.procs"), std::process::id().to_string()).ok()?;
        enable(&own_dir).ok()?;
    }
    let runs = own_dir.join(RUNS_DIR);
    fs::create_dir_all(&runs).ok()?;
    enable(&runs).ok()?;
    Some(CgroupRoot::V2 { runs })
}

fn detect_v1(mountinfo: &str, membership: &str) -> Option<CgroupRoot> {
    let hierarchy = |controller: &str| -> Option<PathBuf> {
        let mount = mountinfo.lines().find_map(|line| {
            let (pre, post) = line.split_once(" - ")?;
            let mut post = post.split_whitespace();
            let fstype = post.next()?;
            let options = post.nth(1)?;
            (fstype == "cgroup" && options.split(',').any(|o| o == controller))
                .then(|| pre.split_whitespace().nth(4))?
        })?;
        let own = membership.lines().find_map(|l| {
            let mut fields = l.splitn(3, ':');
            let _id = fields.next()?;
            let controllers = fields.next()?;
            let path = fields.next()?;
            controllers
                .split(',')
                .any(|c| c == controller)
                .then_some(path)
        })?;
        Some(
            Path::new(mount)
                .join(own.trim_start_matches('/'))
                .join(RUNS_DIR),
        )
    };
    Some(CgroupRoot::V1 {
        pids: hierarchy("pids")?,
        memory: hierarchy("memory")?,
        freezer: hierarchy("freezer")?,
    })
}

/// The cgroup of one run; dropping it kills what is left in it and removes it.
#[derive(Debug)]
pub struct RunCgroup {
    version: CgroupRoot,
    /// One directory per hierarchy: v1 pids, memory, freezer; v2 the one directory.
    dirs: Vec<PathBuf>,
    /// `cgroup.procs` of each directory, opened before fork so the child only writes.
    procs: Vec<File>,
}

impl RunCgroup {
    /// Sets the memory and process limits of the whole tree.
    pub fn set_limits(&self, limits: CgroupLimits) -> io::Result<()> {
        let memory = limits.memory_bytes.to_string();
        let pids = limits.max_processes.to_string();
        fs::write(self.dirs[0].join("pids.max"), &pids)?;
        match self.version {
            CgroupRoot::V1 { .. } => {
                fs::write(self.memory_dir().join("memory.limit_in_bytes"), &memory)?;
                // Without swap accounting this file is absent; the memory limit still holds.
                let _ = fs::write(
                    self.memory_dir().join("memory.memsw.limit_in_bytes"),
                    &memory,
                );
            }
            CgroupRoot::V2 { .. } => {
                fs::write(self.memory_dir().join("memory.max"), &memory)?;
                let _ = fs::write(self.memory_dir().join("memory.swap.max"), "0");
            }
        }
        Ok(())
    }

    /// Descriptors the child writes "0" to, between fork and exec, to join the cgroup.
    pub fn join_fds(&self) -> Vec<RawFd> {
        self.procs.iter().map(|f| f.as_raw_fd()).collect()
    }

    fn memory_dir(&self) -> &Path {
        match self.version {
            CgroupRoot::V1 { .. } => &self.dirs[1],
            CgroupRoot::V2 { .. } => &self.dirs[0],
        }
    }

    /// Every process in the run's cgroups, nested cgroups the run made included.
    fn pids(&self) -> Vec<i32> {
        let mut pids = Vec::new();
        for dir in &self.dirs {
            for cgroup in subtree(dir) {
                let procs = fs::read_to_string(cgroup.join("cgroup.procs")).unwrap_or_default();
                pids.extend(procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
            }
        }
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    /// Kills every process in the cgroup, freezing it first so none can fork meanwhile.
    /// Returns true when the cgroup is empty afterwards.
    pub fn kill_all(&self) -> bool {
        let (state_file, frozen, thawed) = match &self.version {
            CgroupRoot::V1 { .. } => (self.dirs[2].join("freezer.state"), "FROZEN", "THAWED"),
            CgroupRoot::V2 { .. } => {
                if fs::write(self.dirs[0].join("cgroup.kill"), "1").is_ok() {
                    return self.wait_empty();
                }
                (self.dirs[0].join("cgroup.freeze"), "1", "0")
            }
        };
        for _ in 0..KILL_ROUNDS {
            let pids = self.pids();
            if pids.is_empty() {
                return true;
            }
            let _ = fs::write(&state_file, frozen);
            for pid in pids {
                let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            let _ = fs::write(&state_file, thawed);
            std::thread::sleep(Duration::from_millis(2));
        }
        self.pids().is_empty()
    }

    fn wait_empty(&self) -> bool {
        for _ in 0..KILL_ROUNDS {
            if self.pids().is_empty() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        false
    }

    /// Highest memory use of the whole tree, where the kernel records it.
    pub fn peak_memory(&self) -> Option<u64> {
        let file = match self.version {
            CgroupRoot::V1 { .. } => "memory.max_usage_in_bytes",
            CgroupRoot::V2 { .. } => "memory.peak",
        };
        fs::read_to_string(self.memory_dir().join(file))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// True when the kernel's OOM killer ended a process of this run.
    pub fn oom_killed(&self) -> bool {
        let file = match self.version {
            CgroupRoot::V1 { .. } => "memory.oom_control",
            CgroupRoot::V2 { .. } => "memory.events",
        };
        fs::read_to_string(self.memory_dir().join(file))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.strip_prefix("oom_kill "))
            .any(|n| n.trim().parse::<u64>().unwrap_or(0) > 0)
    }

    /// True when a fork failed because the process limit was reached.
    pub fn process_limit_hit(&self) -> bool {
        let events = fs::read_to_string(self.dirs[0].join("pids.events")).unwrap_or_default();
        events
            .lines()
            .filter_map(|l| l.strip_prefix("max "))
            .any(|n| n.trim().parse::<u64>().unwrap_or(0) > 0)
    }

    /// Removes the cgroup directories, nested ones first (they must hold no process).
    fn remove(&self) {
        for dir in &self.dirs {
            for cgroup in subtree(dir).into_iter().rev() {
                let mut result = fs::remove_dir(&cgroup);
                for _ in 0..KILL_ROUNDS {
                    if result.is_ok() || !cgroup.exists() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(2));
                    result = fs::remove_dir(&cgroup);
                }
                if let Err(e) = result {
                    tracing::warn!(cgroup = %cgroup.display(), error = %e, "cannot remove run cgroup");
                }
            }
        }
    }
}

impl Drop for RunCgroup {
    /// A run's cgroup goes with it, whatever path drops it: every process in it is killed and
    /// the directories removed. Blocking.
    fn drop(&mut self) {
        self.kill_all();
        self.remove();
    }
}

/// A cgroup directory and every cgroup below it, parents before children.
fn subtree(dir: &Path) -> Vec<PathBuf> {
    let mut found = vec![dir.to_path_buf()];
    let mut i = 0;
    while i < found.len() {
        if let Ok(entries) = fs::read_dir(&found[i]) {
            found.extend(
                entries
                    .flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
        i += 1;
    }
    found
}
