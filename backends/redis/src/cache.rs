//! `Cache` on Redis strings.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use im_infra::cache::{Cache, CacheCapabilities, KeyTtl};
use im_infra::{validate, Error, Result};

use crate::keys::CacheKey;
use crate::Shared;

/// The cache of a [`RedisBackend`](crate::RedisBackend): one Redis string
/// per key under `<namespace>:c:`, TTLs with millisecond precision
/// (`PX`), `get_many` by `MGET` and `set_many` by one pipeline. Handed
/// out inside [`ObservedCache`](im_infra::layer::ObservedCache), which
/// checks keys, TTLs and value sizes.
pub(crate) struct RedisCache {
    shared: Arc<Shared>,
}

fn bytes_of(v: Option<Vec<u8>>) -> Option<Bytes> {
    v.map(Bytes::from)
}

/// A `PTTL` answer: -2 absent, -1 no TTL, else milliseconds left.
fn key_ttl(ms: i64) -> Result<KeyTtl> {
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
}

impl RedisCache {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        RedisCache { shared }
    }

    fn key<'a>(&'a self, key: &'a str) -> CacheKey<'a> {
        self.shared.keys.cache_arg(key)
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
        CacheCapabilities::storing(self.shared.client.settings().max_value_bytes)
    }

    async fn get(&self, key: &str) -> Result<Option<Bytes>> {
        let v: Option<Vec<u8>> = self
            .shared
            .client
            .query(redis::cmd("GET").arg(self.key(key)))
            .await?;
        Ok(bytes_of(v))
    }

    async fn set(&self, key: &str, value: Bytes, ttl: Option<Duration>) -> Result<()> {
        let set = Self::set_cmd(self.key(key), &value, ttl, false);
        self.shared.client.query::<()>(&set).await
    }

    async fn set_nx(&self, key: &str, value: Bytes, ttl: Option<Duration>) -> Result<bool> {
        let set = Self::set_cmd(self.key(key), &value, ttl, true);
        let r: Option<String> = self.shared.client.query(&set).await?;
        Ok(r.is_some())
    }

    async fn delete<'k>(&self, keys: &[&'k str]) -> Result<u64> {
        // On a cluster the client splits a multi-key DEL by slot and sums
        // the counts.
        let mut cmd = redis::cmd("DEL");
        for k in keys {
            cmd.arg(self.key(k));
        }
        self.shared.client.query(&cmd).await
    }

    async fn exists(&self, key: &str) -> Result<bool> {
        let n: u64 = self
            .shared
            .client
            .query(redis::cmd("EXISTS").arg(self.key(key)))
            .await?;
        Ok(n > 0)
    }

    async fn expire(&self, key: &str, ttl: Duration) -> Result<bool> {
        let mut cmd = redis::cmd("PEXPIRE");
        cmd.arg(self.key(key)).arg(validate::ttl_millis(ttl));
        let n: u64 = self.shared.client.query(&cmd).await?;
        Ok(n == 1)
    }

    async fn ttl(&self, key: &str) -> Result<KeyTtl> {
        let ms: i64 = self
            .shared
            .client
            .query(redis::cmd("PTTL").arg(self.key(key)))
            .await?;
        key_ttl(ms)
    }

    /// `GET` and `PTTL` in one pipeline: one round trip.
    async fn get_with_ttl(&self, key: &str) -> Result<(Option<Bytes>, KeyTtl)> {
        let mut pipe = redis::pipe();
        pipe.cmd("GET")
            .arg(self.key(key))
            .cmd("PTTL")
            .arg(self.key(key));
        let (value, ms): (Option<Vec<u8>>, i64) = self.shared.client.pipe(&pipe).await?;
        Ok((bytes_of(value), key_ttl(ms)?))
    }

    /// One pipeline of `GET` and `PTTL` per key on a single node; on a
    /// cluster, where a pipeline stays in one slot, one pipeline per key,
    /// all at once.
    async fn get_many_with_ttl<'k>(
        &self,
        keys: &[&'k str],
    ) -> Result<Vec<(Option<Bytes>, KeyTtl)>> {
        if self.shared.client.settings().is_cluster() {
            return futures::future::try_join_all(keys.iter().map(|k| self.get_with_ttl(k))).await;
        }
        let mut pipe = redis::pipe();
        for k in keys {
            pipe.cmd("GET")
                .arg(self.key(k))
                .cmd("PTTL")
                .arg(self.key(k));
        }
        let read: Vec<(Option<Vec<u8>>, i64)> = self.shared.client.pipe(&pipe).await?;
        read.into_iter()
            .map(|(value, ms)| Ok((bytes_of(value), key_ttl(ms)?)))
            .collect()
    }

    async fn incr_by(&self, key: &str, delta: i64) -> Result<i64> {
        let mut cmd = redis::cmd("INCRBY");
        cmd.arg(self.key(key)).arg(delta);
        self.shared.client.query(&cmd).await
    }

    async fn get_many<'k>(&self, keys: &[&'k str]) -> Result<Vec<Option<Bytes>>> {
        let mut cmd = redis::cmd("MGET");
        for k in keys {
            cmd.arg(self.key(k));
        }
        let vals: Vec<Option<Vec<u8>>> = self.shared.client.query(&cmd).await?;
        Ok(vals.into_iter().map(bytes_of).collect())
    }

    async fn set_many<'k>(
        &self,
        entries: &[(&'k str, Bytes)],
        ttl: Option<Duration>,
    ) -> Result<()> {
        let cmds = entries
            .iter()
            .map(|(k, v)| Self::set_cmd(self.key(k), v, ttl, false));
        if self.shared.client.settings().is_cluster() {
            // A cluster pipeline must stay in one slot: the SETs go out
            // together on the multiplexed connections instead.
            let client = &self.shared.client;
            let cmds: Vec<redis::Cmd> = cmds.collect();
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
    }
}
