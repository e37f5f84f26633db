//! Key names. Every key starts with `<namespace>:`; keys that one script
//! touches together share a Redis Cluster hash tag (`{...}`).

use std::io::Write;

use redis::{RedisWrite, ToRedisArgs};

/// A cache key written straight into the command (`<ns>:c:<key>`), without
/// building a `String` first: the hot path of every cache operation.
pub(crate) struct CacheKey<'a>(pub &'a str, pub &'a str);

impl ToRedisArgs for CacheKey<'_> {
    fn write_redis_args<W>(&self, out: &mut W)
    where
        W: ?Sized + RedisWrite,
    {
        let mut w = out.writer_for_next_arg();
        let _ = w.write_all(self.0.as_bytes());
        let _ = w.write_all(b":c:");
        let _ = w.write_all(self.1.as_bytes());
    }
}

impl CacheKey<'_> {
    /// Its length in bytes, to size a command before writing it.
    pub(crate) fn len(&self) -> usize {
        self.0.len() + 3 + self.1.len()
    }
}

/// A limiter bucket key written straight into the command
/// (`<ns>:rl:<len(resource)>:<resource>:<key>`).
pub(crate) struct LimiterKey<'a>(pub &'a str, pub &'a str, pub &'a str);

impl ToRedisArgs for LimiterKey<'_> {
    fn write_redis_args<W>(&self, out: &mut W)
    where
        W: ?Sized + RedisWrite,
    {
        let mut len = itoa::Buffer::new();
        let mut w = out.writer_for_next_arg();
        let _ = w.write_all(self.0.as_bytes());
        let _ = w.write_all(b":rl:");
        let _ = w.write_all(len.format(self.1.len()).as_bytes());
        let _ = w.write_all(b":");
        let _ = w.write_all(self.1.as_bytes());
        let _ = w.write_all(b":");
        let _ = w.write_all(self.2.as_bytes());
    }
}

/// Builds the keys of one namespace.
#[derive(Debug, Clone)]
pub(crate) struct Keys {
    ns: String,
}

impl Keys {
    pub(crate) fn new(ns: &str) -> Self {
        Keys { ns: ns.to_owned() }
    }

    /// The cache key of `key`, as a command argument.
    pub(crate) fn cache_arg<'a>(&'a self, key: &'a str) -> CacheKey<'a> {
        CacheKey(&self.ns, key)
    }

    /// The bucket key of (`resource`, `key`), as a command argument.
    pub(crate) fn limiter_arg<'a>(&'a self, resource: &'a str, key: &'a str) -> LimiterKey<'a> {
        LimiterKey(&self.ns, resource, key)
    }

    /// The prefix of every cache key (`<ns>:c:`).
    #[cfg(feature = "near-cache")]
    pub(crate) fn cache_prefix(&self) -> String {
        format!("{}:c:", self.ns)
    }

    /// Pattern matching every key of the namespace (for clean-up tools).
    pub(crate) fn all(&self) -> String {
        format!("{}:*", self.ns)
    }

    #[cfg(test)]
    pub(crate) fn cache(&self, key: &str) -> String {
        format!("{}:c:{key}", self.ns)
    }

    /// The resource length keeps ("a:b", "c") and ("a", "b:c") apart.
    #[cfg(test)]
    pub(crate) fn limiter(&self, resource: &str, key: &str) -> String {
        format!("{}:rl:{}:{resource}:{key}", self.ns, resource.len())
    }

    /// The lock hash and its fencing counter share a hash tag: both start
    /// with `{L<key>`, so their first `{...}` is the same and never empty.
    pub(crate) fn lock(&self, key: &str) -> String {
        format!("{}:l:{{L{key}}}", self.ns)
    }

    pub(crate) fn lock_fence(&self, key: &str) -> String {
        format!("{}:l:{{L{key}}}:f", self.ns)
    }

    /// Channel on which releases are announced (payload: the lock key).
    pub(crate) fn lock_channel(&self) -> String {
        format!("{}:l:released", self.ns)
    }

    pub(crate) fn once(&self, key: &str) -> String {
        format!("{}:o:{key}", self.ns)
    }

    /// Config center keys: revision counter, values, key index, change log.
    pub(crate) fn cfg(&self, part: &str) -> String {
        format!("{}:{{cfg}}:{part}", self.ns)
    }

    /// Registry keys: instances, expiries, name index, change log, revision.
    pub(crate) fn reg(&self, part: &str) -> String {
        format!("{}:{{reg}}:{part}", self.ns)
    }

    /// Worker-id keys: all in one slot so one script can scan them.
    pub(crate) fn worker_prefix(&self) -> String {
        format!("{}:{{wid}}:", self.ns)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot_tag(key: &str) -> &str {
        match key.find('{') {
            Some(open) => match key[open + 1..].find('}') {
                Some(len) if len > 0 => &key[open + 1..open + 1 + len],
                _ => key,
            },
            None => key,
        }
    }

    #[test]
    fn lock_keys_share_a_slot_whatever_the_key() {
        let k = Keys::new("ns");
        for key in ["plain", "a}b", "{x}", "}", "{", "a{b}c"] {
            assert_eq!(
                slot_tag(&k.lock(key)),
                slot_tag(&k.lock_fence(key)),
                "key {key:?}"
            );
        }
    }

    #[test]
    fn argument_forms_match_the_string_forms() {
        let k = Keys::new("ns");
        assert_eq!(
            k.cache_arg("a:b").to_redis_args(),
            vec![k.cache("a:b").into_bytes()]
        );
        assert_eq!(
            k.limiter_arg("api", "u:1").to_redis_args(),
            vec![k.limiter("api", "u:1").into_bytes()]
        );
    }

    #[test]
    fn limiter_keys_do_not_collide_across_resources() {
        let k = Keys::new("ns");
        assert_ne!(k.limiter("a:b", "c"), k.limiter("a", "b:c"));
    }
}
