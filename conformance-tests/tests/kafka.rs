//! The conformance suite on the Kafka backend, against the tansu broker from
//! `scripts/services.sh` (`IMINFRA_KAFKA_BROKERS`).

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use async_trait::async_trait;
use im_infra::backend::Backend;
use im_infra_conformance::servers::KAFKA_ENV;
use im_infra_conformance::{run_main, Fixture, Hooks, SuiteKind, Target, World};
use im_infra_kafka::{ConsumerTuning, KafkaBackend};

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
    async fn create_topic(&self, topic: &str, partitions: u32) -> Result<()> {
        self.backend.create_topic(topic, partitions, 1).await?;
        Ok(())
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
        // Every world has topics and groups of its own on the broker.
        let ns = format!("t-{}.", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let backend = connect(&self.brokers, &ns).await?;
        let peer = connect(&self.brokers, &ns).await?;
        Ok(World {
            backend: Arc::new(backend.clone()),
            peer: Arc::new(peer.clone()),
            hooks: Arc::new(KafkaHooks { backend, peer }),
        })
    }
}

fn main() -> ExitCode {
    run_main(Target {
        backend: "kafka",
        env_var: Some(KAFKA_ENV),
        fixture: Some(|brokers| {
            Ok(Arc::new(KafkaFixture {
                brokers: brokers.split(',').map(str::to_owned).collect(),
            }))
        }),
        suite: SuiteKind::Contract,
    })
}
