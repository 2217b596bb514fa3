//! How far a batch has come, on stderr: a bar on a terminal (done, failed, running, rate, ETA),
//! and otherwise a plain line at most once a second and one at the end.

use std::{
    io::IsTerminal,
    time::{Duration, Instant},
};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::cli::PREFIX;

/// Between two plain progress lines.
const LINE_EVERY: Duration = Duration::from_secs(1);

/// The counts shown, and where they go.
pub struct Progress {
    bar: Option<ProgressBar>,
    total: u64,
    done: u64,
    failed: u64,
    running: u64,
    /// Finished in this run (the rate's numerator; results resumed from the database are not).
    finished_here: u64,
    started: Instant,
    last_line: Option<Instant>,
}

impl Progress {
    /// Progress of `total` tasks of which `done` (`failed` of them not ok) were recorded before.
    pub fn new(total: u64, done: u64, failed: u64) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template(
                    "{bar:30.cyan/blue} {pos}/{len} {msg} {per_sec} ETA {eta}",
                )
                .expect("a valid template")
                .progress_chars("=> "),
            );
            bar.set_position(done);
            bar.reset_eta();
            bar
        });
        let progress = Progress {
            bar,
            total,
            done,
            failed,
            running: 0,
            finished_here: 0,
            started: Instant::now(),
            last_line: None,
        };
        progress.show_counts();
        progress
    }

    /// Tasks in flight now.
    pub fn set_running(&mut self, running: u64) {
        self.running = running;
    }

    pub fn finished_one(&mut self, ok: bool) {
        self.done += 1;
        self.finished_here += 1;
        if !ok {
            self.failed += 1;
        }
        if let Some(bar) = &self.bar {
            bar.inc(1);
        }
        self.show();
    }

    /// The last word: `how` the batch ended.
    pub fn end(self, how: &str) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
        eprintln!("{PREFIX} batch {how}: {}", self.summary());
    }

    fn summary(&self) -> String {
        let seconds = self.started.elapsed().as_secs_f64();
        let rate = if seconds > 0.0 {
            self.finished_here as f64 / seconds
        } else {
            0.0
        };
        let left = self.total - self.done;
        let eta = if rate > 0.0 && left > 0 {
            format!(", ETA {:.0} s", left as f64 / rate)
        } else {
            String::new()
        };
        format!(
            "{} of {} done ({} failed, {} running), {rate:.1}/s{eta}",
            self.done, self.total, self.failed, self.running
        )
    }

    fn show(&mut self) {
        if self.bar.is_some() {
            self.show_counts();
            return;
        }
        if self.last_line.is_some_and(|at| at.elapsed() < LINE_EVERY) {
            return;
        }
        self.last_line = Some(Instant::now());
        eprintln!("{PREFIX} batch: {}", self.summary());
    }

    fn show_counts(&self) {
        if let Some(bar) = &self.bar {
            bar.set_message(format!(
                "({} failed, {} running)",
                self.failed, self.running
            ));
        }
    }
}
