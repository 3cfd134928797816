//! Rate-limited logging for what outsiders can trigger (refused clients,
//! misbehaving guests): at most a burst of lines per interval, then one
//! line saying how many were suppressed.

use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// Admits at most `burst` events per `interval`.
#[derive(Debug)]
pub struct RateLimit {
    burst: u32,
    interval: Duration,
    state: Mutex<(Instant, u32, u64)>,
}

impl RateLimit {
    /// A limiter admitting `burst` events per `interval`.
    pub fn new(burst: u32, interval: Duration) -> Self {
        RateLimit {
            burst,
            interval,
            state: Mutex::new((Instant::now(), 0, 0)),
        }
    }

    /// Whether to log this event; `Some(n)` with the number of events
    /// suppressed since the last admitted one.
    pub fn admit(&self) -> Option<u64> {
        let mut g = self.state.lock();
        let now = Instant::now();
        if now.duration_since(g.0) >= self.interval {
            *g = (now, 0, g.2);
        }
        if g.1 < self.burst {
            g.1 += 1;
            let suppressed = std::mem::take(&mut g.2);
            Some(suppressed)
        } else {
            g.2 += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bursts_then_suppresses_then_reports() {
        let r = RateLimit::new(3, Duration::from_millis(50));
        assert_eq!(r.admit(), Some(0));
        assert_eq!(r.admit(), Some(0));
        assert_eq!(r.admit(), Some(0));
        for _ in 0..10 {
            assert_eq!(r.admit(), None);
        }
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(r.admit(), Some(10));
    }
}
