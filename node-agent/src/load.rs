//! Host load for heartbeats: CPU use since the last sample, memory, and the load average.

use sysinfo::{CpuRefreshKind, MemoryRefreshKind, RefreshKind, System};

/// Load of this host at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct HostLoad {
    pub cpu_percent: f32,
    pub memory_used_bytes: u64,
    pub memory_total_bytes: u64,
    pub load_average_1m: f64,
}

/// Samples host load; CPU use is measured between consecutive samples.
pub struct LoadSampler {
    system: System,
}

impl Default for LoadSampler {
    fn default() -> Self {
        let refresh = RefreshKind::nothing()
            .with_cpu(CpuRefreshKind::nothing().with_cpu_usage())
            .with_memory(MemoryRefreshKind::nothing().with_ram());
        LoadSampler {
            system: System::new_with_specifics(refresh),
        }
    }
}

impl LoadSampler {
    pub fn sample(&mut self) -> HostLoad {
        self.system.refresh_cpu_usage();
        self.system.refresh_memory();
        HostLoad {
            cpu_percent: self.system.global_cpu_usage(),
            memory_used_bytes: self.system.used_memory(),
            memory_total_bytes: self.system.total_memory(),
            load_average_1m: System::load_average().one,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_reports_memory_and_a_cpu_share() {
        let mut sampler = LoadSampler::default();
        sampler.sample();
        let load = sampler.sample();
        assert!(load.memory_total_bytes > 0);
        assert!(load.memory_used_bytes <= load.memory_total_bytes);
        assert!(
            (0.0..=100.0).contains(&load.cpu_percent),
            "{}",
            load.cpu_percent
        );
    }
}
