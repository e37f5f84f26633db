//! The one close path against a real server (`IMINFRA_REDIS_URL`; skipped
//! without it unless `IMINFRA_REQUIRE_BACKENDS` names `redis` or `all`).

use std::time::Duration;

use bytes::Bytes;
use im_infra::backend::{Backend, Maintenance};
use im_infra::ratelimit::{FailurePolicy, LimiterSettings, Rule, Rules};
use im_infra::registry::ServiceInstance;
use im_infra::ErrorKind;
use im_infra_conformance::servers::{server_or_skip, REDIS_ENV};
use im_infra_redis::RedisBackend;

async fn connect(url: &str, ns: &str) -> RedisBackend {
    RedisBackend::builder()
        .url(url)
        .namespace(ns)
        .build()
        .await
        .expect("redis answers")
}

#[tokio::test]
async fn close_deregisters_what_was_registered_and_then_everything_answers_closed() {
    let Some(url) = server_or_skip("redis", REDIS_ENV) else {
        return;
    };
    let ns = format!(
        "t-close-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    let backend = connect(&url, &ns).await;
    let peer = connect(&url, &ns).await;

    // Bad input is refused by the layer, which names the operation.
    let cache = backend.cache().await.unwrap();
    let err = cache.get("").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    assert_eq!(
        (err.operation(), err.backend()),
        (Some("cache.get"), Some("redis"))
    );
    cache
        .set("k", Bytes::from_static(b"v"), None)
        .await
        .unwrap();

    let registry = backend.registry().await.unwrap();
    let instance = ServiceInstance::new("svc", "a", "127.0.0.1:1");
    registry
        .register(&instance, Duration::from_secs(30))
        .await
        .unwrap();
    let discovery = peer.discovery().await.unwrap();
    assert_eq!(discovery.instances("svc").await.unwrap().len(), 1);

    let mut cfg = LimiterSettings::with_rule("api", Rule::per_second(100));
    cfg.failure_policy = FailurePolicy::FailOpen;
    let limiter = backend.limiter(Rules::fixed(cfg).unwrap()).await.unwrap();
    assert!(limiter.check("api", "k", 1).await.unwrap().allowed);

    // Concurrent and repeated closes all succeed; the first one does the work.
    let (a, b) = tokio::join!(backend.close(), backend.close());
    a.unwrap();
    b.unwrap();
    backend.close().await.unwrap();

    // Deregistered at once, not left to expire.
    assert!(discovery.instances("svc").await.unwrap().is_empty());

    // The limiter answers Closed whatever its failure policy.
    let err = limiter.check("api", "k", 1).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Closed);
    assert_eq!(err.operation(), Some("ratelimit.check"));
    let err = backend.health_check().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Closed);
    assert_eq!(err.operation(), Some("backend.health_check"));
    assert_eq!(cache.get("k").await.unwrap_err().kind(), ErrorKind::Closed);
    assert_eq!(
        backend.registry().await.err().map(|e| e.kind()),
        Some(ErrorKind::Closed)
    );

    assert!(peer.purge_namespace().await.unwrap() > 0);
    peer.close().await.unwrap();
}
