//! [`Registrations`]: the registry handle every backend hands out. Its
//! registrations are each kept by a [`Lease`] and registered again,
//! forever, after they are lost; a backend supplies only the server's side
//! ([`RegistrationBackend`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use super::{RegisterOptions, ServiceInfo, ServiceInstance, ServiceRegistry};
use crate::backend::Closable;
use crate::error::{Error, ErrorKind, Result};
use crate::lease::{Lease, LeaseBackend, LeaseOptions, Tick};
use crate::retry::RetrySettings;

/// One registration on a backend's server: kept alive by `extend`,
/// deregistered by `release` (both only while it is this registration's:
/// a newer registration of the same instance is never touched).
#[async_trait]
pub trait RegistrationLease: LeaseBackend {
    /// Replaces the registered value, keeping the lease. `Ok(false)`: the
    /// registration is gone on the server.
    async fn update(&self, instance: &ServiceInstance) -> Result<bool>;

    /// The caller's lease this registration is on
    /// ([`RegisterOptions::lease_id`]); `None` (the default) for a lease
    /// of its own. A registration replaced by one on the same lease is left
    /// to it, not released: releasing it would delete the new value.
    fn callers_lease(&self) -> Option<i64> {
        None
    }
}

/// What a backend does to register an instance on its server.
#[async_trait]
pub trait RegistrationBackend: Send + Sync + 'static {
    /// The backend's name, for metrics and logs.
    fn name(&self) -> &'static str;

    /// The TTL of a registration that names none.
    fn default_ttl(&self) -> Duration;

    /// `Closed` once the backend was closed, checked before every call of
    /// the registry handle (a backend whose calls all reach its server,
    /// which refuses them once closed, keeps the default).
    fn check_open(&self) -> Result<()> {
        Ok(())
    }

    /// The shortest TTL the backend keeps alive (renewals every third of
    /// it need room), as its capabilities report it
    /// ([`RegistryCapabilities::min_ttl`](crate::registry::RegistryCapabilities::min_ttl));
    /// a shorter one is raised to it. None by default.
    fn min_ttl(&self) -> Duration {
        Duration::ZERO
    }

    /// Whether [`put`](Self::put) registers on a lease of the caller's
    /// ([`RegisterOptions::lease_id`]); where not (the default), such a
    /// registration is `Unsupported`.
    fn takes_caller_leases(&self) -> bool {
        false
    }

    /// Metadata every instance is registered with unless it sets the key
    /// itself. None by default.
    fn default_metadata(&self) -> &BTreeMap<String, String> {
        static NONE: BTreeMap<String, String> = BTreeMap::new();
        &NONE
    }

    /// Every live instance of every service.
    async fn list(&self) -> Result<Vec<ServiceInstance>>;

    /// Puts `instance` on the server under a new lease of `ttl` (or on the
    /// existing lease `lease_id`, where the backend has such leases),
    /// replacing any earlier registration of the same service and id.
    /// Returns the registration and the TTL the server granted (at least
    /// `ttl`).
    async fn put(
        &self,
        instance: &ServiceInstance,
        ttl: Duration,
        lease_id: Option<i64>,
    ) -> Result<(Arc<dyn RegistrationLease>, Duration)>;

    /// Replaces the value of a registered instance, whoever registered it,
    /// keeping its lease and the TTL recorded with it. `Ok(false)`: it is
    /// not registered.
    async fn replace(&self, instance: &ServiceInstance) -> Result<bool>;
}

/// The state of one registration, shared by its keeper task and the
/// registry's calls.
struct Slot {
    instance: ServiceInstance,
    current: Option<(Arc<dyn RegistrationLease>, Lease)>,
    /// Set when the registration ends (deregistered, replaced): its keeper
    /// registers it no more.
    stopped: bool,
    /// A deregistration that failed to reach the server (no longer kept,
    /// still on the server until its TTL): the next `deregister` of the
    /// instance, or the registry's close, releases it again.
    unreleased: Option<Arc<dyn RegistrationLease>>,
}

impl Drop for Slot {
    /// A registration dropped without `deregister` (the registry dropped,
    /// the keeper ended) is left to expire on the server, as when the
    /// process dies.
    fn drop(&mut self) {
        if let Some((_, lease)) = self.current.take() {
            lease.detach();
        }
    }
}

struct Registration {
    slot: Arc<tokio::sync::Mutex<Slot>>,
    stop: CancellationToken,
}

/// A backend's [`ServiceRegistry`] handle: the registrations made through
/// it.
///
/// Each is a [`Lease`] (renewed every third of its TTL, with a local
/// deadline); when it is lost — expired during a partition, revoked,
/// deleted — it is registered again with a new lease, retrying forever with
/// the backend's backoff, until it is deregistered. Dropping the handle
/// stops the renewals (the instances then expire, as when a process dies);
/// closing it ([`Closable`], with its backend) deregisters them. Backends
/// implement [`RegistrationBackend`] and [`RegistrationLease`] and hand this
/// out inside [`ObservedRegistry`](crate::layer::ObservedRegistry), which
/// checks the arguments.
pub struct Registrations {
    backend: Arc<dyn RegistrationBackend>,
    retry: RetrySettings,
    mine: Mutex<HashMap<(String, String), Registration>>,
    /// Set by [`close`](Closable::close), under the `mine` lock: a
    /// registration whose put was still running then is released, not kept.
    closed: AtomicBool,
}

impl std::fmt::Debug for Registrations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registrations")
            .field("backend", &self.backend.name())
            .field("count", &self.mine().len())
            .finish()
    }
}

fn not_registered(service: &str, id: &str) -> Error {
    Error::new(
        ErrorKind::NotRegistered,
        format!("{service}/{id} is not registered"),
    )
}

impl Registrations {
    /// Registrations on `backend`, re-registered with `retry`'s backoff.
    pub fn new(backend: Arc<dyn RegistrationBackend>, retry: RetrySettings) -> Self {
        Registrations {
            backend,
            retry,
            mine: Mutex::new(HashMap::new()),
            closed: AtomicBool::new(false),
        }
    }

    fn mine(&self) -> MutexGuard<'_, HashMap<(String, String), Registration>> {
        self.mine.lock()
    }

    /// Registers `instance` for `ttl` (on the existing lease `lease_id`,
    /// where the backend has such leases) and keeps it registered.
    /// Registering the same service and id again replaces the earlier
    /// registration once the put succeeded; a failed put leaves it as it
    /// was. After a loss it is registered again on a new lease.
    async fn keep_registered(
        &self,
        instance: &ServiceInstance,
        ttl: Duration,
        lease_id: Option<i64>,
    ) -> Result<()> {
        instance.validate()?;
        crate::validate::ttl(ttl)?;
        if self.closed.load(Ordering::Acquire) {
            return Err(crate::backend::closed(self.backend.name()));
        }
        // What is stored carries the TTL; the lease id is the backend's.
        let mut instance = ServiceInstance {
            ttl: Some(ttl),
            lease_id: None,
            ..instance.clone()
        };
        let key = (instance.service.clone(), instance.id.clone());
        // The earlier registration is held while the put runs: its keeper
        // cannot register it again over the new value, and a failed put
        // (the guard dropped) leaves it registered and kept.
        let mut earlier = loop {
            let Some(slot) = self.mine().get(&key).map(|r| r.slot.clone()) else {
                break None;
            };
            let guard = slot.clone().lock_owned().await;
            // Replaced while waiting: hold the registration that replaced it.
            let still = self.mine().get(&key).map(|r| r.slot.clone());
            if still.is_some_and(|still| Arc::ptr_eq(&still, &slot)) {
                break Some(guard);
            }
        };
        let sent = Tick::now();
        let (reg, granted) = self.backend.put(&instance, ttl, lease_id).await?;
        if lease_id.is_some() {
            // A caller's lease has its own TTL, recorded as such.
            instance.ttl = Some(granted);
        }
        let lease = self.lease(reg.clone(), granted, sent);
        let slot = Arc::new(tokio::sync::Mutex::new(Slot {
            instance: instance.clone(),
            current: Some((reg.clone(), lease)),
            stopped: false,
            unreleased: None,
        }));
        let stop = CancellationToken::new();
        tokio::spawn(keep(
            self.backend.clone(),
            self.retry.clone(),
            slot.clone(),
            stop.clone(),
            ttl,
        ));
        let registration = Registration { slot, stop };
        // In the map before the earlier one is let go: a call that waited
        // for it then finds the new registration.
        let displaced = {
            let mut mine = self.mine();
            if self.closed.load(Ordering::Acquire) {
                Err(registration)
            } else {
                Ok(mine.insert(key, registration))
            }
        };
        let replaced = earlier.as_mut().and_then(|slot| {
            slot.stopped = true;
            // A failed deregistration's release is moot: the put replaced
            // its value (and releasing it could delete the new one, on the
            // same caller's lease).
            slot.unreleased = None;
            slot.current.take()
        });
        drop(earlier);
        if let Some(replaced) = replaced {
            end(replaced, &reg).await;
        }
        match displaced {
            Ok(displaced) => {
                if let Some(displaced) = displaced {
                    retire(displaced, Some(&reg)).await;
                }
                Ok(())
            }
            // Closed while the put ran: what it registered goes too.
            Err(registration) => {
                retire(registration, None).await;
                Err(crate::backend::closed(self.backend.name()))
            }
        }
    }

    /// Deregisters an instance registered here. `NotRegistered` if it is
    /// not. It is no longer kept from the start. Until the server confirms
    /// the release it stays in the map, stopped: a call that failed with a
    /// retryable error, or that was dropped midway, is retried by the next
    /// `deregister` (or the registry's close); meanwhile the instance
    /// expires on the server after its TTL.
    async fn remove(&self, service: &str, id: &str) -> Result<()> {
        let key = (service.to_owned(), id.to_owned());
        let (slot, stop) = self
            .mine()
            .get(&key)
            .map(|r| (r.slot.clone(), r.stop.clone()))
            .ok_or_else(|| not_registered(service, id))?;
        // Stopped under the slot's lock, then its keeper: a call dropped
        // while waiting for the lock leaves the registration as it was.
        // The lease only stops being kept: the release below is the
        // registration's own, retried through the slot, so that no
        // background release of a dropped lease can race a registration
        // made meanwhile on the same caller's lease.
        let reg = {
            let mut slot = slot.lock().await;
            slot.stopped = true;
            stop.cancel();
            match slot.current.take() {
                Some((reg, lease)) => {
                    lease.detach();
                    slot.unreleased = Some(reg.clone());
                    Some(reg)
                }
                None => slot.unreleased.clone(),
            }
        };
        let result = match reg {
            Some(reg) => reg.release().await.map(drop),
            None => Ok(()),
        };
        if matches!(&result, Err(e) if e.is_retryable()) {
            return result;
        }
        // Released (or it cannot be, whatever is retried): gone from here.
        slot.lock().await.unreleased = None;
        let mut mine = self.mine();
        if mine.get(&key).is_some_and(|r| Arc::ptr_eq(&r.slot, &slot)) {
            mine.remove(&key);
        }
        result
    }

    /// Changes the address or metadata of a registered instance. Registered
    /// here: the new value is also the one registered again after a loss;
    /// `LeaseLost` if its registration was lost (it is being registered
    /// again, with the new value). Registered elsewhere: the value on the
    /// server is replaced, keeping its lease; `NotRegistered` if it is
    /// registered nowhere.
    async fn change(&self, instance: &ServiceInstance) -> Result<()> {
        instance.validate()?;
        let key = (instance.service.clone(), instance.id.clone());
        let mut slot = loop {
            let slot = self.mine().get(&key).map(|r| r.slot.clone());
            let Some(slot) = slot else {
                // The backend keeps the TTL the instance is registered with.
                return if self.backend.replace(&instance.registered()).await? {
                    Ok(())
                } else {
                    Err(not_registered(&instance.service, &instance.id))
                };
            };
            let guard = slot.clone().lock_owned().await;
            if !guard.stopped {
                break guard;
            }
            // Replaced while waiting: the new registration takes the change.
            // Deregistered: not registered here.
            let now = self.mine().get(&key).map(|r| r.slot.clone());
            if now.is_none_or(|now| Arc::ptr_eq(&now, &slot)) {
                return Err(not_registered(&instance.service, &instance.id));
            }
        };
        let instance = &ServiceInstance {
            ttl: slot.instance.ttl,
            lease_id: None,
            ..instance.clone()
        };
        slot.instance = instance.clone();
        let updated = match &slot.current {
            Some((reg, lease)) if lease.is_held() => reg.update(instance).await?,
            _ => false,
        };
        if updated {
            Ok(())
        } else {
            Err(Error::new(
                ErrorKind::LeaseLost,
                format!(
                    "the registration of {}/{} was lost; it is being registered again with the new value",
                    instance.service, instance.id
                ),
            ))
        }
    }

    /// The instances registered here, and those whose deregistration
    /// failed until it is retried.
    pub fn instances(&self) -> Vec<(String, String)> {
        self.mine().keys().cloned().collect()
    }

    /// `instance` with the backend's default metadata under its own.
    fn with_default_metadata(&self, instance: &ServiceInstance) -> ServiceInstance {
        let mut instance = instance.clone();
        for (k, v) in self.backend.default_metadata() {
            instance
                .metadata
                .entry(k.clone())
                .or_insert_with(|| v.clone());
        }
        instance
    }

    fn lease(&self, reg: Arc<dyn RegistrationLease>, granted: Duration, sent: Tick) -> Lease {
        lease_of(self.backend.name(), reg, granted, sent)
    }
}

fn lease_of(
    backend: &'static str,
    reg: Arc<dyn RegistrationLease>,
    granted: Duration,
    sent: Tick,
) -> Lease {
    Lease::start(
        reg,
        LeaseOptions::new(granted).labels(backend, "registry"),
        sent,
    )
}

/// Stops keeping a replaced registration and releases it; releasing
/// touches only what is still that registration's. One on the lease of
/// `by` (the registration replacing it) is left to it.
async fn retire(old: Registration, by: Option<&Arc<dyn RegistrationLease>>) {
    old.stop.cancel();
    let current = {
        let mut slot = old.slot.lock().await;
        slot.stopped = true;
        slot.current.take()
    };
    if let Some(current) = current {
        match by {
            Some(by) => end(current, by).await,
            None => {
                let _ = current.1.release().await;
            }
        }
    }
}

/// Ends a registration replaced by `by`: released, unless both are on the
/// same caller's lease (the new value is on it: the old one stops renewing
/// and leaves the lease to the new registration).
async fn end((old, lease): (Arc<dyn RegistrationLease>, Lease), by: &Arc<dyn RegistrationLease>) {
    match old.callers_lease() {
        Some(id) if by.callers_lease() == Some(id) => lease.detach(),
        _ => {
            let _ = lease.release().await;
        }
    }
}

#[async_trait]
impl ServiceRegistry for Registrations {
    /// Without a TTL, the backend's default; a lease of the caller's only
    /// where the backend takes one (etcd), `Unsupported` elsewhere.
    async fn register_with(&self, instance: &ServiceInstance, opts: RegisterOptions) -> Result<()> {
        self.backend.check_open()?;
        if opts.lease_id.is_some() && !self.backend.takes_caller_leases() {
            return Err(Error::unsupported("registry.register on an existing lease"));
        }
        crate::validate::opt_ttl(opts.ttl)?;
        let ttl = opts
            .ttl
            .unwrap_or_else(|| self.backend.default_ttl())
            .max(self.backend.min_ttl());
        let instance = self.with_default_metadata(instance);
        self.keep_registered(&instance, ttl, opts.lease_id).await
    }

    async fn deregister(&self, service: &str, id: &str) -> Result<()> {
        self.backend.check_open()?;
        self.remove(service, id).await
    }

    async fn update(&self, instance: &ServiceInstance) -> Result<()> {
        self.backend.check_open()?;
        self.change(&self.with_default_metadata(instance)).await
    }

    async fn list_services(&self) -> Result<Vec<ServiceInfo>> {
        self.backend.check_open()?;
        Ok(ServiceInfo::group(self.backend.list().await?))
    }
}

#[async_trait]
impl Closable for Registrations {
    /// Deregisters everything registered here, including a registration
    /// whose put is still running, and refuses further ones (`Closed`);
    /// failures are logged (those registrations expire on the server).
    async fn close(&self) -> Result<()> {
        {
            let _mine = self.mine();
            self.closed.store(true, Ordering::Release);
        }
        for (service, id) in self.instances() {
            if let Err(e) = self.remove(&service, &id).await {
                tracing::warn!(service, id, error = %e, "deregistration on close failed; the instance will expire");
            }
        }
        // Those whose release failed expire on the server.
        for (_, reg) in self.mine().drain() {
            reg.stop.cancel();
        }
        Ok(())
    }
}

impl Drop for Registrations {
    /// Stops keeping the registrations: they expire on the server, as when
    /// the process dies. Use [`close`](Closable::close) to deregister.
    fn drop(&mut self) {
        for (_, reg) in self.mine().drain() {
            reg.stop.cancel();
        }
    }
}

/// Waits for the registration's lease to be lost, then registers it again
/// with backoff, forever, until stopped. The backoff starts over only after
/// a registration that lasted a whole TTL: one lost again at once (a put
/// slower than its lease, another owner of the same id taking the key)
/// waits longer each time instead of putting back to back.
async fn keep(
    backend: Arc<dyn RegistrationBackend>,
    retry: RetrySettings,
    slot: Arc<tokio::sync::Mutex<Slot>>,
    stop: CancellationToken,
    ttl: Duration,
) {
    let mut delays = retry.delays_forever();
    let mut registered = Tick::now();
    loop {
        let lost = match &slot.lock().await.current {
            Some((_, lease)) => lease.lost(),
            None => return,
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = lost.cancelled() => {}
        }
        if registered.elapsed() >= ttl {
            delays = retry.delays_forever();
        } else {
            let pause = delays.next().unwrap_or(Duration::from_secs(1));
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(pause) => {}
            }
        }
        loop {
            // Held across the put, so that a deregistration waits for it
            // and then releases what it registered.
            let mut s = slot.lock().await;
            if s.stopped || stop.is_cancelled() {
                return;
            }
            tracing::info!(
                service = %s.instance.service,
                id = %s.instance.id,
                backend = backend.name(),
                "registering again after the registration was lost"
            );
            // On a lease of its own, with the TTL of the registration (one
            // on a caller's lease recorded that lease's).
            s.instance.ttl = Some(ttl);
            let sent = Tick::now();
            match backend.put(&s.instance, ttl, None).await {
                Ok((reg, granted)) => {
                    let lease = lease_of(backend.name(), reg.clone(), granted, sent);
                    // The lost lease is released where it is still its own.
                    s.current = Some((reg, lease));
                    registered = Tick::now();
                    break;
                }
                Err(e) if e.kind() == ErrorKind::Closed => return,
                Err(e) => {
                    drop(s);
                    let pause = delays.next().unwrap_or(Duration::from_secs(1));
                    tracing::debug!(error = %e, ?pause, "registering again failed; retrying");
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(pause) => {}
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    /// A server side that records what it was asked to put.
    struct Recording {
        default_metadata: BTreeMap<String, String>,
        put: Mutex<Vec<(ServiceInstance, Duration, Option<i64>)>>,
        closed: AtomicBool,
    }

    struct Held;

    #[async_trait]
    impl LeaseBackend for Held {
        fn describe(&self) -> String {
            "registration".into()
        }
        async fn extend(&self, _: Duration) -> Result<bool> {
            Ok(true)
        }
        async fn release(&self) -> Result<bool> {
            Ok(true)
        }
    }

    #[async_trait]
    impl RegistrationLease for Held {
        async fn update(&self, _: &ServiceInstance) -> Result<bool> {
            Ok(true)
        }
    }

    #[async_trait]
    impl RegistrationBackend for Recording {
        fn name(&self) -> &'static str {
            "recording"
        }
        fn default_ttl(&self) -> Duration {
            Duration::from_secs(7)
        }
        fn min_ttl(&self) -> Duration {
            Duration::from_millis(100)
        }
        fn check_open(&self) -> Result<()> {
            if self.closed.load(Ordering::SeqCst) {
                return Err(crate::backend::closed("recording"));
            }
            Ok(())
        }
        fn default_metadata(&self) -> &BTreeMap<String, String> {
            &self.default_metadata
        }
        async fn list(&self) -> Result<Vec<ServiceInstance>> {
            Ok(self.put.lock().iter().map(|(i, _, _)| i.clone()).collect())
        }
        async fn put(
            &self,
            instance: &ServiceInstance,
            ttl: Duration,
            lease_id: Option<i64>,
        ) -> Result<(Arc<dyn RegistrationLease>, Duration)> {
            self.put.lock().push((instance.clone(), ttl, lease_id));
            Ok((Arc::new(Held), ttl))
        }
        async fn replace(&self, _: &ServiceInstance) -> Result<bool> {
            Ok(false)
        }
    }

    fn registry() -> (Arc<Recording>, Registrations) {
        let server = Arc::new(Recording {
            default_metadata: BTreeMap::from([
                ("region".to_owned(), "eu".to_owned()),
                ("zone".to_owned(), "a".to_owned()),
            ]),
            put: Mutex::default(),
            closed: AtomicBool::new(false),
        });
        let registrations = Registrations::new(server.clone(), RetrySettings::default());
        (server, registrations)
    }

    /// A put slower than the lease it grants (the lease is lost as it
    /// starts) is registered again after growing pauses, not back to back.
    #[tokio::test]
    async fn a_registration_lost_at_once_is_registered_again_after_growing_pauses() {
        struct SlowPut(AtomicUsize);
        #[async_trait]
        impl RegistrationBackend for SlowPut {
            fn name(&self) -> &'static str {
                "slow"
            }
            fn default_ttl(&self) -> Duration {
                Duration::from_millis(100)
            }
            async fn list(&self) -> Result<Vec<ServiceInstance>> {
                Ok(Vec::new())
            }
            async fn put(
                &self,
                _: &ServiceInstance,
                ttl: Duration,
                _: Option<i64>,
            ) -> Result<(Arc<dyn RegistrationLease>, Duration)> {
                self.0.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(ttl + Duration::from_millis(20)).await;
                Ok((Arc::new(Held), ttl))
            }
            async fn replace(&self, _: &ServiceInstance) -> Result<bool> {
                Ok(false)
            }
        }
        let server = Arc::new(SlowPut(AtomicUsize::new(0)));
        let retry = RetrySettings {
            jitter: false,
            ..RetrySettings::default()
        };
        let registry = Registrations::new(server.clone(), retry);
        let instance = ServiceInstance::new("svc", "a", "10.0.0.1:80");
        registry
            .register(&instance, Duration::from_millis(100))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let puts = server.0.load(Ordering::SeqCst);
        // Back to back, a put every 120 ms: about 17 in 2 s. After pauses
        // of 100, 200, 400 and 800 ms: 5.
        assert!((2..=7).contains(&puts), "{puts} puts in 2 s");
        Closable::close(&registry).await.unwrap();
    }

    /// A registration whose put is still running when the registry is
    /// closed is released when the put returns, and answers `Closed`: a
    /// closed registry keeps nothing alive.
    #[tokio::test]
    async fn a_register_running_when_closed_is_released_not_kept() {
        #[derive(Default)]
        struct Gated {
            entered: tokio::sync::Notify,
            go: tokio::sync::Notify,
            released: Arc<AtomicUsize>,
        }
        struct Counted(Arc<AtomicUsize>);
        #[async_trait]
        impl LeaseBackend for Counted {
            fn describe(&self) -> String {
                "registration".into()
            }
            async fn extend(&self, _: Duration) -> Result<bool> {
                Ok(true)
            }
            async fn release(&self) -> Result<bool> {
                self.0.fetch_add(1, Ordering::SeqCst);
                Ok(true)
            }
        }
        #[async_trait]
        impl RegistrationLease for Counted {
            async fn update(&self, _: &ServiceInstance) -> Result<bool> {
                Ok(true)
            }
        }
        #[async_trait]
        impl RegistrationBackend for Gated {
            fn name(&self) -> &'static str {
                "gated"
            }
            fn default_ttl(&self) -> Duration {
                Duration::from_secs(10)
            }
            async fn list(&self) -> Result<Vec<ServiceInstance>> {
                Ok(Vec::new())
            }
            async fn put(
                &self,
                _: &ServiceInstance,
                ttl: Duration,
                _: Option<i64>,
            ) -> Result<(Arc<dyn RegistrationLease>, Duration)> {
                self.entered.notify_one();
                self.go.notified().await;
                Ok((Arc::new(Counted(self.released.clone())), ttl))
            }
            async fn replace(&self, _: &ServiceInstance) -> Result<bool> {
                Ok(false)
            }
        }
        let server = Arc::new(Gated::default());
        let registry = Arc::new(Registrations::new(server.clone(), RetrySettings::default()));
        let instance = ServiceInstance::new("svc", "a", "10.0.0.1:80");
        let registering = tokio::spawn({
            let registry = registry.clone();
            async move { registry.register(&instance, Duration::from_secs(10)).await }
        });
        server.entered.notified().await;
        Closable::close(&*registry).await.unwrap();
        server.go.notify_one();
        let e = registering.await.unwrap().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Closed, "{e}");
        assert_eq!(server.released.load(Ordering::SeqCst), 1, "released");
        assert!(registry.instances().is_empty(), "nothing kept");
        let again = ServiceInstance::new("svc", "b", "10.0.0.1:81");
        let e = registry
            .register(&again, Duration::from_secs(10))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Closed, "{e}");
    }

    /// A server side whose puts and releases fail on demand, and whose
    /// registrations on a caller's lease say so.
    #[derive(Default)]
    struct Scripted {
        fail_puts: AtomicBool,
        slow_puts: AtomicBool,
        failing_releases: AtomicUsize,
        releases: Arc<AtomicUsize>,
        released: Arc<AtomicUsize>,
        puts: AtomicUsize,
    }

    struct ScriptedLease {
        lease: Option<i64>,
        server: Arc<Scripted>,
    }

    #[async_trait]
    impl LeaseBackend for ScriptedLease {
        fn describe(&self) -> String {
            "registration".into()
        }
        async fn extend(&self, _: Duration) -> Result<bool> {
            Ok(true)
        }
        async fn release(&self) -> Result<bool> {
            self.server.releases.fetch_add(1, Ordering::SeqCst);
            let failing = &self.server.failing_releases;
            if failing
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                return Err(Error::new(ErrorKind::Unavailable, "release timed out"));
            }
            self.server.released.fetch_add(1, Ordering::SeqCst);
            Ok(true)
        }
    }

    #[async_trait]
    impl RegistrationLease for ScriptedLease {
        async fn update(&self, _: &ServiceInstance) -> Result<bool> {
            Ok(true)
        }
        fn callers_lease(&self) -> Option<i64> {
            self.lease
        }
    }

    struct ScriptedServer(Arc<Scripted>);

    #[async_trait]
    impl RegistrationBackend for ScriptedServer {
        fn name(&self) -> &'static str {
            "scripted"
        }
        fn default_ttl(&self) -> Duration {
            Duration::from_secs(10)
        }
        fn takes_caller_leases(&self) -> bool {
            true
        }
        async fn list(&self) -> Result<Vec<ServiceInstance>> {
            Ok(Vec::new())
        }
        async fn put(
            &self,
            _: &ServiceInstance,
            _: Duration,
            lease: Option<i64>,
        ) -> Result<(Arc<dyn RegistrationLease>, Duration)> {
            if self.0.fail_puts.load(Ordering::SeqCst) {
                return Err(Error::new(ErrorKind::Unavailable, "put timed out"));
            }
            if self.0.slow_puts.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            self.0.puts.fetch_add(1, Ordering::SeqCst);
            let server = self.0.clone();
            Ok((
                Arc::new(ScriptedLease { lease, server }),
                Duration::from_secs(10),
            ))
        }
        async fn replace(&self, _: &ServiceInstance) -> Result<bool> {
            Ok(false)
        }
    }

    fn scripted() -> (Arc<Scripted>, Registrations) {
        let server = Arc::new(Scripted::default());
        let backend = Arc::new(ScriptedServer(server.clone()));
        (
            server,
            Registrations::new(backend, RetrySettings::default()),
        )
    }

    /// Registering again replaces the earlier registration only once the
    /// put succeeded: a failed put leaves it registered, kept and
    /// updatable (also on a caller's lease, where the earlier registration
    /// used to be released before the put).
    #[tokio::test]
    async fn a_failed_registration_again_leaves_the_earlier_one_kept() {
        let (server, registry) = scripted();
        let instance = ServiceInstance::new("svc", "a", "10.0.0.1:80");
        let on_lease = || RegisterOptions::default().lease_id(5);
        registry.register_with(&instance, on_lease()).await.unwrap();
        server.fail_puts.store(true, Ordering::SeqCst);
        let e = registry
            .register(&instance, Duration::from_secs(10))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
        let e = registry
            .register_with(&instance, on_lease())
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
        assert_eq!(
            server.releases.load(Ordering::SeqCst),
            0,
            "nothing released"
        );
        assert_eq!(registry.instances(), [("svc".into(), "a".into())]);
        registry
            .update(&ServiceInstance::new("svc", "a", "10.0.0.1:81"))
            .await
            .expect("the earlier registration is still kept");
        server.fail_puts.store(false, Ordering::SeqCst);
        registry
            .register(&instance, Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(
            server.released.load(Ordering::SeqCst),
            1,
            "replaced once the put succeeded"
        );
        Closable::close(&registry).await.unwrap();
        assert_eq!(server.released.load(Ordering::SeqCst), 2);
    }

    /// A deregistration the server did not take stops keeping the instance
    /// at once; retrying it releases it again (and the registry's close
    /// would), instead of answering `NotRegistered` while the instance
    /// lives on the server.
    #[tokio::test]
    async fn a_failed_deregistration_can_be_retried() {
        let (server, registry) = scripted();
        let instance = ServiceInstance::new("svc", "a", "10.0.0.1:80");
        registry
            .register(&instance, Duration::from_secs(10))
            .await
            .unwrap();
        server.failing_releases.store(2, Ordering::SeqCst);
        for _ in 0..2 {
            let e = registry.deregister("svc", "a").await.unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
            let e = registry.update(&instance).await.unwrap_err();
            assert_eq!(e.kind(), ErrorKind::NotRegistered, "{e}");
        }
        registry.deregister("svc", "a").await.unwrap();
        assert_eq!(server.releases.load(Ordering::SeqCst), 3, "tried thrice");
        assert_eq!(server.released.load(Ordering::SeqCst), 1);
        let e = registry.deregister("svc", "a").await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotRegistered, "{e}");

        // One whose deregistration failed is released by the close.
        registry
            .register(&instance, Duration::from_secs(10))
            .await
            .unwrap();
        server.failing_releases.store(1, Ordering::SeqCst);
        registry.deregister("svc", "a").await.unwrap_err();
        Closable::close(&registry).await.unwrap();
        assert_eq!(server.released.load(Ordering::SeqCst), 2);
        assert!(registry.instances().is_empty());
    }

    /// A deregistration retried while the instance is registered again on
    /// the same caller's lease: the retry waits for the new registration,
    /// then finds nothing left to release (the put replaced the value the
    /// failed deregistration left); releasing it would delete the new one.
    #[tokio::test]
    async fn a_retried_deregistration_spares_a_registration_made_meanwhile() {
        let (server, registry) = scripted();
        let registry = Arc::new(registry);
        let instance = ServiceInstance::new("svc", "a", "10.0.0.1:80");
        let on_lease = || RegisterOptions::default().lease_id(5);
        registry.register_with(&instance, on_lease()).await.unwrap();
        server.failing_releases.store(1, Ordering::SeqCst);
        registry.deregister("svc", "a").await.unwrap_err();
        server.slow_puts.store(true, Ordering::SeqCst);
        let again = tokio::spawn({
            let (registry, instance) = (registry.clone(), instance.clone());
            async move { registry.register_with(&instance, on_lease()).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        let retried = tokio::spawn({
            let registry = registry.clone();
            async move { registry.deregister("svc", "a").await }
        });
        again.await.unwrap().unwrap();
        retried.await.unwrap().unwrap();
        assert_eq!(
            server.releases.load(Ordering::SeqCst),
            1,
            "only the failed release reached the server"
        );
        assert_eq!(registry.instances(), [("svc".into(), "a".into())]);
        Closable::close(&*registry).await.unwrap();
    }

    /// An instance registered again on the same caller's lease: the new
    /// value is on that lease, so the earlier registration is not released
    /// (which would delete it); on another lease it is.
    #[tokio::test]
    async fn a_registration_replaced_on_the_same_callers_lease_is_not_released() {
        let (server, registry) = scripted();
        let instance = ServiceInstance::new("svc", "a", "10.0.0.1:80");
        for lease in [5, 5] {
            let opts = RegisterOptions::default().lease_id(lease);
            registry.register_with(&instance, opts).await.unwrap();
        }
        assert_eq!(server.releases.load(Ordering::SeqCst), 0);
        let opts = RegisterOptions::default().lease_id(6);
        registry.register_with(&instance, opts).await.unwrap();
        assert_eq!(server.releases.load(Ordering::SeqCst), 1);
        registry
            .register(&instance, Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(server.releases.load(Ordering::SeqCst), 2);
        assert_eq!(server.puts.load(Ordering::SeqCst), 4);
        Closable::close(&registry).await.unwrap();
    }

    /// The backend's policy, applied once for every backend: its default
    /// TTL, its minimum (a shorter TTL is raised to it), a caller's lease
    /// only where it takes one, its default metadata under the instance's
    /// own, and `Closed` once closed.
    #[tokio::test]
    async fn the_backends_policy_applies_to_every_call() {
        let (server, registry) = registry();
        let instance = ServiceInstance::new("svc", "a", "10.0.0.1:80").with_metadata("zone", "b");
        registry
            .register_with(&instance, RegisterOptions::default())
            .await
            .unwrap();
        {
            let put = server.put.lock();
            let (stored, ttl, lease) = &put[0];
            assert_eq!((*ttl, *lease), (Duration::from_secs(7), None));
            assert_eq!(stored.metadata["region"], "eu");
            assert_eq!(
                stored.metadata["zone"], "b",
                "the instance's own value wins"
            );
        }
        let short = ServiceInstance::new("svc", "b", "10.0.0.2:80");
        let opts = RegisterOptions::default().ttl(Duration::from_millis(99));
        registry.register_with(&short, opts).await.unwrap();
        assert_eq!(
            server.put.lock()[1].1,
            Duration::from_millis(100),
            "a TTL under the minimum is raised to it"
        );
        let leased = RegisterOptions::default().lease_id(42);
        let e = registry.register_with(&instance, leased).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
        assert_eq!(server.put.lock().len(), 2, "refused calls reach no server");

        let services = registry.list_services().await.unwrap();
        assert_eq!(services.len(), 1);
        server.closed.store(true, Ordering::SeqCst);
        let kinds = [
            registry.register(&instance, Duration::from_secs(1)).await,
            registry.update(&instance).await,
            registry.deregister("svc", "a").await,
            registry.list_services().await.map(drop),
        ]
        .map(|r| r.unwrap_err().kind());
        assert_eq!(kinds, [ErrorKind::Closed; 4]);
        // The close still deregisters what is registered.
        Closable::close(&registry).await.unwrap();
        assert!(registry.instances().is_empty());
    }
}
