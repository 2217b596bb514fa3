//! The dashboard in a real browser: headless Chromium (Debian's), driven by Playwright, shows a
//! cluster of 3 agents; one agent is SIGKILLed and the page shows it down without a reload. A
//! screenshot of the page is kept in the target directory as the test's artifact.

use std::{
    io::{BufRead, BufReader, Write},
    path::Path,
    process::{Command, Stdio},
};

use kowalski_exo_tests::{Cluster, outcome};
use nix::sys::signal::Signal;

const CHROMIUM: &str = "/usr/bin/chromium";

/// Opens the page, waits for agent-1 ready, says so, waits for a line on stdin (the kill),
/// then for agent-1 down on the same page, checks it never reloaded, and takes a screenshot.
const BROWSER: &str = r##"
import sys
from playwright.sync_api import sync_playwright
url, chromium, shot = sys.argv[1:4]
flags = ["--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
with sync_playwright() as p:
    browser = p.chromium.launch(executable_path=chromium, args=flags)
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page.goto(url)
    page.wait_for_selector('tr[data-node="agent-1"][data-state="ready"]', timeout=20000)
    assert page.locator("#nodes tr").count() == 3, page.inner_text("#nodes")
    page.evaluate("window.keptAcrossUpdates = true")
    print("ready", flush=True)
    sys.stdin.readline()
    page.wait_for_selector('tr[data-node="agent-1"][data-state="down"]', timeout=20000)
    assert page.evaluate("window.keptAcrossUpdates === true"), "the page reloaded"
    assert page.evaluate("performance.getEntriesByType('navigation').length") == 1
    others = page.locator('#nodes tr[data-state="ready"]').count()
    page.screenshot(path=shot, full_page=True)
    print(f"down, {others} ready", flush=True)
    browser.close()
"##;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_a_killed_node_down_without_a_reload() {
    let playwright = Command::new("python3")
        .args(["-c", "import playwright.sync_api"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !playwright || !Path::new(CHROMIUM).exists() {
        println!(
            "skipped: needs Playwright (pip install playwright) and Debian's chromium at {CHROMIUM} (.ci/run installs both)"
        );
        return;
    }
    let cluster = Cluster::start(3, 1, &[]).await;
    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    let _ = std::fs::remove_file(&shot);
    let mut browser = Command::new("python3")
        .args(["-c", BROWSER, &format!("{}/", cluster.http_url()), CHROMIUM])
        .arg(&shot)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut said = BufReader::new(browser.stdout.take().unwrap()).lines();
    let first = said.next().and_then(Result::ok);
    if first.as_deref() != Some("ready") {
        let (_, _, err) = outcome(browser.wait_with_output().unwrap());
        panic!("the page never showed agent-1 ready ({first:?}): {err}");
    }
    cluster.agent("agent-1").signal(Signal::SIGKILL);
    let mut stdin = browser.stdin.take().unwrap();
    writeln!(stdin, "killed").unwrap();
    let last = said.next().and_then(Result::ok);
    let (status, _, err) = outcome(browser.wait_with_output().unwrap());
    assert_eq!(status, Some(0), "{err}");
    assert_eq!(last.as_deref(), Some("down, 2 ready"));
    assert!(shot.exists(), "no screenshot at {}", shot.display());
    println!("screenshot: {}", shot.display());
}
