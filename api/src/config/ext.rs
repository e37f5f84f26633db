//! Typed (JSON) access to a [`ConfigCenter`].

use async_trait::async_trait;
use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::ConfigCenter;
use crate::error::{Error, Result};

/// Conveniences for every [`ConfigCenter`], including `dyn ConfigCenter`.
#[async_trait]
pub trait ConfigCenterExt: ConfigCenter {
    /// The raw value of `key`.
    async fn get(&self, key: &str) -> Result<Option<Bytes>> {
        Ok(self.get_with_version(key).await?.map(|v| v.value))
    }

    /// The value of `key` decoded from JSON; a malformed value is a
    /// `Serialization` error naming the key.
    async fn get_json<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>> {
        Ok(self.get_json_with_version(key).await?.map(|(v, _)| v))
    }

    /// The decoded value of `key` and its version.
    async fn get_json_with_version<T: DeserializeOwned>(
        &self,
        key: &str,
    ) -> Result<Option<(T, u64)>> {
        match self.get_with_version(key).await? {
            None => Ok(None),
            Some(v) => serde_json::from_slice(&v.value)
                .map(|t| Some((t, v.version)))
                .map_err(|e| Error::serialization(key, e)),
        }
    }

    /// Stores `value` as JSON; returns the new version.
    async fn set_json<T: Serialize + Sync>(&self, key: &str, value: &T) -> Result<u64> {
        let raw = serde_json::to_vec(value).map_err(|e| Error::serialization(key, e))?;
        self.set(key, Bytes::from(raw)).await
    }

    /// Compare-and-set of a JSON value.
    async fn compare_and_set_json<T: Serialize + Sync>(
        &self,
        key: &str,
        value: &T,
        expected_version: u64,
    ) -> Result<u64> {
        let raw = serde_json::to_vec(value).map_err(|e| Error::serialization(key, e))?;
        self.compare_and_set(key, Bytes::from(raw), expected_version)
            .await
    }
}

impl<C: ConfigCenter + ?Sized> ConfigCenterExt for C {}
