//! How an im-infra error becomes a gRPC status, the same in every service.

use im_infra::{Error, ErrorKind};
use tonic::{Code, Status};

/// The status a client sees for `e`: its kind decides the code (a retryable
/// failure is `UNAVAILABLE`, bad input `INVALID_ARGUMENT`, …); the message
/// is the error's.
///
/// ```
/// use im_infra::{Error, ErrorKind};
/// let s = im_infra_examples_chat::status::of(&Error::new(ErrorKind::Timeout, "slow"));
/// assert_eq!(s.code(), tonic::Code::DeadlineExceeded);
/// ```
pub fn of(e: &Error) -> Status {
    let code = match e.kind() {
        ErrorKind::InvalidArgument | ErrorKind::Serialization => Code::InvalidArgument,
        ErrorKind::Timeout => Code::DeadlineExceeded,
        ErrorKind::NotFound => Code::NotFound,
        ErrorKind::AlreadyExists => Code::AlreadyExists,
        ErrorKind::ResourceExhausted => Code::ResourceExhausted,
        ErrorKind::InProgress | ErrorKind::LockNotAcquired | ErrorKind::Conflict => Code::Aborted,
        ErrorKind::Connection
        | ErrorKind::Unavailable
        | ErrorKind::Closed
        | ErrorKind::NoInstances
        | ErrorKind::LeaseLost
        | ErrorKind::LockNotHeld => Code::Unavailable,
        _ => Code::Internal,
    };
    Status::new(code, e.to_string())
}

/// Whether a failed call may be tried again on another instance: the
/// instance could not be reached (`UNAVAILABLE`) or its connection broke
/// during the call (`UNKNOWN`, a transport error). A call that ran out of
/// its deadline is not tried again: the work may still be running, and a
/// retry would queue behind it.
pub fn retryable(s: &Status) -> bool {
    matches!(s.code(), Code::Unavailable | Code::Unknown)
}
