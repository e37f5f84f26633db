//! Mapping of librdkafka errors onto the kinds of [`im_infra::Error`].

use im_infra::{Error, ErrorKind};

use crate::NAME;
use rdkafka::error::{KafkaError, RDKafkaErrorCode as C};

/// The kind of a librdkafka error code: retryable kinds (`Unavailable`,
/// `Timeout`, `Connection`, `ResourceExhausted`) for what passes when the
/// broker comes back or the queue drains.
pub(crate) fn kind_of_code(code: C) -> ErrorKind {
    match code {
        C::QueueFull | C::ThrottlingQuotaExceeded | C::PollExceeded => ErrorKind::ResourceExhausted,
        C::MessageTimedOut | C::OperationTimedOut | C::RequestTimedOut | C::TimedOutQueue => {
            ErrorKind::Timeout
        }
        C::BrokerTransportFailure
        | C::AllBrokersDown
        | C::Resolve
        | C::NetworkException
        | C::BrokerNotAvailable => ErrorKind::Connection,
        C::LeaderNotAvailable
        | C::NotLeaderForPartition
        | C::ReplicaNotAvailable
        | C::NotEnoughReplicas
        | C::NotEnoughReplicasAfterAppend
        | C::CoordinatorLoadInProgress
        | C::CoordinatorNotAvailable
        | C::NotCoordinator
        | C::WaitingForCoordinator
        | C::RebalanceInProgress
        | C::NotController
        | C::KafkaStorageError
        | C::FencedLeaderEpoch
        | C::UnknownLeaderEpoch
        | C::OutOfOrderSequenceNumber
        | C::UnknownProducerId
        | C::Retry => ErrorKind::Unavailable,
        C::UnknownTopicOrPartition | C::UnknownTopic | C::UnknownPartition => ErrorKind::NotFound,
        C::TopicAlreadyExists => ErrorKind::AlreadyExists,
        C::MessageSizeTooLarge
        | C::InvalidMessageSize
        | C::MessageBatchTooLarge
        | C::InvalidTopic
        | C::InvalidArgument
        | C::InvalidPartitions
        | C::InvalidReplicationFactor
        | C::InvalidRecord => ErrorKind::InvalidArgument,
        C::TopicAuthorizationFailed
        | C::GroupAuthorizationFailed
        | C::ClusterAuthorizationFailed
        | C::SaslAuthenticationFailed
        | C::Authentication
        | C::UnsupportedSASLMechanism
        | C::SSL
        | C::InvalidConfig
        | C::InvalidRequiredAcks => ErrorKind::InvalidConfig,
        C::BadMessage | C::KeyDeserialization | C::ValueDeserialization => ErrorKind::Serialization,
        C::BrokerDestroy | C::DestroyBroker => ErrorKind::Closed,
        C::State | C::Fatal | C::Fenced | C::ProducerFenced | C::InvalidProducerEpoch => {
            ErrorKind::InvalidState
        }
        C::UnsupportedFeature | C::UnsupportedVersion | C::NotImplemented => ErrorKind::Unsupported,
        _ => ErrorKind::Internal,
    }
}

/// An `im_infra::Error` for a librdkafka error, with `what` saying what was
/// being done.
pub(crate) fn map(err: KafkaError, what: &str) -> Error {
    let kind = match &err {
        KafkaError::Canceled => ErrorKind::Closed,
        KafkaError::ClientConfig(..) => ErrorKind::InvalidConfig,
        KafkaError::ClientCreation(_) => ErrorKind::InvalidConfig,
        KafkaError::Nul(_) => ErrorKind::InvalidArgument,
        KafkaError::Subscription(_) => ErrorKind::InvalidArgument,
        KafkaError::NoMessageReceived => ErrorKind::Timeout,
        KafkaError::PauseResume(_) | KafkaError::Seek(_) => ErrorKind::InvalidState,
        KafkaError::Transaction(e) => kind_of_code(e.code()),
        KafkaError::AdminOp(code) => kind_of_code(*code),
        other => other
            .rdkafka_error_code()
            .map_or(ErrorKind::Internal, kind_of_code),
    };
    Error::new(kind, format!("{what}: {err}"))
        .with_backend(NAME)
        .with_source(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transient_failures_are_retryable() {
        for code in [
            C::QueueFull,
            C::MessageTimedOut,
            C::AllBrokersDown,
            C::BrokerTransportFailure,
            C::NotLeaderForPartition,
            C::RequestTimedOut,
        ] {
            let e = map(KafkaError::MessageProduction(code), "produce");
            assert!(e.is_retryable(), "{code:?} -> {:?}", e.kind());
        }
    }

    #[test]
    fn permanent_failures_are_not() {
        for (code, kind) in [
            (C::MessageSizeTooLarge, ErrorKind::InvalidArgument),
            (C::TopicAuthorizationFailed, ErrorKind::InvalidConfig),
            (C::UnknownTopicOrPartition, ErrorKind::NotFound),
            (C::TopicAlreadyExists, ErrorKind::AlreadyExists),
        ] {
            let e = map(KafkaError::MessageProduction(code), "produce");
            assert_eq!(e.kind(), kind, "{code:?}");
            assert!(!e.is_retryable(), "{code:?}");
        }
        assert_eq!(map(KafkaError::Canceled, "x").kind(), ErrorKind::Closed);
        assert_eq!(
            map(KafkaError::AdminOp(C::OperationTimedOut), "create").kind(),
            ErrorKind::Timeout
        );
    }
}
