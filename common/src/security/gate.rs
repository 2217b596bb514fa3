//! The gate of the client APIs (gRPC and HTTP alike): a key in force, then the key's request
//! rate. Each key has a token bucket, so one client flooding the coordinator is refused quickly
//! and cheaply while other keys, and the agents' streams, go on.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use super::trust::{ClusterTrust, KeyRefused};

/// Requests per second a key may make by default, with bursts of twice as many.
pub const DEFAULT_RATE: u32 = 100;
/// Most keys whose buckets are kept; past it idle full ones are dropped.
const MAX_BUCKETS: usize = 4096;

/// Why a request was not let through.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error(transparent)]
    Key(#[from] KeyRefused),
    #[error(
        "the API key '{key}' made more than {rate} requests per second (bursts of {burst}); retry in {} ms",
        retry_after.as_millis().max(1)
    )]
    Rate {
        key: String,
        rate: u32,
        burst: u32,
        retry_after: Duration,
    },
}

/// Keys and rates, shared by every server of a coordinator.
pub struct Gate {
    trust: Arc<ClusterTrust>,
    /// Requests per second per key; 0 lets any rate through.
    rate: u32,
    buckets: Mutex<HashMap<String, Bucket>>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Gate {
    pub fn new(trust: Arc<ClusterTrust>, rate: u32) -> Self {
        Gate {
            trust,
            rate,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    fn burst(&self) -> u32 {
        self.rate.saturating_mul(2)
    }

    /// Lets a request with `presented` (the bearer key) through, returning the key's name.
    pub fn admit(&self, presented: Option<&str>) -> Result<String, Refusal> {
        let key = self.trust.authorize(presented)?;
        self.take(&key, Instant::now())?;
        Ok(key)
    }

    /// Takes one token from `key`'s bucket at `now`.
    fn take(&self, key: &str, now: Instant) -> Result<(), Refusal> {
        if self.rate == 0 {
            return Ok(());
        }
        let (rate, burst) = (f64::from(self.rate), f64::from(self.burst()));
        let mut buckets = self.buckets.lock().expect("rate buckets poisoned");
        if buckets.len() >= MAX_BUCKETS && !buckets.contains_key(key) {
            buckets.retain(|_, b| b.tokens + rate * now.duration_since(b.at).as_secs_f64() < burst);
        }
        let bucket = buckets.entry(key.to_string()).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        let refilled =
            (bucket.tokens + rate * now.duration_since(bucket.at).as_secs_f64()).min(burst);
        bucket.at = now;
        if refilled >= 1.0 {
            bucket.tokens = refilled - 1.0;
            return Ok(());
        }
        bucket.tokens = refilled;
        Err(Refusal::Rate {
            key: key.to_string(),
            rate: self.rate,
            burst: self.burst(),
            retry_after: Duration::from_secs_f64((1.0 - refilled) / rate),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate(rate: u32) -> (tempfile::TempDir, Gate) {
        let dir = tempfile::tempdir().unwrap();
        let trust = Arc::new(ClusterTrust::open(dir.path()).unwrap());
        (dir, Gate::new(trust, rate))
    }

    #[test]
    fn a_key_gets_its_burst_then_its_rate_and_others_are_untouched() {
        let (_dir, gate) = gate(10);
        let start = Instant::now();
        for _ in 0..20 {
            gate.take("flood", start).unwrap();
        }
        let refused = gate.take("flood", start).unwrap_err();
        let message = refused.to_string();
        assert!(
            message.contains("'flood' made more than 10 requests per second (bursts of 20)"),
            "{message}"
        );
        assert!(message.contains("retry in 100 ms"), "{message}");
        gate.take("quiet", start).unwrap();
        // A tenth of a second later one more request fits, and no second one.
        let later = start + Duration::from_millis(100);
        gate.take("flood", later).unwrap();
        assert!(gate.take("flood", later).is_err());
    }

    #[test]
    fn a_rate_of_zero_lets_everything_through() {
        let (_dir, gate) = gate(0);
        let now = Instant::now();
        for _ in 0..10_000 {
            gate.take("any", now).unwrap();
        }
    }
}
