//! In-process service registry: instances with TTL leases, keep-alive,
//! re-registration after lease loss, and watch events.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use parking_lot::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use im_infra::lease::LeaseBackend;
use im_infra::registry::watch::{spawn_watch, InstanceBatch, InstanceChange, InstanceHistory};
use im_infra::registry::{
    RegistrationBackend, RegistrationLease, Registrations, RegistryCapabilities, ServiceDiscovery,
    ServiceEventKind, ServiceEventStream, ServiceInstance, DEFAULT_TTL,
};
use im_infra::{Result, RetrySettings};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::Shared;

/// The shortest registration TTL the in-process registry keeps alive; a
/// shorter one is raised to it. Renewals every third of it, and the lease's
/// drift margin, need room beyond the timer's millisecond on a loaded
/// machine.
const MIN_TTL: Duration = Duration::from_millis(50);

#[derive(Debug, Clone)]
struct Entry {
    instance: ServiceInstance,
    lease: u64,
    expires_at: Instant,
}

/// Changes kept for watches; a watch further behind lists again.
const HISTORY: usize = 4096;

#[derive(Debug, Default)]
struct State {
    /// Live instances by (service, id).
    instances: BTreeMap<(String, String), Entry>,
    /// Revision of the last change (0: none yet).
    revision: u64,
    /// The most recent changes, oldest first: revision, service, change.
    history: VecDeque<(u64, String, InstanceChange)>,
}

impl State {
    /// Revisions above this one are all still in `history`.
    fn history_floor(&self) -> u64 {
        self.history
            .front()
            .map_or(self.revision, |(revision, _, _)| revision - 1)
    }
}

/// Instances shared by every registry and discovery handle of one backend.
#[derive(Debug, Default)]
pub(crate) struct RegistryStore {
    state: Mutex<State>,
    leases: AtomicU64,
    /// Woken whenever an expiry time changes, for the reaper.
    changed: Arc<Notify>,
    /// Woken by every change, for the watches.
    watches: Arc<Notify>,
}

impl RegistryStore {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock()
    }

    /// Records a change of `instance` and wakes the watches.
    fn emit(&self, state: &mut State, kind: ServiceEventKind, instance: &ServiceInstance) {
        state.revision += 1;
        let change = match kind {
            ServiceEventKind::Delete => InstanceChange::Delete(instance.id.clone()),
            _ => InstanceChange::Put(instance.clone()),
        };
        let entry = (state.revision, instance.service.clone(), change);
        state.history.push_back(entry);
        if state.history.len() > HISTORY {
            state.history.pop_front();
        }
        self.watches.notify_waiters();
    }

    /// Puts an instance under a new lease; returns the lease id.
    fn put(&self, instance: &ServiceInstance, ttl: Duration) -> u64 {
        let lease = self.leases.fetch_add(1, Ordering::Relaxed) + 1;
        let mut state = self.state();
        let key = (instance.service.clone(), instance.id.clone());
        // An entry that expired but was not reaped yet is gone for the
        // watches (a listing leaves it out): putting it again is an Add.
        let kind = match state.instances.get(&key) {
            Some(old) if old.expires_at <= Instant::now() => Some(ServiceEventKind::Add),
            Some(old) if old.instance == *instance => None,
            Some(_) => Some(ServiceEventKind::Update),
            None => Some(ServiceEventKind::Add),
        };
        state.instances.insert(
            key,
            Entry {
                instance: instance.clone(),
                lease,
                expires_at: Instant::now() + ttl,
            },
        );
        if let Some(kind) = kind {
            self.emit(&mut state, kind, instance);
        }
        drop(state);
        self.changed.notify_one();
        lease
    }

    /// Extends a lease; `false` when it is gone (expired or revoked).
    fn keep_alive(&self, service: &str, id: &str, lease: u64, ttl: Duration) -> bool {
        let mut state = self.state();
        match state
            .instances
            .get_mut(&(service.to_owned(), id.to_owned()))
        {
            Some(e) if e.lease == lease && e.expires_at > Instant::now() => {
                e.expires_at = Instant::now() + ttl;
                true
            }
            _ => false,
        }
    }

    /// Replaces the instance's value if it is live under `lease` (any
    /// lease when `None`).
    fn update(&self, instance: &ServiceInstance, lease: Option<u64>) -> bool {
        let mut state = self.state();
        let key = (instance.service.clone(), instance.id.clone());
        let now = Instant::now();
        match state.instances.get_mut(&key) {
            Some(e) if lease.is_none_or(|l| l == e.lease) && e.expires_at > now => {
                let instance = ServiceInstance {
                    ttl: e.instance.ttl,
                    ..instance.clone()
                };
                if e.instance != instance {
                    e.instance = instance.clone();
                    self.emit(&mut state, ServiceEventKind::Update, &instance);
                }
                true
            }
            _ => false,
        }
    }

    /// Removes an instance (of `lease`, or any when `None`).
    pub(crate) fn remove(&self, service: &str, id: &str, lease: Option<u64>) -> bool {
        let mut state = self.state();
        let key = (service.to_owned(), id.to_owned());
        let matches = state
            .instances
            .get(&key)
            .is_some_and(|e| lease.is_none_or(|l| l == e.lease));
        if !matches {
            return false;
        }
        if let Some(e) = state.instances.remove(&key) {
            self.emit(&mut state, ServiceEventKind::Delete, &e.instance);
        }
        true
    }

    /// Removes expired instances; returns the next expiry.
    pub(crate) fn reap(&self) -> Option<Instant> {
        let now = Instant::now();
        let mut state = self.state();
        let expired: Vec<(String, String)> = state
            .instances
            .iter()
            .filter(|(_, e)| e.expires_at <= now)
            .map(|(k, _)| k.clone())
            .collect();
        for key in expired {
            if let Some(e) = state.instances.remove(&key) {
                tracing::debug!(service = %e.instance.service, id = %e.instance.id, "registration expired");
                self.emit(&mut state, ServiceEventKind::Delete, &e.instance);
            }
        }
        state.instances.values().map(|e| e.expires_at).min()
    }

    /// Deletes expired instances as they expire, until shutdown.
    pub(crate) async fn reaper(shared: std::sync::Weak<Shared>) {
        loop {
            let Some(s) = shared.upgrade() else { return };
            let next = s.registry.reap();
            let wait = next.map_or(Duration::from_secs(1), |t| {
                t.saturating_duration_since(Instant::now())
                    .min(Duration::from_secs(1))
            });
            let stop = s.stop().clone();
            let changed = s.registry.changed.clone();
            drop(s);
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = changed.notified() => {}
                _ = tokio::time::sleep(wait + Duration::from_millis(1)) => {}
            }
        }
    }

    pub(crate) fn live(&self, service: &str) -> Vec<ServiceInstance> {
        let now = Instant::now();
        let state = self.state();
        state
            .instances
            .range((service.to_owned(), String::new())..)
            .take_while(|((s, _), _)| s == service)
            .filter(|(_, e)| e.expires_at > now)
            .map(|(_, e)| e.instance.clone())
            .collect()
    }
}

/// The registry handle of a [`MemoryBackend`](crate::MemoryBackend): a
/// [`Registrations`] over the backend's store. Without a TTL,
/// [`DEFAULT_TTL`]; at least [`MIN_TTL`].
pub(crate) fn registry(shared: Arc<Shared>) -> Registrations {
    let retry = RetrySettings {
        max_retries: u32::MAX,
        initial_interval: Duration::from_millis(20),
        max_interval: Duration::from_secs(2),
        multiplier: 2.0,
        jitter: true,
    };
    Registrations::new(Arc::new(Store { shared }), retry)
}

/// Registers in the backend's store.
struct Store {
    shared: Arc<Shared>,
}

#[async_trait]
impl RegistrationBackend for Store {
    fn name(&self) -> &'static str {
        crate::NAME
    }

    fn default_ttl(&self) -> Duration {
        DEFAULT_TTL
    }

    fn min_ttl(&self) -> Duration {
        MIN_TTL
    }

    fn check_open(&self) -> Result<()> {
        self.shared.check_open()
    }

    async fn list(&self) -> Result<Vec<ServiceInstance>> {
        self.shared.check_open()?;
        let now = Instant::now();
        let state = self.shared.registry.state();
        let live = state
            .instances
            .values()
            .filter(|e| e.expires_at > now)
            .map(|e| e.instance.clone());
        Ok(live.collect())
    }

    async fn put(
        &self,
        instance: &ServiceInstance,
        ttl: Duration,
        _lease_id: Option<i64>,
    ) -> Result<(Arc<dyn RegistrationLease>, Duration)> {
        self.shared.check_open()?;
        let lease = self.shared.registry.put(instance, ttl);
        Ok((
            Arc::new(Registered {
                shared: self.shared.clone(),
                service: instance.service.clone(),
                id: instance.id.clone(),
                lease,
            }),
            ttl,
        ))
    }

    async fn replace(&self, instance: &ServiceInstance) -> Result<bool> {
        self.shared.check_open()?;
        Ok(self.shared.registry.update(instance, None))
    }
}

/// One registration in the store.
struct Registered {
    shared: Arc<Shared>,
    service: String,
    id: String,
    lease: u64,
}

#[async_trait]
impl LeaseBackend for Registered {
    fn describe(&self) -> String {
        format!("registration {}/{}", self.service, self.id)
    }

    async fn extend(&self, ttl: Duration) -> Result<bool> {
        self.shared.check_open()?;
        Ok(self
            .shared
            .registry
            .keep_alive(&self.service, &self.id, self.lease, ttl))
    }

    async fn release(&self) -> Result<bool> {
        Ok(self
            .shared
            .registry
            .remove(&self.service, &self.id, Some(self.lease)))
    }
}

#[async_trait]
impl RegistrationLease for Registered {
    async fn update(&self, instance: &ServiceInstance) -> Result<bool> {
        self.shared.check_open()?;
        Ok(self.shared.registry.update(instance, Some(self.lease)))
    }
}

/// The discovery handle of a [`MemoryBackend`](crate::MemoryBackend). The
/// backend hands it out inside an
/// [`ObservedDiscovery`](im_infra::layer::ObservedDiscovery), which checks
/// the service names and does the telemetry.
pub(crate) struct MemoryDiscovery {
    shared: Arc<Shared>,
}

impl MemoryDiscovery {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        MemoryDiscovery { shared }
    }
}

#[async_trait]
impl ServiceDiscovery for MemoryDiscovery {
    fn capabilities(&self) -> RegistryCapabilities {
        RegistryCapabilities::default()
            .with_watch()
            .with_min_ttl(MIN_TTL)
    }

    async fn instances(&self, service: &str) -> Result<Vec<ServiceInstance>> {
        self.shared.check_open()?;
        Ok(self.shared.registry.live(service))
    }

    async fn watch(&self, service: &str) -> Result<ServiceEventStream> {
        self.shared.check_open()?;
        let history = Instances {
            shared: Arc::downgrade(&self.shared),
            watches: self.shared.registry.watches.clone(),
            shutdown: self.shared.stop().clone(),
            service: service.to_owned(),
        };
        let shutdown = self.shared.stop().clone();
        spawn_watch(history, RetrySettings::default(), shutdown).await
    }
}

/// One watched service's changes, for the shared registry watch driver.
/// It holds the backend weakly: a backend dropped without `close` still
/// ends its watches.
struct Instances {
    shared: Weak<Shared>,
    watches: Arc<Notify>,
    shutdown: CancellationToken,
    service: String,
}

impl Instances {
    fn shared(&self) -> Result<Arc<Shared>> {
        im_infra::backend::upgrade(&self.shared, crate::NAME)
    }
}

#[async_trait]
impl InstanceHistory for Instances {
    async fn list(&mut self) -> Result<(u64, Vec<ServiceInstance>)> {
        let shared = self.shared()?;
        let now = Instant::now();
        let state = shared.registry.state();
        let live = state
            .instances
            .iter()
            .filter(|((s, _), e)| *s == self.service && e.expires_at > now)
            .map(|(_, e)| e.instance.clone())
            .collect();
        Ok((state.revision, live))
    }

    async fn next_batch(&mut self, after: u64) -> Result<InstanceBatch> {
        loop {
            let changed = self.watches.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            {
                let shared = self.shared()?;
                let state = shared.registry.state();
                if state.revision > after {
                    if after < state.history_floor() {
                        return Ok(InstanceBatch::Gap);
                    }
                    let changes = state
                        .history
                        .iter()
                        .filter(|(revision, s, _)| *revision > after && *s == self.service)
                        .map(|(_, _, change)| change.clone())
                        .collect();
                    let upto = state.revision;
                    return Ok(InstanceBatch::Changes { changes, upto });
                }
            }
            tokio::select! {
                _ = &mut changed => {}
                _ = self.shutdown.cancelled() => {
                    return Err(im_infra::backend::closed(crate::NAME));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;
    use im_infra::backend::Backend;

    use super::*;
    use crate::MemoryBackend;

    /// Once the backend is closed, every call of a registry handle
    /// answers `Closed`; what it registered was deregistered by the close.
    #[tokio::test]
    async fn a_registry_of_a_closed_backend_answers_closed() {
        use im_infra::registry::ServiceRegistry;
        use im_infra::ErrorKind;
        let backend = MemoryBackend::new();
        let registry = backend.registry().await.unwrap();
        let instance = ServiceInstance::new("svc", "a", "10.0.0.1:80");
        registry
            .register(&instance, Duration::from_secs(60))
            .await
            .unwrap();
        backend.close().await.unwrap();
        assert!(backend.shared.registry.live("svc").is_empty());
        let kinds = [
            registry.register(&instance, Duration::from_secs(60)).await,
            registry.register(&instance, Duration::from_millis(1)).await,
            registry.deregister("svc", "a").await,
            registry.update(&instance).await,
            registry.list_services().await.map(drop),
        ]
        .map(|r| r.unwrap_err().kind());
        assert_eq!(kinds, [ErrorKind::Closed; 5]);
    }

    /// A watch that does not read while many more changes than the
    /// history keeps are made lists again: it still ends on the current
    /// state, and the history stays bounded.
    #[tokio::test]
    async fn a_watch_left_behind_the_bounded_history_lists_again() {
        let backend = MemoryBackend::new();
        let mut events = backend
            .discovery()
            .await
            .unwrap()
            .watch("svc")
            .await
            .unwrap();
        let store = &backend.shared.registry;
        let ttl = Duration::from_secs(60);
        let last = HISTORY * 2;
        for i in 0..=last {
            store.put(
                &ServiceInstance::new("svc", "a", format!("10.0.0.1:{i}")),
                ttl,
            );
        }
        store.put(&ServiceInstance::new("svc", "b", "10.0.0.2:80"), ttl);
        assert!(store.state().history.len() <= HISTORY);
        let want_a = format!("10.0.0.1:{last}");
        let (mut a, mut b) = (None, false);
        let mut seen = 0;
        while a.as_deref() != Some(want_a.as_str()) || !b {
            let event = tokio::time::timeout(Duration::from_secs(5), events.next())
                .await
                .expect("the watch reaches the current state")
                .expect("the stream goes on")
                .unwrap();
            seen += 1;
            match event.instance.id.as_str() {
                "a" => a = Some(event.instance.address),
                _ => b = true,
            }
        }
        assert!(
            seen < last,
            "{seen} events: the change history was replayed whole"
        );
        backend.close().await.unwrap();
    }

    /// An entry that expired but was not reaped yet is gone for the
    /// watches: putting the same instance again is a change they see.
    #[test]
    fn putting_again_an_expired_instance_not_yet_reaped_is_a_change() {
        let backend = MemoryBackend::new();
        let store = &backend.shared.registry;
        let instance = ServiceInstance::new("svc", "a", "10.0.0.1:80");
        store.put(&instance, Duration::from_millis(1));
        std::thread::sleep(Duration::from_millis(5));
        let before = store.state().revision;
        store.put(&instance, Duration::from_secs(60));
        let state = store.state();
        assert!(state.revision > before, "the put was not recorded");
        assert!(matches!(
            state.history.back(),
            Some((_, _, InstanceChange::Put(_)))
        ));
    }

    /// A watch does not keep a backend alive: dropped without `close`,
    /// the backend ends its watches.
    #[tokio::test]
    async fn a_watch_ends_when_its_backend_is_dropped() {
        let backend = MemoryBackend::new();
        let discovery = backend.discovery().await.unwrap();
        let mut events = discovery.watch("svc").await.unwrap();
        drop((discovery, backend));
        let end = tokio::time::timeout(Duration::from_secs(5), events.next()).await;
        assert!(matches!(end, Ok(None)), "the watch goes on: {end:?}");
    }
}
