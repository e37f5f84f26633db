//! [`ErrorCategory`]: the original system's error categories.

use crate::error::{Error, ErrorKind};

/// The error categories of the original system's etcd component, for
/// callers that branch on them. Derived from the error kind (and, for
/// registry and discovery, the operation), so they apply to an error of
/// any backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCategory {
    /// `CONNECTION_ERROR`: connecting, connection lost, not connected.
    Connection,
    /// `REGISTRY_ERROR`: a registration exists already or is missing.
    Registry,
    /// `DISCOVERY_ERROR`: no instance of a service.
    Discovery,
    /// `LOCK_ERROR`: a lock not held or held elsewhere.
    Lock,
    /// `LEASE_ERROR`: a lease lost or missing.
    Lease,
    /// `CONFIGURATION_ERROR`: invalid settings or input.
    Configuration,
    /// `TIMEOUT_ERROR`.
    Timeout,
    /// `NOT_FOUND_ERROR`.
    NotFound,
    /// `ALREADY_EXISTS_ERROR`.
    AlreadyExists,
    /// `INVALID_STATE_ERROR`.
    InvalidState,
}

impl ErrorCategory {
    /// The category of `e`: its code's family (1xxx connection, 2xxx
    /// registry, 3xxx discovery, 4xxx lock, 5xxx lease, 6xxx
    /// configuration), except that timeouts, missing things, existing
    /// things and invalid states have categories of their own, as in the
    /// original system; an existing or missing registration is a registry
    /// error and a missing service a discovery error.
    ///
    /// ```
    /// use im_infra::{Error, ErrorKind};
    /// use im_infra::ErrorCategory;
    /// let e = Error::new(ErrorKind::LeaseLost, "gone");
    /// assert_eq!(ErrorCategory::of(&e), ErrorCategory::Lease);
    /// assert_eq!(ErrorCategory::of(&e).as_str(), "LEASE_ERROR");
    /// let e = Error::new(ErrorKind::NotRegistered, "svc/1");
    /// assert_eq!(ErrorCategory::of(&e), ErrorCategory::Registry);
    /// ```
    pub fn of(e: &Error) -> ErrorCategory {
        let op = e.operation().unwrap_or("");
        match e.kind() {
            ErrorKind::Timeout => ErrorCategory::Timeout,
            ErrorKind::InvalidState => ErrorCategory::InvalidState,
            ErrorKind::AlreadyExists | ErrorKind::NotFound if op.starts_with("registry.") => {
                ErrorCategory::Registry
            }
            ErrorKind::NotFound if op.starts_with("discovery.") => ErrorCategory::Discovery,
            ErrorKind::AlreadyExists => ErrorCategory::AlreadyExists,
            ErrorKind::NotFound => ErrorCategory::NotFound,
            k => match k.code() / 1000 {
                1 => ErrorCategory::Connection,
                2 => ErrorCategory::Registry,
                3 => ErrorCategory::Discovery,
                4 => ErrorCategory::Lock,
                5 => ErrorCategory::Lease,
                _ => ErrorCategory::Configuration,
            },
        }
    }

    /// The original system's name (`"LEASE_ERROR"`).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCategory::Connection => "CONNECTION_ERROR",
            ErrorCategory::Registry => "REGISTRY_ERROR",
            ErrorCategory::Discovery => "DISCOVERY_ERROR",
            ErrorCategory::Lock => "LOCK_ERROR",
            ErrorCategory::Lease => "LEASE_ERROR",
            ErrorCategory::Configuration => "CONFIGURATION_ERROR",
            ErrorCategory::Timeout => "TIMEOUT_ERROR",
            ErrorCategory::NotFound => "NOT_FOUND_ERROR",
            ErrorCategory::AlreadyExists => "ALREADY_EXISTS_ERROR",
            ErrorCategory::InvalidState => "INVALID_STATE_ERROR",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_the_category_of_the_original_system() {
        let cases = [
            (ErrorKind::Connection, ErrorCategory::Connection),
            (ErrorKind::Unavailable, ErrorCategory::Connection),
            (ErrorKind::Closed, ErrorCategory::Connection),
            (ErrorKind::Timeout, ErrorCategory::Timeout),
            (ErrorKind::AlreadyExists, ErrorCategory::AlreadyExists),
            (ErrorKind::NotRegistered, ErrorCategory::Registry),
            (ErrorKind::NotFound, ErrorCategory::NotFound),
            (ErrorKind::NoInstances, ErrorCategory::Discovery),
            (ErrorKind::LockNotAcquired, ErrorCategory::Lock),
            (ErrorKind::LockNotHeld, ErrorCategory::Lock),
            (ErrorKind::LockAlreadyHeld, ErrorCategory::Lock),
            (ErrorKind::InProgress, ErrorCategory::Lock),
            (ErrorKind::LeaseNotCreated, ErrorCategory::Lease),
            (ErrorKind::LeaseNotFound, ErrorCategory::Lease),
            (ErrorKind::LeaseLost, ErrorCategory::Lease),
            (ErrorKind::InvalidConfig, ErrorCategory::Configuration),
            (ErrorKind::MissingEndpoints, ErrorCategory::Configuration),
            (ErrorKind::InvalidState, ErrorCategory::InvalidState),
        ];
        for (kind, category) in cases {
            assert_eq!(
                ErrorCategory::of(&Error::new(kind, "x")),
                category,
                "{kind}"
            );
        }
        let exists = Error::new(ErrorKind::AlreadyExists, "x").with_operation("registry.register");
        assert_eq!(ErrorCategory::of(&exists), ErrorCategory::Registry);
        let missing = Error::new(ErrorKind::NotFound, "x").with_operation("discovery.instances");
        assert_eq!(ErrorCategory::of(&missing), ErrorCategory::Discovery);
    }
}
