//! `Cache` on Redis strings.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use im_infra::cache::{Cache, CacheCapabilities, KeyTtl};
use im_infra::telemetry::OpMetrics;
use im_infra::{validate, Error, Result};

use crate::keys::CacheKey;
use crate::Shared;

struct Ops {
    get: OpMetrics,
    set: OpMetrics,
    set_nx: OpMetrics,
    delete: OpMetrics,
    exists: OpMetrics,
    expire: OpMetrics,
    ttl: OpMetrics,
    incr_by: OpMetrics,
    get_many: OpMetrics,
    set_many: OpMetrics,
}

/// The cache of a [`RedisBackend`](crate::RedisBackend): one Redis string
/// per key under `<namespace>:c:`, TTLs with millisecond precision
/// (`PX`), `get_many` by `MGET` and `set_many` by one pipeline.
pub struct RedisCache {
    shared: Arc<Shared>,
    ops: Ops,
}

impl std::fmt::Debug for RedisCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisCache").finish_non_exhaustive()
    }
}

fn bytes_of(v: Option<Vec<u8>>) -> Option<Bytes> {
    v.map(Bytes::from)
}

impl RedisCache {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        let m = |op| OpMetrics::new(crate::NAME, "cache", op);
        RedisCache {
            shared,
            ops: Ops {
                get: m("cache.get"),
                set: m("cache.set"),
                set_nx: m("cache.set_nx"),
                delete: m("cache.delete"),
                exists: m("cache.exists"),
                expire: m("cache.expire"),
                ttl: m("cache.ttl"),
                incr_by: m("cache.incr_by"),
                get_many: m("cache.get_many"),
                set_many: m("cache.set_many"),
            },
        }
    }

    fn key<'a>(&'a self, key: &'a str) -> Result<CacheKey<'a>> {
        validate::key(key)?;
        Ok(self.shared.keys.cache_arg(key))
    }

    fn check_value(&self, v: &Bytes) -> Result<()> {
        validate::value(v.len(), self.shared.client.cfg().max_value_bytes)
    }

    fn set_cmd(key: CacheKey<'_>, value: &Bytes, ttl: Option<Duration>, nx: bool) -> redis::Cmd {
        let mut cmd = redis::cmd("SET");
        cmd.arg(key).arg(value.as_ref());
        if nx {
            cmd.arg("NX");
        }
        if let Some(ttl) = ttl {
            cmd.arg("PX").arg(validate::ttl_millis(ttl));
        }
        cmd
    }
}

#[async_trait]
impl Cache for RedisCache {
    fn capabilities(&self) -> CacheCapabilities {
        CacheCapabilities::storing(self.shared.client.cfg().max_value_bytes)
    }

    async fn get(&self, key: &str) -> Result<Option<Bytes>> {
        self.ops
            .get
            .run(async {
                let k = self.key(key)?;
                let v: Option<Vec<u8>> = self.shared.client.query(redis::cmd("GET").arg(k)).await?;
                Ok(bytes_of(v))
            })
            .await
    }

    async fn set(&self, key: &str, value: Bytes, ttl: Option<Duration>) -> Result<()> {
        self.ops
            .set
            .run(async {
                let k = self.key(key)?;
                validate::opt_ttl(ttl)?;
                self.check_value(&value)?;
                self.shared
                    .client
                    .query::<()>(&Self::set_cmd(k, &value, ttl, false))
                    .await
            })
            .await
    }

    async fn set_nx(&self, key: &str, value: Bytes, ttl: Option<Duration>) -> Result<bool> {
        self.ops
            .set_nx
            .run(async {
                let k = self.key(key)?;
                validate::opt_ttl(ttl)?;
                self.check_value(&value)?;
                let r: Option<String> = self
                    .shared
                    .client
                    .query(&Self::set_cmd(k, &value, ttl, true))
                    .await?;
                Ok(r.is_some())
            })
            .await
    }

    async fn delete<'k>(&self, keys: &[&'k str]) -> Result<u64> {
        self.ops
            .delete
            .run(async {
                validate::keys(keys)?;
                // On a cluster the client splits a multi-key DEL by slot
                // and sums the counts.
                let mut cmd = redis::cmd("DEL");
                for k in keys {
                    cmd.arg(self.shared.keys.cache_arg(k));
                }
                self.shared.client.query(&cmd).await
            })
            .await
    }

    async fn exists(&self, key: &str) -> Result<bool> {
        self.ops
            .exists
            .run(async {
                let k = self.key(key)?;
                let n: u64 = self
                    .shared
                    .client
                    .query(redis::cmd("EXISTS").arg(k))
                    .await?;
                Ok(n > 0)
            })
            .await
    }

    async fn expire(&self, key: &str, ttl: Duration) -> Result<bool> {
        self.ops
            .expire
            .run(async {
                let k = self.key(key)?;
                validate::ttl(ttl)?;
                let n: u64 = self
                    .shared
                    .client
                    .query(redis::cmd("PEXPIRE").arg(k).arg(validate::ttl_millis(ttl)))
                    .await?;
                Ok(n == 1)
            })
            .await
    }

    async fn ttl(&self, key: &str) -> Result<KeyTtl> {
        self.ops
            .ttl
            .run(async {
                let k = self.key(key)?;
                let ms: i64 = self.shared.client.query(redis::cmd("PTTL").arg(k)).await?;
                Ok(match ms {
                    -2 => KeyTtl::Missing,
                    -1 => KeyTtl::Persistent,
                    ms if ms >= 0 => KeyTtl::Expires(Duration::from_millis(ms as u64)),
                    other => {
                        return Err(Error::new(
                            im_infra::ErrorKind::Internal,
                            format!("PTTL answered {other}"),
                        ))
                    }
                })
            })
            .await
    }

    async fn incr_by(&self, key: &str, delta: i64) -> Result<i64> {
        self.ops
            .incr_by
            .run(async {
                let k = self.key(key)?;
                self.shared
                    .client
                    .query(redis::cmd("INCRBY").arg(k).arg(delta))
                    .await
            })
            .await
    }

    async fn get_many<'k>(&self, keys: &[&'k str]) -> Result<Vec<Option<Bytes>>> {
        self.ops
            .get_many
            .run(async {
                validate::keys(keys)?;
                let mut cmd = redis::cmd("MGET");
                for k in keys {
                    cmd.arg(self.shared.keys.cache_arg(k));
                }
                let vals: Vec<Option<Vec<u8>>> = self.shared.client.query(&cmd).await?;
                Ok(vals.into_iter().map(bytes_of).collect())
            })
            .await
    }

    async fn set_many<'k>(
        &self,
        entries: &[(&'k str, Bytes)],
        ttl: Option<Duration>,
    ) -> Result<()> {
        self.ops
            .set_many
            .run(async {
                if entries.is_empty() {
                    return Err(Error::invalid_argument("at least one entry is required"));
                }
                validate::opt_ttl(ttl)?;
                let mut cmds = Vec::with_capacity(entries.len());
                for (k, v) in entries {
                    validate::key(k)?;
                    self.check_value(v)?;
                    cmds.push(Self::set_cmd(self.shared.keys.cache_arg(k), v, ttl, false));
                }
                if self.shared.client.cfg().is_cluster() {
                    // A cluster pipeline must stay in one slot: the SETs go
                    // out together on the multiplexed connections instead.
                    let client = &self.shared.client;
                    futures::future::try_join_all(cmds.iter().map(|c| client.query::<()>(c)))
                        .await
                        .map(drop)
                } else {
                    let mut p = redis::pipe();
                    for c in cmds {
                        p.add_command(c).ignore();
                    }
                    self.shared.client.pipe::<()>(&p).await
                }
            })
            .await
    }
}
