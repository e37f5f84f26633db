//! A service that depends on `Arc<dyn Cache>` and `Arc<dyn Limiter>` only,
//! unit-tested with expectations on the mocks.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use im_infra::cache::{Cache, CacheExt};
use im_infra::ratelimit::{Decision, DecisionSource, DenyReason, Limiter};
use im_infra::{Error, ErrorKind};
use im_infra_mocks::{predicate, MockCache, MockLimiter, Sequence};

/// The code under test: reads and writes profiles, rate-limited per user.
struct ProfileService {
    cache: Arc<dyn Cache>,
    limiter: Arc<dyn Limiter>,
}

#[derive(Debug, PartialEq)]
enum ServiceError {
    RateLimited(Duration),
    Infra(ErrorKind),
}

impl From<Error> for ServiceError {
    fn from(e: Error) -> Self {
        ServiceError::Infra(e.kind())
    }
}

impl ProfileService {
    async fn name(&self, user: &str) -> Result<Option<String>, ServiceError> {
        let d = self.limiter.check("profile.read", user, 1).await?;
        if !d.allowed {
            return Err(ServiceError::RateLimited(d.retry_after));
        }
        Ok(self.cache.get_json(&format!("profile:{user}")).await?)
    }

    async fn rename(&self, user: &str, name: &str) -> Result<(), ServiceError> {
        let d = self.limiter.check("profile.write", user, 1).await?;
        if !d.allowed {
            return Err(ServiceError::RateLimited(d.retry_after));
        }
        self.cache
            .set_json(
                &format!("profile:{user}"),
                &name,
                Some(Duration::from_secs(600)),
            )
            .await?;
        Ok(())
    }
}

fn decision(allowed: bool) -> Decision {
    Decision {
        allowed,
        limit: 10,
        remaining: if allowed { 9 } else { 0 },
        retry_after: if allowed {
            Duration::ZERO
        } else {
            Duration::from_millis(250)
        },
        reset_after: Duration::from_secs(1),
        denied: (!allowed).then_some(DenyReason::RateExceeded),
        source: DecisionSource::Backend,
    }
}

fn service(cache: MockCache, limiter: MockLimiter) -> ProfileService {
    ProfileService {
        cache: Arc::new(cache),
        limiter: Arc::new(limiter),
    }
}

#[tokio::test]
async fn allowed_read_hits_the_cache_with_the_profile_key() {
    let mut limiter = MockLimiter::new();
    limiter
        .expect_check()
        .with(
            predicate::eq("profile.read"),
            predicate::eq("alice"),
            predicate::eq(1),
        )
        .times(1)
        .returning(|_, _, _| Ok(decision(true)));
    let mut cache = MockCache::new();
    cache
        .expect_get()
        .with(predicate::eq("profile:alice"))
        .times(1)
        .returning(|_| Ok(Some(Bytes::from_static(b"\"Alice\""))));

    let got = service(cache, limiter).name("alice").await;
    assert_eq!(got, Ok(Some("Alice".to_string())));
}

#[tokio::test]
async fn denied_read_never_touches_the_cache() {
    let mut limiter = MockLimiter::new();
    limiter
        .expect_check()
        .times(1)
        .returning(|_, _, _| Ok(decision(false)));
    let mut cache = MockCache::new();
    cache.expect_get().times(0);

    let got = service(cache, limiter).name("bob").await;
    assert_eq!(
        got,
        Err(ServiceError::RateLimited(Duration::from_millis(250)))
    );
}

#[tokio::test]
async fn backend_failure_surfaces_its_kind() {
    let mut limiter = MockLimiter::new();
    limiter
        .expect_check()
        .returning(|_, _, _| Ok(decision(true)));
    let mut cache = MockCache::new();
    cache
        .expect_get()
        .returning(|_| Err(Error::new(ErrorKind::Unavailable, "redis down")));

    let got = service(cache, limiter).name("carol").await;
    assert_eq!(got, Err(ServiceError::Infra(ErrorKind::Unavailable)));
}

#[tokio::test]
async fn malformed_cached_value_is_a_serialization_error() {
    let mut limiter = MockLimiter::new();
    limiter
        .expect_check()
        .returning(|_, _, _| Ok(decision(true)));
    let mut cache = MockCache::new();
    cache
        .expect_get()
        .returning(|_| Ok(Some(Bytes::from_static(b"{not json"))));

    let got = service(cache, limiter).name("dave").await;
    assert_eq!(got, Err(ServiceError::Infra(ErrorKind::Serialization)));
}

#[tokio::test]
async fn rename_checks_the_limit_before_writing_json_with_a_ttl() {
    let mut seq = Sequence::new();
    let mut limiter = MockLimiter::new();
    limiter
        .expect_check()
        .with(
            predicate::eq("profile.write"),
            predicate::eq("erin"),
            predicate::eq(1),
        )
        .times(1)
        .in_sequence(&mut seq)
        .returning(|_, _, _| Ok(decision(true)));
    let mut cache = MockCache::new();
    cache
        .expect_set()
        .withf(|key, value, ttl| {
            key == "profile:erin"
                && value.as_ref() == b"\"Erin\""
                && *ttl == Some(Duration::from_secs(600))
        })
        .times(1)
        .in_sequence(&mut seq)
        .returning(|_, _, _| Ok(()));

    assert_eq!(service(cache, limiter).rename("erin", "Erin").await, Ok(()));
}
