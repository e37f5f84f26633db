//! im-infra's MySQL backend against raw `mysql_async`, in one run.
//!
//! ```text
//! scripts/services.sh up && source .services/env
//! cargo bench -p im-infra-mysql --bench vs_raw
//! ```
//!
//! Both sides use a pool built from the same options
//! ([`MysqlSettings::opts`]: no connection reset on return) and run the same
//! SQL on the same tables (`RAW_DEFAULT_POOL=1`: the raw side uses
//! `mysql_async`'s default pool options instead): what differs is the backend's validation,
//! key building, deadline, span and metrics, and, for locks, its token,
//! guard and keeper task. 32 tasks per side; rounds of 1.5 s alternate raw
//! and im-infra (7 pairs); `RATIO` lines print the median of the per-pair
//! im-infra / raw throughput ratios.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use im_infra::backend::{Backend, Maintenance};
use im_infra::lock::LockOptions;
use im_infra_bench_support::{compare_throughput, server_env, Rounds};
use im_infra_mysql::mysql_async::prelude::Queryable;
use im_infra_mysql::mysql_async::{Opts, Pool};
use im_infra_mysql::{MysqlBackend, MysqlSettings};

const KEYS: usize = 1000;
const NS: &str = "bench/";

fn raw_pool(url: &str, cfg: &MysqlSettings) -> Pool {
    if std::env::var_os("RAW_DEFAULT_POOL").is_some() {
        // mysql_async's defaults, for comparison.
        return Pool::new(Opts::from_url(url).expect("url"));
    }
    Pool::new(cfg.opts().expect("options"))
}

fn main() {
    let Some(url) = server_env("IMINFRA_MYSQL_URL") else {
        return;
    };
    im_infra_bench_support::runtime().block_on(async move {
        let backend = MysqlBackend::builder()
            .url(&url)
            .namespace(NS)
            .build()
            .await
            .expect("connect");
        let pool = raw_pool(&url, backend.settings());
        let prefix = backend.settings().table_prefix.clone();
        let rounds = Rounds::default();

        // Cache get: the same SELECT on the same rows.
        let cache = backend.cache().await.expect("cache");
        let value = Bytes::from(vec![b'x'; 100]);
        let keys: Arc<Vec<String>> = Arc::new((0..KEYS).map(|i| format!("k{i}")).collect());
        for k in keys.iter() {
            cache.set(k, value.clone(), None).await.expect("seed");
        }
        let (c, k) = (cache.clone(), keys.clone());
        let ours = Arc::new(move |i: usize| {
            let (c, k) = (c.clone(), k.clone());
            async move { matches!(c.get(&k[i % KEYS]).await, Ok(Some(_))) }
        });
        let sql: Arc<str> = format!(
            "SELECT v FROM {prefix}cache WHERE k = ? AND (expires_at IS NULL OR expires_at > NOW(6))"
        )
        .into();
        let (p, k, q) = (pool.clone(), keys.clone(), sql.clone());
        let raw = Arc::new(move |i: usize| {
            let (p, k, q) = (p.clone(), k.clone(), q.clone());
            async move {
                let Ok(mut c) = p.get_conn().await else { return false };
                let key = format!("{NS}{}", k[i % KEYS]);
                matches!(c.exec_first::<Vec<u8>, _, _>(&*q, (key.as_bytes(),)).await, Ok(Some(_)))
            }
        });
        compare_throughput("mysql cache get", rounds, raw, ours).await;

        // Config get.
        let center = backend.config().await.expect("config");
        center
            .set("/cfg/key", Bytes::from((0..64).map(|i| format!("{i},")).collect::<String>()))
            .await
            .expect("seed");
        let c = center.clone();
        let ours = Arc::new(move |_: usize| {
            let c = c.clone();
            async move { matches!(c.get_with_version("/cfg/key").await, Ok(Some(_))) }
        });
        let q: Arc<str> = format!("SELECT v, version FROM {prefix}config WHERE k = ?").into();
        let p = pool.clone();
        let raw = Arc::new(move |_: usize| {
            let (p, q) = (p.clone(), q.clone());
            async move {
                let Ok(mut c) = p.get_conn().await else { return false };
                let key = format!("{NS}/cfg/key");
                matches!(c.exec_first::<(Vec<u8>, u64), _, _>(&*q, (key.as_bytes(),)).await, Ok(Some(_)))
            }
        });
        compare_throughput("mysql config get", rounds, raw, ours).await;

        // Lock acquire + release, one key per task (uncontended).
        let locks = backend.lock().await.expect("lock");
        let opts = LockOptions::new(Duration::from_secs(10)).no_renewal();
        let l = locks.clone();
        let ours = Arc::new(move |i: usize| {
            let l = l.clone();
            async move {
                let key = format!("lock{}", i % rounds.tasks);
                match l.try_acquire(&key, opts).await {
                    Ok(Some(g)) => g.release().await.is_ok(),
                    _ => false,
                }
            }
        });
        let take: Arc<str> = format!(
            "UPDATE {prefix}locks SET owner = ?, \
             fence = LAST_INSERT_ID(GREATEST(fence + 1, TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', UTC_TIMESTAMP(6)))), \
             expires_at = NOW(6) + INTERVAL ? MICROSECOND, acquired_at = NOW(6) \
             WHERE k = ? AND (owner IS NULL OR expires_at <= NOW(6) OR owner = ?)"
        )
        .into();
        let seed = format!("INSERT IGNORE INTO {prefix}locks (k, owner, fence, expires_at) VALUES (?, NULL, 0, NOW(6))");
        let give: Arc<str> =
            format!("UPDATE {prefix}locks SET owner = NULL WHERE k = ? AND owner = ? AND expires_at > NOW(6)").into();
        for t in 0..rounds.tasks {
            let key = format!("{NS}rawlock{t}");
            pool.get_conn()
                .await
                .expect("conn")
                .exec_drop(&seed, (key.as_bytes(),))
                .await
                .expect("seed");
        }
        let p = pool.clone();
        let raw = Arc::new(move |i: usize| {
            let (p, take, give) = (p.clone(), take.clone(), give.clone());
            async move {
                let key = format!("{NS}rawlock{}", i % rounds.tasks);
                let owner = format!("raw-{i}");
                let Ok(mut c) = p.get_conn().await else { return false };
                let params = (owner.as_str(), 10_000_000u64, key.as_bytes(), owner.as_str());
                if c.exec_drop(&*take, params).await.is_err()
                    || c.affected_rows() != 1
                {
                    return false;
                }
                drop(c);
                let Ok(mut c) = p.get_conn().await else { return false };
                c.exec_drop(&*give, (key.as_bytes(), owner.as_str())).await.is_ok() && c.affected_rows() == 1
            }
        });
        compare_throughput("mysql lock acquire+release", rounds, raw, ours).await;

        if std::env::var_os("NOISE_FLOOR").is_some() {
            let (p, q) = (pool.clone(), sql.clone());
            let raw = Arc::new(move |i: usize| {
                let (p, q) = (p.clone(), q.clone());
                async move {
                    let Ok(mut c) = p.get_conn().await else { return false };
                    let key = format!("{NS}k{}", i % KEYS);
                    matches!(c.exec_first::<Vec<u8>, _, _>(&*q, (key.as_bytes(),)).await, Ok(Some(_)))
                }
            });
            compare_throughput("mysql raw vs raw (noise floor)", rounds, raw.clone(), raw).await;
        }

        backend.purge_namespace().await.expect("purge");
        backend.close().await.expect("close");
        pool.disconnect().await.expect("disconnect");
    });
}
