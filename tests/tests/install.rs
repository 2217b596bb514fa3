//! `scripts/install.sh` into a throwaway root: the binaries, the units (checked with
//! `systemd-analyze verify`), the root-only token file; a second run changes nothing; the
//! units are what `install-service` prints; `--uninstall` removes all of it.

use std::{os::unix::fs::PermissionsExt, path::Path, process::Command};

use kowalski_exo_tests::{binary, outcome};

const AGENT_UNIT: &str = "etc/systemd/system/kowalski-exo-node-agent.service";
const COORDINATOR_UNIT: &str = "etc/systemd/system/kowalski-exo-coordinator.service";

fn install(root: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/install.sh");
    let bin_dir = binary("node-agent").parent().unwrap().to_path_buf();
    outcome(
        Command::new("bash")
            .arg(script)
            .arg("--root")
            .arg(root)
            .arg("--bin-dir")
            .arg(bin_dir)
            .args(args)
            .output()
            .unwrap(),
    )
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap()
}

#[test]
fn install_writes_services_once_and_uninstall_removes_them() {
    let root = tempfile::tempdir().unwrap();
    let root = root.path();
    let token = format!("kx1.{}.{}", "a".repeat(32), "b".repeat(64));
    let args = [
        "--coordinator",
        "--join",
        &token,
        "--cluster",
        "home",
        "--",
        "--name",
        "pi",
    ];
    let (status, out, err) = install(root, &args);
    assert_eq!(status, Some(0), "{out}{err}");
    assert_eq!(out.matches("install.sh: installed ").count(), 5, "{out}");
    let agent_unit = root.join(AGENT_UNIT);
    let coordinator_unit = root.join(COORDINATOR_UNIT);
    let env = root.join("etc/kowalski-exo/node-agent.env");
    assert_eq!(mode(&root.join("usr/local/bin/node-agent")), 0o755);
    assert_eq!(mode(&env), 0o600, "the token file is root's alone");
    assert_eq!(read(&env), format!("KOWALSKI_JOIN_TOKEN={token}\n"));
    assert!(
        !read(&agent_unit).contains(&token),
        "the token stays out of the unit"
    );

    // The units are what the binaries print.
    let printed = |bin: &str, installed: &str, args: &[&str]| {
        let (status, unit, err) = outcome(
            Command::new(binary(bin))
                .args(["install-service", "--bin", installed, "--"])
                .args(args)
                .output()
                .unwrap(),
        );
        assert_eq!(status, Some(0), "{err}");
        unit
    };
    assert_eq!(
        read(&agent_unit),
        printed("node-agent", "/usr/local/bin/node-agent", &["--name", "pi"])
    );
    assert_eq!(
        read(&coordinator_unit),
        printed(
            "coordinator",
            "/usr/local/bin/coordinator",
            &["--cluster-name", "home"]
        )
    );
    assert!(read(&coordinator_unit).contains("User=kowalski-exo\n"));

    // A second run changes nothing.
    let before = std::fs::metadata(&agent_unit).unwrap().modified().unwrap();
    let (status, out, err) = install(root, &args);
    assert_eq!(status, Some(0), "{out}{err}");
    assert!(!out.contains("installed"), "{out}");
    assert_eq!(out.matches(" unchanged").count(), 5, "{out}");
    assert_eq!(
        std::fs::metadata(&agent_unit).unwrap().modified().unwrap(),
        before
    );

    verify(root, &[AGENT_UNIT, COORDINATOR_UNIT]);

    let (status, out, err) = install(root, &["--uninstall"]);
    assert_eq!(status, Some(0), "{out}{err}");
    for gone in [
        AGENT_UNIT,
        COORDINATOR_UNIT,
        "usr/local/bin/node-agent",
        "usr/local/bin/coordinator",
        "etc/kowalski-exo",
    ] {
        assert!(!root.join(gone).exists(), "{gone} is still there: {out}");
    }
    let (status, out, _) = install(root, &["--uninstall"]);
    assert_eq!(
        (status, out.as_str()),
        (Some(0), "install.sh: uninstalled\n")
    );
}

/// `systemd-analyze verify` of each unit, its binary's path taken inside `root`.
fn verify(root: &Path, units: &[&str]) {
    let available = Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !available {
        println!("skipped verifying the units: systemd-analyze is not installed");
        return;
    }
    let check = tempfile::tempdir().unwrap();
    let mut paths = Vec::new();
    for unit in units {
        let text = read(&root.join(unit)).replace(
            "ExecStart=/usr/local/bin/",
            &format!("ExecStart={}/usr/local/bin/", root.display()),
        );
        let path = check.path().join(Path::new(unit).file_name().unwrap());
        std::fs::write(&path, text).unwrap();
        paths.push(path);
    }
    let (status, out, err) = outcome(
        Command::new("systemd-analyze")
            .arg("verify")
            .args(&paths)
            .output()
            .unwrap(),
    );
    assert_eq!(status, Some(0), "systemd-analyze verify: {out}{err}");
    assert_eq!(err, "", "systemd-analyze verify warned");
}
