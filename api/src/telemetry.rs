//! Spans and metrics around every backend operation.
//!
//! The library logs and traces through [`tracing`] and counts through the
//! [`metrics`] facade; both do nothing until the application installs a
//! subscriber or a recorder ("inject or stay silent"). Every backend
//! operation runs inside one span named `im_infra.op` and updates:
//!
//! - `im_infra_ops_total{backend, capability, op, outcome}`: a counter;
//!   `outcome` is `ok` or the error kind (`unavailable`, `timeout`, ...);
//! - `im_infra_op_duration_seconds{backend, capability, op}`: a histogram.
//!
//! Backends build one [`OpMetrics`] per operation when they are constructed,
//! so the hot path touches pre-registered handles only. Install the recorder
//! before building backends (as the `metrics` crate recommends): the
//! handles are bound to the recorder in force then, and when that is the
//! `metrics` crate's no-op recorder an operation reads no clock at all, so
//! the telemetry costs nothing measurable until a recorder is installed.
//!
//! ```
//! use im_infra::telemetry::OpMetrics;
//! use im_infra::{Error, ErrorKind};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let get = OpMetrics::new("memory", "cache", "cache.get");
//! let res: Result<u32, Error> = get.run(async { Err(Error::new(ErrorKind::Timeout, "slow")) }).await;
//! let err = res.unwrap_err();
//! assert_eq!(err.operation(), Some("cache.get"));
//! assert_eq!(err.backend(), Some("memory"));
//! # }
//! ```

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use quanta::Instant;

use metrics::{Counter, Histogram};

use crate::error::Result;

/// Name of the operation counter.
pub const OPS_TOTAL: &str = "im_infra_ops_total";
/// Name of the operation duration histogram (seconds).
pub const OP_DURATION_SECONDS: &str = "im_infra_op_duration_seconds";
/// Name of the counter of limiter decisions taken by a failure policy while
/// the backend was unreachable (`policy` = `fail_open|fail_closed|local`).
pub const LIMITER_FALLBACK_TOTAL: &str = "im_infra_limiter_fallback_total";

/// Pre-registered metric handles and span fields of one operation.
#[derive(Clone)]
pub struct OpMetrics {
    backend: &'static str,
    capability: &'static str,
    op: &'static str,
    ok: Counter,
    duration: Histogram,
    /// A recorder was installed when the handles were registered: time the
    /// operations.
    timed: bool,
}

/// Whether a recorder other than the `metrics` crate's no-op one is in
/// force (the no-op recorder is the only zero-sized one).
fn recorder_installed() -> bool {
    metrics::with_recorder(|r| std::mem::size_of_val(r) != 0)
}

impl std::fmt::Debug for OpMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpMetrics")
            .field("backend", &self.backend)
            .field("capability", &self.capability)
            .field("op", &self.op)
            .finish()
    }
}

impl OpMetrics {
    /// Registers the handles of `op` (e.g. `"cache.get"`) of `capability`
    /// (`"cache"`) on `backend` (`"redis"`).
    pub fn new(backend: &'static str, capability: &'static str, op: &'static str) -> Self {
        OpMetrics {
            backend,
            capability,
            op,
            ok: metrics::counter!(OPS_TOTAL, "backend" => backend, "capability" => capability, "op" => op, "outcome" => "ok"),
            duration: metrics::histogram!(OP_DURATION_SECONDS, "backend" => backend, "capability" => capability, "op" => op),
            timed: recorder_installed(),
        }
    }

    /// The capability label.
    pub fn capability(&self) -> &'static str {
        self.capability
    }

    /// When the operation started, if it is timed.
    #[inline]
    pub fn start(&self) -> Option<Instant> {
        self.timed.then(Instant::now)
    }

    /// Records one finished run that started at `start` (see
    /// [`start`](Self::start)) inside `span`, and stamps the operation and
    /// backend on an error.
    #[inline]
    pub fn finish<T>(
        &self,
        res: Result<T>,
        start: Option<Instant>,
        span: &tracing::Span,
    ) -> Result<T> {
        self.record(&res, start.map_or(Duration::ZERO, |s| s.elapsed()));
        match res {
            Ok(v) => {
                span.record("outcome", "ok");
                Ok(v)
            }
            Err(e) => {
                span.record("outcome", e.kind().as_str());
                tracing::debug!(parent: span, error = %e, "operation failed");
                Err(e.with_operation(self.op).with_backend(self.backend))
            }
        }
    }

    /// Whether nothing observes this operation: no metrics recorder was
    /// installed when its handles were registered and no subscriber is
    /// interested in its (debug) span. A layer may then skip the span and
    /// the counters, and only stamp errors (see [`stamp`](Self::stamp)).
    #[inline]
    pub fn quiet(&self) -> bool {
        !self.timed && !tracing::level_enabled!(tracing::Level::DEBUG)
    }

    /// Stamps the operation and backend on an error, as
    /// [`finish`](Self::finish) does.
    #[cold]
    pub fn stamp(&self, e: crate::Error) -> crate::Error {
        e.with_operation(self.op).with_backend(self.backend)
    }

    /// The operation name.
    pub fn op(&self) -> &'static str {
        self.op
    }

    /// The backend name.
    pub fn backend(&self) -> &'static str {
        self.backend
    }

    /// A new span for one run of the operation.
    pub fn span(&self) -> tracing::Span {
        tracing::debug_span!(
            "im_infra.op",
            backend = self.backend,
            capability = self.capability,
            op = self.op,
            outcome = tracing::field::Empty
        )
    }

    /// Records one finished run (its duration only when timed).
    #[inline]
    pub fn record<T>(&self, res: &Result<T>, elapsed: Duration) {
        if self.timed {
            self.duration.record(elapsed.as_secs_f64());
        }
        match res {
            Ok(_) => self.ok.increment(1),
            Err(e) => metrics::counter!(
                OPS_TOTAL,
                "backend" => self.backend,
                "capability" => self.capability,
                "op" => self.op,
                "outcome" => e.kind().as_str()
            )
            .increment(1),
        }
    }

    /// Runs `fut` inside the operation's span, records its outcome and
    /// duration, and stamps the operation and backend on an error.
    ///
    /// The returned future wraps `fut` in place (no copy of it is kept
    /// beside it), so the boxed futures of `async_trait` methods stay small.
    pub fn run<T, F>(&self, fut: F) -> OpFuture<'_, F>
    where
        F: Future<Output = Result<T>>,
    {
        OpFuture {
            inner: fut,
            metrics: self,
            span: None,
            start: None,
        }
    }

    /// Like [`run`](Self::run) for a synchronous operation.
    #[inline]
    pub fn run_sync<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let span = self.span();
        let _entered = span.enter();
        let start = self.start();
        let res = f();
        self.finish(res, start, &span)
    }

    /// [`run`](Self::run) for a future that started at `start` (see
    /// [`start`](Self::start)) inside `span`: an operation that began
    /// synchronously and goes on asynchronously.
    pub fn run_started<T, F>(
        &self,
        fut: F,
        span: tracing::Span,
        start: Option<Instant>,
    ) -> OpFuture<'_, F>
    where
        F: Future<Output = Result<T>>,
    {
        OpFuture {
            inner: fut,
            metrics: self,
            span: Some(span),
            start: Some(start),
        }
    }
}

pin_project! {
    /// The future of [`OpMetrics::run`].
    #[must_use = "futures do nothing unless polled"]
    pub struct OpFuture<'a, F> {
        #[pin]
        inner: F,
        metrics: &'a OpMetrics,
        span: Option<tracing::Span>,
        // `None` until first polled; then when it started, if timed.
        start: Option<Option<Instant>>,
    }
}

impl<T, F> Future for OpFuture<'_, F>
where
    F: Future<Output = Result<T>>,
{
    type Output = Result<T>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let metrics = *this.metrics;
        let span = this.span.get_or_insert_with(|| metrics.span());
        let start = *this.start.get_or_insert_with(|| metrics.start());
        let res = {
            let _entered = span.enter();
            match this.inner.poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(res) => res,
            }
        };
        Poll::Ready(metrics.finish(res, start, span))
    }
}

/// Runs `fut` with a deadline; an elapsed deadline becomes an
/// [`ErrorKind::Timeout`](crate::ErrorKind::Timeout) error naming `what`.
pub async fn with_timeout<T, F>(timeout: Duration, what: &'static str, fut: F) -> Result<T>
where
    F: Future<Output = Result<T>>,
{
    match tokio::time::timeout(timeout, fut).await {
        Ok(res) => res,
        Err(_) => Err(crate::Error::new(
            crate::ErrorKind::Timeout,
            format!("{what} did not finish within {timeout:?}"),
        )
        .with_operation(what)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    #[tokio::test]
    async fn ok_passes_through() {
        let m = OpMetrics::new("test", "cache", "cache.get");
        assert_eq!(m.run(async { Ok(7) }).await.unwrap(), 7);
        assert_eq!(m.run_sync(|| Ok(8)).unwrap(), 8);
    }

    #[tokio::test]
    async fn timeout_becomes_timeout_kind() {
        let err = with_timeout(Duration::from_millis(5), "slow.op", async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            Ok(())
        })
        .await
        .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Timeout);
        assert_eq!(err.operation(), Some("slow.op"));
    }
}
