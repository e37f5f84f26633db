//! The one error type of every capability.
//!
//! Every operation of every backend returns [`Error`]. Callers branch on its
//! [`ErrorKind`] (part of the contract: the conformance suite asserts on
//! kinds), ask [`Error::is_retryable`] whether the same call may succeed
//! later, and read the [`Error::operation`] and [`Error::backend`] it came
//! from for logs.
//!
//! ```
//! use im_infra::{Error, ErrorKind};
//!
//! let err = Error::new(ErrorKind::Unavailable, "redis is down")
//!     .with_operation("cache.get")
//!     .with_backend("redis");
//! assert!(err.is_retryable());
//! assert_eq!(err.code(), 1002);
//! assert_eq!(err.to_string(), "Unavailable (1002): redis is down [op=cache.get, backend=redis]");
//! ```

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

/// Result alias used by every trait of the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, independent of the backend.
///
/// New kinds may be added: match with a wildcard arm.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The backend could not be reached or the connection failed (code 1001).
    Connection,
    /// The backend is reachable in principle but cannot serve now: connection
    /// lost, server down, leader election, overload (code 1002).
    Unavailable,
    /// The operation did not finish within its deadline (code 1003).
    Timeout,
    /// The client or backend instance was closed (code 1004).
    Closed,
    /// The thing to create already exists, such as a registration
    /// (code 2001).
    AlreadyExists,
    /// The instance is not registered: a deregistration through a registry
    /// that does not hold it, or an update of an instance registered
    /// nowhere (code 2002).
    NotRegistered,
    /// The thing asked for does not exist (code 3001).
    NotFound,
    /// A service has no live instance matching the request (code 3002).
    NoInstances,
    /// A waiting acquisition gave up: another holder kept the lock for the
    /// whole wait bound (code 4001).
    LockNotAcquired,
    /// The operation needs a lock this caller does not hold, or no longer
    /// holds (code 4002).
    LockNotHeld,
    /// The lock is held by another holder right now and the caller asked
    /// not to wait (code 4003).
    LockAlreadyHeld,
    /// A compare-and-set found another version than expected (code 4004).
    Conflict,
    /// Another caller is running the same once-only work right now
    /// (code 4005).
    InProgress,
    /// The server refused to create a lease (code 5001). A lease that could
    /// not be asked for (connection, timeout) keeps that kind.
    LeaseNotCreated,
    /// A lease named by its id does not exist (never granted, expired or
    /// revoked) (code 5002).
    LeaseNotFound,
    /// A lease this process held expired or was revoked (code 5003).
    LeaseLost,
    /// A configuration value is invalid (code 6001).
    InvalidConfig,
    /// The settings name no server to connect to (code 6002).
    MissingEndpoints,
    /// An argument is invalid: empty or oversized key or value, zero TTL, ...
    /// (code 6003).
    InvalidArgument,
    /// Bytes could not be encoded or decoded (code 6004).
    Serialization,
    /// The operation is in a valid form but not allowed in the current state
    /// (code 6005).
    InvalidState,
    /// The backend does not offer this operation (code 6006).
    Unsupported,
    /// A bounded queue or quota is full; retry later (code 7001).
    ResourceExhausted,
    /// A bug or an unexpected answer from the backend (code 9001).
    Internal,
}

impl ErrorKind {
    /// Every kind, in code order (for documentation and tests).
    pub const ALL: [ErrorKind; 24] = [
        ErrorKind::Connection,
        ErrorKind::Unavailable,
        ErrorKind::Timeout,
        ErrorKind::Closed,
        ErrorKind::AlreadyExists,
        ErrorKind::NotRegistered,
        ErrorKind::NotFound,
        ErrorKind::NoInstances,
        ErrorKind::LockNotAcquired,
        ErrorKind::LockNotHeld,
        ErrorKind::LockAlreadyHeld,
        ErrorKind::Conflict,
        ErrorKind::InProgress,
        ErrorKind::LeaseNotCreated,
        ErrorKind::LeaseNotFound,
        ErrorKind::LeaseLost,
        ErrorKind::InvalidConfig,
        ErrorKind::MissingEndpoints,
        ErrorKind::InvalidArgument,
        ErrorKind::Serialization,
        ErrorKind::InvalidState,
        ErrorKind::Unsupported,
        ErrorKind::ResourceExhausted,
        ErrorKind::Internal,
    ];

    /// The stable numeric code of this kind.
    ///
    /// Codes follow the families of the original system: 1xxx connection,
    /// 2xxx registration, 3xxx discovery, 4xxx locking and concurrency,
    /// 5xxx leases, 6xxx configuration and input, 7xxx capacity, 9xxx internal.
    /// Every code the original system defined (1001-1004, 2001, 2002, 3001,
    /// 3002, 4001-4003, 5001-5003, 6001, 6002) keeps its meaning there; the
    /// others are additions in free places of their family.
    ///
    /// ```
    /// use im_infra::ErrorKind;
    /// assert_eq!(ErrorKind::NotRegistered.code(), 2002);
    /// assert_eq!(ErrorKind::LockAlreadyHeld.code(), 4003);
    /// assert_eq!(ErrorKind::from_code(5002), Some(ErrorKind::LeaseNotFound));
    /// ```
    pub const fn code(self) -> u32 {
        match self {
            ErrorKind::Connection => 1001,
            ErrorKind::Unavailable => 1002,
            ErrorKind::Timeout => 1003,
            ErrorKind::Closed => 1004,
            ErrorKind::AlreadyExists => 2001,
            ErrorKind::NotRegistered => 2002,
            ErrorKind::NotFound => 3001,
            ErrorKind::NoInstances => 3002,
            ErrorKind::LockNotAcquired => 4001,
            ErrorKind::LockNotHeld => 4002,
            ErrorKind::LockAlreadyHeld => 4003,
            ErrorKind::Conflict => 4004,
            ErrorKind::InProgress => 4005,
            ErrorKind::LeaseNotCreated => 5001,
            ErrorKind::LeaseNotFound => 5002,
            ErrorKind::LeaseLost => 5003,
            ErrorKind::InvalidConfig => 6001,
            ErrorKind::MissingEndpoints => 6002,
            ErrorKind::InvalidArgument => 6003,
            ErrorKind::Serialization => 6004,
            ErrorKind::InvalidState => 6005,
            ErrorKind::Unsupported => 6006,
            ErrorKind::ResourceExhausted => 7001,
            ErrorKind::Internal => 9001,
        }
    }

    /// The kind of a code (`None` for a code no kind has).
    pub fn from_code(code: u32) -> Option<ErrorKind> {
        ErrorKind::ALL.into_iter().find(|k| k.code() == code)
    }

    /// Whether an operation that failed with this kind may succeed if retried
    /// unchanged later: transport failures, timeouts, contention and full
    /// queues. A `Conflict` is not retryable as such: re-read, then retry.
    ///
    /// Retryable does not mean "not applied": a write that failed with
    /// `Timeout`, or with `Unavailable` or `Connection` after its request
    /// left, may have reached the server.
    pub const fn is_retryable(self) -> bool {
        matches!(
            self,
            ErrorKind::Connection
                | ErrorKind::Unavailable
                | ErrorKind::Timeout
                | ErrorKind::LockNotAcquired
                | ErrorKind::LockAlreadyHeld
                | ErrorKind::InProgress
                | ErrorKind::NoInstances
                | ErrorKind::ResourceExhausted
        )
    }

    /// A short stable name, as used in metric labels (`"unavailable"`).
    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Connection => "connection",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Closed => "closed",
            ErrorKind::AlreadyExists => "already_exists",
            ErrorKind::NotRegistered => "not_registered",
            ErrorKind::NotFound => "not_found",
            ErrorKind::NoInstances => "no_instances",
            ErrorKind::LockNotAcquired => "lock_not_acquired",
            ErrorKind::LockNotHeld => "lock_not_held",
            ErrorKind::LockAlreadyHeld => "lock_already_held",
            ErrorKind::Conflict => "conflict",
            ErrorKind::InProgress => "in_progress",
            ErrorKind::LeaseNotCreated => "lease_not_created",
            ErrorKind::LeaseNotFound => "lease_not_found",
            ErrorKind::LeaseLost => "lease_lost",
            ErrorKind::InvalidConfig => "invalid_config",
            ErrorKind::MissingEndpoints => "missing_endpoints",
            ErrorKind::InvalidArgument => "invalid_argument",
            ErrorKind::Serialization => "serialization",
            ErrorKind::InvalidState => "invalid_state",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::ResourceExhausted => "resource_exhausted",
            ErrorKind::Internal => "internal",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

type Source = Arc<dyn std::error::Error + Send + Sync + 'static>;

/// The error of every im-infra operation.
///
/// One pointer wide (errors are the cold path: every `Result` of the
/// library stays small), and cheap to clone (the source is shared), so one
/// failure can be handed to every waiter of a single-flight load.
#[derive(Clone)]
pub struct Error {
    inner: Box<Inner>,
}

#[derive(Clone)]
struct Inner {
    kind: ErrorKind,
    message: Cow<'static, str>,
    operation: Option<&'static str>,
    backend: Option<&'static str>,
    source: Option<Source>,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.render())
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.inner
            .source
            .as_deref()
            .map(|s| s as &(dyn std::error::Error + 'static))
    }
}

impl Error {
    /// A new error of `kind` with a human-readable message.
    #[cold]
    pub fn new(kind: ErrorKind, message: impl Into<Cow<'static, str>>) -> Self {
        Error {
            inner: Box::new(Inner {
                kind,
                message: message.into(),
                operation: None,
                backend: None,
                source: None,
            }),
        }
    }

    /// Shorthand for an [`ErrorKind::InvalidArgument`] error.
    pub fn invalid_argument(message: impl Into<Cow<'static, str>>) -> Self {
        Error::new(ErrorKind::InvalidArgument, message)
    }

    /// Shorthand for an [`ErrorKind::Unsupported`] error naming the operation.
    pub fn unsupported(operation: &'static str) -> Self {
        Error::new(
            ErrorKind::Unsupported,
            format!("{operation} is not supported by this backend"),
        )
        .with_operation(operation)
    }

    /// Shorthand for an [`ErrorKind::Serialization`] error about `key`.
    pub fn serialization(
        key: &str,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Error::new(
            ErrorKind::Serialization,
            format!("value of key {key:?} could not be (de)serialised"),
        )
        .with_source(source)
    }

    /// Attaches the operation (`"lock.acquire"`) if none is set yet.
    #[must_use]
    pub fn with_operation(mut self, operation: &'static str) -> Self {
        if self.inner.operation.is_none() {
            self.inner.operation = Some(operation);
        }
        self
    }

    /// Attaches the backend name (`"redis"`) if none is set yet.
    #[must_use]
    pub fn with_backend(mut self, backend: &'static str) -> Self {
        if self.inner.backend.is_none() {
            self.inner.backend = Some(backend);
        }
        self
    }

    /// Attaches the underlying error.
    #[must_use]
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.inner.source = Some(Arc::new(source));
        self
    }

    /// What went wrong.
    pub fn kind(&self) -> ErrorKind {
        self.inner.kind
    }

    /// The stable numeric code of the kind.
    pub fn code(&self) -> u32 {
        self.inner.kind.code()
    }

    /// The message, without kind or context.
    pub fn message(&self) -> &str {
        &self.inner.message
    }

    /// The operation that failed, when known.
    pub fn operation(&self) -> Option<&'static str> {
        self.inner.operation
    }

    /// The backend that failed, when known.
    pub fn backend(&self) -> Option<&'static str> {
        self.inner.backend
    }

    /// Whether retrying the same call later may succeed (see
    /// [`ErrorKind::is_retryable`]).
    pub fn is_retryable(&self) -> bool {
        self.inner.kind.is_retryable()
    }

    /// `true` for [`ErrorKind::NotFound`].
    pub fn is_not_found(&self) -> bool {
        self.inner.kind == ErrorKind::NotFound
    }

    /// `true` for [`ErrorKind::Conflict`].
    pub fn is_conflict(&self) -> bool {
        self.inner.kind == ErrorKind::Conflict
    }

    /// `true` for [`ErrorKind::Timeout`].
    pub fn is_timeout(&self) -> bool {
        self.inner.kind == ErrorKind::Timeout
    }

    /// `true` for [`ErrorKind::Connection`] and [`ErrorKind::Unavailable`].
    pub fn is_connection(&self) -> bool {
        matches!(
            self.inner.kind,
            ErrorKind::Connection | ErrorKind::Unavailable
        )
    }

    /// `true` for [`ErrorKind::Unsupported`].
    pub fn is_unsupported(&self) -> bool {
        self.inner.kind == ErrorKind::Unsupported
    }

    fn render(&self) -> String {
        let mut out = format!(
            "{} ({}): {}",
            self.inner.kind,
            self.inner.kind.code(),
            self.inner.message
        );
        match (self.inner.operation, self.inner.backend) {
            (Some(op), Some(be)) => out.push_str(&format!(" [op={op}, backend={be}]")),
            (Some(op), None) => out.push_str(&format!(" [op={op}]")),
            (None, Some(be)) => out.push_str(&format!(" [backend={be}]")),
            (None, None) => {}
        }
        if let Some(source) = &self.inner.source {
            out.push_str(&format!(": {source}"));
        }
        out
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Error");
        d.field("kind", &self.inner.kind)
            .field("code", &self.inner.kind.code())
            .field("message", &self.inner.message);
        if let Some(op) = self.inner.operation {
            d.field("operation", &op);
        }
        if let Some(be) = self.inner.backend {
            d.field("backend", &be);
        }
        if let Some(source) = &self.inner.source {
            d.field("source", &source.to_string());
        }
        d.finish()
    }
}

impl From<serde_json::Error> for Error {
    fn from(e: serde_json::Error) -> Self {
        Error::new(ErrorKind::Serialization, "JSON (de)serialisation failed").with_source(e)
    }
}

impl From<tokio::time::error::Elapsed> for Error {
    fn from(e: tokio::time::error::Elapsed) -> Self {
        Error::new(ErrorKind::Timeout, "deadline elapsed").with_source(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_is_one_pointer_so_results_stay_small() {
        assert_eq!(std::mem::size_of::<Error>(), std::mem::size_of::<usize>());
        assert_eq!(
            std::mem::size_of::<Result<()>>(),
            std::mem::size_of::<usize>()
        );
        let e = Error::new(ErrorKind::Timeout, "slow").with_source(std::io::Error::other("io"));
        assert!(std::error::Error::source(&e).is_some());
    }
    use std::collections::HashSet;

    #[test]
    fn codes_are_unique_and_in_their_family() {
        let codes: HashSet<u32> = ErrorKind::ALL.iter().map(|k| k.code()).collect();
        assert_eq!(codes.len(), ErrorKind::ALL.len());
        assert!(ErrorKind::ALL
            .iter()
            .all(|k| (1000..10000).contains(&k.code())));
        let names: HashSet<&str> = ErrorKind::ALL.iter().map(|k| k.as_str()).collect();
        assert_eq!(names.len(), ErrorKind::ALL.len());
        assert!(ErrorKind::ALL.windows(2).all(|w| w[0].code() < w[1].code()));
    }

    /// Every code of the original system, with the kind that carries it.
    #[test]
    fn every_code_of_the_original_system_has_its_kind() {
        let original = [
            (1001, ErrorKind::Connection),
            (1002, ErrorKind::Unavailable),
            (1003, ErrorKind::Timeout),
            (1004, ErrorKind::Closed),
            (2001, ErrorKind::AlreadyExists),
            (2002, ErrorKind::NotRegistered),
            (3001, ErrorKind::NotFound),
            (3002, ErrorKind::NoInstances),
            (4001, ErrorKind::LockNotAcquired),
            (4002, ErrorKind::LockNotHeld),
            (4003, ErrorKind::LockAlreadyHeld),
            (5001, ErrorKind::LeaseNotCreated),
            (5002, ErrorKind::LeaseNotFound),
            (5003, ErrorKind::LeaseLost),
            (6001, ErrorKind::InvalidConfig),
            (6002, ErrorKind::MissingEndpoints),
        ];
        for (code, kind) in original {
            assert_eq!(kind.code(), code, "{kind}");
            assert_eq!(ErrorKind::from_code(code), Some(kind), "{code}");
        }
        assert_eq!(ErrorKind::from_code(4242), None);
    }

    #[test]
    fn retryable_kinds() {
        assert!(Error::new(ErrorKind::Timeout, "t").is_retryable());
        assert!(Error::new(ErrorKind::Connection, "c").is_retryable());
        assert!(!Error::new(ErrorKind::Conflict, "c").is_retryable());
        assert!(!Error::new(ErrorKind::InvalidArgument, "c").is_retryable());
    }

    #[test]
    fn context_is_kept_once_and_rendered() {
        let e = Error::new(ErrorKind::NotFound, "no such key")
            .with_operation("config.get")
            .with_operation("ignored")
            .with_backend("etcd");
        assert_eq!(e.operation(), Some("config.get"));
        assert_eq!(e.backend(), Some("etcd"));
        assert!(e.is_not_found());
        assert_eq!(
            e.to_string(),
            "NotFound (3001): no such key [op=config.get, backend=etcd]"
        );
    }

    #[test]
    fn source_is_exposed() {
        let io = std::io::Error::other("boom");
        let e = Error::new(ErrorKind::Internal, "wrapped").with_source(io);
        let src = std::error::Error::source(&e).expect("source");
        assert_eq!(src.to_string(), "boom");
        assert!(e.to_string().ends_with(": boom"));
    }
}
