//! Probing each runtime: find it on PATH, then ask it for its real executable and version.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, SystemTime},
};

use kowalski_exo_common::Language;
use tokio::{process::Command, task::JoinSet};

use super::{RuntimeFingerprint, RuntimeHealth, RuntimeInfo, SearchPath};

/// How long one runtime may take to answer its probe (a cold JVM needs a while).
const PROBE_TIMEOUT: Duration = Duration::from_secs(15);

/// Probes every known language concurrently.
pub async fn probe_all(search: &SearchPath) -> RuntimeFingerprint {
    let mut probes = JoinSet::new();
    for language in Language::ALL {
        let search = search.clone();
        probes.spawn(async move { probe(language, &search).await });
    }
    let mut runtimes = probes.join_all().await;
    runtimes.sort_by_key(|r| Language::ALL.iter().position(|l| *l == r.language));
    RuntimeFingerprint {
        runtimes,
        probed_at: SystemTime::now(),
    }
}

/// Executable names tried for a language, in order.
fn candidates(language: Language) -> &'static [&'static str] {
    match language {
        Language::Python => &["python3", "python"],
        Language::Bash => &["bash"],
        Language::Sh => &["sh"],
        Language::Javascript => &["node", "nodejs"],
        Language::Ruby => &["ruby"],
        Language::Perl => &["perl"],
        Language::Rust => &["rustc"],
        Language::Java => &["java"],
        Language::Go => &["go"],
        Language::C => &["cc", "gcc", "clang"],
    }
}

/// Arguments that make the runtime print its real executable and its version.
fn self_report_args(language: Language) -> &'static [&'static str] {
    match language {
        Language::Python => &[
            "-c",
            "import sys, platform; print(sys.executable); print(platform.python_version())",
        ],
        Language::Bash => &["-c", "echo \"$BASH\"; echo \"${BASH_VERSION%%(*}\""],
        Language::Sh => &["-c", "exit 0"],
        Language::Javascript => &["-p", "process.execPath + '\\n' + process.versions.node"],
        Language::Ruby => &[
            "-e",
            "require 'rbconfig'; puts RbConfig.ruby; puts RUBY_VERSION",
        ],
        Language::Perl => &["-e", "printf \"%s\\n%vd\\n\", $^X, $^V"],
        Language::Rust => &["--print", "sysroot"],
        Language::Java => &["-XshowSettings:properties", "-version"],
        Language::Go => &["env", "GOROOT", "GOVERSION"],
        Language::C => &["-dumpfullversion", "-dumpversion"],
    }
}

async fn probe(language: Language, search: &SearchPath) -> RuntimeInfo {
    let Some(found) = candidates(language).iter().find_map(|n| search.find(n)) else {
        return RuntimeInfo::missing(language);
    };
    let (executable, health, version) = match self_report(language, &found).await {
        Ok((executable, version)) => (Some(executable), RuntimeHealth::Healthy, version),
        Err(reason) => (None, RuntimeHealth::Broken(reason), String::new()),
    };
    RuntimeInfo {
        language,
        version,
        executable,
        found_as: Some(found),
        health,
    }
}

/// Runs the self-report probe and returns (real executable, version).
async fn self_report(language: Language, found: &Path) -> Result<(PathBuf, String), String> {
    let report = run_probe(found, self_report_args(language)).await?;
    let mut lines = report.lines().map(str::trim).filter(|l| !l.is_empty());
    match language {
        Language::Python
        | Language::Bash
        | Language::Javascript
        | Language::Ruby
        | Language::Perl => {
            let exe = lines.next().ok_or("probe printed no executable path")?;
            let version = lines.next().ok_or("probe printed no version")?;
            Ok((PathBuf::from(exe), version.to_string()))
        }
        Language::Sh | Language::C => {
            let real = std::fs::canonicalize(found).map_err(|e| e.to_string())?;
            let version = match language {
                Language::C => lines.next().unwrap_or_default().to_string(),
                _ => file_name(&real),
            };
            Ok((real, version))
        }
        Language::Rust => {
            let sysroot = lines.next().ok_or("rustc printed no sysroot")?;
            let real = Path::new(sysroot).join("bin").join("rustc");
            let version = run_probe(&real, &["--version"]).await?;
            let version = version.split_whitespace().nth(1).unwrap_or_default();
            Ok((real, version.to_string()))
        }
        Language::Java => java_report(&report),
        Language::Go => {
            let goroot = lines.next().ok_or("go env printed no GOROOT")?;
            let version = lines.next().unwrap_or_default().trim_start_matches("go");
            Ok((
                Path::new(goroot).join("bin").join("go"),
                version.to_string(),
            ))
        }
    }
}

/// Single-file source launch needs a JDK (its compiler module), not just a JRE.
fn java_report(report: &str) -> Result<(PathBuf, String), String> {
    let property = |name: &str| {
        report.lines().find_map(|l| {
            let (key, value) = l.split_once('=')?;
            (key.trim() == name).then(|| value.trim().to_string())
        })
    };
    let home = property("java.home").ok_or("java printed no java.home")?;
    let version = property("java.version").unwrap_or_default();
    let home = PathBuf::from(home);
    if !home.join("bin").join("javac").exists() {
        return Err(format!(
            "{} is a JRE without javac; single-file source launch needs a JDK",
            home.display()
        ));
    }
    Ok((home.join("bin").join("java"), version))
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Runs one probe command; its stdout and stderr together are the report.
async fn run_probe(program: &Path, args: &[&str]) -> Result<String, String> {
    let run = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output();
    let output = match tokio::time::timeout(PROBE_TIMEOUT, run).await {
        Err(_) => return Err(format!("no answer within {PROBE_TIMEOUT:?}")),
        Ok(Err(e)) => return Err(format!("cannot start {}: {e}", program.display())),
        Ok(Ok(output)) => output,
    };
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        let first_line = stderr
            .lines()
            .chain(stdout.lines())
            .find(|l| !l.trim().is_empty())
            .unwrap_or("no output");
        return Err(format!("probe exited with {}: {first_line}", output.status));
    }
    Ok(format!("{stdout}{stderr}"))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn write_script(dir: &Path, name: &str, body: &str) {
        let path = dir.join(name);
        std::fs::write(&path, body).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[tokio::test]
    async fn broken_runtime_reports_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        write_script(
            dir.path(),
            "ruby",
            "#!/bin/sh\necho 'ruby: version 9.9 is not installed' >&2\nexit 127\n",
        );
        let search = SearchPath::from_os(dir.path().as_os_str());
        let info = probe(Language::Ruby, &search).await;
        match &info.health {
            RuntimeHealth::Broken(reason) => {
                assert!(reason.contains("version 9.9 is not installed"), "{reason}")
            }
            other => panic!("expected broken, got {other:?}"),
        }
        assert_eq!(info.found_as, Some(dir.path().join("ruby")));
    }

    #[tokio::test]
    async fn absent_runtime_is_missing() {
        let dir = tempfile::tempdir().unwrap();
        let search = SearchPath::from_os(dir.path().as_os_str());
        assert_eq!(
            probe(Language::Perl, &search).await.health,
            RuntimeHealth::Missing
        );
    }

    #[tokio::test]
    async fn shim_resolves_to_the_real_interpreter() {
        let Some(real_python) = SearchPath::from_env().find("python3") else {
            eprintln!("skipped: no python3 on PATH");
            return;
        };
        let shims = tempfile::tempdir().unwrap();
        write_script(
            shims.path(),
            "python3",
            &format!("#!/bin/sh\nexec {} \"$@\"\n", real_python.display()),
        );
        let search = SearchPath::from_os(shims.path().as_os_str());
        let info = probe(Language::Python, &search).await;
        assert_eq!(info.health, RuntimeHealth::Healthy);
        assert_eq!(info.found_as, Some(shims.path().join("python3")));
        let exe = info.executable.unwrap();
        assert!(!exe.starts_with(shims.path()), "still the shim: {exe:?}");
        assert!(info.version.starts_with('3'), "version {}", info.version);
    }
}
