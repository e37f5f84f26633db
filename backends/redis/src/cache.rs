//! `Cache` on Redis strings.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use im_infra::cache::{Cache, CacheCapabilities, KeyTtl};
use im_infra::{validate, Error, Result};
use redis::Value;

use crate::client;
use crate::error::unexpected;
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

/// `GET` and `PTTL` of every key, in one command (`scripts/get_with_ttl.lua`).
static READ_WITH_TTL: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(include_str!("scripts/get_with_ttl.lua")));

/// The values and TTLs of `n` keys from [`READ_WITH_TTL`]'s flat reply.
fn decode_reads(reply: Value, n: usize) -> Result<Vec<(Option<Bytes>, KeyTtl)>> {
    let Value::Array(items) = reply else {
        return Err(unexpected("not an array"));
    };
    if items.len() != 2 * n {
        return Err(unexpected("a value and a TTL per key"));
    }
    let mut out = Vec::with_capacity(n);
    let mut items = items.into_iter();
    while let (Some(value), Some(ttl)) = (items.next(), items.next()) {
        let value = match value {
            Value::Nil => None,
            Value::BulkString(v) => Some(Bytes::from(v)),
            _ => return Err(unexpected("a value that is not a string")),
        };
        let Value::Int(ms) = ttl else {
            return Err(unexpected("a TTL that is not a number"));
        };
        out.push((value, key_ttl(ms)?));
    }
    Ok(out)
}

impl RedisCache {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        RedisCache { shared }
    }

    /// The values and TTLs of `keys` by one `EVALSHA`, the command sized
    /// before the keys are written into it.
    async fn read_with_ttl(&self, keys: &[&str]) -> Result<Vec<(Option<Bytes>, KeyTtl)>> {
        let script = &*READ_WITH_TTL;
        let bytes: usize = keys.iter().map(|k| self.key(k).len()).sum();
        let mut cmd = client::evalsha_sized(script, keys.len(), keys.len(), bytes);
        for k in keys {
            cmd.arg(self.key(k));
        }
        let reply: Value = self.shared.client.script(script, &cmd).await?;
        decode_reads(reply, keys.len())
    }

    fn key<'a>(&'a self, key: &'a str) -> CacheKey<'a> {
        self.shared.keys.cache_arg(key)
    }

    fn set_cmd(key: CacheKey<'_>, value: &Bytes, ttl: Option<Duration>, nx: bool) -> redis::Cmd {
        let mut cmd = command("SET", key, 5, value.len() + 24);
        cmd.arg(value.as_ref());
        if nx {
            cmd.arg("NX");
        }
        if let Some(ttl) = ttl {
            cmd.arg("PX").arg(validate::ttl_millis(ttl));
        }
        cmd
    }
}

/// `name` over `key`, sized once for `args` more arguments of `bytes` in
/// all (a command grown argument by argument allocates again and again).
fn command(name: &'static str, key: CacheKey<'_>, args: usize, bytes: usize) -> redis::Cmd {
    let mut cmd = redis::Cmd::with_capacity(2 + args, name.len() + key.len() + bytes);
    cmd.arg(name).arg(key);
    cmd
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
            .query(&command("GET", self.key(key), 0, 0))
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

    /// `GET` and `PTTL` in one script call: one command, one round trip,
    /// no write in between.
    async fn get_with_ttl(&self, key: &str) -> Result<(Option<Bytes>, KeyTtl)> {
        let mut read = self.read_with_ttl(&[key]).await?;
        read.pop().ok_or_else(|| unexpected("no answer"))
    }

    /// All keys in one script call on a single node; on a cluster, where a
    /// script's keys stay in one slot, one call per key, all at once.
    async fn get_many_with_ttl<'k>(
        &self,
        keys: &[&'k str],
    ) -> Result<Vec<(Option<Bytes>, KeyTtl)>> {
        if self.shared.client.settings().is_cluster() {
            return futures::future::try_join_all(keys.iter().map(|k| self.get_with_ttl(k))).await;
        }
        self.read_with_ttl(keys).await
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flat_reply_decodes_to_a_value_and_a_ttl_per_key() {
        let reply = Value::Array(vec![
            Value::BulkString(b"v".to_vec()),
            Value::Int(1500),
            Value::Nil,
            Value::Int(-2),
            Value::BulkString(Vec::new()),
            Value::Int(-1),
        ]);
        let read = decode_reads(reply, 3).expect("decoded");
        assert_eq!(
            read,
            vec![
                (
                    Some(Bytes::from_static(b"v")),
                    KeyTtl::Expires(Duration::from_millis(1500))
                ),
                (None, KeyTtl::Missing),
                (Some(Bytes::new()), KeyTtl::Persistent),
            ]
        );
    }

    #[test]
    fn a_reply_of_another_shape_is_an_internal_error() {
        let pair = || vec![Value::Nil, Value::Int(-2)];
        for (reply, n) in [
            (Value::Nil, 1),
            (Value::Array(pair()), 2),
            (Value::Array(vec![Value::Int(1), Value::Int(-1)]), 1),
            (Value::Array(vec![Value::Nil, Value::Nil]), 1),
            (Value::Array(vec![Value::Nil, Value::Int(-7)]), 1),
        ] {
            let e = decode_reads(reply, n).expect_err("not decodable");
            assert_eq!(e.kind(), im_infra::ErrorKind::Internal, "{e}");
        }
    }
}
