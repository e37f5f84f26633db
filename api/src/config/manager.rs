//! A typed configuration that loads from the config center, falls back to
//! defaults, validates, and hot-reloads.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use parking_lot::Mutex;
use std::time::Duration;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{app_env, config_path_in, ConfigCenter, ConfigEvent, ConfigEventKind, WatchOptions};
use crate::error::{Error, ErrorKind, Result};
use crate::retry::RetrySettings;

/// A component that applies a new configuration while running.
#[cfg_attr(feature = "mock", mockall::automock)]
#[async_trait]
pub trait HotReloadable<T: Send + Sync + 'static>: Send + Sync {
    /// Applies `config`. An error is logged; the manager keeps the new value.
    async fn reload(&self, config: Arc<T>) -> Result<()>;
}

type Validator<T> = Arc<dyn Fn(&T) -> std::result::Result<(), String> + Send + Sync>;
type Listener<T> = Arc<dyn Fn(&T) + Send + Sync>;

/// The value in force and its version (0: the default), swapped together
/// so that no reader sees one without the other.
struct Applied<T> {
    value: Arc<T>,
    version: u64,
}

struct Inner<T> {
    center: Arc<dyn ConfigCenter>,
    path: String,
    default: Arc<T>,
    current: ArcSwap<Applied<T>>,
    /// Highest version processed (values and deletes).
    seen: AtomicU64,
    validator: Option<Validator<T>>,
    listeners: Vec<Listener<T>>,
    reloadables: Vec<Arc<dyn HotReloadable<T>>>,
    load_timeout: Duration,
    retry: RetrySettings,
    task: Mutex<Option<(CancellationToken, JoinHandle<()>)>>,
}

impl<T> Drop for Inner<T> {
    fn drop(&mut self) {
        if let Some((stop, _)) = self.task.lock().take() {
            stop.cancel();
        }
    }
}

/// The typed configuration of one component of one service, stored as JSON
/// at `/config/{env}/{service}/{component}`.
///
/// - [`start`](Self::start) loads it; if the center is unreachable (within
///   the load timeout), the key is absent, or the value is malformed or
///   invalid, the default stays in force and a warning is logged — it never
///   fails and never panics.
/// - A background watch then applies every valid change: the new value is
///   swapped in atomically, update callbacks and [`HotReloadable`]
///   components are told. An invalid value is rejected and the last good
///   value kept; a deleted key reverts to the default.
/// - [`current`](Self::current) and [`with_current`](Self::with_current) are
///   lock-free reads.
///
/// ```
/// use std::sync::Arc;
/// use im_infra::config::{ConfigCenter, ConfigManager};
///
/// #[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
/// struct CacheSettings { max_entries: u32 }
///
/// async fn wire(center: Arc<dyn ConfigCenter>) -> im_infra::Result<()> {
///     let settings = ConfigManager::<CacheSettings>::builder(center, "im-logic", "cache")
///         .validator(|c| if c.max_entries == 0 { Err("max_entries must be positive".into()) } else { Ok(()) })
///         .on_update(|c| println!("now {} entries", c.max_entries))
///         .build()?;
///     settings.start().await;
///     println!("{}", settings.current().max_entries);
///     settings.stop().await;
///     Ok(())
/// }
/// ```
pub struct ConfigManager<T> {
    inner: Arc<Inner<T>>,
}

impl<T> Clone for ConfigManager<T> {
    fn clone(&self) -> Self {
        ConfigManager {
            inner: self.inner.clone(),
        }
    }
}

/// Builds a [`ConfigManager`].
pub struct ConfigManagerBuilder<T> {
    center: Arc<dyn ConfigCenter>,
    env: Option<String>,
    service: String,
    component: String,
    path: Option<String>,
    default: Option<T>,
    validator: Option<Validator<T>>,
    listeners: Vec<Listener<T>>,
    reloadables: Vec<Arc<dyn HotReloadable<T>>>,
    load_timeout: Duration,
    retry: RetrySettings,
}

impl<T> ConfigManagerBuilder<T>
where
    T: DeserializeOwned + Default + Send + Sync + 'static,
{
    /// Uses `env` instead of `APP_ENV`.
    #[must_use]
    pub fn env(mut self, env: impl Into<String>) -> Self {
        self.env = Some(env.into());
        self
    }

    /// Uses an explicit key instead of the path convention.
    #[must_use]
    pub fn path(mut self, path: impl Into<String>) -> Self {
        self.path = Some(path.into());
        self
    }

    /// The value in force until a valid one is loaded (default:
    /// `T::default()`).
    #[must_use]
    pub fn default_value(mut self, value: T) -> Self {
        self.default = Some(value);
        self
    }

    /// A check every loaded value must pass before it is applied (one that
    /// panics rejects the value).
    #[must_use]
    pub fn validator(
        mut self,
        f: impl Fn(&T) -> std::result::Result<(), String> + Send + Sync + 'static,
    ) -> Self {
        self.validator = Some(Arc::new(f));
        self
    }

    /// Called with every newly applied value. A callback that panics is
    /// logged and skipped; the other callbacks, and later values, are not
    /// affected.
    #[must_use]
    pub fn on_update(mut self, f: impl Fn(&T) + Send + Sync + 'static) -> Self {
        self.listeners.push(Arc::new(f));
        self
    }

    /// A component reloaded with every newly applied value (a failed or
    /// panicking reload is logged; the value stays applied).
    #[must_use]
    pub fn reloadable(mut self, component: Arc<dyn HotReloadable<T>>) -> Self {
        self.reloadables.push(component);
        self
    }

    /// Bound of the initial load (default 3 s).
    #[must_use]
    pub fn load_timeout(mut self, timeout: Duration) -> Self {
        self.load_timeout = timeout;
        self
    }

    /// Backoff between reconnection attempts of the watch.
    #[must_use]
    pub fn retry(mut self, retry: RetrySettings) -> Self {
        self.retry = retry;
        self
    }

    /// Builds the manager (not started). Fails with `InvalidConfig` for a
    /// bad path segment or a default value that the validator rejects.
    pub fn build(self) -> Result<ConfigManager<T>> {
        let path = match self.path {
            Some(p) => {
                crate::validate::key(&p)?;
                p
            }
            None => config_path_in(
                &self.env.unwrap_or_else(app_env),
                &self.service,
                &self.component,
            )?,
        };
        let default = Arc::new(self.default.unwrap_or_default());
        if let Some(v) = &self.validator {
            v(&default).map_err(|msg| {
                Error::new(
                    ErrorKind::InvalidConfig,
                    format!("the default value of {path} is invalid: {msg}"),
                )
            })?;
        }
        self.retry.validate()?;
        Ok(ConfigManager {
            inner: Arc::new(Inner {
                center: self.center,
                path,
                current: ArcSwap::from_pointee(Applied {
                    value: default.clone(),
                    version: 0,
                }),
                default,
                seen: AtomicU64::new(0),
                validator: self.validator,
                listeners: self.listeners,
                reloadables: self.reloadables,
                load_timeout: self.load_timeout,
                retry: self.retry,
                task: Mutex::new(None),
            }),
        })
    }
}

impl<T> ConfigManager<T>
where
    T: DeserializeOwned + Default + Send + Sync + 'static,
{
    /// A builder for `/config/{APP_ENV}/{service}/{component}` on `center`.
    pub fn builder(
        center: Arc<dyn ConfigCenter>,
        service: &str,
        component: &str,
    ) -> ConfigManagerBuilder<T> {
        ConfigManagerBuilder {
            center,
            env: None,
            service: service.to_owned(),
            component: component.to_owned(),
            path: None,
            default: None,
            validator: None,
            listeners: Vec::new(),
            reloadables: Vec::new(),
            load_timeout: Duration::from_secs(3),
            retry: RetrySettings {
                max_retries: u32::MAX,
                initial_interval: Duration::from_millis(100),
                max_interval: Duration::from_secs(5),
                multiplier: 2.0,
                jitter: true,
            },
        }
    }

    /// Loads the current value and starts watching. Never fails: problems
    /// are logged and the default (or last good value) stays in force.
    /// Calling it again while started does nothing.
    pub async fn start(&self) {
        if self.is_started() {
            return;
        }
        let inner = &self.inner;
        let loaded = tokio::time::timeout(
            inner.load_timeout,
            inner.center.get_with_version(&inner.path),
        )
        .await;
        match loaded {
            Ok(Ok(Some(v))) => {
                Inner::apply(inner, v.value, v.version).await;
            }
            Ok(Ok(None)) => {
                tracing::info!(path = %inner.path, "no configuration stored; using the default");
            }
            Ok(Err(e)) => {
                tracing::warn!(path = %inner.path, error = %e, "config center unavailable; using the default");
            }
            Err(_) => {
                tracing::warn!(path = %inner.path, timeout = ?inner.load_timeout, "config center did not answer in time; using the default");
            }
        }
        let stop = CancellationToken::new();
        let handle = tokio::spawn(watch_loop(
            Arc::downgrade(inner),
            inner.center.clone(),
            inner.path.clone(),
            inner.retry.clone(),
            stop.clone(),
        ));
        let mut task = inner.task.lock();
        if let Some((old_stop, _)) = task.replace((stop, handle)) {
            old_stop.cancel();
        }
    }

    /// Stops watching; the current value stays readable.
    pub async fn stop(&self) {
        let task = self.inner.task.lock().take();
        if let Some((stop, handle)) = task {
            stop.cancel();
            let _ = handle.await;
        }
    }

    /// Whether the watch is running.
    pub fn is_started(&self) -> bool {
        self.inner.task.lock().is_some()
    }

    /// The value in force.
    pub fn current(&self) -> Arc<T> {
        self.inner.current.load().value.clone()
    }

    /// The value in force and its version, read together (a reload between
    /// two calls of [`current`](Self::current) and
    /// [`version`](Self::version) cannot mix them).
    pub fn current_with_version(&self) -> (Arc<T>, u64) {
        let applied = self.inner.current.load();
        (applied.value.clone(), applied.version)
    }

    /// Runs `f` on the value in force without cloning the `Arc`.
    pub fn with_current<R>(&self, f: impl FnOnce(&T) -> R) -> R {
        f(&self.inner.current.load().value)
    }

    /// The version of the value in force (0 while the default is in force).
    pub fn version(&self) -> u64 {
        self.inner.current.load().version
    }

    /// The key this manager reads.
    pub fn path(&self) -> &str {
        &self.inner.path
    }

    /// The default value.
    pub fn default_value(&self) -> Arc<T> {
        self.inner.default.clone()
    }

    /// Validates `value` and stores it in the config center (the watch then
    /// applies it here and in every other process). Returns the version.
    pub async fn publish(&self, value: &T) -> Result<u64>
    where
        T: Serialize,
    {
        if let Some(v) = &self.inner.validator {
            v(value).map_err(|msg| Error::new(ErrorKind::InvalidConfig, msg))?;
        }
        let raw =
            serde_json::to_vec(value).map_err(|e| Error::serialization(&self.inner.path, e))?;
        self.inner
            .center
            .set(&self.inner.path, Bytes::from(raw))
            .await
    }
}

impl<T> Inner<T>
where
    T: DeserializeOwned + Send + Sync + 'static,
{
    /// Decodes, validates and swaps in a value; returns whether it was applied.
    async fn apply(this: &Arc<Self>, raw: Bytes, version: u64) -> bool {
        // One atomic step: of two callers with the same version (the load
        // and the watch's re-read), only one goes on.
        if version <= this.seen.fetch_max(version, Ordering::AcqRel) {
            return false;
        }
        let value: T = match serde_json::from_slice(&raw) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(path = %this.path, version, error = %e, "malformed configuration ignored; keeping the last good value");
                return false;
            }
        };
        if let Some(validate) = &this.validator {
            // A validator that panics rejects the value; the manager goes on.
            let verdict = std::panic::catch_unwind(AssertUnwindSafe(|| validate(&value)))
                .unwrap_or_else(|_| Err("the validator panicked".into()));
            if let Err(msg) = verdict {
                tracing::warn!(path = %this.path, version, reason = %msg, "invalid configuration rejected; keeping the last good value");
                return false;
            }
        }
        Self::swap(this, Arc::new(value), version).await;
        true
    }

    async fn revert_to_default(this: &Arc<Self>, version: u64) {
        if version <= this.seen.fetch_max(version, Ordering::AcqRel) {
            return;
        }
        if this.current.load().version == 0 {
            return;
        }
        tracing::info!(path = %this.path, version, "configuration deleted; reverting to the default");
        Self::swap(this, this.default.clone(), 0).await;
    }

    async fn swap(this: &Arc<Self>, value: Arc<T>, version: u64) {
        this.current.store(Arc::new(Applied {
            value: value.clone(),
            version,
        }));
        tracing::info!(path = %this.path, version, "configuration applied");
        // A callback or component that panics is logged and skipped: the
        // others still get the value, and later values still apply.
        for listener in &this.listeners {
            if std::panic::catch_unwind(AssertUnwindSafe(|| listener(&value))).is_err() {
                tracing::error!(path = %this.path, version, "an update callback panicked");
            }
        }
        for r in &this.reloadables {
            match AssertUnwindSafe(r.reload(value.clone()))
                .catch_unwind()
                .await
            {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(path = %this.path, error = %e, "hot reload of a component failed")
                }
                Err(_) => {
                    tracing::error!(path = %this.path, version, "hot reload of a component panicked")
                }
            }
        }
    }
}

/// Follows the config at `path` until `stop`: each connection reads the
/// current value, then applies the watch's events; after a failure or the
/// end of the stream it backs off with `retry` and connects again.
async fn watch_loop<T>(
    inner: Weak<Inner<T>>,
    center: Arc<dyn ConfigCenter>,
    path: String,
    retry: RetrySettings,
    stop: CancellationToken,
) where
    T: DeserializeOwned + Send + Sync + 'static,
{
    let mut delays = retry.delays_forever();
    while !stop.is_cancelled() {
        match follow(&inner, &*center, &path, &stop).await {
            Followed::Ended => return,
            Followed::Failed => {}
            // The delays start again after a connection that worked.
            Followed::Lost => delays = retry.delays_forever(),
        }
        let delay = delays.next().unwrap_or(Duration::from_secs(5));
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// How one connection of [`follow`] ended.
enum Followed {
    /// Stopped, or the manager was dropped: the loop ends.
    Ended,
    /// Reading the value or opening the watch failed.
    Failed,
    /// The watch was open, then failed or ended.
    Lost,
}

/// One connection: re-reads the value (so nothing is missed across
/// reconnections), then applies the watch's events.
async fn follow<T>(
    inner: &Weak<Inner<T>>,
    center: &dyn ConfigCenter,
    path: &str,
    stop: &CancellationToken,
) -> Followed
where
    T: DeserializeOwned + Send + Sync + 'static,
{
    let read = center.get_with_version(path).await;
    let Some(this) = inner.upgrade() else {
        return Followed::Ended;
    };
    let after = match read {
        Ok(Some(v)) => {
            Inner::apply(&this, v.value, v.version).await;
            Some(this.seen.load(Ordering::Acquire).max(v.version))
        }
        // No value now, and none ever applied: a watch after version 0
        // would replay the key's retained history (values deleted long
        // ago) as if they were current. The watch starts from now instead,
        // and a second read finds what came before it.
        Ok(None) if this.seen.load(Ordering::Acquire) == 0 => None,
        Ok(None) => Some(this.seen.load(Ordering::Acquire)),
        Err(e) => {
            tracing::debug!(path = %path, error = %e, "config center unavailable; retrying");
            return Followed::Failed;
        }
    };
    drop(this);
    let opts = after.map_or_else(WatchOptions::default, WatchOptions::after);
    let mut events = match center.watch(path, opts).await {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(path = %path, error = %e, "watch failed; retrying");
            return Followed::Failed;
        }
    };
    if after.is_none() {
        match center.get_with_version(path).await {
            Ok(Some(v)) => {
                let Some(this) = inner.upgrade() else {
                    return Followed::Ended;
                };
                Inner::apply(&this, v.value, v.version).await;
            }
            Ok(None) => {}
            Err(e) => {
                tracing::debug!(path = %path, error = %e, "config center unavailable; retrying");
                return Followed::Failed;
            }
        }
    }
    // From now: an event older than the second read is not a regression
    // (the watch began before that read), and `apply` skips it.
    let mut stream_last = after.unwrap_or(0);
    loop {
        let next = tokio::select! {
            _ = stop.cancelled() => return Followed::Ended,
            next = events.next() => next,
        };
        let Some(this) = inner.upgrade() else {
            return Followed::Ended;
        };
        match next {
            Some(Ok(ev)) => apply_event(&this, ev, &mut stream_last, path).await,
            Some(Err(e)) => {
                tracing::warn!(path = %path, error = %e, "configuration watch failed; reconnecting");
                return Followed::Lost;
            }
            None => return Followed::Lost,
        }
    }
}

/// Applies one event of the watch; `stream_last` is the version of the
/// one before.
async fn apply_event<T>(this: &Arc<Inner<T>>, ev: ConfigEvent, stream_last: &mut u64, path: &str)
where
    T: DeserializeOwned + Send + Sync + 'static,
{
    if ev.version < *stream_last {
        // The watch went back: the server lost changes it had delivered,
        // and this event is the correction (see
        // `WatchCursor::resync_regressed`). It wins over what was applied.
        tracing::warn!(path = %path, version = ev.version, after = *stream_last, "the config center went back in time; applying its current state");
        this.seen
            .store(ev.version.saturating_sub(1), Ordering::Release);
    }
    *stream_last = ev.version;
    match ev.kind {
        ConfigEventKind::Put => {
            if let Some(value) = ev.value {
                Inner::apply(this, value, ev.version).await;
            }
        }
        ConfigEventKind::Delete => Inner::revert_to_default(this, ev.version).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ConfigCapabilities, ConfigEvent, Versioned, WatchStream};
    use std::sync::atomic::AtomicUsize;

    /// A center that is down (or hangs) for every call.
    struct Down {
        hang: bool,
        calls: AtomicUsize,
    }

    #[async_trait]
    impl ConfigCenter for Down {
        fn capabilities(&self) -> ConfigCapabilities {
            ConfigCapabilities::full(1024)
        }
        async fn get_with_version(&self, _key: &str) -> Result<Option<Versioned>> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            if self.hang {
                futures::future::pending::<()>().await;
            }
            Err(Error::new(ErrorKind::Unavailable, "down"))
        }
        async fn set(&self, _key: &str, _value: Bytes) -> Result<u64> {
            Err(Error::new(ErrorKind::Unavailable, "down"))
        }
        async fn delete(&self, _key: &str) -> Result<bool> {
            Err(Error::new(ErrorKind::Unavailable, "down"))
        }
        async fn list(&self, _prefix: &str) -> Result<Vec<String>> {
            Err(Error::new(ErrorKind::Unavailable, "down"))
        }
        async fn compare_and_set(&self, _key: &str, _value: Bytes, _v: u64) -> Result<u64> {
            Err(Error::new(ErrorKind::Unavailable, "down"))
        }
        async fn watch(&self, _key: &str, _opts: WatchOptions) -> Result<WatchStream> {
            Err(Error::new(ErrorKind::Unavailable, "down"))
        }
        async fn watch_prefix(&self, _prefix: &str, _opts: WatchOptions) -> Result<WatchStream> {
            Err(Error::new(ErrorKind::Unavailable, "down"))
        }
    }

    #[derive(Debug, Default, PartialEq, serde::Deserialize, serde::Serialize)]
    struct Settings {
        workers: u32,
    }

    fn manager(center: Arc<Down>) -> ConfigManager<Settings> {
        ConfigManager::<Settings>::builder(center, "svc", "settings")
            .env("test")
            .default_value(Settings { workers: 3 })
            .load_timeout(Duration::from_millis(200))
            .retry(RetrySettings {
                max_retries: u32::MAX,
                initial_interval: Duration::from_millis(10),
                max_interval: Duration::from_millis(20),
                multiplier: 2.0,
                jitter: false,
            })
            .build()
            .unwrap()
    }

    #[tokio::test]
    async fn unreachable_center_falls_back_to_the_default_and_keeps_trying() {
        let center = Arc::new(Down {
            hang: false,
            calls: AtomicUsize::new(0),
        });
        let m = manager(center.clone());
        m.start().await;
        assert_eq!(*m.current(), Settings { workers: 3 });
        assert_eq!(m.version(), 0);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            center.calls.load(Ordering::SeqCst) > 2,
            "the watch keeps retrying"
        );
        m.stop().await;
        assert!(!m.is_started());
    }

    #[tokio::test]
    async fn a_hanging_center_does_not_block_start_beyond_the_load_timeout() {
        let m = manager(Arc::new(Down {
            hang: true,
            calls: AtomicUsize::new(0),
        }));
        let t = std::time::Instant::now();
        m.start().await;
        assert!(t.elapsed() < Duration::from_secs(2));
        assert_eq!(m.current().workers, 3);
        m.stop().await;
    }

    #[test]
    fn an_invalid_default_or_path_is_rejected_at_build() {
        let center = Arc::new(Down {
            hang: false,
            calls: AtomicUsize::new(0),
        });
        let err = ConfigManager::<Settings>::builder(center.clone(), "svc", "settings")
            .validator(|s| {
                if s.workers == 0 {
                    Err("zero".into())
                } else {
                    Ok(())
                }
            })
            .build()
            .err()
            .unwrap();
        assert_eq!(err.kind(), ErrorKind::InvalidConfig);
        let err = ConfigManager::<Settings>::builder(center, "bad/service", "settings")
            .build()
            .err()
            .unwrap();
        assert_eq!(err.kind(), ErrorKind::InvalidConfig);
    }

    /// A center whose watch replays fixed events, then stays open.
    struct Scripted(Vec<ConfigEvent>);

    #[async_trait]
    impl ConfigCenter for Scripted {
        fn capabilities(&self) -> ConfigCapabilities {
            ConfigCapabilities::full(1024)
        }
        async fn get_with_version(&self, _key: &str) -> Result<Option<Versioned>> {
            Ok(Some(Versioned {
                value: Bytes::from_static(br#"{"workers":5}"#),
                version: 5,
            }))
        }
        async fn set(&self, _key: &str, _value: Bytes) -> Result<u64> {
            Err(Error::unsupported("set"))
        }
        async fn delete(&self, _key: &str) -> Result<bool> {
            Err(Error::unsupported("delete"))
        }
        async fn list(&self, _prefix: &str) -> Result<Vec<String>> {
            Ok(Vec::new())
        }
        async fn compare_and_set(&self, _key: &str, _value: Bytes, _v: u64) -> Result<u64> {
            Err(Error::unsupported("cas"))
        }
        async fn watch(&self, _key: &str, _opts: WatchOptions) -> Result<WatchStream> {
            let events: Vec<Result<ConfigEvent>> = self.0.iter().cloned().map(Ok).collect();
            Ok(futures::stream::iter(events)
                .chain(futures::stream::pending())
                .boxed())
        }
        async fn watch_prefix(&self, _prefix: &str, _opts: WatchOptions) -> Result<WatchStream> {
            Err(Error::unsupported("watch_prefix"))
        }
    }

    #[tokio::test]
    async fn a_watch_that_goes_back_in_time_corrects_the_value() {
        let put = |workers: u32, version: u64| ConfigEvent {
            kind: crate::config::ConfigEventKind::Put,
            key: "/config/test/svc/settings".into(),
            value: Some(Bytes::from(format!(r#"{{"workers":{workers}}}"#))),
            version,
        };
        // Version 6 was lost by the server; its resync reports version 4.
        let center = Arc::new(Scripted(vec![put(6, 6), put(4, 4), put(4, 4)]));
        let m = ConfigManager::<Settings>::builder(center, "svc", "settings")
            .env("test")
            .build()
            .unwrap();
        m.start().await;
        for _ in 0..100 {
            if m.version() == 4 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!((m.current().workers, m.version()), (4, 4));
        m.stop().await;
    }

    #[tokio::test]
    async fn a_callback_that_panics_stops_neither_the_others_nor_later_values() {
        let put = |workers: u32, version: u64| ConfigEvent {
            kind: crate::config::ConfigEventKind::Put,
            key: "/config/test/svc/settings".into(),
            value: Some(Bytes::from(format!(r#"{{"workers":{workers}}}"#))),
            version,
        };
        let center = Arc::new(Scripted(vec![put(6, 6), put(7, 7)]));
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let m = ConfigManager::<Settings>::builder(center, "svc", "settings")
            .env("test")
            .validator(|s| {
                if s.workers == 6 {
                    panic!("expected: this test checks that a panicking validator is a rejection");
                }
                Ok(())
            })
            .on_update(|s| {
                if s.workers == 5 {
                    panic!("expected: this test checks that a panicking callback is skipped");
                }
            })
            .on_update({
                let seen = seen.clone();
                move |s| seen.lock().unwrap().push(s.workers)
            })
            .build()
            .unwrap();
        m.start().await;
        for _ in 0..100 {
            if m.version() == 7 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!((m.current().workers, m.version()), (7, 7));
        assert_eq!(*seen.lock().unwrap(), [5, 7], "6 rejected, the others seen");
        m.stop().await;
    }
}
