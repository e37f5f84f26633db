//! [`Check`]: the future of [`Limiter::check`](super::Limiter::check).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::future::BoxFuture;

use super::Decision;
use crate::error::Result;

/// The answer of [`Limiter::check`](super::Limiter::check): ready at once
/// for an in-process limiter (no allocation, no await point), or a boxed
/// future for a limiter that asks a server. Await it either way.
///
/// ```
/// use std::time::Duration;
/// use im_infra::ratelimit::{Check, Decision, DecisionSource};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> im_infra::Result<()> {
/// let d = Decision {
///     allowed: true,
///     limit: 10,
///     remaining: 9,
///     retry_after: Duration::ZERO,
///     reset_after: Duration::from_millis(100),
///     denied: None,
///     source: DecisionSource::Backend,
/// };
/// let now = Check::ready(Ok(d));
/// assert!(now.is_ready());
/// assert!(now.await?.allowed);
/// let later = Check::boxed(async move { Ok(d) });
/// assert_eq!(later.await?.remaining, 9);
/// # Ok(()) }
/// ```
#[must_use = "a Check does nothing unless awaited"]
pub struct Check<'a>(State<'a>);

enum State<'a> {
    Ready(Result<Decision>),
    Boxed(BoxFuture<'a, Result<Decision>>),
    Done,
}

impl<'a> Check<'a> {
    /// A decision taken already.
    #[inline]
    pub fn ready(result: Result<Decision>) -> Self {
        Check(State::Ready(result))
    }

    /// A decision still to be taken by `future`.
    pub fn boxed(future: impl Future<Output = Result<Decision>> + Send + 'a) -> Self {
        Check(State::Boxed(Box::pin(future)))
    }

    /// Applies `f` to the error of a decision taken already; anything else
    /// is left as it is (in place: nothing is moved on the way of a
    /// decision).
    #[inline]
    pub fn map_ready_err(&mut self, f: impl FnOnce(crate::Error) -> crate::Error) {
        if matches!(self.0, State::Ready(Err(_))) {
            if let State::Ready(Err(e)) = std::mem::replace(&mut self.0, State::Done) {
                self.0 = State::Ready(Err(f(e)));
            }
        }
    }

    /// Whether the decision was taken already (polling it will not wait).
    pub fn is_ready(&self) -> bool {
        matches!(self.0, State::Ready(_))
    }

    /// The decision if it was taken already, without polling.
    #[inline]
    pub fn into_ready(self) -> Option<Result<Decision>> {
        match self.0 {
            State::Ready(r) => Some(r),
            State::Boxed(_) | State::Done => None,
        }
    }

    /// The decision if it was taken already, or the check back.
    #[inline]
    pub fn try_ready(self) -> std::result::Result<Result<Decision>, Self> {
        match self.0 {
            State::Ready(r) => Ok(r),
            other => Err(Check(other)),
        }
    }

    /// Applies `f` to the decision when it is taken, keeping a ready check
    /// ready (no allocation).
    #[inline]
    pub fn map(self, f: impl FnOnce(Result<Decision>) -> Result<Decision> + Send + 'a) -> Self {
        match self.0 {
            State::Ready(r) => Check::ready(f(r)),
            State::Done => Check(State::Done),
            State::Boxed(fut) => Check::boxed(async move { f(fut.await) }),
        }
    }
}

impl Future for Check<'_> {
    type Output = Result<Decision>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        match &mut this.0 {
            // A decision is `Copy`: it is read where it is, not moved out
            // (polled again, the check answers the same).
            State::Ready(Ok(decision)) => Poll::Ready(Ok(*decision)),
            State::Boxed(fut) => fut.as_mut().poll(cx),
            State::Ready(Err(_)) => match std::mem::replace(&mut this.0, State::Done) {
                State::Ready(r) => Poll::Ready(r),
                _ => unreachable!("matched as an error just above"),
            },
            State::Done => panic!("a Check is not polled after it completed"),
        }
    }
}

impl std::fmt::Debug for Check<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            State::Ready(r) => f.debug_tuple("Check::Ready").field(r).finish(),
            State::Boxed(_) => f.write_str("Check::Boxed"),
            State::Done => f.write_str("Check::Done"),
        }
    }
}
