//! The one resumable config watch: a driver that owns the channel, the
//! [`WatchCursor`], the backoff, shutdown and every resynchronisation
//! decision, fed by a backend's [`ConfigHistory`].
//!
//! A backend supplies only what is specific to its store: the current
//! revision, a snapshot of the keys a watch covers, and the next batch of
//! changes after the cursor (with how the history continues from it). The
//! driver does the rest, the same way for every backend:
//!
//! - it (re)connects the history before the first read and after every
//!   failure ([`ConfigHistory::connect`]), backing off with the backend's
//!   [`RetrySettings`] (the delays start again after a successful batch), so
//!   a watch resumes after a connection loss from the last version it
//!   delivered;
//! - it drops duplicates and changes outside the target, and moves the
//!   cursor past changes of other keys ([`Batch::Changes`]'s `upto`);
//! - when the history no longer reaches back to the cursor
//!   ([`Continuity::Trimmed`]: trimmed, compacted, purged) it reads a
//!   snapshot and delivers the events that bring the consumer to the
//!   current state ([`WatchCursor::resync`]);
//! - when the store lost changes the watch delivered
//!   ([`Continuity::Regressed`]: it came back with older data) it reports
//!   every key that may differ and moves the cursor back to the store's
//!   revision ([`WatchCursor::resync_regressed`]);
//! - it stops when the consumer drops the stream, the shutdown token is
//!   cancelled or the history answers `Closed`.
//!
//! ```
//! use async_trait::async_trait;
//! use bytes::Bytes;
//! use futures::StreamExt;
//! use im_infra::config::watch::{WatchCursor, WatchTarget};
//! use im_infra::config::watch_driver::{spawn_watch, Batch, ConfigHistory};
//! use im_infra::config::{ConfigEvent, ConfigEventKind, Versioned, WatchOptions};
//! use im_infra::{Result, RetrySettings};
//! use tokio_util::sync::CancellationToken;
//!
//! /// A store whose history is a fixed list of changes.
//! struct Fixed(Vec<ConfigEvent>);
//!
//! #[async_trait]
//! impl ConfigHistory for Fixed {
//!     async fn revision(&mut self) -> Result<u64> {
//!         Ok(self.0.last().map_or(0, |e| e.version))
//!     }
//!     async fn snapshot(&mut self, _: &WatchTarget) -> Result<(u64, Vec<(String, Versioned)>)> {
//!         Ok((self.revision().await?, Vec::new()))
//!     }
//!     async fn next_batch(&mut self, cursor: &WatchCursor) -> Result<Batch> {
//!         let after = cursor.last_version();
//!         let events: Vec<ConfigEvent> =
//!             self.0.iter().filter(|e| e.version > after).cloned().collect();
//!         if events.is_empty() {
//!             futures::future::pending::<()>().await; // nothing more, ever
//!         }
//!         Ok(Batch::changes(events, 0))
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<()> {
//! let put = |key: &str, version| ConfigEvent {
//!     kind: ConfigEventKind::Put,
//!     key: key.into(),
//!     value: Some(Bytes::from_static(b"1")),
//!     version,
//! };
//! let history = Fixed(vec![put("/app/a", 1), put("/other", 2), put("/app/b", 3)]);
//! let mut events = spawn_watch(
//!     history,
//!     WatchTarget::prefix("/app/")?,
//!     WatchOptions::after(0),
//!     RetrySettings::default(),
//!     CancellationToken::new(),
//! )
//! .await?;
//! assert_eq!(events.next().await.unwrap()?.key, "/app/a");
//! assert_eq!(events.next().await.unwrap()?.key, "/app/b"); // "/other" is not covered
//! # Ok(()) }
//! ```

use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::watch::{WatchCursor, WatchTarget};
use super::{ConfigEvent, Versioned, WatchOptions, WatchStream};
use crate::error::{ErrorKind, Result};
use crate::RetrySettings;

/// Events buffered between the driver and a slow consumer.
const BUFFER: usize = 256;

/// How the store's history continues from a watch's cursor.
///
/// ```
/// use im_infra::config::watch_driver::{Batch, Continuity};
///
/// // A backend that found the entry after the cursor links back to an
/// // earlier revision than the cursor: the store lost what it delivered.
/// let (cursor, linked_to) = (40, 31);
/// let how = if linked_to == cursor { Continuity::Continuous } else if linked_to > cursor {
///     Continuity::Trimmed
/// } else {
///     Continuity::Regressed
/// };
/// assert_eq!(Batch::from(how), Batch::Regressed);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Continuity {
    /// The history continues from the cursor: nothing was lost.
    Continuous,
    /// Changes after the cursor were trimmed, compacted or purged: the
    /// driver resynchronises from a snapshot ([`WatchCursor::resync`]).
    Trimmed,
    /// The store lost changes up to the cursor (it came back with older
    /// data): the driver reports every key that may differ and moves the
    /// cursor back ([`WatchCursor::resync_regressed`]).
    Regressed,
}

/// What one read of a store's history found after a watch's cursor.
///
/// ```
/// use bytes::Bytes;
/// use im_infra::config::watch_driver::{Batch, Continuity};
/// use im_infra::config::{ConfigEvent, ConfigEventKind};
///
/// let delete = ConfigEvent { kind: ConfigEventKind::Delete, key: "/k".into(), value: None, version: 12 };
/// // The history was read up to revision 15; only revision 12 was ours.
/// let batch = Batch::changes(vec![delete], 15);
/// assert!(matches!(batch, Batch::Changes { upto: 15, .. }));
/// assert_eq!(Batch::idle(), Batch::from(Continuity::Continuous));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Batch {
    /// The history continues from the cursor.
    Changes {
        /// The changes after the cursor, in version order (possibly none).
        /// Changes at or below the cursor and of keys the watch does not
        /// cover are dropped by the driver.
        events: Vec<ConfigEvent>,
        /// The history was read up to this revision (0: unknown): every
        /// covered change up to it is in `events`, so the cursor moves
        /// there even when none was.
        upto: u64,
    },
    /// See [`Continuity::Trimmed`].
    Trimmed,
    /// See [`Continuity::Regressed`].
    Regressed,
}

impl Batch {
    /// Changes after the cursor, read up to revision `upto` (0: unknown).
    pub fn changes(events: Vec<ConfigEvent>, upto: u64) -> Self {
        Batch::Changes { events, upto }
    }

    /// Nothing new yet.
    pub fn idle() -> Self {
        Batch::changes(Vec::new(), 0)
    }
}

impl From<Continuity> for Batch {
    fn from(how: Continuity) -> Self {
        match how {
            Continuity::Continuous => Batch::idle(),
            Continuity::Trimmed => Batch::Trimmed,
            Continuity::Regressed => Batch::Regressed,
        }
    }
}

/// A store's change history, as one watch reads it: what a backend
/// implements to get a resumable watch from [`spawn_watch`]. One value is
/// made per watch and may keep per-watch state (a dedicated connection, a
/// server-side watch stream).
///
/// Every method may fail; the driver then backs off, calls
/// [`connect`](Self::connect) again and goes on from its cursor. An error
/// of kind `Closed` ends the watch.
///
/// ```
/// use async_trait::async_trait;
/// use im_infra::config::watch::{WatchCursor, WatchTarget};
/// use im_infra::config::watch_driver::{Batch, ConfigHistory, Continuity};
/// use im_infra::config::Versioned;
/// use im_infra::Result;
///
/// /// A store without changes, at revision 7.
/// struct Still;
///
/// #[async_trait]
/// impl ConfigHistory for Still {
///     async fn revision(&mut self) -> Result<u64> { Ok(7) }
///     async fn snapshot(&mut self, _: &WatchTarget) -> Result<(u64, Vec<(String, Versioned)>)> {
///         Ok((7, Vec::new()))
///     }
///     async fn connect(&mut self, cursor: &WatchCursor) -> Result<Continuity> {
///         // A store behind the cursor lost what the watch delivered.
///         Ok(if cursor.last_version() > 7 { Continuity::Regressed } else { Continuity::Continuous })
///     }
///     async fn next_batch(&mut self, _: &WatchCursor) -> Result<Batch> {
///         tokio::time::sleep(std::time::Duration::from_secs(1)).await;
///         Ok(Batch::changes(Vec::new(), 7))
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<()> {
/// let cursor = WatchCursor::new(WatchTarget::key("/k")?, 9);
/// assert_eq!(Still.connect(&cursor).await?, Continuity::Regressed);
/// # Ok(()) }
/// ```
#[async_trait]
pub trait ConfigHistory: Send + 'static {
    /// The store's current revision (a watch "from now" starts after it).
    async fn revision(&mut self) -> Result<u64>;

    /// Every entry covered by `target` that exists now, and the revision
    /// the store is at, read consistently.
    async fn snapshot(&mut self, target: &WatchTarget) -> Result<(u64, Vec<(String, Versioned)>)>;

    /// (Re)connects before the first [`next_batch`](Self::next_batch) and
    /// after every failure, and says how the history continues from the
    /// cursor. The default does nothing and leaves the question to
    /// `next_batch`.
    async fn connect(&mut self, cursor: &WatchCursor) -> Result<Continuity> {
        let _ = cursor;
        Ok(Continuity::Continuous)
    }

    /// Waits for the changes after `cursor.last_version()` and returns
    /// them, or how the history fails to continue from there. It may wait
    /// as long as it likes (the driver stops waiting when the watch ends);
    /// a backend that checks something while idle returns
    /// [`Batch::idle`] now and then.
    async fn next_batch(&mut self, cursor: &WatchCursor) -> Result<Batch>;
}

/// Starts a watch of `target` fed by `history` and returns its stream.
///
/// `opts.after_version: None` starts after the store's revision at this
/// call, read with the entries covered then (a snapshot, read here, so a
/// failure is returned): those count as delivered, so that a resync after
/// lost history reports their deletion too. The driver task backs off
/// with `retry` after failures and ends when the stream is dropped,
/// `shutdown` is cancelled or `history` answers `Closed`; the stream then
/// ends.
///
/// ```
/// # use async_trait::async_trait;
/// # use im_infra::config::watch::{WatchCursor, WatchTarget};
/// # use im_infra::config::watch_driver::{spawn_watch, Batch, ConfigHistory};
/// # use im_infra::config::{Versioned, WatchOptions};
/// # use im_infra::{Result, RetrySettings};
/// # use futures::StreamExt;
/// # use tokio_util::sync::CancellationToken;
/// # struct Still;
/// # #[async_trait]
/// # impl ConfigHistory for Still {
/// #     async fn revision(&mut self) -> Result<u64> { Ok(7) }
/// #     async fn snapshot(&mut self, _: &WatchTarget) -> Result<(u64, Vec<(String, Versioned)>)> { Ok((7, vec![])) }
/// #     async fn next_batch(&mut self, _: &WatchCursor) -> Result<Batch> {
/// #         futures::future::pending::<()>().await; unreachable!()
/// #     }
/// # }
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<()> {
/// let shutdown = CancellationToken::new();
/// let mut events = spawn_watch(
///     Still,
///     WatchTarget::key("/config/dev/web/flags")?,
///     WatchOptions::default(),
///     RetrySettings::default(),
///     shutdown.clone(),
/// )
/// .await?;
/// shutdown.cancel(); // the backend closes: the stream ends
/// assert!(events.next().await.is_none());
/// # Ok(()) }
/// ```
pub async fn spawn_watch<H: ConfigHistory>(
    mut history: H,
    target: WatchTarget,
    opts: WatchOptions,
    retry: RetrySettings,
    shutdown: CancellationToken,
) -> Result<WatchStream> {
    let mut cursor = WatchCursor::new(target, opts.after_version.unwrap_or(0));
    if opts.after_version.is_none() {
        // "From now" means the store at this call, not when the task runs;
        // what it holds then counts as delivered (a resync after lost
        // history then reports its deletion).
        let (revision, current) = history.snapshot(cursor.target()).await?;
        cursor.start_at(current, revision);
    }
    let (tx, mut rx) = mpsc::channel(BUFFER);
    let driver = Driver {
        history,
        cursor,
        tx,
    };
    tokio::spawn(driver.run(retry, shutdown));
    Ok(Box::pin(futures::stream::poll_fn(move |cx| {
        rx.poll_recv(cx)
    })))
}

/// One running watch.
struct Driver<H> {
    history: H,
    cursor: WatchCursor,
    tx: mpsc::Sender<Result<ConfigEvent>>,
}

impl<H: ConfigHistory> Driver<H> {
    /// Connects, reads batch after batch and resynchronises, backing off
    /// after failures, until the watch ends.
    async fn run(mut self, retry: RetrySettings, shutdown: CancellationToken) {
        let tx = self.tx.clone();
        let mut delays = None;
        let mut connected = false;
        loop {
            let step = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return,
                _ = tx.closed() => return,
                step = self.step(connected) => step,
            };
            match step {
                Ok(()) => {
                    if connected {
                        delays = None;
                    }
                    connected = true;
                }
                Err(e) if e.kind() == ErrorKind::Closed => return,
                Err(e) => {
                    connected = false;
                    tracing::debug!(error = %e, after = self.cursor.last_version(), "config watch interrupted; resuming");
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

    /// Connects (`connected == false`) or reads the next batch, and
    /// delivers what it brings.
    async fn step(&mut self, connected: bool) -> Result<()> {
        let batch = if connected {
            self.history.next_batch(&self.cursor).await?
        } else {
            Batch::from(self.history.connect(&self.cursor).await?)
        };
        let events = match batch {
            Batch::Changes { events, upto } => {
                let events = events
                    .into_iter()
                    .filter_map(|e| self.cursor.accept(e))
                    .collect();
                self.cursor.advance_to(upto);
                events
            }
            Batch::Trimmed => {
                let (revision, current) = self.history.snapshot(self.cursor.target()).await?;
                self.cursor.resync(current, revision)
            }
            Batch::Regressed => {
                let (revision, current) = self.history.snapshot(self.cursor.target()).await?;
                tracing::warn!(
                    cursor = self.cursor.last_version(),
                    revision,
                    "the config history lost changes this watch delivered (the store came back \
                     with older data?); resynchronising from the current state"
                );
                self.cursor.resync_regressed(current, revision)
            }
        };
        for e in events {
            if self.tx.send(Ok(e)).await.is_err() {
                break; // the consumer went away: `run` sees it next
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::{Arc, Mutex};

    use bytes::Bytes;
    use futures::StreamExt;
    use tokio::time::Instant;

    use super::*;
    use crate::config::ConfigEventKind;
    use crate::error::Error;

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Call {
        Revision,
        Snapshot,
        Connect(u64),
        Next(u64),
    }

    type Log = Arc<Mutex<Vec<(Call, Instant)>>>;

    /// A history that answers from a script and logs every call with the
    /// cursor it was called at. An exhausted script of batches waits
    /// forever; of connects, answers `Continuous`.
    struct Script {
        log: Log,
        revision: u64,
        connects: VecDeque<Result<Continuity>>,
        batches: VecDeque<Result<Batch>>,
        snapshots: VecDeque<(u64, Vec<(String, Versioned)>)>,
        /// Dropped with the history: tells a test the driver ended.
        _alive: mpsc::Sender<()>,
    }

    impl Script {
        fn new(batches: Vec<Result<Batch>>) -> (Self, Log, mpsc::Receiver<()>) {
            let log = Log::default();
            let (alive, dropped) = mpsc::channel(1);
            let script = Script {
                log: log.clone(),
                revision: 0,
                connects: VecDeque::new(),
                batches: batches.into(),
                snapshots: VecDeque::new(),
                _alive: alive,
            };
            (script, log, dropped)
        }

        fn note(&self, call: Call) {
            self.log.lock().unwrap().push((call, Instant::now()));
        }
    }

    #[async_trait]
    impl ConfigHistory for Script {
        async fn revision(&mut self) -> Result<u64> {
            self.note(Call::Revision);
            Ok(self.revision)
        }

        async fn snapshot(&mut self, _: &WatchTarget) -> Result<(u64, Vec<(String, Versioned)>)> {
            self.note(Call::Snapshot);
            Ok(self.snapshots.pop_front().expect("an unscripted snapshot"))
        }

        async fn connect(&mut self, cursor: &WatchCursor) -> Result<Continuity> {
            self.note(Call::Connect(cursor.last_version()));
            self.connects
                .pop_front()
                .unwrap_or(Ok(Continuity::Continuous))
        }

        async fn next_batch(&mut self, cursor: &WatchCursor) -> Result<Batch> {
            self.note(Call::Next(cursor.last_version()));
            match self.batches.pop_front() {
                Some(b) => b,
                None => futures::future::pending().await,
            }
        }
    }

    fn put(key: &str, version: u64) -> ConfigEvent {
        ConfigEvent {
            kind: ConfigEventKind::Put,
            key: key.into(),
            value: Some(Bytes::from(format!("{key}@{version}"))),
            version,
        }
    }

    fn delete(key: &str, version: u64) -> ConfigEvent {
        ConfigEvent {
            kind: ConfigEventKind::Delete,
            key: key.into(),
            value: None,
            version,
        }
    }

    fn entry(key: &str, version: u64) -> (String, Versioned) {
        let value = put(key, version).value.unwrap();
        (key.into(), Versioned { value, version })
    }

    fn unavailable() -> Error {
        Error::new(ErrorKind::Unavailable, "connection lost")
    }

    fn quick_retry() -> RetrySettings {
        RetrySettings {
            max_retries: 0,
            initial_interval: Duration::from_millis(100),
            max_interval: Duration::from_secs(1),
            multiplier: 2.0,
            jitter: false,
        }
    }

    async fn start(script: Script, target: &str, opts: WatchOptions) -> WatchStream {
        spawn_watch(
            script,
            WatchTarget::prefix(target).unwrap(),
            opts,
            quick_retry(),
            CancellationToken::new(),
        )
        .await
        .unwrap()
    }

    /// The next `n` events, failing after 10 s (of paused time: at once
    /// when nothing else can happen).
    async fn take(events: &mut WatchStream, n: usize) -> Vec<ConfigEvent> {
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

    async fn nothing_more(events: &mut WatchStream) {
        let got = tokio::time::timeout(Duration::from_secs(10), events.next()).await;
        assert!(got.is_err(), "unexpected {got:?}");
    }

    fn calls(log: &Log) -> Vec<Call> {
        log.lock().unwrap().iter().map(|(c, _)| *c).collect()
    }

    /// Waits for the driver to drop the history.
    async fn ended(mut dropped: mpsc::Receiver<()>) {
        tokio::time::timeout(Duration::from_secs(10), dropped.recv())
            .await
            .expect("the driver still runs");
    }

    #[tokio::test(start_paused = true)]
    async fn delivers_changes_in_order_without_duplicates_or_other_keys() {
        let (mut script, log, _alive) = Script::new(vec![
            Ok(Batch::changes(
                vec![
                    put("/p/a", 4), // before the watch started
                    put("/p/a", 6),
                    put("/x", 7), // not covered
                    put("/p/b", 8),
                    put("/p/a", 6), // a duplicate
                ],
                10,
            )),
            // Read up to 10 already: 9 is not delivered again.
            Ok(Batch::changes(vec![put("/p/c", 9), put("/p/c", 11)], 0)),
        ]);
        script.snapshots.push_back((5, vec![entry("/p/a", 4)]));
        let mut events = start(script, "/p/", WatchOptions::default()).await;
        let got = take(&mut events, 3).await;
        assert_eq!(got, vec![put("/p/a", 6), put("/p/b", 8), put("/p/c", 11)]);
        nothing_more(&mut events).await;
        assert_eq!(
            calls(&log),
            vec![
                Call::Snapshot,
                Call::Connect(5),
                Call::Next(5),
                Call::Next(10),
                Call::Next(11)
            ]
        );
    }

    /// A watch from now counts what exists at its start as delivered: a
    /// key deleted while the history was lost is reported deleted.
    #[tokio::test(start_paused = true)]
    async fn a_watch_from_now_reports_the_deletion_of_a_key_it_found_at_its_start() {
        let (mut script, _log, _alive) = Script::new(vec![Ok(Batch::Trimmed)]);
        script.snapshots.push_back((5, vec![entry("/p/a", 4)]));
        script.snapshots.push_back((9, vec![]));
        let mut events = start(script, "/p/", WatchOptions::default()).await;
        assert_eq!(take(&mut events, 1).await, vec![delete("/p/a", 9)]);
        nothing_more(&mut events).await;
    }

    #[tokio::test(start_paused = true)]
    async fn trimmed_history_resyncs_from_a_snapshot_and_goes_on() {
        let (mut script, log, _alive) = Script::new(vec![
            Ok(Batch::changes(vec![put("/p/a", 2), put("/p/gone", 3)], 3)),
            Ok(Batch::Trimmed),
            Ok(Batch::changes(vec![put("/p/b", 21)], 21)),
        ]);
        // "/p/a" unchanged, "/p/b" changed at 15, "/p/gone" deleted.
        script
            .snapshots
            .push_back((20, vec![entry("/p/a", 2), entry("/p/b", 15)]));
        let mut events = start(script, "/p/", WatchOptions::after(0)).await;
        let got = take(&mut events, 5).await;
        assert_eq!(
            got,
            vec![
                put("/p/a", 2),
                put("/p/gone", 3),
                put("/p/b", 15),
                delete("/p/gone", 20),
                put("/p/b", 21),
            ]
        );
        nothing_more(&mut events).await;
        assert_eq!(
            calls(&log),
            vec![
                Call::Connect(0),
                Call::Next(0),
                Call::Next(3),
                Call::Snapshot,
                Call::Next(20),
                Call::Next(21)
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_regressed_store_moves_the_cursor_back_and_reports_what_differs() {
        let (mut script, log, _alive) = Script::new(vec![
            Ok(Batch::changes(vec![put("/p/a", 10), put("/p/b", 11)], 11)),
            Err(unavailable()), // the server restarts ...
            // ... with older data: writes go on from revision 5.
            Ok(Batch::changes(vec![put("/p/c", 6)], 6)),
        ]);
        script.connects =
            VecDeque::from(vec![Ok(Continuity::Continuous), Ok(Continuity::Regressed)]);
        script.snapshots.push_back((5, vec![entry("/p/a", 3)]));
        let mut events = start(script, "/p/", WatchOptions::after(0)).await;
        let got = take(&mut events, 5).await;
        assert_eq!(
            got,
            vec![
                put("/p/a", 10),
                put("/p/b", 11),
                put("/p/a", 3),    // the store's value, below what was delivered
                delete("/p/b", 5), // lost
                put("/p/c", 6),    // written after the regression
            ]
        );
        assert_eq!(
            calls(&log),
            vec![
                Call::Connect(0),
                Call::Next(0),
                Call::Next(11),
                Call::Connect(11),
                Call::Snapshot,
                Call::Next(5),
                Call::Next(6)
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_regression_found_by_a_batch_resyncs_too() {
        let (mut script, log, _alive) = Script::new(vec![
            Ok(Batch::changes(vec![put("/p/a", 3)], 3)),
            Ok(Batch::changes(vec![put("/p/a", 10)], 12)),
            Ok(Batch::Regressed),
        ]);
        // The store is back at revision 4, with "/p/a" at 3.
        script.snapshots.push_back((4, vec![entry("/p/a", 3)]));
        let mut events = start(script, "/p/", WatchOptions::after(0)).await;
        let got = take(&mut events, 3).await;
        assert_eq!(got, vec![put("/p/a", 3), put("/p/a", 10), put("/p/a", 3)]);
        nothing_more(&mut events).await;
        assert_eq!(
            calls(&log)[3..],
            [Call::Next(12), Call::Snapshot, Call::Next(4)]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn failures_back_off_and_the_delays_start_again_after_a_batch() {
        let (mut script, log, _alive) = Script::new(vec![
            Err(unavailable()),
            Err(unavailable()),
            Ok(Batch::changes(vec![put("/p/a", 1)], 1)),
            Err(unavailable()),
            Ok(Batch::changes(vec![put("/p/a", 2)], 2)),
        ]);
        // The second reconnection fails too.
        script.connects = VecDeque::from(vec![
            Ok(Continuity::Continuous),
            Ok(Continuity::Continuous),
            Err(unavailable()),
        ]);
        let t0 = Instant::now();
        let mut events = start(script, "/p/", WatchOptions::after(0)).await;
        assert_eq!(
            take(&mut events, 2).await,
            vec![put("/p/a", 1), put("/p/a", 2)]
        );
        let connects: Vec<(u64, u128)> = log
            .lock()
            .unwrap()
            .iter()
            .filter_map(|(c, at)| match c {
                Call::Connect(v) => Some((*v, (*at - t0).as_millis())),
                _ => None,
            })
            .collect();
        // 100, 200, 400 ms (a successful connect is no successful batch),
        // then 100 ms again after the batch of version 1; resuming from the
        // last delivered version.
        let versions: Vec<u64> = connects.iter().map(|(v, _)| *v).collect();
        assert_eq!(versions, [0, 0, 0, 0, 1], "{connects:?}");
        let pauses: Vec<u128> = connects.windows(2).map(|w| w[1].1 - w[0].1).collect();
        // backon computes delays in f32: allow a millisecond.
        let want = [100, 200, 400, 100];
        assert!(
            pauses.len() == 4 && pauses.iter().zip(want).all(|(p, w)| p.abs_diff(w) <= 1),
            "pauses {pauses:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_closed_history_ends_the_stream() {
        let (script, _log, dropped) = Script::new(vec![
            Ok(Batch::changes(vec![put("/p/a", 1)], 1)),
            Err(Error::new(ErrorKind::Closed, "closed")),
        ]);
        let mut events = start(script, "/p/", WatchOptions::after(0)).await;
        assert_eq!(take(&mut events, 1).await, vec![put("/p/a", 1)]);
        assert!(events.next().await.is_none());
        ended(dropped).await;
    }

    #[tokio::test(start_paused = true)]
    async fn dropping_the_stream_stops_the_driver() {
        let (script, _log, dropped) = Script::new(vec![]);
        let events = start(script, "/p/", WatchOptions::after(0)).await;
        drop(events);
        ended(dropped).await;
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_ends_the_stream_while_waiting_or_backing_off() {
        for batches in [vec![], vec![Err(unavailable())]] {
            let (script, log, dropped) = Script::new(batches);
            let shutdown = CancellationToken::new();
            let mut events = spawn_watch(
                script,
                WatchTarget::key("/k").unwrap(),
                WatchOptions::after(0),
                RetrySettings {
                    initial_interval: Duration::from_secs(3600),
                    max_interval: Duration::from_secs(3600),
                    ..quick_retry()
                },
                shutdown.clone(),
            )
            .await
            .unwrap();
            tokio::task::yield_now().await;
            assert_eq!(calls(&log)[..2], [Call::Connect(0), Call::Next(0)]);
            shutdown.cancel();
            assert!(events.next().await.is_none());
            ended(dropped).await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_first_revision_read_fails_the_call() {
        struct Down;
        #[async_trait]
        impl ConfigHistory for Down {
            async fn revision(&mut self) -> Result<u64> {
                Err(unavailable())
            }
            async fn snapshot(
                &mut self,
                _: &WatchTarget,
            ) -> Result<(u64, Vec<(String, Versioned)>)> {
                Err(unavailable())
            }
            async fn next_batch(&mut self, _: &WatchCursor) -> Result<Batch> {
                Err(unavailable())
            }
        }
        let r = spawn_watch(
            Down,
            WatchTarget::key("/k").unwrap(),
            WatchOptions::default(),
            quick_retry(),
            CancellationToken::new(),
        )
        .await;
        assert_eq!(r.err().map(|e| e.kind()), Some(ErrorKind::Unavailable));
    }
}
