//! A tonic channel balanced over the live instances of a service, for any
//! [`ServiceDiscovery`] (etcd, Redis, in-process).
//!
//! [`BalancedChannel`] follows the discovery watch: an instance that is
//! added is used from the next call on, one that goes away is dropped at
//! once. A call that fails at the transport level (the server is gone
//! before its lease expired) ejects that endpoint for a while, so the
//! following calls go to the others. Calls are spread round-robin, at
//! random, or always to the first instance (by id) while it is healthy.
//!
//! An instance is dialled over TLS when its metadata says
//! `scheme = "https"`, or when it says no scheme and the options carry
//! [`GrpcTls`] (the CA to trust, optionally a client certificate for mutual
//! TLS); `scheme = "http"` is plain text.
//!
//! ```no_run
//! use std::sync::Arc;
//! use im_infra::registry::grpc::{BalancePolicy, BalancedChannel, GrpcOptions};
//! use im_infra::registry::ServiceDiscovery;
//!
//! async fn client(discovery: Arc<dyn ServiceDiscovery>) -> im_infra::Result<()> {
//!     let channel = BalancedChannel::connect(
//!         discovery,
//!         "user-service",
//!         GrpcOptions::default().policy(BalancePolicy::RoundRobin),
//!     )
//!     .await?;
//!     // let mut users = UserServiceClient::new(channel.clone());
//!     println!("{} endpoints", channel.endpoints().len());
//!     Ok(())
//! }
//! ```

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use tonic::body::Body;
use tonic::transport::{Channel, Endpoint};
use tower::ServiceExt;

use super::{ServiceDiscovery, ServiceEventKind, ServiceInstance};
use crate::error::{Error, ErrorKind, Result};

mod tls;

pub use tls::GrpcTls;

/// The metadata key naming how an instance is dialled: `"https"` (TLS) or
/// `"http"` (plain text). Without it, TLS is used when the options carry
/// [`GrpcTls`].
pub const SCHEME_KEY: &str = "scheme";

/// How calls are spread over the live instances.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum BalancePolicy {
    /// Each call to the next instance in turn.
    #[default]
    RoundRobin,
    /// Each call to an instance chosen at random.
    Random,
    /// Every call to the first healthy instance (by id); the others are
    /// standbys.
    PickFirst,
}

/// Options of a [`BalancedChannel`].
#[derive(Debug, Clone)]
pub struct GrpcOptions {
    /// How calls are spread.
    pub policy: BalancePolicy,
    /// Only instances whose metadata contains these labels.
    pub filter: BTreeMap<String, String>,
    /// Bound of connecting to one instance.
    pub connect_timeout: Duration,
    /// Bound of one call (none by default: the caller's deadline applies).
    pub request_timeout: Option<Duration>,
    /// How long an instance whose call failed at the transport level is
    /// skipped.
    pub eject_for: Duration,
    /// HTTP/2 PINGs on every connection at this interval, idle or not; a
    /// connection whose PING is not answered within the same interval is
    /// closed, failing its calls, so an instance behind a frozen network
    /// is ejected instead of holding every call until its deadline. `None`:
    /// no PINGs.
    pub keepalive: Option<Duration>,
    /// Bound of the first read of the instances.
    pub discovery_timeout: Duration,
    /// TLS towards `https` instances (none: every instance is dialled in
    /// plain text, and one that says `scheme = "https"` is skipped with a
    /// warning).
    pub tls: Option<GrpcTls>,
}

impl Default for GrpcOptions {
    fn default() -> Self {
        GrpcOptions {
            policy: BalancePolicy::RoundRobin,
            filter: BTreeMap::new(),
            connect_timeout: Duration::from_secs(2),
            request_timeout: None,
            eject_for: Duration::from_secs(5),
            keepalive: Some(Duration::from_secs(10)),
            discovery_timeout: Duration::from_secs(5),
            tls: None,
        }
    }
}

impl GrpcOptions {
    /// Sets the policy.
    #[must_use]
    pub fn policy(mut self, policy: BalancePolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Dials `https` instances with `tls` (and instances without a
    /// [`SCHEME_KEY`] label too).
    #[must_use]
    pub fn tls(mut self, tls: GrpcTls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Requires a metadata label.
    #[must_use]
    pub fn with_metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.filter.insert(key.into(), value.into());
        self
    }
}

struct Target {
    instance: ServiceInstance,
    channel: Channel,
    /// Milliseconds since `Shared::origin` until which the target is skipped.
    ejected_until: AtomicU64,
}

struct Shared {
    service: String,
    opts: GrpcOptions,
    targets: ArcSwap<Vec<Arc<Target>>>,
    next: AtomicUsize,
    origin: Instant,
    stop: CancellationToken,
}

impl Shared {
    fn now_ms(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64
    }

    fn target_for(&self, instance: &ServiceInstance) -> Result<Arc<Target>> {
        let tls = match instance.metadata.get(SCHEME_KEY).map(String::as_str) {
            Some("https") => Some(self.opts.tls.as_ref().ok_or_else(|| {
                Error::new(
                    ErrorKind::InvalidConfig,
                    "the instance speaks https and the channel has no GrpcTls",
                )
            })?),
            Some("http") => None,
            None => self.opts.tls.as_ref(),
            Some(other) => {
                return Err(Error::invalid_argument(format!(
                    "unknown scheme {other:?} (https or http)"
                )))
            }
        };
        let scheme = if tls.is_some() { "https" } else { "http" };
        let endpoint = Endpoint::from_shared(format!("{scheme}://{}", instance.address))
            .map_err(|e| {
                Error::invalid_argument(format!("bad address {:?}", instance.address))
                    .with_source(e)
            })?
            .connect_timeout(self.opts.connect_timeout);
        let endpoint = match tls {
            Some(tls) => tls.apply(endpoint)?,
            None => endpoint,
        };
        let endpoint = match self.opts.request_timeout {
            Some(t) => endpoint.timeout(t),
            None => endpoint,
        };
        let endpoint = match self.opts.keepalive {
            Some(every) => endpoint
                .http2_keep_alive_interval(every)
                .keep_alive_timeout(every)
                .keep_alive_while_idle(true),
            None => endpoint,
        };
        Ok(Arc::new(Target {
            instance: instance.clone(),
            channel: endpoint.connect_lazy(),
            ejected_until: AtomicU64::new(0),
        }))
    }

    fn upsert(&self, instance: &ServiceInstance) {
        if !instance.matches(&self.opts.filter) {
            self.remove(&instance.id);
            return;
        }
        let current = self.targets.load();
        // A new lease alone (etcd, after a re-registration) keeps the channel.
        if current
            .iter()
            .any(|t| t.instance.registered() == instance.registered())
        {
            return;
        }
        let target = match self.target_for(instance) {
            Ok(target) => target,
            Err(e) => {
                tracing::warn!(service = %self.service, id = %instance.id, address = %instance.address, error = %e, "instance skipped: it cannot be dialled");
                self.remove(&instance.id);
                return;
            }
        };
        let mut next: Vec<Arc<Target>> = current
            .iter()
            .filter(|t| t.instance.id != instance.id)
            .cloned()
            .collect();
        next.push(target);
        next.sort_by(|a, b| a.instance.id.cmp(&b.instance.id));
        self.targets.store(Arc::new(next));
    }

    fn remove(&self, id: &str) {
        let current = self.targets.load();
        if current.iter().any(|t| t.instance.id == id) {
            let next: Vec<Arc<Target>> = current
                .iter()
                .filter(|t| t.instance.id != id)
                .cloned()
                .collect();
            self.targets.store(Arc::new(next));
        }
    }

    fn pick(&self) -> Option<Arc<Target>> {
        let all = self.targets.load();
        let now = self.now_ms();
        let healthy: Vec<&Arc<Target>> = all
            .iter()
            .filter(|t| t.ejected_until.load(Ordering::Relaxed) <= now)
            .collect();
        // When every instance is ejected, try them anyway rather than fail.
        let pool: Vec<&Arc<Target>> = if healthy.is_empty() {
            all.iter().collect()
        } else {
            healthy
        };
        if pool.is_empty() {
            return None;
        }
        let i = match self.opts.policy {
            BalancePolicy::RoundRobin => self.next.fetch_add(1, Ordering::Relaxed) % pool.len(),
            BalancePolicy::Random => fastrand::usize(..pool.len()),
            BalancePolicy::PickFirst => 0,
        };
        Some(pool[i].clone())
    }

    fn eject(&self, target: &Target) {
        let until = self.now_ms() + self.opts.eject_for.as_millis() as u64;
        target.ejected_until.store(until, Ordering::Relaxed);
        tracing::warn!(service = %self.service, id = %target.instance.id, address = %target.instance.address, "endpoint failed; ejected");
    }
}

/// A tonic channel over the live instances of one service; cheap to clone
/// (clones share endpoints and the discovery watch, which stops when the
/// last clone is dropped).
#[derive(Clone)]
pub struct BalancedChannel {
    shared: Arc<Shared>,
    _stop: Arc<StopOnDrop>,
}

struct StopOnDrop(CancellationToken);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

impl std::fmt::Debug for BalancedChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BalancedChannel")
            .field("service", &self.shared.service)
            .field("policy", &self.shared.opts.policy)
            .field("endpoints", &self.endpoints())
            .finish()
    }
}

impl BalancedChannel {
    /// Reads the live instances of `service` and follows their changes.
    /// Succeeds with no instance too (calls then fail with `NoInstances`
    /// until one registers). `InvalidConfig` when the options' TLS
    /// certificates or key do not parse.
    pub async fn connect(
        discovery: Arc<dyn ServiceDiscovery>,
        service: &str,
        opts: GrpcOptions,
    ) -> Result<Self> {
        crate::validate::name("service name", service)?;
        if let Some(tls) = &opts.tls {
            tls.validate()?;
        }
        let stop = CancellationToken::new();
        let shared = Arc::new(Shared {
            service: service.to_owned(),
            opts,
            targets: ArcSwap::from_pointee(Vec::new()),
            next: AtomicUsize::new(0),
            origin: Instant::now(),
            stop: stop.clone(),
        });
        let first = crate::telemetry::with_timeout(
            shared.opts.discovery_timeout,
            "grpc.discover",
            discovery.instances(service),
        )
        .await?;
        for i in &first {
            shared.upsert(i);
        }
        tokio::spawn(follow(discovery, Arc::downgrade(&shared)));
        Ok(BalancedChannel {
            shared,
            _stop: Arc::new(StopOnDrop(stop)),
        })
    }

    /// The addresses calls may go to now.
    pub fn endpoints(&self) -> Vec<String> {
        self.shared
            .targets
            .load()
            .iter()
            .map(|t| t.instance.address.clone())
            .collect()
    }
}

/// Follows the discovery watch, reconnecting it forever with backoff.
async fn follow(discovery: Arc<dyn ServiceDiscovery>, shared: std::sync::Weak<Shared>) {
    let mut delay = Duration::from_millis(100);
    loop {
        let Some(s) = shared.upgrade() else { return };
        let (service, stop) = (s.service.clone(), s.stop.clone());
        drop(s);
        // Instances that went away while the watch was down are found by
        // a listing after the watch started: the watch never reports the
        // deletion of one it did not know. Without that listing the watch
        // is started again.
        let watched = match discovery.watch(&service).await {
            Ok(events) => discovery
                .instances(&service)
                .await
                .map(|live| (events, live)),
            Err(e) => Err(e),
        };
        if let Ok((mut events, live)) = watched {
            delay = Duration::from_millis(100);
            if let Some(s) = shared.upgrade() {
                let ids: std::collections::BTreeSet<&str> =
                    live.iter().map(|i| i.id.as_str()).collect();
                let stale: Vec<String> = s
                    .targets
                    .load()
                    .iter()
                    .filter(|t| !ids.contains(t.instance.id.as_str()))
                    .map(|t| t.instance.id.clone())
                    .collect();
                for id in stale {
                    s.remove(&id);
                }
            }
            loop {
                let next = tokio::select! {
                    _ = stop.cancelled() => return,
                    e = events.next() => e,
                };
                let Some(s) = shared.upgrade() else { return };
                match next {
                    Some(Ok(e)) => match e.kind {
                        ServiceEventKind::Add | ServiceEventKind::Update => s.upsert(&e.instance),
                        ServiceEventKind::Delete => s.remove(&e.instance.id),
                    },
                    _ => break,
                }
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Whether a failed call only ran out of its deadline (`grpc-timeout`):
/// the instance answered too slowly, or the work waited on something, but
/// it is not gone, so it is not ejected. Ejecting it would send the next
/// calls to the other instances only, and, once every instance had been
/// slow once, to dead instances as well.
fn ran_out_of_time(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(e);
    while let Some(err) = next {
        if err.is::<tonic::TimeoutExpired>() {
            return true;
        }
        next = err.source();
    }
    false
}

impl tower::Service<http::Request<Body>> for BalancedChannel {
    type Response = http::Response<Body>;
    type Error = BoxError;
    type Future =
        Pin<Box<dyn Future<Output = std::result::Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<std::result::Result<(), Self::Error>> {
        // Each call picks its endpoint and waits for it to be ready.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let shared = self.shared.clone();
        Box::pin(async move {
            let Some(target) = shared.pick() else {
                return Err(Box::new(Error::new(
                    ErrorKind::NoInstances,
                    format!("no live instance of {:?}", shared.service),
                )) as BoxError);
            };
            match target.channel.clone().oneshot(req).await {
                Ok(resp) => Ok(resp),
                Err(e) => {
                    if !ran_out_of_time(&e) {
                        shared.eject(&target);
                    }
                    Err(Box::new(e) as BoxError)
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::ran_out_of_time;

    #[derive(Debug)]
    struct Wrapping(Box<dyn std::error::Error + Send + Sync>);

    impl std::fmt::Display for Wrapping {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("transport error")
        }
    }

    impl std::error::Error for Wrapping {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&*self.0)
        }
    }

    #[test]
    fn a_deadline_anywhere_in_the_chain_is_not_an_instance_failure() {
        assert!(ran_out_of_time(&tonic::TimeoutExpired(())));
        assert!(ran_out_of_time(&Wrapping(Box::new(tonic::TimeoutExpired(
            ()
        )))));
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert!(!ran_out_of_time(&refused));
        assert!(!ran_out_of_time(&Wrapping(Box::new(refused))));
    }
}

#[cfg(test)]
mod follow_tests {
    use std::collections::VecDeque;
    use std::sync::Mutex;

    use async_trait::async_trait;

    use super::*;
    use crate::registry::{RegistryCapabilities, ServiceEvent, ServiceEventStream};

    fn instance(id: &str, port: u16) -> ServiceInstance {
        ServiceInstance::new("svc", id, format!("127.0.0.1:{port}"))
    }

    /// A discovery whose listings follow a script (then `a` alone), and
    /// whose watch knows only `a`: `b` went before the watch's first
    /// listing, so it never reports `b`'s deletion.
    struct Scripted {
        listings: Mutex<VecDeque<Result<Vec<ServiceInstance>>>>,
    }

    #[async_trait]
    impl ServiceDiscovery for Scripted {
        fn capabilities(&self) -> RegistryCapabilities {
            RegistryCapabilities::default().with_watch()
        }

        async fn instances(&self, _service: &str) -> Result<Vec<ServiceInstance>> {
            let next = self.listings.lock().unwrap().pop_front();
            next.unwrap_or_else(|| Ok(vec![instance("a", 1)]))
        }

        async fn watch(&self, _service: &str) -> Result<ServiceEventStream> {
            let add = ServiceEvent {
                kind: ServiceEventKind::Add,
                instance: instance("a", 1),
            };
            Ok(futures::stream::iter([Ok(add)])
                .chain(futures::stream::pending())
                .boxed())
        }
    }

    #[tokio::test]
    async fn an_instance_gone_before_the_watch_began_is_dropped_even_if_a_listing_failed() {
        let discovery = Arc::new(Scripted {
            listings: Mutex::new(VecDeque::from([
                Ok(vec![instance("a", 1), instance("b", 2)]),
                Err(Error::new(ErrorKind::Unavailable, "a listing that failed")),
            ])),
        });
        let channel = BalancedChannel::connect(discovery, "svc", GrpcOptions::default())
            .await
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while channel.endpoints() != ["127.0.0.1:1"] {
            assert!(
                Instant::now() < deadline,
                "b is still a target: {:?}",
                channel.endpoints()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
