//! Shared plumbing of registry watches: an [`InstanceCursor`] that turns a
//! backend's listings and changes into [`ServiceEvent`]s, and a driver
//! ([`spawn_watch`]) fed by a backend's [`InstanceHistory`].
//!
//! A watch starts with an `Add` for every live instance, then follows the
//! changes. After a failure, or a [gap](InstanceBatch::Gap) in what the
//! backend can read (a trimmed stream, a compacted revision), the driver
//! lists the instances again and reports the difference from what it
//! reported before, so the consumer ends on the server's state whatever
//! it missed.
//!
//! ```
//! use im_infra::registry::watch::{InstanceChange, InstanceCursor};
//! use im_infra::registry::{ServiceEventKind, ServiceInstance};
//!
//! let a = ServiceInstance::new("svc", "a", "10.0.0.1:80");
//! let b = ServiceInstance::new("svc", "b", "10.0.0.2:80");
//! let mut cursor = InstanceCursor::new();
//! let events = cursor.resync(7, vec![a.clone(), b.clone()]);
//! assert_eq!(events.len(), 2); // an Add per live instance
//! let moved = b.clone().with_metadata("zone", "eu");
//! let e = cursor.apply(InstanceChange::Put(moved)).unwrap();
//! assert_eq!(e.kind, ServiceEventKind::Update);
//! // After a gap: "a" is gone, nothing else changed.
//! let events = cursor.resync(12, vec![b.with_metadata("zone", "eu")]);
//! assert_eq!((events.len(), events[0].kind), (1, ServiceEventKind::Delete));
//! assert_eq!(cursor.revision(), 12);
//! ```

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{ServiceEvent, ServiceEventKind, ServiceEventStream, ServiceInstance};
use crate::error::{ErrorKind, Result};
use crate::RetrySettings;

/// Events buffered between the driver and a slow consumer.
const BUFFER: usize = 256;

/// The instances a registry watch reported, and the revision of the
/// backend's change history it has read up to.
///
/// ```
/// use im_infra::registry::watch::{InstanceChange, InstanceCursor};
/// use im_infra::registry::{ServiceEventKind, ServiceInstance};
///
/// let mut cursor = InstanceCursor::new();
/// let a = ServiceInstance::new("svc", "a", "10.0.0.1:80");
/// assert_eq!(cursor.apply(InstanceChange::Put(a.clone())).unwrap().kind, ServiceEventKind::Add);
/// assert!(cursor.apply(InstanceChange::Put(a)).is_none(), "unchanged");
/// let gone = cursor.apply(InstanceChange::Delete("a".into())).unwrap();
/// assert_eq!((gone.kind, gone.instance.address.as_str()), (ServiceEventKind::Delete, "10.0.0.1:80"));
/// assert!(cursor.apply(InstanceChange::Delete("a".into())).is_none(), "not known");
/// ```
#[derive(Debug, Clone, Default)]
pub struct InstanceCursor {
    known: BTreeMap<String, ServiceInstance>,
    revision: u64,
}

impl InstanceCursor {
    /// A cursor that has reported nothing.
    pub fn new() -> Self {
        InstanceCursor::default()
    }

    /// The revision the changes were read up to.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// The instances reported live, by id.
    pub fn known(&self) -> &BTreeMap<String, ServiceInstance> {
        &self.known
    }

    /// Moves the cursor past `revision` (never back).
    ///
    /// ```
    /// let mut cursor = im_infra::registry::watch::InstanceCursor::new();
    /// cursor.advance_to(9);
    /// cursor.advance_to(4);
    /// assert_eq!(cursor.revision(), 9);
    /// ```
    pub fn advance_to(&mut self, revision: u64) {
        self.revision = self.revision.max(revision);
    }

    /// Given every live instance read at `revision`, returns the events that
    /// turn what was reported into that: a `Delete` for every instance gone,
    /// then an `Add` or `Update` for every new or changed one, each in id
    /// order. The cursor moves to `revision` (back, if the listing is older).
    ///
    /// ```
    /// use im_infra::registry::watch::InstanceCursor;
    /// use im_infra::registry::{ServiceEventKind, ServiceInstance};
    ///
    /// let mut cursor = InstanceCursor::new();
    /// cursor.resync(20, vec![ServiceInstance::new("svc", "a", "10.0.0.1:80")]);
    /// // Listed again, at an older revision (the server came back older).
    /// let events = cursor.resync(12, vec![ServiceInstance::new("svc", "b", "10.0.0.2:80")]);
    /// let kinds: Vec<_> = events.iter().map(|e| (e.kind, e.instance.id.as_str())).collect();
    /// assert_eq!(kinds, [(ServiceEventKind::Delete, "a"), (ServiceEventKind::Add, "b")]);
    /// assert_eq!((cursor.revision(), cursor.known().len()), (12, 1));
    /// ```
    pub fn resync(&mut self, revision: u64, now: Vec<ServiceInstance>) -> Vec<ServiceEvent> {
        let now: BTreeMap<String, ServiceInstance> =
            now.into_iter().map(|i| (i.id.clone(), i)).collect();
        let gone = self
            .known
            .iter()
            .filter(|(id, _)| !now.contains_key(*id))
            .map(|(_, old)| event(ServiceEventKind::Delete, old));
        let mut events: Vec<ServiceEvent> = gone.collect();
        for (id, instance) in &now {
            match self.known.get(id) {
                None => events.push(event(ServiceEventKind::Add, instance)),
                Some(old) if old != instance => {
                    events.push(event(ServiceEventKind::Update, instance))
                }
                Some(_) => {}
            }
        }
        self.known = now;
        self.revision = revision;
        events
    }

    /// Applies one change; returns its event, or `None` when it changes
    /// nothing that was reported (an unchanged instance, the removal of an
    /// unknown one). A `Delete` carries the instance as last reported.
    pub fn apply(&mut self, change: InstanceChange) -> Option<ServiceEvent> {
        match change {
            InstanceChange::Put(instance) => {
                let kind = match self.known.get(&instance.id) {
                    None => ServiceEventKind::Add,
                    Some(old) if *old == instance => return None,
                    Some(_) => ServiceEventKind::Update,
                };
                self.known.insert(instance.id.clone(), instance.clone());
                Some(ServiceEvent { kind, instance })
            }
            InstanceChange::Delete(id) => {
                let instance = self.known.remove(&id)?;
                Some(event(ServiceEventKind::Delete, &instance))
            }
        }
    }
}

fn event(kind: ServiceEventKind, instance: &ServiceInstance) -> ServiceEvent {
    ServiceEvent {
        kind,
        instance: instance.clone(),
    }
}

/// One change of a watched service, as a backend read it.
///
/// ```
/// use im_infra::registry::watch::InstanceChange;
/// use im_infra::registry::ServiceInstance;
///
/// let put = InstanceChange::Put(ServiceInstance::new("svc", "a", "10.0.0.1:80"));
/// let delete = InstanceChange::Delete("a".into()); // by instance id
/// assert_ne!(put, delete);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InstanceChange {
    /// The instance was registered or updated.
    Put(ServiceInstance),
    /// The instance with this id was removed (deregistered, expired).
    Delete(String),
}

/// What one read of a backend's registry history found.
///
/// ```
/// use im_infra::registry::watch::{InstanceBatch, InstanceChange};
///
/// let batch = InstanceBatch::Changes { changes: vec![InstanceChange::Delete("a".into())], upto: 42 };
/// assert!(matches!(batch, InstanceBatch::Changes { upto: 42, .. }));
/// assert_ne!(batch, InstanceBatch::Gap);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InstanceBatch {
    /// The changes of the watched service after the cursor, in order
    /// (possibly none), read up to revision `upto` (0: unknown).
    Changes {
        /// The changes.
        changes: Vec<InstanceChange>,
        /// The revision read up to: the cursor moves there.
        upto: u64,
    },
    /// The history no longer continues from the cursor (trimmed,
    /// compacted): the driver lists the instances again.
    Gap,
}

/// A backend's registry, as one watch of one service reads it: what a
/// backend implements to get a resumable registry watch from
/// [`spawn_watch`]. One value is made per watch and may keep per-watch
/// state (a dedicated connection, a server-side watch).
///
/// ```
/// use async_trait::async_trait;
/// use im_infra::registry::watch::{InstanceBatch, InstanceHistory};
/// use im_infra::registry::ServiceInstance;
/// use im_infra::Result;
///
/// /// A service with one instance that never changes.
/// struct Fixed;
///
/// #[async_trait]
/// impl InstanceHistory for Fixed {
///     async fn list(&mut self) -> Result<(u64, Vec<ServiceInstance>)> {
///         Ok((3, vec![ServiceInstance::new("svc", "a", "10.0.0.1:80")]))
///     }
///     async fn next_batch(&mut self, after: u64) -> Result<InstanceBatch> {
///         tokio::time::sleep(std::time::Duration::from_secs(1)).await;
///         Ok(InstanceBatch::Changes { changes: Vec::new(), upto: after })
///     }
/// }
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<()> {
/// assert_eq!(Fixed.list().await?.1.len(), 1);
/// # Ok(()) }
/// ```
#[async_trait]
pub trait InstanceHistory: Send + 'static {
    /// Every live instance of the watched service, sorted by id, and the
    /// revision of the history they were read at.
    async fn list(&mut self) -> Result<(u64, Vec<ServiceInstance>)>;

    /// Prepares to read the changes after `after` (a connection, a
    /// server-side watch); called after every listing. The default does
    /// nothing.
    async fn connect(&mut self, after: u64) -> Result<()> {
        let _ = after;
        Ok(())
    }

    /// Waits for the changes after revision `after`. It may wait as long
    /// as it likes (the driver stops waiting when the watch ends).
    async fn next_batch(&mut self, after: u64) -> Result<InstanceBatch>;
}

/// Starts a watch fed by `history` and returns its stream: an `Add` for
/// every instance of a listing read at this call (a failure is returned),
/// then the changes. After a failure the driver backs off with `retry`
/// (the delays start again after a successful batch), lists again and
/// reports the difference; after a gap it lists again at once. It ends
/// when the stream is dropped, `shutdown` is cancelled or `history`
/// answers `Closed`; the stream then ends.
///
/// ```
/// # use async_trait::async_trait;
/// # use im_infra::registry::watch::{spawn_watch, InstanceBatch, InstanceHistory};
/// # use im_infra::registry::{ServiceEventKind, ServiceInstance};
/// # use im_infra::{Result, RetrySettings};
/// # use futures::StreamExt;
/// # use tokio_util::sync::CancellationToken;
/// # struct Fixed;
/// # #[async_trait]
/// # impl InstanceHistory for Fixed {
/// #     async fn list(&mut self) -> Result<(u64, Vec<ServiceInstance>)> {
/// #         Ok((3, vec![ServiceInstance::new("svc", "a", "10.0.0.1:80")]))
/// #     }
/// #     async fn next_batch(&mut self, _: u64) -> Result<InstanceBatch> {
/// #         futures::future::pending::<()>().await; unreachable!()
/// #     }
/// # }
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<()> {
/// let shutdown = CancellationToken::new();
/// let mut events = spawn_watch(Fixed, RetrySettings::default(), shutdown.clone()).await?;
/// let first = events.next().await.unwrap()?;
/// assert_eq!((first.kind, first.instance.id.as_str()), (ServiceEventKind::Add, "a"));
/// shutdown.cancel();
/// assert!(events.next().await.is_none());
/// # Ok(()) }
/// ```
pub async fn spawn_watch<H: InstanceHistory>(
    mut history: H,
    retry: RetrySettings,
    shutdown: CancellationToken,
) -> Result<ServiceEventStream> {
    // The first listing is read now, so the stream starts from this call.
    let first = history.list().await?;
    let (tx, mut rx) = mpsc::channel(BUFFER);
    let driver = Driver {
        history,
        cursor: InstanceCursor::new(),
        tx,
    };
    tokio::spawn(driver.run(first, retry, shutdown));
    Ok(Box::pin(futures::stream::poll_fn(move |cx| {
        rx.poll_recv(cx)
    })))
}

/// One running registry watch.
struct Driver<H> {
    history: H,
    cursor: InstanceCursor,
    tx: mpsc::Sender<Result<ServiceEvent>>,
}

impl<H: InstanceHistory> Driver<H> {
    /// Lists and follows the changes, listing again after a gap and (with
    /// backoff) after a failure, until the watch ends.
    async fn run(
        mut self,
        first: (u64, Vec<ServiceInstance>),
        retry: RetrySettings,
        shutdown: CancellationToken,
    ) {
        let tx = self.tx.clone();
        let mut listing = Some(first);
        let mut delays = None;
        let mut listed = false;
        loop {
            let step = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return,
                _ = tx.closed() => return,
                step = self.step(listed, listing.take()) => step,
            };
            match step {
                Ok(now_listed) => {
                    if listed && now_listed {
                        delays = None;
                    }
                    listed = now_listed;
                }
                Err(e) if e.kind() == ErrorKind::Closed => return,
                Err(e) => {
                    listed = false;
                    tracing::debug!(error = %e, "registry watch interrupted; listing again");
                    let pause = delays
                        .get_or_insert_with(|| retry.delays_forever())
                        .next()
                        .unwrap_or(Duration::from_secs(1));
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tx.closed() => return,
                        _ = tokio::time::sleep(pause) => {}
                    }
                }
            }
        }
    }

    /// Lists (`listed == false`; `listing` if given, else from the
    /// backend) and connects, or reads the next batch; delivers what it
    /// brings. Returns whether the cursor still follows the history
    /// (`false` after a gap).
    async fn step(
        &mut self,
        listed: bool,
        listing: Option<(u64, Vec<ServiceInstance>)>,
    ) -> Result<bool> {
        let mut connect = None;
        let events = if listed {
            match self.history.next_batch(self.cursor.revision()).await? {
                InstanceBatch::Gap => return Ok(false),
                InstanceBatch::Changes { changes, upto } => {
                    let events = changes
                        .into_iter()
                        .filter_map(|c| self.cursor.apply(c))
                        .collect();
                    self.cursor.advance_to(upto);
                    events
                }
            }
        } else {
            let (revision, now) = match listing {
                Some(l) => l,
                None => self.history.list().await?,
            };
            connect = Some(revision);
            self.cursor.resync(revision, now)
        };
        for e in events {
            if self.tx.send(Ok(e)).await.is_err() {
                return Ok(true); // the consumer went away: `run` sees it next
            }
        }
        if let Some(revision) = connect {
            self.history.connect(revision).await?;
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::{Arc, Mutex};

    use futures::StreamExt;
    use tokio::time::Instant;

    use super::*;
    use crate::error::Error;

    fn inst(id: &str, port: u16) -> ServiceInstance {
        ServiceInstance::new("svc", id, format!("10.0.0.1:{port}"))
    }

    fn ev(kind: ServiceEventKind, i: &ServiceInstance) -> ServiceEvent {
        event(kind, i)
    }

    use ServiceEventKind::{Add, Delete, Update};

    #[test]
    fn resync_reports_deletes_then_adds_and_updates_in_id_order() {
        let mut c = InstanceCursor::new();
        let first = c.resync(5, vec![inst("b", 2), inst("a", 1), inst("c", 3)]);
        assert_eq!(
            first,
            vec![
                ev(Add, &inst("a", 1)),
                ev(Add, &inst("b", 2)),
                ev(Add, &inst("c", 3))
            ]
        );
        // "a" and "c" are gone, "b" moved, "d" is new.
        let events = c.resync(9, vec![inst("d", 4), inst("b", 20)]);
        assert_eq!(
            events,
            vec![
                ev(Delete, &inst("a", 1)),
                ev(Delete, &inst("c", 3)),
                ev(Update, &inst("b", 20)),
                ev(Add, &inst("d", 4)),
            ]
        );
        assert_eq!(c.revision(), 9);
        assert!(c.resync(9, vec![inst("d", 4), inst("b", 20)]).is_empty());
        // A listing at an older revision moves the cursor back.
        assert!(c.resync(3, vec![inst("d", 4), inst("b", 20)]).is_empty());
        assert_eq!(c.revision(), 3);
        assert_eq!(c.known().keys().collect::<Vec<_>>(), ["b", "d"]);
    }

    #[test]
    fn apply_reports_only_what_changes_and_deletes_as_last_known() {
        let mut c = InstanceCursor::new();
        let put = InstanceChange::Put;
        assert_eq!(c.apply(put(inst("a", 1))), Some(ev(Add, &inst("a", 1))));
        assert_eq!(c.apply(put(inst("a", 1))), None);
        assert_eq!(c.apply(put(inst("a", 2))), Some(ev(Update, &inst("a", 2))));
        assert_eq!(
            c.apply(InstanceChange::Delete("a".into())),
            Some(ev(Delete, &inst("a", 2)))
        );
        assert_eq!(c.apply(InstanceChange::Delete("a".into())), None);
        c.advance_to(8);
        c.advance_to(4);
        assert_eq!(c.revision(), 8);
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Call {
        List,
        Connect(u64),
        Next(u64),
    }

    type Log = Arc<Mutex<Vec<(Call, Instant)>>>;

    /// A registry that answers from a script and logs every call. An
    /// exhausted script of batches waits forever; of connects, succeeds.
    struct Script {
        log: Log,
        lists: VecDeque<Result<(u64, Vec<ServiceInstance>)>>,
        connects: VecDeque<Result<()>>,
        batches: VecDeque<Result<InstanceBatch>>,
        _alive: mpsc::Sender<()>,
    }

    impl Script {
        fn new(
            lists: Vec<(u64, Vec<ServiceInstance>)>,
            batches: Vec<Result<InstanceBatch>>,
        ) -> (Self, Log, mpsc::Receiver<()>) {
            let log = Log::default();
            let (alive, dropped) = mpsc::channel(1);
            let script = Script {
                log: log.clone(),
                lists: lists.into_iter().map(Ok).collect(),
                connects: VecDeque::new(),
                batches: batches.into(),
                _alive: alive,
            };
            (script, log, dropped)
        }

        fn note(&self, call: Call) {
            self.log.lock().unwrap().push((call, Instant::now()));
        }
    }

    #[async_trait]
    impl InstanceHistory for Script {
        async fn list(&mut self) -> Result<(u64, Vec<ServiceInstance>)> {
            self.note(Call::List);
            self.lists.pop_front().expect("an unscripted listing")
        }

        async fn connect(&mut self, after: u64) -> Result<()> {
            self.note(Call::Connect(after));
            self.connects.pop_front().unwrap_or(Ok(()))
        }

        async fn next_batch(&mut self, after: u64) -> Result<InstanceBatch> {
            self.note(Call::Next(after));
            match self.batches.pop_front() {
                Some(b) => b,
                None => futures::future::pending().await,
            }
        }
    }

    fn changes(changes: Vec<InstanceChange>, upto: u64) -> Result<InstanceBatch> {
        Ok(InstanceBatch::Changes { changes, upto })
    }

    fn unavailable() -> Error {
        Error::new(ErrorKind::Unavailable, "connection lost")
    }

    fn retry() -> RetrySettings {
        RetrySettings {
            max_retries: 0,
            initial_interval: Duration::from_millis(100),
            max_interval: Duration::from_secs(1),
            multiplier: 2.0,
            jitter: false,
        }
    }

    async fn start(script: Script) -> ServiceEventStream {
        spawn_watch(script, retry(), CancellationToken::new())
            .await
            .unwrap()
    }

    async fn take(events: &mut ServiceEventStream, n: usize) -> Vec<ServiceEvent> {
        let mut out = Vec::new();
        for _ in 0..n {
            let e = tokio::time::timeout(Duration::from_secs(10), events.next())
                .await
                .unwrap_or_else(|_| panic!("only {out:?} arrived"))
                .expect("the stream ended")
                .expect("an error item");
            out.push(e);
        }
        out
    }

    async fn nothing_more(events: &mut ServiceEventStream) {
        let got = tokio::time::timeout(Duration::from_secs(10), events.next()).await;
        assert!(got.is_err(), "unexpected {got:?}");
    }

    fn calls(log: &Log) -> Vec<Call> {
        log.lock().unwrap().iter().map(|(c, _)| *c).collect()
    }

    /// The time between consecutive `call`s, in milliseconds.
    fn pauses_before(log: &Log, call: Call) -> Vec<u128> {
        let log = log.lock().unwrap();
        let at: Vec<Instant> = log
            .iter()
            .filter(|(c, _)| *c == call)
            .map(|(_, t)| *t)
            .collect();
        at.windows(2).map(|w| (w[1] - w[0]).as_millis()).collect()
    }

    async fn ended(mut dropped: mpsc::Receiver<()>) {
        tokio::time::timeout(Duration::from_secs(10), dropped.recv())
            .await
            .expect("the driver still runs");
    }

    #[tokio::test(start_paused = true)]
    async fn starts_with_the_listing_then_follows_the_changes() {
        let (script, log, _alive) = Script::new(
            vec![(10, vec![inst("a", 1)])],
            vec![
                changes(
                    vec![
                        InstanceChange::Put(inst("b", 2)),
                        InstanceChange::Put(inst("a", 1)), // unchanged
                        InstanceChange::Delete("x".into()), // never reported
                    ],
                    14,
                ),
                changes(
                    vec![
                        InstanceChange::Put(inst("b", 3)),
                        InstanceChange::Delete("a".into()),
                    ],
                    0,
                ),
            ],
        );
        let mut events = start(script).await;
        assert_eq!(
            take(&mut events, 4).await,
            vec![
                ev(Add, &inst("a", 1)),
                ev(Add, &inst("b", 2)),
                ev(Update, &inst("b", 3)),
                ev(Delete, &inst("a", 1)),
            ]
        );
        nothing_more(&mut events).await;
        assert_eq!(
            calls(&log),
            vec![
                Call::List,
                Call::Connect(10),
                Call::Next(10),
                Call::Next(14),
                Call::Next(14)
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_gap_lists_again_at_once_and_reports_the_difference() {
        let (script, log, _alive) = Script::new(
            vec![
                (10, vec![inst("a", 1), inst("b", 2)]),
                (30, vec![inst("b", 5), inst("c", 3)]),
            ],
            vec![Ok(InstanceBatch::Gap)],
        );
        let mut events = start(script).await;
        assert_eq!(
            take(&mut events, 5).await,
            vec![
                ev(Add, &inst("a", 1)),
                ev(Add, &inst("b", 2)),
                ev(Delete, &inst("a", 1)),
                ev(Update, &inst("b", 5)),
                ev(Add, &inst("c", 3)),
            ]
        );
        nothing_more(&mut events).await;
        let log = log.lock().unwrap().clone();
        let got: Vec<Call> = log.iter().map(|(c, _)| *c).collect();
        assert_eq!(
            got,
            vec![
                Call::List,
                Call::Connect(10),
                Call::Next(10),
                Call::List,
                Call::Connect(30),
                Call::Next(30)
            ]
        );
        assert_eq!(log[3].1, log[2].1, "no pause after a gap");
    }

    #[tokio::test(start_paused = true)]
    async fn failures_back_off_and_nothing_is_lost_or_repeated() {
        let (mut script, log, _alive) = Script::new(
            vec![
                (10, vec![inst("a", 1)]),
                (20, vec![inst("a", 1), inst("b", 2)]),
                (25, vec![inst("b", 2)]),
                (30, vec![inst("b", 2)]),
            ],
            vec![
                Err(unavailable()),
                changes(vec![], 26),
                Err(unavailable()),
                changes(vec![InstanceChange::Put(inst("c", 3))], 31),
            ],
        );
        // The connection after the second listing fails: its events are
        // delivered all the same, and not again.
        script.connects = VecDeque::from(vec![Ok(()), Err(unavailable())]);
        let mut events = start(script).await;
        assert_eq!(
            take(&mut events, 4).await,
            vec![
                ev(Add, &inst("a", 1)),
                ev(Add, &inst("b", 2)),
                ev(Delete, &inst("a", 1)),
                ev(Add, &inst("c", 3)),
            ]
        );
        nothing_more(&mut events).await;
        // 100 ms, 200 ms (no batch in between), then 100 ms again.
        let pauses = pauses_before(&log, Call::List);
        let want = [100, 200, 100];
        assert!(
            pauses.len() == 3 && pauses.iter().zip(want).all(|(p, w)| p.abs_diff(w) <= 1),
            "pauses {pauses:?}"
        );
        assert_eq!(
            calls(&log),
            vec![
                Call::List,
                Call::Connect(10),
                Call::Next(10),
                Call::List,
                Call::Connect(20),
                Call::List,
                Call::Connect(25),
                Call::Next(25),
                Call::Next(26),
                Call::List,
                Call::Connect(30),
                Call::Next(30),
                Call::Next(31),
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn closed_consumer_gone_or_shutdown_end_the_watch() {
        // Closed.
        let (script, _, dropped) = Script::new(
            vec![(1, vec![inst("a", 1)])],
            vec![Err(Error::new(ErrorKind::Closed, "closed"))],
        );
        let mut events = start(script).await;
        assert_eq!(take(&mut events, 1).await, vec![ev(Add, &inst("a", 1))]);
        assert!(events.next().await.is_none());
        ended(dropped).await;
        // The consumer drops the stream.
        let (script, _, dropped) = Script::new(vec![(1, vec![])], vec![]);
        drop(start(script).await);
        ended(dropped).await;
        // Shutdown, while waiting and while backing off.
        for batches in [vec![], vec![Err(unavailable())]] {
            let (script, log, dropped) = Script::new(vec![(1, vec![])], batches);
            let shutdown = CancellationToken::new();
            let mut events = spawn_watch(script, retry(), shutdown.clone())
                .await
                .unwrap();
            tokio::task::yield_now().await;
            assert_eq!(calls(&log).last(), Some(&Call::Next(1)));
            shutdown.cancel();
            assert!(events.next().await.is_none());
            ended(dropped).await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_first_listing_fails_the_call() {
        let (mut script, _, _alive) = Script::new(vec![], vec![]);
        script.lists.push_back(Err(unavailable()));
        let r = spawn_watch(script, retry(), CancellationToken::new()).await;
        assert_eq!(r.err().map(|e| e.kind()), Some(ErrorKind::Unavailable));
    }
}
