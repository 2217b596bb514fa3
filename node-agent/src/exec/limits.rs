//! Limits of one run: the agent's defaults, what a request may ask for, and the ceilings it
//! cannot go past (the owner may lower them: `node-agent --max-memory` and the like).

use std::time::Duration;

use kowalski_exo_common::proto;

/// Wall-clock timeout when the request names none.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest timeout a request may ask for.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(3600);

/// Resolved limits of one run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExecLimits {
    pub timeout: Duration,
    pub cpu_seconds: u32,
    pub memory_bytes: u64,
    pub output_bytes: u64,
    pub max_processes: u32,
    pub file_size_bytes: u64,
    pub open_files: u32,
    /// Work dir, /tmp and /dev/shm together (with the mount layer).
    pub disk_bytes: u64,
}

impl Default for ExecLimits {
    fn default() -> Self {
        ExecLimits {
            timeout: DEFAULT_TIMEOUT,
            cpu_seconds: 30,
            memory_bytes: 512 * 1024 * 1024,
            output_bytes: 1024 * 1024,
            max_processes: 128,
            file_size_bytes: 64 * 1024 * 1024,
            open_files: 1024,
            disk_bytes: 256 * 1024 * 1024,
        }
    }
}

impl ExecLimits {
    /// The most any request may ask for, unless the owner says less.
    pub fn ceiling() -> Self {
        ExecLimits {
            timeout: MAX_TIMEOUT,
            cpu_seconds: 3600,
            memory_bytes: 64 * 1024 * 1024 * 1024,
            output_bytes: 256 * 1024 * 1024,
            max_processes: 4096,
            file_size_bytes: 16 * 1024 * 1024 * 1024,
            open_files: 65536,
            disk_bytes: 64 * 1024 * 1024 * 1024,
        }
    }

    /// Each limit at most the one of `ceiling`.
    pub fn capped(self, ceiling: &ExecLimits) -> Self {
        ExecLimits {
            timeout: self.timeout.min(ceiling.timeout),
            cpu_seconds: self.cpu_seconds.min(ceiling.cpu_seconds),
            memory_bytes: self.memory_bytes.min(ceiling.memory_bytes),
            output_bytes: self.output_bytes.min(ceiling.output_bytes),
            max_processes: self.max_processes.min(ceiling.max_processes),
            file_size_bytes: self.file_size_bytes.min(ceiling.file_size_bytes),
            open_files: self.open_files.min(ceiling.open_files),
            disk_bytes: self.disk_bytes.min(ceiling.disk_bytes),
        }
    }

    /// These defaults overridden by the request's non-zero fields, each capped at `ceiling`.
    pub fn with_request(
        self,
        timeout_ms: u32,
        requested: Option<&proto::ExecLimits>,
        ceiling: &ExecLimits,
    ) -> Self {
        let pick = |asked: u64, default: u64, max: u64| {
            if asked == 0 { default } else { asked.min(max) }
        };
        let r = requested.cloned().unwrap_or_default();
        let timeout = Duration::from_millis(pick(
            timeout_ms.into(),
            self.timeout.as_millis() as u64,
            ceiling.timeout.as_millis() as u64,
        ));
        // A run allowed to take longer than the default CPU time may use the CPU all along.
        let cpu_default = u64::from(self.cpu_seconds).max(timeout.as_secs_f64().ceil() as u64);
        ExecLimits {
            timeout,
            cpu_seconds: pick(
                r.cpu_seconds.into(),
                cpu_default,
                ceiling.cpu_seconds.into(),
            ) as u32,
            memory_bytes: pick(r.memory_bytes, self.memory_bytes, ceiling.memory_bytes),
            output_bytes: pick(r.output_bytes, self.output_bytes, ceiling.output_bytes),
            max_processes: pick(
                r.max_processes.into(),
                self.max_processes.into(),
                ceiling.max_processes.into(),
            ) as u32,
            file_size_bytes: pick(
                r.file_size_bytes,
                self.file_size_bytes,
                ceiling.file_size_bytes,
            ),
            open_files: pick(
                r.open_files.into(),
                self.open_files.into(),
                ceiling.open_files.into(),
            ) as u32,
            disk_bytes: pick(r.disk_bytes, self.disk_bytes, ceiling.disk_bytes),
        }
        .capped(ceiling)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_fields_take_defaults_and_others_are_capped() {
        let asked = proto::ExecLimits {
            memory_bytes: 64 * 1024 * 1024,
            output_bytes: u64::MAX,
            ..Default::default()
        };
        let limits = ExecLimits::default().with_request(0, Some(&asked), &ExecLimits::ceiling());
        assert_eq!(limits.timeout, DEFAULT_TIMEOUT);
        assert_eq!(limits.memory_bytes, 64 * 1024 * 1024);
        assert_eq!(limits.output_bytes, ExecLimits::ceiling().output_bytes);
        assert_eq!(limits.max_processes, ExecLimits::default().max_processes);
    }

    #[test]
    fn a_timeout_past_the_cpu_default_raises_the_cpu_limit_unless_one_is_asked() {
        let limits = ExecLimits::default().with_request(40_500, None, &ExecLimits::ceiling());
        assert_eq!(limits.cpu_seconds, 41);
        let asked = proto::ExecLimits {
            cpu_seconds: 5,
            ..Default::default()
        };
        assert_eq!(
            ExecLimits::default()
                .with_request(40_000, Some(&asked), &ExecLimits::ceiling())
                .cpu_seconds,
            5
        );
        assert_eq!(
            ExecLimits::default()
                .with_request(2_000, None, &ExecLimits::ceiling())
                .cpu_seconds,
            30
        );
    }

    #[test]
    fn the_owners_ceiling_caps_requests_and_defaults() {
        let ceiling = ExecLimits {
            memory_bytes: 128 * 1024 * 1024,
            max_processes: 16,
            timeout: Duration::from_secs(5),
            ..ExecLimits::ceiling()
        };
        let asked = proto::ExecLimits {
            memory_bytes: 64 * 1024 * 1024 * 1024,
            max_processes: 4096,
            ..Default::default()
        };
        let limits = ExecLimits::default().with_request(600_000, Some(&asked), &ceiling);
        assert_eq!(limits.memory_bytes, 128 * 1024 * 1024);
        assert_eq!(limits.max_processes, 16);
        assert_eq!(limits.timeout, Duration::from_secs(5));
        let defaults = ExecLimits::default().with_request(0, None, &ceiling);
        assert_eq!(defaults.memory_bytes, 128 * 1024 * 1024);
        assert_eq!(defaults.timeout, Duration::from_secs(5));
    }

    #[test]
    fn request_timeout_overrides_default() {
        let limits = ExecLimits::default().with_request(1500, None, &ExecLimits::ceiling());
        assert_eq!(limits.timeout, Duration::from_millis(1500));
    }
}
