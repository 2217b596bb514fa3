//! The fallback kill without cgroups: the run's process group plus every descendant found
//! under /proc. A child that leaves both (setsid, then its parent exits) escapes this; cgroups
//! close that gap where the host offers them.

use std::{collections::HashMap, fs};

use nix::{
    sys::signal::{Signal, kill, killpg},
    unistd::Pid,
};

/// Parent pid of every process, read from /proc.
fn parents() -> HashMap<i32, i32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return HashMap::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| {
            let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // The command name may hold spaces and parentheses: fields start after the last ')'.
            let after = &stat[stat.rfind(')')? + 1..];
            let ppid = after.split_whitespace().nth(1)?.parse().ok()?;
            Some((pid, ppid))
        })
        .collect()
}

/// Every descendant of `root` alive now.
pub fn descendants(root: i32) -> Vec<i32> {
    let parents = parents();
    let mut found = vec![root];
    let mut i = 0;
    while i < found.len() {
        let parent = found[i];
        found.extend(
            parents
                .iter()
                .filter(|(_, ppid)| **ppid == parent)
                .map(|(pid, _)| *pid),
        );
        i += 1;
    }
    found.remove(0);
    found
}

/// SIGKILLs the process group led by `leader` and every descendant of `leader`.
pub fn kill_tree(leader: i32) {
    let found = descendants(leader);
    kill_group(leader);
    for pid in found {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
}

/// SIGKILLs the process group led by `leader`.
pub fn kill_group(leader: i32) {
    let _ = killpg(Pid::from_raw(leader), Signal::SIGKILL);
}
