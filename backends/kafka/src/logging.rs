//! librdkafka's log lines and client errors, forwarded to `tracing`.

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::KafkaError;

/// The librdkafka log level matching what `tracing` records now (so
/// librdkafka does not format lines nobody reads).
pub(crate) fn level() -> RDKafkaLogLevel {
    use tracing::level_filters::LevelFilter;
    match LevelFilter::current() {
        LevelFilter::OFF | LevelFilter::ERROR => RDKafkaLogLevel::Error,
        LevelFilter::WARN => RDKafkaLogLevel::Warning,
        LevelFilter::INFO => RDKafkaLogLevel::Info,
        _ => RDKafkaLogLevel::Debug,
    }
}

/// Forwards a librdkafka log line to `tracing` (target `librdkafka`).
pub(crate) fn log(level: RDKafkaLogLevel, facility: &str, message: &str) {
    match level {
        RDKafkaLogLevel::Emerg
        | RDKafkaLogLevel::Alert
        | RDKafkaLogLevel::Critical
        | RDKafkaLogLevel::Error => {
            tracing::error!(target: "librdkafka", facility, "{message}")
        }
        RDKafkaLogLevel::Warning => tracing::warn!(target: "librdkafka", facility, "{message}"),
        RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
            tracing::info!(target: "librdkafka", facility, "{message}")
        }
        RDKafkaLogLevel::Debug => tracing::debug!(target: "librdkafka", facility, "{message}"),
    }
}

/// Reports a client-level error. Broker disconnections are routine (the
/// client reconnects by itself), so they are warnings, not errors.
pub(crate) fn client_error(error: &KafkaError, reason: &str) {
    tracing::warn!(target: "librdkafka", error = %error, "{reason}");
}

/// The context of the producer and admin clients.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct TracingContext;

impl ClientContext for TracingContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        log(level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        client_error(&error, reason);
    }
}
