//! im-infra's Redis backend against the raw `redis` crate, in one run, at
//! the same concurrency, on the same connection type.
//!
//! ```text
//! scripts/services.sh up && source .services/env
//! cargo bench -p im-infra-redis --bench vs_raw
//! ```
//!
//! 64 tasks share one multiplexed connection manager on each side. Rounds
//! alternate raw and im-infra (1.5 s each, 9 pairs); `RATIO` lines print the
//! median of the per-pair im-infra / raw throughput ratios.

use std::sync::Arc;

use bytes::Bytes;
use im_infra::backend::{Backend, Maintenance};
use im_infra::ratelimit::{gcra, Limiter, Rule, Rules};
use im_infra_bench_support::{compare_throughput, server_env, Rounds};
use im_infra_redis::{gcra_script, RedisBackend};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

const KEYS: usize = 1000;
const ROUNDS: Rounds = Rounds {
    tasks: 64,
    round: std::time::Duration::from_millis(1500),
    pairs: 9,
};

async fn compare<R, RF, O, OF>(name: &str, raw: Arc<R>, ours: Arc<O>)
where
    R: Fn(usize) -> RF + Send + Sync + 'static,
    RF: std::future::Future<Output = bool> + Send,
    O: Fn(usize) -> OF + Send + Sync + 'static,
    OF: std::future::Future<Output = bool> + Send,
{
    let raw = Arc::new(move |i: usize| raw(i % KEYS));
    let ours = Arc::new(move |i: usize| ours(i % KEYS));
    compare_throughput(&format!("redis {name}"), ROUNDS, raw, ours).await;
}

fn main() {
    let Some(url) = server_env("IMINFRA_REDIS_URL") else {
        return;
    };
    im_infra_bench_support::runtime().block_on(async move {
        let ns = "bench";
        let backend = RedisBackend::builder()
            .url(&url)
            .namespace(ns)
            .build()
            .await
            .expect("connect");
        let client = redis::Client::open(url.as_str()).expect("url");
        let raw = ConnectionManager::new_with_config(client, ConnectionManagerConfig::new())
            .await
            .expect("connect");
        let value = Bytes::from(vec![b'x'; 100]);

        let cache = backend.cache().await.expect("cache");
        for i in 0..KEYS {
            cache
                .set(&format!("k{i}"), value.clone(), None)
                .await
                .expect("seed");
            redis::cmd("SET")
                .arg(format!("raw:k{i}"))
                .arg(value.as_ref())
                .query_async::<()>(&mut raw.clone())
                .await
                .expect("seed");
        }
        let keys: Arc<Vec<String>> = Arc::new((0..KEYS).map(|i| format!("k{i}")).collect());
        let raw_keys: Arc<Vec<String>> = Arc::new((0..KEYS).map(|i| format!("raw:k{i}")).collect());

        // GET
        let (c, k) = (cache.clone(), keys.clone());
        let ours = Arc::new(move |i: usize| {
            let (c, k) = (c.clone(), k.clone());
            async move { c.get(&k[i]).await.map(|v| v.is_some()).unwrap_or(false) }
        });
        let (r, k) = (raw.clone(), raw_keys.clone());
        let rawf = Arc::new(move |i: usize| {
            let (mut r, k) = (r.clone(), k.clone());
            async move {
                redis::cmd("GET")
                    .arg(&k[i])
                    .query_async::<Option<Vec<u8>>>(&mut r)
                    .await
                    .map(|v| v.is_some())
                    .unwrap_or(false)
            }
        });
        compare("cache get", rawf, ours).await;

        // SET
        let (c, k, v) = (cache.clone(), keys.clone(), value.clone());
        let ours = Arc::new(move |i: usize| {
            let (c, k, v) = (c.clone(), k.clone(), v.clone());
            async move { c.set(&k[i], v, None).await.is_ok() }
        });
        let (r, k, v) = (raw.clone(), raw_keys.clone(), value.clone());
        let rawf = Arc::new(move |i: usize| {
            let (mut r, k, v) = (r.clone(), k.clone(), v.clone());
            async move {
                redis::cmd("SET")
                    .arg(&k[i])
                    .arg(v.as_ref())
                    .query_async::<()>(&mut r)
                    .await
                    .is_ok()
            }
        });
        compare("cache set", rawf, ours).await;

        // Limiter decision: one EVALSHA of the same script.
        let rule = Rule::per_second(1_000_000);
        let limiter = backend
            .limiter(Rules::single("api", rule).expect("rule"))
            .await
            .expect("limiter");
        let (l, k) = (limiter.clone(), keys.clone());
        let ours = Arc::new(move |i: usize| {
            let (l, k) = (l.clone(), k.clone());
            async move { l.check("api", &k[i], 1).await.is_ok() }
        });
        let p = gcra::Params::new(&rule, 1000).expect("params");
        let (r, k) = (raw.clone(), raw_keys.clone());
        let rawf = Arc::new(move |i: usize| {
            let (mut r, k) = (r.clone(), k.clone());
            async move {
                let mut inv = gcra_script().prepare_invoke();
                inv.key(format!("rl:{}", k[i]))
                    .arg(p.emission)
                    .arg(p.tolerance)
                    .arg(1)
                    .arg(p.burst);
                inv.invoke_async::<Vec<i64>>(&mut r).await.is_ok()
            }
        });
        compare("limiter check (EVALSHA)", rawf.clone(), ours).await;
        let direct =
            Arc::new(backend.limiter_without_policy(&Rules::single("api", rule).expect("rule")));
        let (l, k) = (direct.clone(), keys.clone());
        let ours = Arc::new(move |i: usize| {
            let (l, k) = (l.clone(), k.clone());
            async move { l.check("api", &k[i], 1).await.is_ok() }
        });
        compare("limiter check without failure policy", rawf.clone(), ours).await;
        compare("raw vs raw (noise floor)", rawf.clone(), rawf).await;

        backend.purge_namespace().await.expect("purge");
        let _: () = redis::cmd("DEL")
            .arg(&raw_keys[..])
            .query_async(&mut raw.clone())
            .await
            .unwrap_or(());
        backend.close().await.expect("close");
    });
}
