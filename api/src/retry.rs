//! Retrying retryable failures with jittered exponential backoff.
//!
//! One [`RetrySettings`] (the original system's `RetrySettings`) serves every
//! backend: reconnect loops, re-registration after a lost lease, handler
//! retries of a consumer. Only errors whose [`Error::is_retryable`] is true
//! are retried; any other error is returned at once.
//!
//! ```
//! use std::sync::atomic::{AtomicU32, Ordering};
//! use std::time::Duration;
//! use im_infra::{Error, ErrorKind, RetrySettings};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let retry = RetrySettings {
//!     max_retries: 5,
//!     initial_interval: Duration::from_millis(1),
//!     max_interval: Duration::from_millis(4),
//!     ..RetrySettings::default()
//! };
//! let calls = AtomicU32::new(0);
//! let value = retry
//!     .retry(|| async {
//!         if calls.fetch_add(1, Ordering::SeqCst) < 2 {
//!             Err(Error::new(ErrorKind::Unavailable, "not yet"))
//!         } else {
//!             Ok(42)
//!         }
//!     })
//!     .await
//!     .unwrap();
//! assert_eq!((value, calls.load(Ordering::SeqCst)), (42, 3));
//! # }
//! ```

use std::future::Future;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder, Retryable};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Backoff policy for retryable errors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetrySettings {
    /// How many times a failed call is retried (0 = never).
    pub max_retries: u32,
    /// Delay before the first retry.
    #[serde(with = "humantime_serde")]
    pub initial_interval: Duration,
    /// Upper bound of the exponential delay (before jitter).
    #[serde(with = "humantime_serde")]
    pub max_interval: Duration,
    /// Growth factor of the delay between attempts (≥ 1.0).
    pub multiplier: f64,
    /// Adds a random part (up to the current delay) to every delay, so that
    /// many clients failing together do not retry together.
    pub jitter: bool,
}

impl Default for RetrySettings {
    fn default() -> Self {
        RetrySettings {
            max_retries: 3,
            initial_interval: Duration::from_millis(100),
            max_interval: Duration::from_secs(5),
            multiplier: 2.0,
            jitter: true,
        }
    }
}

impl RetrySettings {
    /// Checks the values: a positive initial interval not above the maximum,
    /// and a finite multiplier of at least 1.
    pub fn validate(&self) -> Result<()> {
        if self.initial_interval.is_zero() {
            return Err(Error::new(
                crate::ErrorKind::InvalidConfig,
                "retry.initial_interval must be positive",
            ));
        }
        if self.initial_interval > self.max_interval {
            return Err(Error::new(
                crate::ErrorKind::InvalidConfig,
                "retry.initial_interval must not exceed retry.max_interval",
            ));
        }
        if !self.multiplier.is_finite() || self.multiplier < 1.0 {
            return Err(Error::new(
                crate::ErrorKind::InvalidConfig,
                "retry.multiplier must be a finite number >= 1.0",
            ));
        }
        Ok(())
    }

    fn builder(&self) -> ExponentialBuilder {
        let multiplier = if self.multiplier.is_finite() && self.multiplier >= 1.0 {
            self.multiplier as f32
        } else {
            2.0
        };
        let initial = self.initial_interval.max(Duration::from_millis(1));
        let b = ExponentialBuilder::default()
            .with_min_delay(initial)
            .with_max_delay(self.max_interval.max(initial))
            .with_factor(multiplier);
        if self.jitter {
            b.with_jitter()
        } else {
            b
        }
    }

    /// The delays before each of the `max_retries` retries.
    pub fn delays(&self) -> impl Iterator<Item = Duration> + Send {
        self.builder()
            .with_max_times(self.max_retries as usize)
            .build()
    }

    /// An endless sequence of delays, for loops that must never give up
    /// (re-registration after a lost lease, reconnecting a watch).
    pub fn delays_forever(&self) -> impl Iterator<Item = Duration> + Send {
        self.builder().without_max_times().build()
    }

    /// Runs `op`, retrying it after a backoff delay while it fails with a
    /// retryable error and retries remain. Returns the last error otherwise.
    pub async fn retry<T, F, Fut>(&self, op: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        op.retry(self.builder().with_max_times(self.max_retries as usize))
            .when(Error::is_retryable)
            .notify(|err: &Error, delay: Duration| {
                tracing::debug!(error = %err, ?delay, "retrying after a retryable error");
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn quick() -> RetrySettings {
        RetrySettings {
            max_retries: 3,
            initial_interval: Duration::from_millis(1),
            max_interval: Duration::from_millis(2),
            multiplier: 2.0,
            jitter: false,
        }
    }

    #[tokio::test]
    async fn non_retryable_error_is_returned_at_once() {
        let calls = AtomicU32::new(0);
        let err = quick()
            .retry(|| async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err::<(), _>(Error::invalid_argument("bad"))
            })
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn retryable_error_is_retried_max_retries_times() {
        let calls = AtomicU32::new(0);
        let err = quick()
            .retry(|| async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err::<(), _>(Error::new(ErrorKind::Timeout, "slow"))
            })
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Timeout);
        assert_eq!(calls.load(Ordering::SeqCst), 4);
    }

    #[test]
    fn delays_grow_and_are_capped() {
        let cfg = RetrySettings {
            max_retries: 5,
            initial_interval: Duration::from_millis(10),
            max_interval: Duration::from_millis(40),
            multiplier: 2.0,
            jitter: false,
        };
        // backon computes in f32: allow a microsecond-level rounding error.
        let d: Vec<f64> = cfg.delays().map(|d| d.as_secs_f64() * 1000.0).collect();
        let want = [10.0, 20.0, 40.0, 40.0, 40.0];
        assert_eq!(d.len(), want.len());
        for (got, want) in d.iter().zip(want) {
            assert!((got - want).abs() < 0.1, "{d:?}");
        }
        assert!(cfg.delays_forever().take(100).count() == 100);
    }

    #[test]
    fn validate_rejects_bad_values() {
        let mut c = quick();
        c.multiplier = 0.5;
        assert_eq!(c.validate().unwrap_err().kind(), ErrorKind::InvalidConfig);
        let mut c = quick();
        c.initial_interval = Duration::ZERO;
        assert!(c.validate().is_err());
        assert!(quick().validate().is_ok());
    }

    #[test]
    fn deserialises_human_durations() {
        let c: RetrySettings = serde_json::from_str(
            r#"{"max_retries":5,"initial_interval":"200ms","max_interval":"5s","multiplier":2.0}"#,
        )
        .unwrap();
        assert_eq!(c.initial_interval, Duration::from_millis(200));
        assert!(c.jitter);
    }
}
