//! A LAN made of network namespaces, for tests of what crosses a network (discovery) that must
//! never touch the host's own: a bridge in a namespace of its own, and hosts, each a namespace
//! with one veth on the bridge and an address in 10.77.0.0/24. Needs root and iproute2's `ip`;
//! everything is removed on drop.

use std::{fs::File, os::fd::AsFd, process::Command};

use nix::sched::{CloneFlags, setns};

/// The bridge and its hosts.
pub struct Lan {
    switch: String,
    hosts: Vec<Host>,
}

/// One host of the LAN: a network namespace.
pub struct Host {
    pub netns: String,
    /// Its address on the LAN.
    pub address: String,
}

impl Lan {
    /// A LAN of `hosts` hosts, or why it cannot be made here (not root, no `ip`).
    pub fn create(hosts: usize) -> Result<Lan, String> {
        if !nix::unistd::geteuid().is_root() {
            return Err("network namespaces need root".into());
        }
        let tag = std::process::id() % 100_000;
        let switch = format!("kx{tag}s");
        ip(&["netns", "add", &switch])?;
        let mut lan = Lan {
            switch: switch.clone(),
            hosts: Vec::new(),
        };
        ip(&["-n", &switch, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &switch, "link", "set", "br0", "up"])?;
        for i in 0..hosts {
            let netns = format!("kx{tag}h{i}");
            ip(&["netns", "add", &netns])?;
            let host = Host {
                netns: netns.clone(),
                address: format!("10.77.0.{}", i + 1),
            };
            lan.hosts.push(host);
            let port = format!("p{i}");
            ip(&[
                "link", "add", &port, "netns", &switch, "type", "veth", "peer", "name", "eth0",
                "netns", &netns,
            ])?;
            ip(&["-n", &switch, "link", "set", &port, "master", "br0", "up"])?;
            let cidr = format!("10.77.0.{}/24", i + 1);
            ip(&["-n", &netns, "addr", "add", &cidr, "dev", "eth0"])?;
            ip(&["-n", &netns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &netns, "link", "set", "lo", "up"])?;
        }
        Ok(lan)
    }

    pub fn host(&self, index: usize) -> &Host {
        &self.hosts[index]
    }
}

impl Host {
    /// Makes `command` run in this host's network namespace.
    pub fn enter_on_exec(&self, command: &mut Command) {
        let namespace = File::open(format!("/run/netns/{}", self.netns))
            .unwrap_or_else(|e| panic!("open the namespace {}: {e}", self.netns));
        // SAFETY: between fork and exec the closure only calls setns(2), which is
        // async-signal-safe, on a descriptor opened before the fork.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(command, move || {
                setns(namespace.as_fd(), CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)
            });
        }
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        for host in &self.hosts {
            let _ = ip(&["netns", "del", &host.netns]);
        }
        let _ = ip(&["netns", "del", &self.switch]);
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run `ip` (iproute2): {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}
