//! Mapping `mysql_async` errors into `im_infra::Error`.

use im_infra::{Error, ErrorKind};
use mysql_async::{DriverError, Error as E};

/// The kind of a `mysql_async` error.
pub(crate) fn kind_of(e: &E) -> ErrorKind {
    match e {
        E::Io(_) => ErrorKind::Unavailable,
        E::Url(_) => ErrorKind::InvalidConfig,
        E::Other(_) => ErrorKind::Internal,
        E::Driver(d) => match d {
            DriverError::ConnectionClosed | DriverError::PoolDisconnected => ErrorKind::Unavailable,
            DriverError::PacketTooLarge => ErrorKind::InvalidArgument,
            DriverError::FromValue { .. } | DriverError::FromRow { .. } => ErrorKind::Serialization,
            DriverError::UnknownAuthPlugin { .. } | DriverError::CleartextPluginDisabled => {
                ErrorKind::InvalidConfig
            }
            _ => ErrorKind::Internal,
        },
        E::Server(s) => match s.code {
            // Access denied, unknown database, no such command allowed.
            1044 | 1045 | 1049 | 1142 | 1227 => ErrorKind::InvalidConfig,
            // Too many connections; lock wait timeout; deadlock; query interrupted.
            1040 | 1203 => ErrorKind::ResourceExhausted,
            1205 | 1213 | 1317 => ErrorKind::Unavailable,
            // Server shutting down, server gone, lost connection, read-only.
            1053 | 2006 | 2013 | 1290 | 1792 => ErrorKind::Unavailable,
            // Data too long, packet too large.
            1406 | 1153 | 1301 => ErrorKind::InvalidArgument,
            1062 => ErrorKind::AlreadyExists,
            1146 => ErrorKind::InvalidState,
            _ => ErrorKind::Internal,
        },
    }
}

/// Converts a `mysql_async` error.
pub(crate) fn from_mysql(e: E) -> Error {
    let kind = kind_of(&e);
    if let E::Driver(DriverError::FromRow { .. } | DriverError::FromValue { .. }) = e {
        // The source would print the row's values: leave it out.
        return Error::new(kind, "a stored row does not have the expected shape")
            .with_backend(crate::NAME);
    }
    Error::new(kind, "mysql query failed")
        .with_backend(crate::NAME)
        .with_source(e)
}

/// Names `key` in a `Serialization` error (a malformed stored row).
pub(crate) trait ForKey {
    /// The result, its `Serialization` error naming `key`.
    fn for_key(self, key: &str) -> Self;
}

impl<T> ForKey for im_infra::Result<T> {
    fn for_key(self, key: &str) -> Self {
        self.map_err(|e| {
            if e.kind() == ErrorKind::Serialization {
                malformed(key, e.message())
            } else {
                e
            }
        })
    }
}

/// A stored row that does not have the shape the backend writes: a
/// `Serialization` error naming the key.
pub(crate) fn malformed(key: &str, what: impl std::fmt::Display) -> Error {
    Error::new(
        ErrorKind::Serialization,
        format!("the stored row of key {key:?} is malformed: {what}"),
    )
    .with_backend(crate::NAME)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_errors_map_to_kinds() {
        let server = |code| {
            E::Server(mysql_async::ServerError {
                code,
                message: String::new(),
                state: String::new(),
            })
        };
        assert_eq!(kind_of(&server(1213)), ErrorKind::Unavailable);
        assert_eq!(kind_of(&server(1045)), ErrorKind::InvalidConfig);
        assert_eq!(kind_of(&server(1406)), ErrorKind::InvalidArgument);
        assert!(from_mysql(E::Driver(DriverError::ConnectionClosed)).is_retryable());
    }
}
