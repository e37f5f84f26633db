//! Mapping `redis` errors into `im_infra::Error`.

use im_infra::{Error, ErrorKind};
use redis::{ErrorKind as RK, RedisError, ServerErrorKind as SK};

/// The im-infra kind of a Redis error.
pub(crate) fn kind_of(e: &RedisError) -> ErrorKind {
    if e.is_timeout() {
        return ErrorKind::Timeout;
    }
    if e.is_connection_refusal() {
        return ErrorKind::Connection;
    }
    if e.is_connection_dropped() || e.is_io_error() {
        return ErrorKind::Unavailable;
    }
    match e.kind() {
        RK::AuthenticationFailed | RK::InvalidClientConfig => ErrorKind::InvalidConfig,
        RK::Server(
            SK::BusyLoading | SK::TryAgain | SK::ClusterDown | SK::MasterDown | SK::ReadOnly,
        ) => ErrorKind::Unavailable,
        // The server forgot its scripts again (flushed, restarted or failed
        // over) between a script's load and its call: retry.
        RK::Server(SK::NoScript) => ErrorKind::Unavailable,
        RK::ClusterConnectionNotFound => ErrorKind::Unavailable,
        // Sentinel names no usable primary (yet): a failover under way.
        RK::MasterNameNotFoundBySentinel | RK::NoValidReplicasFoundBySentinel => {
            ErrorKind::Unavailable
        }
        RK::Server(SK::NoPerm) => ErrorKind::InvalidConfig,
        RK::Parse | RK::UnexpectedReturnType => ErrorKind::Internal,
        _ => {
            let msg = e.to_string();
            if msg.contains("WRONGTYPE")
                || msg.contains("not an integer")
                || msg.contains("overflow")
            {
                ErrorKind::InvalidState
            } else if msg.contains("NOAUTH") || msg.contains("WRONGPASS") {
                ErrorKind::InvalidConfig
            } else if msg.contains("BUSY") || msg.contains("LOADING") {
                ErrorKind::Unavailable
            } else {
                ErrorKind::Internal
            }
        }
    }
}

/// Converts a Redis error.
pub(crate) fn from_redis(e: RedisError) -> Error {
    let kind = kind_of(&e);
    Error::new(kind, "redis command failed")
        .with_backend(crate::NAME)
        .with_source(e)
}

/// A reply of a shape the caller did not expect (`Internal`).
pub(crate) fn unexpected(what: impl std::fmt::Display) -> Error {
    Error::new(
        ErrorKind::Internal,
        format!("unexpected reply from redis: {what}"),
    )
    .with_backend(crate::NAME)
}

/// Decodes a value of a script's reply.
pub(crate) fn decode<T: redis::FromRedisValue>(v: redis::Value) -> im_infra::Result<T> {
    redis::from_redis_value(v).map_err(unexpected)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_errors_are_retryable() {
        let e = RedisError::from(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "refused",
        ));
        assert!(from_redis(e).is_retryable());
        let e = RedisError::from(std::io::Error::new(std::io::ErrorKind::BrokenPipe, "gone"));
        assert!(from_redis(e).is_retryable());
    }

    #[test]
    fn a_script_the_server_forgot_again_is_retryable() {
        let e = RedisError::from((
            RK::Server(SK::NoScript),
            "NOSCRIPT No matching script. Please use EVAL.",
        ));
        assert_eq!(kind_of(&e), ErrorKind::Unavailable);
    }
}
