//! [`RateLimitLayer`]: a [`Limiter`] in front of any tower service of
//! `http` requests — a tonic gRPC server or an HTTP router.
//!
//! Each request's key (the user, the client, the tenant) comes from a
//! [`KeyExtractor`]; the request counts one unit against the rule of the
//! layer's resource. A denied request never reaches the service:
//!
//! - gRPC (a request whose content type is `application/grpc…`): status
//!   `RESOURCE_EXHAUSTED` (8), with `retry-after` (whole seconds, rounded
//!   up) and `grpc-retry-pushback-ms` in its metadata;
//! - HTTP: `429 Too Many Requests` with `Retry-After` (whole seconds,
//!   rounded up, at least 1).
//!
//! A request without a key passes unlimited; one whose key the limiter
//! refuses (longer than [`MAX_KEY_BYTES`](crate::validate::MAX_KEY_BYTES),
//! or with a NUL) is answered `INVALID_ARGUMENT` / `400`. When the limiter's
//! backend is unreachable and its failure policy is fail-closed, the answer
//! is `UNAVAILABLE` / `503` with the time to wait. When the limiter fails
//! (an error rather than a decision: no rule for the resource, an
//! unreachable backend without a failure policy), the request passes by
//! default, with a warning ([`OnLimiterError::Allow`]), or is refused with
//! `UNAVAILABLE` / `503` ([`OnLimiterError::Reject`]).
//!
//! ```
//! use std::sync::Arc;
//! use im_infra::ratelimit::tower::{header_key, RateLimitLayer};
//! use im_infra::ratelimit::Limiter;
//!
//! fn layer(limiter: Arc<dyn Limiter>) -> im_infra::Result<RateLimitLayer<im_infra::ratelimit::tower::HeaderKey>> {
//!     // One rule, "send", per value of the x-user-id header.
//!     RateLimitLayer::new(limiter, "send", header_key("x-user-id"))
//! }
//!
//! // Any function of the request works as a key, e.g. for an HTTP router:
//! fn by_path(limiter: Arc<dyn Limiter>) -> im_infra::Result<RateLimitLayer<fn(&http::Request<String>) -> Option<String>>> {
//!     fn key(r: &http::Request<String>) -> Option<String> {
//!         Some(r.uri().path().to_owned())
//!     }
//!     RateLimitLayer::new(limiter, "per_path", key as fn(&http::Request<String>) -> Option<String>)
//! }
//! ```

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::{HeaderName, HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use http::{Request, Response, StatusCode};

use super::{Decision, DenyReason, Limiter};
use crate::error::{ErrorKind, Result as InfraResult};

/// What the layer does when the limiter itself fails.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum OnLimiterError {
    /// Let the request through (logged): the limiter protects, it does not
    /// take the service down with it.
    #[default]
    Allow,
    /// Refuse it: gRPC `UNAVAILABLE`, HTTP `503`.
    Reject,
}

/// Where a request's key comes from.
pub trait KeyExtractor<B>: Clone + Send + Sync + 'static {
    /// The key to limit `request` under; `None` leaves it unlimited.
    fn key(&self, request: &Request<B>) -> Option<String>;
}

impl<B, F> KeyExtractor<B> for F
where
    F: Fn(&Request<B>) -> Option<String> + Clone + Send + Sync + 'static,
{
    fn key(&self, request: &Request<B>) -> Option<String> {
        self(request)
    }
}

/// The key in a request header (for gRPC: its metadata).
#[derive(Debug, Clone)]
pub struct HeaderKey(HeaderName);

/// Keys requests by the value of the header `name` (`x-user-id`, in any
/// case); a request without it, or with a value that is not visible ASCII,
/// is not limited.
///
/// # Panics
///
/// When `name` is not a valid header name (a space, a colon): a
/// programming error caught when the layer is built.
pub fn header_key(name: &str) -> HeaderKey {
    match HeaderName::from_bytes(name.as_bytes()) {
        Ok(name) => HeaderKey(name),
        Err(_) => panic!("header_key: {name:?} is not a header name"),
    }
}

impl<B> KeyExtractor<B> for HeaderKey {
    fn key(&self, request: &Request<B>) -> Option<String> {
        let value = request.headers().get(&self.0)?.to_str().ok()?.trim();
        (!value.is_empty()).then(|| value.to_owned())
    }
}

/// Applies a [`Limiter`] to a service: see the [module](self).
#[derive(Clone)]
pub struct RateLimitLayer<K> {
    limiter: Arc<dyn Limiter>,
    resource: Arc<str>,
    key: K,
    on_error: OnLimiterError,
}

impl<K: std::fmt::Debug> std::fmt::Debug for RateLimitLayer<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimitLayer")
            .field("resource", &self.resource)
            .field("key", &self.key)
            .field("on_error", &self.on_error)
            .finish()
    }
}

impl<K> RateLimitLayer<K> {
    /// Limits each request by `key` under the rule of `resource`;
    /// `InvalidArgument` when `resource` is not a valid name.
    pub fn new(
        limiter: Arc<dyn Limiter>,
        resource: impl Into<Arc<str>>,
        key: K,
    ) -> InfraResult<Self> {
        let resource = resource.into();
        crate::validate::key(&resource)?;
        Ok(RateLimitLayer {
            limiter,
            resource,
            key,
            on_error: OnLimiterError::default(),
        })
    }

    /// What to do when the limiter fails (default: let the request pass).
    #[must_use]
    pub fn on_error(mut self, on_error: OnLimiterError) -> Self {
        self.on_error = on_error;
        self
    }
}

impl<S, K: Clone> ::tower::Layer<S> for RateLimitLayer<K> {
    type Service = RateLimit<S, K>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimit {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service [`RateLimitLayer`] wraps around another.
#[derive(Clone)]
pub struct RateLimit<S, K> {
    inner: S,
    layer: RateLimitLayer<K>,
}

impl<S, K: std::fmt::Debug> std::fmt::Debug for RateLimit<S, K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimit")
            .field("layer", &self.layer)
            .finish()
    }
}

type BoxedResponse<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S, K, ReqBody, ResBody> ::tower::Service<Request<ReqBody>> for RateLimit<S, K>
where
    S: tower::Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    K: KeyExtractor<ReqBody>,
    ReqBody: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = BoxedResponse<Self::Response, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        // The clone is the one made ready by poll_ready's caller.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let key = self.layer.key.key(&request);
        let (limiter, resource, on_error) = (
            self.layer.limiter.clone(),
            self.layer.resource.clone(),
            self.layer.on_error,
        );
        Box::pin(async move {
            if let Some(key) = key {
                let grpc = grpc_content_type(&request);
                match limiter.check(&resource, &key, 1).await {
                    Ok(decision) if !decision.allowed => {
                        return Ok(rejected(grpc.as_ref(), &resource, &decision));
                    }
                    Ok(_) => {}
                    Err(error) if error.kind() == ErrorKind::InvalidArgument => {
                        return Ok(bad_key(grpc.as_ref()));
                    }
                    Err(error) => match on_error {
                        OnLimiterError::Allow => {
                            tracing::warn!(%resource, %error, "rate limit unavailable; request let through");
                        }
                        OnLimiterError::Reject => {
                            tracing::warn!(%resource, %error, "rate limit unavailable; request refused");
                            return Ok(unavailable(grpc.as_ref(), None));
                        }
                    },
                }
            }
            inner.call(request).await
        })
    }
}

/// The content type of a gRPC request (`application/grpc`, `+proto`,
/// `-web`, …), answered in kind; `None` for anything else.
fn grpc_content_type<B>(request: &Request<B>) -> Option<HeaderValue> {
    let value = request.headers().get(CONTENT_TYPE)?;
    let text = value.to_str().ok()?;
    let rest = text.strip_prefix("application/grpc")?;
    (rest.is_empty() || rest.starts_with(['+', ';', '-'])).then(|| value.clone())
}

/// Whole seconds, rounded up, at least 1.
fn retry_after_secs(d: Duration) -> u64 {
    d.as_secs()
        .saturating_add(u64::from(d.subsec_nanos() > 0 || d.is_zero()))
}

/// Digits and percent-encoded text always make a header value.
fn header(value: impl ToString) -> HeaderValue {
    HeaderValue::from_str(&value.to_string()).unwrap_or(HeaderValue::from_static(""))
}

/// `grpc-message` is percent-encoded: everything but unreserved ASCII.
fn percent_encoded(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A gRPC "trailers-only" answer: the status in the headers, no message.
fn grpc_status<B: Default>(content_type: &HeaderValue, code: u8, message: &str) -> Response<B> {
    let mut response = Response::new(B::default());
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, content_type.clone());
    headers.insert("grpc-status", header(code));
    headers.insert("grpc-message", header(percent_encoded(message)));
    response
}

fn rejected<B: Default>(
    grpc: Option<&HeaderValue>,
    resource: &str,
    decision: &Decision,
) -> Response<B> {
    if decision.denied == Some(DenyReason::BackendUnavailable) {
        return unavailable(grpc, Some(decision.retry_after));
    }
    // `Duration::MAX`: the request can never pass (it asks more than the
    // burst); gRPC is told not to retry, HTTP gets no Retry-After.
    let retry = (decision.retry_after != Duration::MAX).then_some(decision.retry_after);
    match grpc {
        Some(content_type) => {
            let message = format!("rate limit exceeded on {resource}");
            let mut response = grpc_status(content_type, 8, &message);
            let headers = response.headers_mut();
            match retry {
                Some(retry) => {
                    headers.insert(RETRY_AFTER, header(retry_after_secs(retry)));
                    let millis = u64::try_from(retry.as_millis()).unwrap_or(u64::MAX);
                    headers.insert("grpc-retry-pushback-ms", header(millis));
                }
                None => {
                    headers.insert("grpc-retry-pushback-ms", HeaderValue::from_static("-1"));
                }
            }
            response
        }
        None => http_status(StatusCode::TOO_MANY_REQUESTS, retry),
    }
}

fn http_status<B: Default>(status: StatusCode, retry: Option<Duration>) -> Response<B> {
    let mut response = Response::new(B::default());
    *response.status_mut() = status;
    if let Some(retry) = retry {
        response
            .headers_mut()
            .insert(RETRY_AFTER, header(retry_after_secs(retry)));
    }
    response
}

fn unavailable<B: Default>(grpc: Option<&HeaderValue>, retry: Option<Duration>) -> Response<B> {
    match grpc {
        Some(content_type) => {
            let mut response = grpc_status(content_type, 14, "rate limit unavailable");
            if let Some(retry) = retry {
                response
                    .headers_mut()
                    .insert(RETRY_AFTER, header(retry_after_secs(retry)));
            }
            response
        }
        None => http_status(StatusCode::SERVICE_UNAVAILABLE, retry),
    }
}

fn bad_key<B: Default>(grpc: Option<&HeaderValue>) -> Response<B> {
    match grpc {
        Some(content_type) => grpc_status(content_type, 3, "the rate-limit key is not valid"),
        None => http_status(StatusCode::BAD_REQUEST, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_is_whole_seconds_rounded_up_and_at_least_one() {
        assert_eq!(retry_after_secs(Duration::new(u64::MAX, 5)), u64::MAX);
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_secs(2)), 2);
        assert_eq!(retry_after_secs(Duration::from_millis(2001)), 3);
    }

    #[test]
    fn header_keys_ignore_missing_and_blank_values() {
        let key = header_key("X-User-Id");
        let with = Request::builder()
            .header("x-user-id", " alice ")
            .body(())
            .unwrap();
        let blank = Request::builder()
            .header("x-user-id", " ")
            .body(())
            .unwrap();
        let without = Request::builder().body(()).unwrap();
        assert_eq!(key.key(&with).as_deref(), Some("alice"));
        assert_eq!(key.key(&blank), None);
        assert_eq!(key.key(&without), None);
    }

    #[test]
    fn grpc_messages_are_percent_encoded() {
        assert_eq!(
            percent_encoded("rate limit on é/x"),
            "rate%20limit%20on%20%C3%A9%2Fx"
        );
    }

    #[test]
    fn grpc_is_told_by_its_content_type_and_answered_in_kind() {
        let of = |t: &str| {
            let r = Request::builder().header(CONTENT_TYPE, t).body(()).unwrap();
            grpc_content_type(&r).map(|v| v.to_str().unwrap().to_owned())
        };
        for t in [
            "application/grpc",
            "application/grpc+proto",
            "application/grpc-web+proto",
        ] {
            assert_eq!(of(t).as_deref(), Some(t));
        }
        assert_eq!(of("application/json"), None);
        assert_eq!(of("application/grpcx"), None);
    }

    #[test]
    fn denials_map_to_the_status_of_their_reason() {
        let decision = |denied, retry_after| Decision {
            allowed: false,
            limit: 1,
            remaining: 0,
            retry_after,
            reset_after: retry_after,
            denied: Some(denied),
            source: super::super::DecisionSource::Backend,
        };
        let grpc = HeaderValue::from_static("application/grpc");
        let over: Response<()> = rejected(
            Some(&grpc),
            "api",
            &decision(DenyReason::RateExceeded, Duration::from_millis(1500)),
        );
        assert_eq!(over.headers()["grpc-status"], "8");
        assert_eq!(over.headers()["retry-after"], "2");
        assert_eq!(over.headers()["grpc-retry-pushback-ms"], "1500");
        let never: Response<()> = rejected(
            Some(&grpc),
            "api",
            &decision(DenyReason::ExceedsBurst, Duration::MAX),
        );
        assert_eq!(never.headers()["grpc-retry-pushback-ms"], "-1");
        let down: Response<()> = rejected(
            None,
            "api",
            &decision(DenyReason::BackendUnavailable, Duration::from_secs(1)),
        );
        assert_eq!(down.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(down.headers()["retry-after"], "1");
        let http: Response<()> = rejected(
            None,
            "api",
            &decision(DenyReason::RateExceeded, Duration::from_secs(3)),
        );
        assert_eq!(http.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(http.headers()["retry-after"], "3");
    }
}
