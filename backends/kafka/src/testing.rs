//! The conformance fixture of the Kafka backend (feature `testing`): every
//! world has topics and consumer groups of its own on the brokers named by
//! `IMINFRA_KAFKA_BROKERS`.
//!
//! ```no_run
//! fn main() -> std::process::ExitCode {
//!     im_infra_conformance::run_main(im_infra_kafka::testing::target())
//! }
//! ```

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use async_trait::async_trait;
use im_infra::backend::Backend;
use im_infra::mq::TopicSpec;
use im_infra_conformance::cases::unique;
use im_infra_conformance::servers::KAFKA_ENV;
use im_infra_conformance::{Fixture, Hooks, SuiteKind, Target, World};

use crate::{ConsumerTuning, KafkaBackend};

/// The conformance runner's target for this backend.
pub fn target() -> Target {
    Target {
        backend: "kafka",
        env_var: Some(KAFKA_ENV),
        fixture: Some(|brokers| {
            Ok(Arc::new(KafkaFixture {
                brokers: brokers.split(',').map(str::to_owned).collect(),
            }))
        }),
        suite: SuiteKind::Contract,
    }
}

struct KafkaFixture {
    brokers: Vec<String>,
}

struct KafkaHooks {
    backend: KafkaBackend,
    peer: KafkaBackend,
}

async fn connect(brokers: &[String], namespace: &str) -> Result<KafkaBackend> {
    let mut builder = KafkaBackend::builder();
    // librdkafka's own debug contexts, e.g. IMINFRA_KAFKA_DEBUG=cgrp,fetch
    // (printed with RUST_LOG=librdkafka=debug).
    if let Ok(contexts) = std::env::var("IMINFRA_KAFKA_DEBUG") {
        builder = builder.property("debug", contexts);
    }
    Ok(builder
        .brokers(brokers.iter().cloned())
        .client_id("im-infra-conformance")
        .namespace(namespace)
        .consumer(ConsumerTuning {
            commit_interval: Duration::from_millis(200),
            fetch_wait_max: Duration::from_millis(50),
            ..ConsumerTuning::default()
        })
        .build()
        .await?)
}

#[async_trait]
impl Hooks for KafkaHooks {
    async fn create_topic(&self, spec: &TopicSpec) -> Result<bool> {
        Ok(self.backend.create_topic(spec).await?)
    }

    async fn cleanup(&self) -> Result<()> {
        self.peer.close().await?;
        self.backend.close().await?;
        Ok(())
    }
}

#[async_trait]
impl Fixture for KafkaFixture {
    async fn world(&self) -> Result<World> {
        let ns = format!("{}.", unique("t"));
        let backend = connect(&self.brokers, &ns).await?;
        let peer = connect(&self.brokers, &ns).await?;
        Ok(World {
            backend: Arc::new(backend.clone()),
            peer: Arc::new(peer.clone()),
            hooks: Arc::new(KafkaHooks { backend, peer }),
        })
    }
}
