//! Finding the coordinator on the LAN (mDNS/DNS-SD) with real processes in network namespaces
//! the test makes (a bridge and veth pairs), never on the host's own network: agents given a
//! join token and no `--coordinator` join their own cluster's coordinator, whether started
//! before or after it, pass over another cluster's coordinator on the same LAN, and find their
//! coordinator again when it comes back at another address.

use std::time::{Duration, Instant};

use kowalski_exo_tests::{CEILING, Daemon, binary, lan::Lan, outcome};

/// Waits until `coordinator` logged that the node `name` registered; returns when it did.
fn registered(coordinator: &Daemon, agent: &Daemon, name: &str) -> Instant {
    let start = Instant::now();
    let marker = format!("name={name}");
    loop {
        if coordinator
            .log()
            .iter()
            .any(|l| l.contains("node registered") && l.contains(&marker))
        {
            return Instant::now();
        }
        assert!(
            start.elapsed() < CEILING,
            "{name} never registered: {:?}\n{name}'s log: {:?}",
            coordinator.log(),
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn args(owned: &[String]) -> Vec<&str> {
    owned.iter().map(String::as_str).collect()
}

fn agent_args<'a>(name: &'a str, token: &'a str, dir: &'a str) -> Vec<&'a str> {
    vec![
        "--join",
        token,
        "--name",
        name,
        "--listen",
        "0.0.0.0:50052",
        "--data-dir",
        dir,
        "--work-dir",
        dir,
    ]
}

#[test]
fn agents_find_their_own_coordinator_on_the_lan_started_before_or_after_it_and_when_it_moves() {
    let lan = match Lan::create(5) {
        Ok(lan) => lan,
        Err(why) => {
            println!("skipped: {why}");
            return;
        }
    };
    let dirs = tempfile::tempdir().unwrap();
    let dir = |name: &str| dirs.path().join(name).to_str().unwrap().to_string();
    let (home, lab, early, late) = (dir("home"), dir("lab"), dir("early"), dir("late"));
    let (status, token, err) = outcome(
        std::process::Command::new(binary("coordinator"))
            .args(["token", "--data-dir", &home])
            .output()
            .unwrap(),
    );
    assert_eq!(status, Some(0), "{err}");
    let token = token.trim().to_string();
    let serve = |cluster: &'static str, data_dir: &str| -> Vec<String> {
        ["serve", "--listen", "0.0.0.0:50051", "--http", "off"]
            .iter()
            .map(|s| s.to_string())
            .chain(["--cluster-name".into(), cluster.into()])
            .chain(["--data-dir".into(), data_dir.to_string()])
            .collect()
    };

    // Another cluster's coordinator is on the LAN first; the agent passes over it.
    let lab_serve = serve("lab", &lab);
    let lab = Daemon::start_in(
        lan.host(1),
        "coordinator",
        &args(&lab_serve),
        Some("coordinator listening"),
    );
    let early_agent = Daemon::start_in(
        lan.host(2),
        "node-agent",
        &agent_args("early", &token, &early),
        None,
    );
    // Give it time to see (and pass over) the other cluster's announcement.
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        !early_agent
            .log()
            .iter()
            .any(|l| l.contains("found the coordinator")),
        "{:?}",
        early_agent.log()
    );

    let home_serve = serve("home", &home);
    let mut home = Daemon::start_in(
        lan.host(0),
        "coordinator",
        &args(&home_serve),
        Some("coordinator listening"),
    );
    let up = Instant::now();
    let early_joined = registered(&home, &early_agent, "early").duration_since(up);
    assert!(
        early_agent
            .log()
            .iter()
            .any(|l| l.contains("found the coordinator") && l.contains("10.77.0.1:50051")),
        "{:?}",
        early_agent.log()
    );

    // Started a while after the coordinator, past its announcements: mDNS answers a record at
    // most once a second by multicast, so an agent asking within a second of an announcement
    // hears it only with the next one.
    std::thread::sleep(Duration::from_millis(1500));
    let started = Instant::now();
    let late_agent = Daemon::start_in(
        lan.host(3),
        "node-agent",
        &agent_args("late", &token, &late),
        None,
    );
    let late_joined = registered(&home, &late_agent, "late").duration_since(started);
    println!(
        "joined the coordinator: an agent started before it {early_joined:?} after it was up, one started after it {late_joined:?} after the agent started (goal: within 1 s)"
    );
    assert!(
        !lab.log().iter().any(|l| l.contains("node registered")),
        "an agent joined the other cluster: {:?}",
        lab.log()
    );

    // The coordinator's device goes away and comes back with another address (its state, and
    // so its authority, kept): both agents find it there.
    home.signal(nix::sys::signal::Signal::SIGKILL);
    home.wait_exit();
    std::thread::sleep(Duration::from_millis(1000));
    let moved = Daemon::start_in(
        lan.host(4),
        "coordinator",
        &args(&home_serve),
        Some("coordinator listening"),
    );
    let up = Instant::now();
    let early_back = registered(&moved, &early_agent, "early").duration_since(up);
    let late_back = registered(&moved, &late_agent, "late").duration_since(up);
    println!(
        "the coordinator came back at another address: the agents joined it again {early_back:?} and {late_back:?} after it was up"
    );
    for agent in [&early_agent, &late_agent] {
        assert!(
            agent
                .log()
                .iter()
                .any(|l| l.contains("announces another address") && l.contains("10.77.0.5:50051")),
            "{:?}",
            agent.log()
        );
    }
    assert!(
        !lab.log().iter().any(|l| l.contains("node registered")),
        "an agent joined the other cluster: {:?}",
        lab.log()
    );
}
