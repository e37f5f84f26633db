//! Mapping etcd client errors into `im_infra::Error`.

use im_infra::{Error, ErrorKind};
use tonic::Code;

/// The kind of an etcd client error.
pub(crate) fn kind_of(e: &etcd_client::Error) -> ErrorKind {
    use etcd_client::Error as E;
    match e {
        E::InvalidArgs(_) | E::InvalidUri(_) | E::InvalidMetadataValue(_) => {
            ErrorKind::InvalidArgument
        }
        E::TransportError(_) | E::EndpointError(_) => ErrorKind::Connection,
        // The client reports a keep-alive answer with TTL 0 so: the lease is gone.
        E::LeaseKeepAliveError(m) if m == "lease not found" => ErrorKind::LeaseLost,
        E::IoError(_) | E::WatchError(_) | E::LeaseKeepAliveError(_) => ErrorKind::Unavailable,
        E::GRpcStatus(s) => {
            let msg = s.message();
            match s.code() {
                // The client's request timeout (tonic) ends a request so.
                _ if msg.contains("Timeout expired")
                    || msg.contains("timed out") && s.code() == Code::Cancelled =>
                {
                    ErrorKind::Timeout
                }
                // The request never left: a member that cannot be reached.
                Code::Unavailable if msg.contains("connect") => ErrorKind::Connection,
                Code::Unavailable | Code::Cancelled | Code::Aborted => ErrorKind::Unavailable,
                Code::DeadlineExceeded => ErrorKind::Timeout,
                Code::NotFound if msg.contains("lease") => ErrorKind::LeaseLost,
                Code::NotFound => ErrorKind::NotFound,
                Code::InvalidArgument if msg.contains("too large") => ErrorKind::InvalidArgument,
                Code::InvalidArgument => ErrorKind::InvalidArgument,
                Code::FailedPrecondition => ErrorKind::InvalidState,
                Code::OutOfRange => ErrorKind::Conflict,
                Code::ResourceExhausted => ErrorKind::ResourceExhausted,
                Code::Unauthenticated | Code::PermissionDenied => ErrorKind::InvalidConfig,
                Code::AlreadyExists => ErrorKind::AlreadyExists,
                // "leader changed", "no leader", "timed out" arrive as
                // Unknown, and so does a connection broken mid-request
                // (tonic's "transport error": a member stopped). The
                // request may have been applied: retryable, like any
                // timeout.
                Code::Unknown
                    if msg.contains("leader")
                        || msg.contains("timed out")
                        || msg.contains("transport error") =>
                {
                    ErrorKind::Unavailable
                }
                _ => ErrorKind::Internal,
            }
        }
        _ => ErrorKind::Internal,
    }
}

/// Converts an etcd client error.
pub(crate) fn from_etcd(e: etcd_client::Error) -> Error {
    let kind = kind_of(&e);
    Error::new(kind, "etcd request failed")
        .with_backend(crate::NAME)
        .with_source(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_keep_alive_answered_with_no_ttl_is_a_lost_lease_and_a_broken_stream_is_not() {
        let gone = etcd_client::Error::LeaseKeepAliveError("lease not found".into());
        assert_eq!(kind_of(&gone), ErrorKind::LeaseLost);
        let broken = etcd_client::Error::LeaseKeepAliveError("channel closed".into());
        assert_eq!(kind_of(&broken), ErrorKind::Unavailable);
    }

    #[test]
    fn a_connection_broken_mid_request_is_retryable() {
        // What a request gets when the member it went to stops.
        let status = tonic::Status::new(Code::Unknown, "transport error");
        let kind = kind_of(&etcd_client::Error::GRpcStatus(status));
        assert_eq!(kind, ErrorKind::Unavailable);
        assert!(Error::new(kind, "x").is_retryable());
        let other = tonic::Status::new(Code::Unknown, "something else");
        assert_eq!(
            kind_of(&etcd_client::Error::GRpcStatus(other)),
            ErrorKind::Internal
        );
    }
}
