//! The dashboard in a real browser: headless Chromium (Debian's), driven by Playwright, shows a
//! cluster of 3 agents; the agent running a run is SIGKILLed, and the page shows it down and
//! the run moved to another node, without a reload. A screenshot of the page is kept in the
//! target directory as the test's artifact.

use std::{
    io::{BufRead, BufReader, Write},
    path::Path,
    process::{Command, Stdio},
};

use kowalski_exo_common::proto::{ClusterEvent, ExecStatus, cluster_event::Event};
use kowalski_exo_tests::{CEILING, Cluster, outcome, python_request};
use nix::sys::signal::Signal;
use tonic::Streaming;

const CHROMIUM: &str = "/usr/bin/chromium";

/// Opens the page, waits for the three nodes ready, says so, reads the name of a node on stdin
/// (killed), waits for it down and for the run it held moved on the same page, checks it never
/// reloaded, and takes a screenshot.
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
    page.wait_for_function(
        "document.querySelectorAll('#nodes tr[data-state=ready]').length === 3", timeout=20000)
    page.evaluate("window.keptAcrossUpdates = true")
    print("ready", flush=True)
    killed = sys.stdin.readline().strip()
    page.wait_for_selector(f'tr[data-node="{killed}"][data-state="down"]', timeout=20000)
    moved = page.wait_for_selector(f'#failovers tr[data-from="{killed}"]', timeout=20000)
    assert page.evaluate("window.keptAcrossUpdates === true"), "the page reloaded"
    assert page.evaluate("performance.getEntriesByType('navigation').length") == 1
    # Each node's load comes as CPU percentages, one every 2 s.
    assert page.evaluate("""fetch('/dashboard/state').then(r => r.json()).then(s =>
        s.nodes.some(n => n.load.length > 0) &&
        s.nodes.every(n => n.load.every(cpu => typeof cpu === 'number')))""")
    others = page.locator('#nodes tr[data-state="ready"]').count()
    page.screenshot(path=shot, full_page=True)
    print(f"down, {others} ready, moved to {moved.get_attribute('data-to')}: {moved.inner_text()}",
          flush=True)
    browser.close()
"##;

/// The run's next event, until its stream ends.
async fn next_event(stream: &mut Streaming<ClusterEvent>) -> Option<Event> {
    tokio::time::timeout(CEILING, stream.message())
        .await
        .expect("no event within the ceiling")
        .expect("stream failed")
        .and_then(|e| e.event)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_a_killed_node_down_and_its_run_moved_without_a_reload() {
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
    let mut run = cluster
        .client()
        .await
        .execute(python_request(
            "import time\nprint('started', flush=True)\ntime.sleep(2)\nprint('done')",
        ))
        .await
        .unwrap()
        .into_inner();
    let mut placed = Vec::new();
    let mut finished = None;
    while let Some(event) = next_event(&mut run).await {
        match event {
            Event::Placed(p) => placed.push(p.node_name),
            Event::Output(_) if placed.len() == 1 => break,
            _ => {}
        }
    }
    let killed = placed[0].clone();
    cluster.agent(&killed).signal(Signal::SIGKILL);
    let mut stdin = browser.stdin.take().unwrap();
    writeln!(stdin, "{killed}").unwrap();
    while let Some(event) = next_event(&mut run).await {
        match event {
            Event::Placed(p) => placed.push(p.node_name),
            Event::Finished(f) => finished = f.result,
            _ => {}
        }
    }
    assert_eq!(finished.map(|r| r.status()), Some(ExecStatus::Ok));
    assert_eq!(placed.len(), 2, "{placed:?}");
    let last = said.next().and_then(Result::ok);
    let (status, _, err) = outcome(browser.wait_with_output().unwrap());
    assert_eq!(status, Some(0), "{err}");
    let expected = format!("down, 2 ready, moved to {}: ", placed[1]);
    let last = last.unwrap_or_default();
    assert!(last.starts_with(&expected), "{last}");
    assert!(
        last.contains("python run") && last.contains(&killed),
        "{last}"
    );
    assert!(shot.exists(), "no screenshot at {}", shot.display());
    println!("screenshot: {}", shot.display());
}
