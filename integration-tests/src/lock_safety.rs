//! A lock-safety check across OS processes (DESIGN §8, "partitions, not
//! only crashes").
//!
//! Several `lock_contender` processes (the binary of this crate) compete for
//! one lock of a real backend (Redis, etcd or MySQL). Each reaches the server
//! through a [`FreezeProxy`] of its own, so the test can cut one process off
//! without closing its connections. Whoever holds the lock writes to a
//! [`FencedStore`], a small TCP server in the test process that plays the
//! protected resource:
//!
//! ```text
//! BEGIN <process> <token> [<planned work ms>]   -> OK | REJECTED
//! END <process> <token>                         -> OK | REJECTED
//! LOST <process> <token> [<µs since last held>] -> OK   (a notice, not a write)
//! ```
//!
//! A contender sends `BEGIN` with its guard's fencing token only if
//! `guard.is_held()`, works a little (checking `is_held()` every
//! millisecond), and then sends `END` if the guard is still held, or `LOST`
//! as soon as it finds it is not, with how long ago it last saw it held. The store rejects a write whose token is
//! below the highest it has accepted (that is how a fenced resource protects
//! itself), and a token that another process already used.
//!
//! [`run`] drives the contest: it kills (SIGKILL) the process holding the
//! lock and starts a replacement; freezes the proxy of a holder (preferably
//! in a long section, which depends on renewal) for longer than the TTL;
//! and holds back the answers to a waiting process for longer than the TTL
//! just as the lock is released, preferably one whose request timeout
//! outlasts the freeze, so that a grant made meanwhile reaches it late.
//! Every freeze is thawed after its time. The rule every lease-backed lock must keep
//! is that the holder learns it has lost the lock strictly before another
//! process can be granted it. The store sees a break of that rule as:
//!
//! - a **rejected write**: a process that had just checked `is_held()`
//!   wrote after a later holder had begun;
//! - a **late loss**: a process last saw its lock held (as its `LOST`
//!   notice tells) after a later holder had begun;
//! - an **overlap**: the last word of a holder (its `END` or `LOST`, accepted
//!   or not) came after the `BEGIN` of the next holder.
//!
//! A holder that was killed in its critical section never sends `END`: its
//! section is *abandoned*, open-ended until the next accepted `BEGIN`,
//! which is fine because that one carries a larger token.
//!
//! The store timestamps every line on arrival, with its own monotonic clock.
//! A contender checks `is_held()` immediately before each write, so a write
//! is a belief at (just before) its arrival. A `LOST` notice says how long
//! before sending it the contender last saw `is_held()` true; the store
//! dates the end of that belief accordingly, so the contender's polling
//! (every millisecond) never makes a lock look late. The other way round, a
//! holder that goes on believing less than about a millisecond too long may
//! go unnoticed: that is the resolution of the check. Each run leaves the
//! store's record (`store.log`) next to the contenders' output.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::fs::File;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use im_infra::backend::{Backend, Maintenance};
use im_infra::lock::DistributedLock;
use im_infra_etcd::{EtcdBackend, EtcdSettings};
use im_infra_mysql::MysqlBackend;
use im_infra_redis::RedisBackend;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use im_infra_conformance::proxy::FreezeProxy;

/// The lock the contenders compete for (inside the run's namespace).
pub const LOCK_NAME: &str = "lock-safety";

/// The table prefix the MySQL contenders use (the one of the other tests).
pub const MYSQL_TABLE_PREFIX: &str = "iminfra_test_";

// ---------------------------------------------------------------------------
// The fenced store
// ---------------------------------------------------------------------------

/// What a protocol line was.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// `BEGIN`: the start of a critical section (a write).
    Begin,
    /// `END`: the end of a critical section (a write).
    End,
    /// `LOST`: the holder found it no longer holds the lock (a notice).
    Lost,
}

impl Kind {
    fn parse(s: &str) -> Option<Kind> {
        match s {
            "BEGIN" => Some(Kind::Begin),
            "END" => Some(Kind::End),
            "LOST" => Some(Kind::Lost),
            _ => None,
        }
    }

    /// The protocol word.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Begin => "BEGIN",
            Kind::End => "END",
            Kind::Lost => "LOST",
        }
    }
}

/// One line the store received, as recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreEvent {
    /// When it arrived, on the store's clock (from the store's start).
    pub at: Duration,
    /// What it was.
    pub kind: Kind,
    /// The sending process.
    pub process: String,
    /// The fencing token it carried.
    pub token: u64,
    /// The planned length of the work (`BEGIN` only, when given).
    pub planned: Option<Duration>,
    /// When, on the store's clock, the sender last saw its lock held
    /// (`LOST` only, when given: the arrival minus the age it reported).
    pub last_held: Option<Duration>,
    /// Whether the store accepted it (a `LOST` notice is always accepted).
    pub accepted: bool,
    /// Why it was rejected.
    pub reason: Option<String>,
}

impl std::fmt::Display for StoreEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:>10.6}s {} {} {} {}",
            self.at.as_secs_f64(),
            self.kind.as_str(),
            self.process,
            self.token,
            if self.accepted { "OK" } else { "REJECTED" }
        )?;
        if let Some(p) = self.planned {
            write!(f, " work={p:?}")?;
        }
        if let Some(h) = self.last_held {
            write!(f, " last-held={:.6}s", h.as_secs_f64())?;
        }
        if let Some(r) = &self.reason {
            write!(f, " ({r})")?;
        }
        Ok(())
    }
}

/// A critical section whose `BEGIN` the store accepted and that has not
/// ended yet, as far as the store knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenSection {
    /// The holder.
    pub process: String,
    /// Its fencing token.
    pub token: u64,
    /// The work it announced.
    pub planned: Option<Duration>,
    /// When its `BEGIN` arrived (store clock).
    pub since: Duration,
}

#[derive(Default)]
struct StoreState {
    events: Vec<StoreEvent>,
    /// The highest token accepted so far and the process that wrote it.
    highest: Option<(u64, String)>,
}

struct StoreShared {
    started: Instant,
    state: Mutex<StoreState>,
    holder: watch::Sender<Option<OpenSection>>,
}

impl StoreShared {
    fn handle(&self, line: &str) -> String {
        let mut words = line.split_whitespace();
        let (Some(kind), Some(process), Some(token)) = (
            words.next().and_then(Kind::parse),
            words.next(),
            words.next().and_then(|t| t.parse::<u64>().ok()),
        ) else {
            return format!("ERR malformed line {line:?}");
        };
        let extra: Option<u64> = words.next().and_then(|n| n.parse().ok());
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let at = self.started.elapsed();
        let (planned, last_held) = match kind {
            Kind::Begin => (extra.map(Duration::from_millis), None),
            Kind::Lost => (
                None,
                extra.map(|us| at.saturating_sub(Duration::from_micros(us))),
            ),
            Kind::End => (None, None),
        };
        let reason = match (&st.highest, kind) {
            (_, Kind::Lost) => None,
            (Some((h, _)), _) if token < *h => {
                Some(format!("token {token} is below the highest accepted, {h}"))
            }
            (Some((h, by)), _) if token == *h && by != process => {
                Some(format!("token {token} was already used by {by}"))
            }
            _ => None,
        };
        let accepted = reason.is_none();
        if accepted && kind != Kind::Lost && st.highest.as_ref().is_none_or(|(h, _)| token > *h) {
            st.highest = Some((token, process.to_owned()));
        }
        let this = |s: &OpenSection| s.process == process && s.token == token;
        if accepted {
            match kind {
                Kind::Begin => {
                    self.holder.send_if_modified(|h| {
                        if h.as_ref().is_some_and(this) {
                            return false;
                        }
                        *h = Some(OpenSection {
                            process: process.to_owned(),
                            token,
                            planned,
                            since: at,
                        });
                        true
                    });
                }
                Kind::End | Kind::Lost => {
                    self.holder.send_if_modified(|h| {
                        if h.as_ref().is_some_and(this) {
                            *h = None;
                            return true;
                        }
                        false
                    });
                }
            }
        }
        st.events.push(StoreEvent {
            at,
            kind,
            process: process.to_owned(),
            token,
            planned,
            last_held,
            accepted,
            reason,
        });
        if accepted { "OK" } else { "REJECTED" }.to_owned()
    }
}

/// The protected resource of the lock-safety check: a TCP server on
/// `127.0.0.1` that accepts fenced writes (see the [module
/// documentation](self) for the protocol) and records every line with its
/// own monotonic timestamp. Dropping it stops the server.
///
/// ```
/// use std::time::Duration;
/// use im_infra_integration_tests::lock_safety::{FencedStore, StoreClient};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> anyhow::Result<()> {
/// let store = FencedStore::start().await?;
/// let mut a = StoreClient::connect(store.addr(), "a").await?;
/// let mut b = StoreClient::connect(store.addr(), "b").await?;
/// assert!(a.begin(7, Duration::from_millis(10)).await?);
/// assert!(b.begin(8, Duration::from_millis(10)).await?); // a was cut off
/// assert!(!a.end(7).await?, "the stale holder is fenced off");
/// assert!(b.end(8).await?);
/// let v = store.verdict();
/// assert_eq!(v.completed, 1);
/// assert_eq!(v.rejected.len(), 1);
/// assert!(!v.is_safe());
/// # Ok(())
/// # }
/// ```
pub struct FencedStore {
    addr: SocketAddr,
    shared: Arc<StoreShared>,
    /// Dropped with the store: the connection tasks see it closed.
    _alive: watch::Sender<()>,
    listener: JoinHandle<()>,
}

impl std::fmt::Debug for FencedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FencedStore")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl FencedStore {
    /// Starts the store on `127.0.0.1:0` (a free port, see
    /// [`addr`](Self::addr)).
    ///
    /// ```
    /// use im_infra_integration_tests::lock_safety::FencedStore;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> anyhow::Result<()> {
    /// let store = FencedStore::start().await?;
    /// assert!(store.addr().ip().is_loopback());
    /// # Ok(())
    /// # }
    /// ```
    pub async fn start() -> Result<FencedStore> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the fenced store on 127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let (holder, _) = watch::channel(None);
        let shared = Arc::new(StoreShared {
            started: Instant::now(),
            state: Mutex::new(StoreState::default()),
            holder,
        });
        let (alive, alive_rx) = watch::channel(());
        let task = tokio::spawn(store_accept_loop(listener, shared.clone(), alive_rx));
        Ok(FencedStore {
            addr,
            shared,
            _alive: alive,
            listener: task,
        })
    }

    /// The store's address.
    ///
    /// ```
    /// use im_infra_integration_tests::lock_safety::{FencedStore, StoreClient};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> anyhow::Result<()> {
    /// let store = FencedStore::start().await?;
    /// let client = StoreClient::connect(store.addr(), "p0").await?;
    /// # drop(client);
    /// # Ok(())
    /// # }
    /// ```
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The store's clock: the time since it started. The events carry
    /// timestamps on this clock; a test uses it to place its own actions
    /// (a kill, a freeze) among them.
    ///
    /// ```
    /// use im_infra_integration_tests::lock_safety::FencedStore;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> anyhow::Result<()> {
    /// let store = FencedStore::start().await?;
    /// let t0 = store.now();
    /// assert!(store.now() >= t0);
    /// # Ok(())
    /// # }
    /// ```
    pub fn now(&self) -> Duration {
        self.shared.started.elapsed()
    }

    /// The section in progress, if any, updated on every accepted `BEGIN`,
    /// and on the `END` or `LOST` of that section.
    ///
    /// ```
    /// use std::time::Duration;
    /// use im_infra_integration_tests::lock_safety::{FencedStore, StoreClient};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> anyhow::Result<()> {
    /// let store = FencedStore::start().await?;
    /// let holder = store.holder();
    /// let mut c = StoreClient::connect(store.addr(), "p0").await?;
    /// c.begin(1, Duration::from_millis(5)).await?;
    /// assert_eq!(holder.borrow().as_ref().map(|s| s.token), Some(1));
    /// c.end(1).await?;
    /// assert!(holder.borrow().is_none());
    /// # Ok(())
    /// # }
    /// ```
    pub fn holder(&self) -> watch::Receiver<Option<OpenSection>> {
        self.shared.holder.subscribe()
    }

    /// Every line received so far, in arrival order.
    ///
    /// ```
    /// use std::time::Duration;
    /// use im_infra_integration_tests::lock_safety::{FencedStore, Kind, StoreClient};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> anyhow::Result<()> {
    /// let store = FencedStore::start().await?;
    /// let mut c = StoreClient::connect(store.addr(), "p0").await?;
    /// c.begin(1, Duration::from_millis(5)).await?;
    /// let events = store.events();
    /// assert_eq!(events.len(), 1);
    /// assert_eq!(events[0].kind, Kind::Begin);
    /// # Ok(())
    /// # }
    /// ```
    pub fn events(&self) -> Vec<StoreEvent> {
        self.shared
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .events
            .clone()
    }

    /// Judges what the store received so far (see [`judge`]).
    ///
    /// ```
    /// use im_infra_integration_tests::lock_safety::FencedStore;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> anyhow::Result<()> {
    /// let store = FencedStore::start().await?;
    /// let v = store.verdict();
    /// assert!(v.is_safe());
    /// assert_eq!(v.completed, 0);
    /// # Ok(())
    /// # }
    /// ```
    pub fn verdict(&self) -> Verdict {
        judge(&self.events())
    }
}

impl Drop for FencedStore {
    fn drop(&mut self) {
        self.listener.abort();
    }
}

async fn store_accept_loop(
    listener: TcpListener,
    shared: Arc<StoreShared>,
    alive: watch::Receiver<()>,
) {
    while let Ok((stream, _)) = listener.accept().await {
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        let mut alive = alive.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = serve_store_connection(stream, &shared) => {}
                _ = alive.changed() => {}
            }
        });
    }
}

async fn serve_store_connection(stream: TcpStream, shared: &StoreShared) -> std::io::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut lines = BufReader::new(r).lines();
    while let Some(line) = lines.next_line().await? {
        let mut answer = shared.handle(&line);
        answer.push('\n');
        w.write_all(answer.as_bytes()).await?;
    }
    Ok(())
}

/// A contender's connection to the [`FencedStore`].
///
/// ```
/// use std::time::Duration;
/// use im_infra_integration_tests::lock_safety::{FencedStore, StoreClient};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> anyhow::Result<()> {
/// let store = FencedStore::start().await?;
/// let mut c = StoreClient::connect(store.addr(), "p0").await?;
/// assert!(c.begin(3, Duration::from_millis(20)).await?);
/// assert!(c.end(3).await?);
/// assert!(!c.begin(2, Duration::from_millis(20)).await?, "a lower token is stale");
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct StoreClient {
    process: String,
    lines: tokio::io::Lines<BufReader<OwnedReadHalf>>,
    writer: OwnedWriteHalf,
}

impl StoreClient {
    /// Connects as `process` (a name without whitespace).
    ///
    /// ```
    /// use im_infra_integration_tests::lock_safety::{FencedStore, StoreClient};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> anyhow::Result<()> {
    /// let store = FencedStore::start().await?;
    /// StoreClient::connect(store.addr(), "p0").await?;
    /// assert!(StoreClient::connect(store.addr(), "two words").await.is_err());
    /// # Ok(())
    /// # }
    /// ```
    pub async fn connect(addr: impl tokio::net::ToSocketAddrs, process: &str) -> Result<Self> {
        if process.is_empty() || process.contains(char::is_whitespace) {
            bail!("process name {process:?} must be one word");
        }
        let stream = TcpStream::connect(addr)
            .await
            .context("connecting to the fenced store")?;
        stream.set_nodelay(true)?;
        let (r, writer) = stream.into_split();
        Ok(StoreClient {
            process: process.to_owned(),
            lines: BufReader::new(r).lines(),
            writer,
        })
    }

    async fn call(&mut self, line: String) -> Result<String> {
        self.writer.write_all(line.as_bytes()).await?;
        let answer = self
            .lines
            .next_line()
            .await?
            .context("the fenced store closed the connection")?;
        if answer.starts_with("ERR") {
            bail!("the fenced store answered {answer:?} to {:?}", line.trim());
        }
        Ok(answer)
    }

    /// Sends `BEGIN`; `true` if the store accepted it.
    ///
    /// ```
    /// use std::time::Duration;
    /// use im_infra_integration_tests::lock_safety::{FencedStore, StoreClient};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> anyhow::Result<()> {
    /// let store = FencedStore::start().await?;
    /// let mut c = StoreClient::connect(store.addr(), "p0").await?;
    /// assert!(c.begin(1, Duration::from_millis(20)).await?);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn begin(&mut self, token: u64, planned: Duration) -> Result<bool> {
        let line = format!("BEGIN {} {token} {}\n", self.process, planned.as_millis());
        Ok(self.call(line).await? == "OK")
    }

    /// Sends `END`; `true` if the store accepted it.
    ///
    /// ```
    /// use std::time::Duration;
    /// use im_infra_integration_tests::lock_safety::{FencedStore, StoreClient};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> anyhow::Result<()> {
    /// let store = FencedStore::start().await?;
    /// let mut c = StoreClient::connect(store.addr(), "p0").await?;
    /// c.begin(1, Duration::from_millis(20)).await?;
    /// assert!(c.end(1).await?);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn end(&mut self, token: u64) -> Result<bool> {
        let line = format!("END {} {token}\n", self.process);
        Ok(self.call(line).await? == "OK")
    }

    /// Sends the `LOST` notice: the lock of `token` is no longer held, and
    /// was last seen held `since` ago.
    ///
    /// ```
    /// use std::time::Duration;
    /// use im_infra_integration_tests::lock_safety::{FencedStore, StoreClient};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> anyhow::Result<()> {
    /// let store = FencedStore::start().await?;
    /// let mut c = StoreClient::connect(store.addr(), "p0").await?;
    /// c.begin(1, Duration::from_secs(5)).await?;
    /// c.lost(1, Duration::from_millis(1)).await?;
    /// assert_eq!(store.verdict().lost, 1);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn lost(&mut self, token: u64, since: Duration) -> Result<()> {
        let line = format!("LOST {} {token} {}\n", self.process, since.as_micros());
        self.call(line).await.map(drop)
    }
}

// ---------------------------------------------------------------------------
// The verdict
// ---------------------------------------------------------------------------

/// How an accepted critical section ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SectionEnd {
    /// Its `END` was accepted (store time).
    Completed(Duration),
    /// Its holder reported the loss (`LOST`) and had last seen the lock
    /// held (the time given) before any later `BEGIN`.
    Lost(Duration),
    /// Neither: the holder was killed, or it spoke up only after a later
    /// holder began. Open-ended until the next accepted `BEGIN` (`None` if
    /// there was none).
    Abandoned(Option<Duration>),
}

/// A critical section: an accepted `BEGIN` and how it ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Section {
    /// The holder.
    pub process: String,
    /// Its fencing token.
    pub token: u64,
    /// The work it announced.
    pub planned: Option<Duration>,
    /// When its `BEGIN` arrived.
    pub begin: Duration,
    /// How it ended.
    pub end: SectionEnd,
    /// The last moment this holder is known to have believed it held the
    /// lock: the arrival of its last `BEGIN` or `END` (accepted or not), or
    /// the last-held time of its `LOST`.
    pub last_word: Duration,
}

/// A holder that reported the loss of its lock only after a later holder
/// had begun.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LateLoss {
    /// The late holder.
    pub process: String,
    /// Its token.
    pub token: u64,
    /// When it last saw its lock held (store clock).
    pub at: Duration,
    /// The process that had begun meanwhile.
    pub successor: String,
    /// The successor's token.
    pub successor_token: u64,
    /// How long after the successor's `BEGIN` it still saw its lock held.
    pub late_by: Duration,
}

/// Two holders that both believed they held the lock at the same time, as
/// the store saw it: the earlier one's last word came after the later one's
/// `BEGIN`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overlap {
    /// The earlier holder and its token.
    pub earlier: (String, u64),
    /// The later holder and its token.
    pub later: (String, u64),
    /// How long both believed they held the lock.
    pub by: Duration,
}

/// What the [`FencedStore`] saw, judged. See [`judge`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Verdict {
    /// Every accepted critical section, in acceptance order.
    pub sections: Vec<Section>,
    /// Sections whose `BEGIN` and `END` were both accepted.
    pub completed: usize,
    /// Sections ended by the holder's own loss notice in time.
    pub lost: usize,
    /// Sections without an accepted end (holder killed, or late).
    pub abandoned: usize,
    /// Rejected writes: each a holder that believed it held the lock while
    /// a later holder had already begun (or a reused token).
    pub rejected: Vec<StoreEvent>,
    /// Loss notices that came after a later holder had begun.
    pub late_losses: Vec<LateLoss>,
    /// Pairs of holders whose beliefs overlapped.
    pub overlaps: Vec<Overlap>,
    /// Accepted sections whose tokens did not strictly increase (a store
    /// bug if ever non-empty: the store enforces the order).
    pub token_order: Vec<String>,
    /// Lines that make no sense in the protocol (an `END` without its
    /// `BEGIN`, ...): a contender or harness bug.
    pub protocol: Vec<String>,
}

impl Verdict {
    /// Every reason to call the lock unsafe (empty when it is safe).
    ///
    /// ```
    /// use im_infra_integration_tests::lock_safety::Verdict;
    ///
    /// assert!(Verdict::default().violations().is_empty());
    /// ```
    pub fn violations(&self) -> Vec<String> {
        let mut v = Vec::new();
        for e in &self.rejected {
            v.push(format!("rejected write: {e}"));
        }
        for l in &self.late_losses {
            v.push(format!(
                "late loss: {} still saw token {} held at {:.3}s, {:?} after {} began with token {}",
                l.process,
                l.token,
                l.at.as_secs_f64(),
                l.late_by,
                l.successor,
                l.successor_token
            ));
        }
        for o in &self.overlaps {
            v.push(format!(
                "overlap: {} (token {}) still believed it held the lock {:?} after {} (token {}) began",
                o.earlier.0, o.earlier.1, o.by, o.later.0, o.later.1
            ));
        }
        v.extend(self.token_order.iter().map(|s| format!("token order: {s}")));
        v.extend(self.protocol.iter().map(|s| format!("protocol: {s}")));
        v
    }

    /// Whether there is no violation at all.
    ///
    /// ```
    /// use im_infra_integration_tests::lock_safety::Verdict;
    ///
    /// assert!(Verdict::default().is_safe());
    /// ```
    pub fn is_safe(&self) -> bool {
        self.violations().is_empty()
    }
}

/// Judges a store's record (in arrival order): rebuilds the critical
/// sections and finds rejected writes, late loss notices, overlapping
/// beliefs, token-order and protocol errors. See the [module
/// documentation](self) for what each means.
///
/// ```
/// use std::time::Duration;
/// use im_infra_integration_tests::lock_safety::{judge, Kind, StoreEvent};
///
/// let ev = |ms, kind, p: &str, token| StoreEvent {
///     at: Duration::from_millis(ms),
///     kind,
///     process: p.into(),
///     token,
///     planned: None,
///     last_held: None,
///     accepted: true,
///     reason: None,
/// };
/// // a is killed in its section; b begins later with a larger token.
/// let v = judge(&[ev(0, Kind::Begin, "a", 1), ev(2000, Kind::Begin, "b", 2), ev(2010, Kind::End, "b", 2)]);
/// assert_eq!((v.completed, v.abandoned), (1, 1));
/// assert!(v.is_safe());
/// // a reports the loss after b began: late.
/// let v = judge(&[ev(0, Kind::Begin, "a", 1), ev(2000, Kind::Begin, "b", 2), ev(2001, Kind::Lost, "a", 1)]);
/// assert_eq!(v.late_losses.len(), 1);
/// assert_eq!(v.overlaps.len(), 1);
/// ```
pub fn judge(events: &[StoreEvent]) -> Verdict {
    let mut v = Verdict::default();
    let mut open: Option<usize> = None;
    let mut index: HashMap<(String, u64), usize> = HashMap::new();
    for e in events {
        let key = (e.process.clone(), e.token);
        // When the sender last believed it held the lock.
        let word = e.last_held.unwrap_or(e.at);
        if let Some(&i) = index.get(&key) {
            let s: &mut Section = &mut v.sections[i];
            s.last_word = s.last_word.max(word);
        }
        if !e.accepted {
            v.rejected.push(e.clone());
            continue;
        }
        match e.kind {
            Kind::Begin => {
                if index.contains_key(&key) {
                    v.protocol.push(format!("repeated BEGIN: {e}"));
                    continue;
                }
                if let Some(i) = open {
                    v.sections[i].end = SectionEnd::Abandoned(Some(e.at));
                }
                if let Some(last) = v.sections.last() {
                    if e.token <= last.token {
                        v.token_order.push(format!(
                            "{} began with token {} after {} with token {}",
                            e.process, e.token, last.process, last.token
                        ));
                    }
                }
                v.sections.push(Section {
                    process: e.process.clone(),
                    token: e.token,
                    planned: e.planned,
                    begin: e.at,
                    end: SectionEnd::Abandoned(None),
                    last_word: e.at,
                });
                let i = v.sections.len() - 1;
                index.insert(key, i);
                open = Some(i);
            }
            Kind::End | Kind::Lost => {
                let current = open.filter(|&i| {
                    v.sections[i].process == e.process && v.sections[i].token == e.token
                });
                if let Some(i) = current {
                    v.sections[i].end = if e.kind == Kind::End {
                        SectionEnd::Completed(e.at)
                    } else {
                        SectionEnd::Lost(word)
                    };
                    open = None;
                    continue;
                }
                match index.get(&key).map(|&i| (i, v.sections[i].end)) {
                    // The notice arrived after the successor began: late
                    // if the holder still saw the lock held by then.
                    Some((i, SectionEnd::Abandoned(Some(next))))
                        if e.kind == Kind::Lost && i + 1 < v.sections.len() =>
                    {
                        if word <= next {
                            v.sections[i].end = SectionEnd::Lost(word);
                            continue;
                        }
                        let successor = &v.sections[i + 1];
                        v.late_losses.push(LateLoss {
                            process: e.process.clone(),
                            token: e.token,
                            at: word,
                            successor: successor.process.clone(),
                            successor_token: successor.token,
                            late_by: word - next,
                        });
                    }
                    Some(_) => v
                        .protocol
                        .push(format!("{} after its section ended: {e}", e.kind.as_str())),
                    // A LOST before any BEGIN is a holder that never began;
                    // an END without its BEGIN is an error.
                    None if e.kind == Kind::Lost => {}
                    None => v.protocol.push(format!("END without its BEGIN: {e}")),
                }
            }
        }
    }
    for s in &v.sections {
        match s.end {
            SectionEnd::Completed(_) => v.completed += 1,
            SectionEnd::Lost(_) => v.lost += 1,
            SectionEnd::Abandoned(_) => v.abandoned += 1,
        }
    }
    // Beliefs: from BEGIN to the last word. Any later section that began
    // before an earlier holder's last word overlaps it.
    for (i, s) in v.sections.iter().enumerate() {
        for later in &v.sections[i + 1..] {
            if later.begin >= s.last_word {
                continue;
            }
            v.overlaps.push(Overlap {
                earlier: (s.process.clone(), s.token),
                later: (later.process.clone(), later.token),
                by: s.last_word - later.begin,
            });
        }
    }
    v
}

// ---------------------------------------------------------------------------
// Backends
// ---------------------------------------------------------------------------

/// The backends the check runs on, built the way the contenders build them.
#[derive(Debug)]
pub enum LockBackend {
    /// `im-infra-redis`.
    Redis(RedisBackend),
    /// `im-infra-etcd`.
    Etcd(EtcdBackend),
    /// `im-infra-mysql`.
    Mysql(MysqlBackend),
}

impl LockBackend {
    /// Builds `kind` (`redis`, `etcd` or `mysql`) on `url` (a Redis or
    /// MySQL URL, or comma-separated etcd endpoints) in `namespace`, with
    /// `timeout` bounding connecting and every request.
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use im_infra_integration_tests::lock_safety::LockBackend;
    ///
    /// # async fn f() -> anyhow::Result<()> {
    /// let b = LockBackend::connect("redis", "redis://127.0.0.1:6379/0", "ns", Duration::from_secs(1)).await?;
    /// let lock = b.lock().await?;
    /// # drop(lock);
    /// b.close().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn connect(
        kind: &str,
        url: &str,
        namespace: &str,
        timeout: Duration,
    ) -> Result<LockBackend> {
        Ok(match kind {
            "redis" => LockBackend::Redis(
                RedisBackend::builder()
                    .url(url)
                    .namespace(namespace)
                    .request_timeout(timeout)
                    .connect_timeout(timeout)
                    .build()
                    .await?,
            ),
            "etcd" => {
                let mut cfg =
                    EtcdSettings::with_endpoints(url.split(',').map(|e| e.trim().to_owned()));
                cfg.namespace = namespace.to_owned();
                cfg.request_timeout = timeout;
                cfg.connect_timeout = timeout;
                LockBackend::Etcd(EtcdBackend::builder().settings(cfg).build().await?)
            }
            "mysql" => LockBackend::Mysql(
                MysqlBackend::builder()
                    .url(url)
                    .namespace(namespace)
                    .table_prefix(MYSQL_TABLE_PREFIX)
                    .request_timeout(timeout)
                    .connect_timeout(timeout)
                    .build()
                    .await?,
            ),
            other => bail!("unknown backend {other:?} (redis, etcd or mysql)"),
        })
    }

    fn backend(&self) -> &dyn Backend {
        match self {
            LockBackend::Redis(b) => b,
            LockBackend::Etcd(b) => b,
            LockBackend::Mysql(b) => b,
        }
    }

    /// The backend's lock service.
    ///
    /// ```no_run
    /// # use std::time::Duration;
    /// # use im_infra_integration_tests::lock_safety::LockBackend;
    /// # async fn f(b: LockBackend) -> anyhow::Result<()> {
    /// let lock = b.lock().await?;
    /// assert!(lock.capabilities().fencing);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn lock(&self) -> Result<Arc<dyn DistributedLock>> {
        Ok(self.backend().lock().await?)
    }

    /// Deletes everything of the namespace.
    ///
    /// ```no_run
    /// # use im_infra_integration_tests::lock_safety::LockBackend;
    /// # async fn f(b: LockBackend) -> anyhow::Result<()> {
    /// b.purge().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn purge(&self) -> Result<()> {
        match self {
            LockBackend::Redis(b) => drop(b.purge_namespace().await?),
            LockBackend::Etcd(b) => drop(b.purge_namespace().await?),
            LockBackend::Mysql(b) => drop(b.purge_namespace().await?),
        }
        Ok(())
    }

    /// Closes the backend.
    ///
    /// ```no_run
    /// # use im_infra_integration_tests::lock_safety::LockBackend;
    /// # async fn f(b: LockBackend) -> anyhow::Result<()> {
    /// b.close().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn close(&self) -> Result<()> {
        Ok(self.backend().close().await?)
    }
}

// ---------------------------------------------------------------------------
// The run
// ---------------------------------------------------------------------------

/// What [`run`] does.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// `redis`, `etcd` or `mysql`.
    pub backend: String,
    /// The real server: a Redis or MySQL URL, or etcd endpoints (only the
    /// first is used). Each contender reaches it through its own proxy.
    pub server: String,
    /// The `lock_contender` binary (`env!("CARGO_BIN_EXE_lock_contender")`
    /// in this crate's integration tests).
    pub contender: PathBuf,
    /// How many contenders run at any time (a killed one is replaced).
    pub processes: usize,
    /// How long the contest lasts.
    pub duration: Duration,
    /// The lock's TTL.
    pub ttl: Duration,
    /// The connect and request timeout of the even-numbered contenders.
    pub timeout: Duration,
    /// The connect and request timeout of the odd-numbered contenders:
    /// longer than `waiter_freeze_for`, so that an answer held back for
    /// longer than the TTL still reaches them (a grant learnt of late).
    pub patient_timeout: Duration,
    /// Percentage of critical sections that last `long_work` instead of
    /// 5–50 ms (so that a freeze can hit a holder that depends on renewal).
    pub long_work_percent: u32,
    /// The length of a long critical section.
    pub long_work: Duration,
    /// How long a freeze of a holder lasts (longer than the TTL).
    pub freeze_for: Duration,
    /// How long the answers to a waiter are held (longer than the TTL,
    /// shorter than `patient_timeout`).
    pub waiter_freeze_for: Duration,
    /// Seed of every random choice (the parent's and the contenders').
    pub seed: u64,
    /// Where the run's output goes: a directory per run, named after its
    /// namespace, with each contender's output (`<id>.log`) and the
    /// store's record (`store.log`).
    pub log_dir: PathBuf,
}

impl RunConfig {
    /// Defaults: 3 processes for 15 s, TTL 2 s, timeouts of 1 s and (every
    /// other contender) 2 × TTL, 15 % long sections of 1.5 × TTL, holder
    /// freezes of 2 × TTL + 0.5 s, waiter freezes of 1.5 × TTL, seed 1 (or
    /// `IMINFRA_LOCK_SAFETY_SEED`), logs under the system's temporary
    /// directory.
    ///
    /// ```
    /// use std::time::Duration;
    /// use im_infra_integration_tests::lock_safety::RunConfig;
    ///
    /// let cfg = RunConfig::new("redis", "redis://127.0.0.1:6379/0", "target/debug/lock_contender")
    ///     .ttl(Duration::from_secs(3));
    /// assert_eq!(cfg.long_work, Duration::from_millis(4500));
    /// assert!(cfg.freeze_for > cfg.ttl);
    /// assert!(cfg.ttl < cfg.waiter_freeze_for && cfg.waiter_freeze_for < cfg.patient_timeout);
    /// ```
    pub fn new(backend: &str, server: &str, contender: impl Into<PathBuf>) -> RunConfig {
        let seed = std::env::var("IMINFRA_LOCK_SAFETY_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(1);
        RunConfig {
            backend: backend.to_owned(),
            server: server.to_owned(),
            contender: contender.into(),
            processes: 3,
            duration: Duration::from_secs(15),
            ttl: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
            patient_timeout: Duration::ZERO,
            long_work_percent: 15,
            long_work: Duration::ZERO,
            freeze_for: Duration::ZERO,
            waiter_freeze_for: Duration::ZERO,
            seed,
            log_dir: std::env::temp_dir().join("im-infra-lock-safety"),
        }
        .ttl(Duration::from_secs(2))
    }

    /// Sets the TTL, and what follows from it: the long-section length
    /// (1.5 × TTL), the holder freeze (2 × TTL + 0.5 s), the waiter freeze
    /// (1.5 × TTL) and the patient timeout (2 × TTL).
    ///
    /// ```
    /// use std::time::Duration;
    /// use im_infra_integration_tests::lock_safety::RunConfig;
    ///
    /// let cfg = RunConfig::new("etcd", "http://127.0.0.1:2379", "lock_contender").ttl(Duration::from_secs(2));
    /// assert_eq!(cfg.freeze_for, Duration::from_millis(4500));
    /// ```
    #[must_use]
    pub fn ttl(mut self, ttl: Duration) -> RunConfig {
        self.ttl = ttl;
        self.long_work = ttl * 3 / 2;
        self.freeze_for = ttl * 2 + Duration::from_millis(500);
        self.waiter_freeze_for = ttl * 3 / 2;
        self.patient_timeout = ttl * 2;
        self
    }
}

/// A SIGKILL of a contender.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kill {
    /// The process killed.
    pub process: String,
    /// The token of the section it was in when the kill was decided.
    pub token: u64,
    /// When (store clock).
    pub at: Duration,
    /// Whether it died in its critical section (no `END`, no `LOST`).
    pub in_section: bool,
    /// Time from the kill to the next accepted `BEGIN` (`None`: none came).
    pub next_begin_after: Option<Duration>,
}

/// How a contender was cut off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FreezeKind {
    /// Both directions, while it held the lock in a long section.
    HolderLong,
    /// Both directions, while it held the lock in a short section.
    Holder,
    /// Only the server's answers, while it waited for the lock just as the
    /// holder was about to release it.
    WaiterReplies,
    /// Only the server's answers, while it waited for the lock just after
    /// the holder was killed (the waiters then race when the dead holder's
    /// lease runs out, with no release to announce it).
    WaiterRepliesAfterKill,
}

/// A freeze of a contender's proxy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Freeze {
    /// The process cut off.
    pub process: String,
    /// How.
    pub kind: FreezeKind,
    /// The token of the holder's section (for holder freezes).
    pub token: Option<u64>,
    /// When (store clock).
    pub at: Duration,
    /// For how long.
    pub duration: Duration,
    /// The contender's request timeout.
    pub timeout: Duration,
}

/// A contender that exited on its own with a failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Crash {
    /// The process.
    pub process: String,
    /// Its exit status.
    pub status: String,
    /// The end of its output.
    pub log_tail: String,
}

/// What [`run`] observed.
#[derive(Debug, Clone)]
pub struct Report {
    /// The backend.
    pub backend: String,
    /// The seed used.
    pub seed: u64,
    /// The store's verdict.
    pub verdict: Verdict,
    /// Every kill.
    pub kills: Vec<Kill>,
    /// Every freeze.
    pub freezes: Vec<Freeze>,
    /// Contenders that failed on their own.
    pub crashes: Vec<Crash>,
    /// Contenders started in all.
    pub spawned: usize,
    /// Actions that found no candidate in time, and other remarks.
    pub notes: Vec<String>,
    /// Where the contenders' output and the store's record are.
    pub log_dir: PathBuf,
}

impl Report {
    /// The waits from the SIGKILL of a holder in its critical section to
    /// the next accepted `BEGIN` (kills with no later `BEGIN` are left out).
    ///
    /// ```
    /// # use im_infra_integration_tests::lock_safety::Report;
    /// # fn f(report: &Report) {
    /// for w in report.kill_waits() {
    ///     println!("{w:?}");
    /// }
    /// # }
    /// ```
    pub fn kill_waits(&self) -> Vec<Duration> {
        self.kills
            .iter()
            .filter(|k| k.in_section)
            .filter_map(|k| k.next_begin_after)
            .collect()
    }

    /// The longest of [`kill_waits`](Self::kill_waits).
    ///
    /// ```
    /// # use im_infra_integration_tests::lock_safety::Report;
    /// # fn f(report: &Report) {
    /// println!("{:?}", report.max_kill_wait());
    /// # }
    /// ```
    pub fn max_kill_wait(&self) -> Option<Duration> {
        self.kill_waits().into_iter().max()
    }

    /// The median of [`kill_waits`](Self::kill_waits) (the upper one of an
    /// even count).
    ///
    /// ```
    /// # use im_infra_integration_tests::lock_safety::Report;
    /// # fn f(report: &Report) {
    /// println!("{:?}", report.median_kill_wait());
    /// # }
    /// ```
    pub fn median_kill_wait(&self) -> Option<Duration> {
        let mut w = self.kill_waits();
        w.sort();
        w.get(w.len() / 2).copied()
    }

    /// A few lines for a test's output: the figures and every violation.
    ///
    /// ```
    /// # use im_infra_integration_tests::lock_safety::Report;
    /// # fn f(report: &Report) {
    /// eprintln!("{}", report.summary());
    /// # }
    /// ```
    pub fn summary(&self) -> String {
        let v = &self.verdict;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "lock safety on {} (seed {}): {} sections ({} completed, {} ended by a loss notice, {} abandoned), \
             {} rejected writes, {} late loss notices, {} overlaps; {} contenders started, {} crashed",
            self.backend,
            self.seed,
            v.sections.len(),
            v.completed,
            v.lost,
            v.abandoned,
            v.rejected.len(),
            v.late_losses.len(),
            v.overlaps.len(),
            self.spawned,
            self.crashes.len()
        );
        let waits: Vec<String> = self
            .kill_waits()
            .iter()
            .map(|w| format!("{:.0} ms", w.as_secs_f64() * 1000.0))
            .collect();
        let _ = writeln!(
            s,
            "  kills: {} ({} in a critical section); wait from SIGKILL to the next BEGIN: max {:?}, median {:?}, all [{}]",
            self.kills.len(),
            self.kills.iter().filter(|k| k.in_section).count(),
            self.max_kill_wait(),
            self.median_kill_wait(),
            waits.join(", ")
        );
        for f in &self.freezes {
            let _ = writeln!(
                s,
                "  freeze: {} {:?} token {:?} at {:.3}s for {:?} (its request timeout {:?})",
                f.process,
                f.kind,
                f.token,
                f.at.as_secs_f64(),
                f.duration,
                f.timeout
            );
        }
        for n in &self.notes {
            let _ = writeln!(s, "  note: {n}");
        }
        for c in &self.crashes {
            let _ = writeln!(s, "  crash: {} {}:\n{}", c.process, c.status, c.log_tail);
        }
        for x in v.violations() {
            let _ = writeln!(s, "  VIOLATION {x}");
        }
        let _ = write!(s, "  contender logs: {}", self.log_dir.display());
        s
    }
}

/// One running `lock_contender`.
struct Contender {
    id: String,
    timeout: Duration,
    started: Instant,
    child: Child,
    proxy: Arc<FreezeProxy>,
    frozen_until: Option<Instant>,
    log: PathBuf,
    exit: Option<ExitStatus>,
    killed: bool,
}

impl Contender {
    fn available(&self) -> bool {
        self.exit.is_none() && self.frozen_until.is_none_or(|t| Instant::now() >= t)
    }
}

impl Drop for Contender {
    fn drop(&mut self) {
        if self.exit.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The contenders of a run.
struct Pool<'a> {
    cfg: &'a RunConfig,
    namespace: String,
    server: String,
    store: SocketAddr,
    deadline: Instant,
    contenders: Vec<Contender>,
    spawned: usize,
    crashes: Vec<Crash>,
}

impl Pool<'_> {
    async fn spawn(&mut self) -> Result<()> {
        let n = self.spawned;
        self.spawned += 1;
        let id = format!("p{n}");
        let proxy = Arc::new(FreezeProxy::for_url(&self.server).await?);
        let url = proxy.url(&self.server)?;
        let log = self.cfg.log_dir.join(format!("{id}.log"));
        let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let remaining = self.deadline.saturating_duration_since(Instant::now());
        let seed = self.cfg.seed.wrapping_mul(1000).wrapping_add(n as u64);
        let timeout = if n % 2 == 1 {
            self.cfg.patient_timeout
        } else {
            self.cfg.timeout
        };
        let args: Vec<String> = [
            ("--backend", self.cfg.backend.clone()),
            ("--url", url),
            ("--namespace", self.namespace.clone()),
            ("--name", LOCK_NAME.to_owned()),
            ("--id", id.clone()),
            ("--store", self.store.to_string()),
            ("--ttl-ms", self.cfg.ttl.as_millis().to_string()),
            ("--timeout-ms", timeout.as_millis().to_string()),
            ("--duration-ms", remaining.as_millis().to_string()),
            (
                "--long-work-percent",
                self.cfg.long_work_percent.to_string(),
            ),
            ("--long-work-ms", self.cfg.long_work.as_millis().to_string()),
            ("--seed", seed.to_string()),
        ]
        .into_iter()
        .flat_map(|(k, v)| [k.to_owned(), v])
        .collect();
        let child = Command::new(&self.cfg.contender)
            .args(&args)
            .env(
                "RUST_LOG",
                std::env::var("IMINFRA_LOCK_SAFETY_LOG").unwrap_or_else(|_| "warn".to_owned()),
            )
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {}", self.cfg.contender.display()))?;
        self.contenders.push(Contender {
            id,
            timeout,
            started: Instant::now(),
            child,
            proxy,
            frozen_until: None,
            log,
            exit: None,
            killed: false,
        });
        Ok(())
    }

    /// Notes contenders that exited; a failure is a crash. Returns how many
    /// exited.
    fn reap(&mut self) -> usize {
        let mut exited = 0;
        for c in &mut self.contenders {
            if c.exit.is_some() {
                continue;
            }
            if let Ok(Some(status)) = c.child.try_wait() {
                c.exit = Some(status);
                exited += 1;
                if !c.killed && !status.success() {
                    self.crashes.push(Crash {
                        process: c.id.clone(),
                        status: status.to_string(),
                        log_tail: tail(&c.log, 20),
                    });
                }
            }
        }
        exited
    }

    fn alive(&self) -> usize {
        self.contenders.iter().filter(|c| c.exit.is_none()).count()
    }

    fn get(&mut self, id: &str) -> Option<&mut Contender> {
        self.contenders.iter_mut().find(|c| c.id == id)
    }

    fn is_available(&self, id: &str) -> bool {
        self.contenders.iter().any(|c| c.id == id && c.available())
    }

    /// A waiter to freeze the answers of: available, not `holder`, running
    /// for 300 ms at least (so it is waiting, not connecting), and
    /// preferably one whose request timeout outlasts `d`.
    fn pick_waiter(&self, holder: &str, d: Duration, rng: &mut fastrand::Rng) -> Option<String> {
        let waiters = |patient: bool| -> Vec<String> {
            self.contenders
                .iter()
                .filter(|c| c.available() && c.id != holder)
                .filter(|c| c.started.elapsed() >= Duration::from_millis(300))
                .filter(|c| !patient || c.timeout > d)
                .map(|c| c.id.clone())
                .collect()
        };
        let mut candidates = waiters(true);
        if candidates.is_empty() {
            candidates = waiters(false);
        }
        rng.choice(candidates.iter()).cloned()
    }

    /// Freezes `id` (both ways, or only the answers) for `d`; returns its
    /// request timeout.
    fn freeze(&mut self, id: &str, replies_only: bool, d: Duration) -> Duration {
        let Some(c) = self.get(id) else {
            return Duration::ZERO;
        };
        if replies_only {
            c.proxy.freeze_replies();
        } else {
            c.proxy.freeze();
        }
        c.frozen_until = Some(Instant::now() + d);
        let proxy = c.proxy.clone();
        tokio::spawn(async move {
            tokio::time::sleep(d).await;
            proxy.thaw();
        });
        c.timeout
    }
}

/// The last `n` lines of a file.
fn tail(path: &std::path::Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Kill,
    FreezeHolder,
    FreezeWaiter,
}

/// Waits up to `timeout` for a section in progress that `pred` accepts.
async fn wait_holder(
    rx: &mut watch::Receiver<Option<OpenSection>>,
    timeout: Duration,
    mut pred: impl FnMut(&OpenSection) -> bool,
) -> Option<OpenSection> {
    let found =
        tokio::time::timeout(timeout, rx.wait_for(|h| h.as_ref().is_some_and(&mut pred))).await;
    match found {
        Ok(Ok(h)) => h.clone(),
        _ => None,
    }
}

/// Runs the multi-process lock-safety check (see the [module
/// documentation](self)) and returns what it observed. Errors are for a
/// harness that could not run (no contender binary, no store); what the
/// lock did wrong is in the [`Report`].
///
/// ```no_run
/// use std::time::Duration;
/// use im_infra_integration_tests::lock_safety::{run, RunConfig};
///
/// # async fn f() -> anyhow::Result<()> {
/// let cfg = RunConfig::new("redis", "redis://127.0.0.1:6379/0", "target/debug/lock_contender")
///     .ttl(Duration::from_secs(2));
/// let report = run(&cfg).await?;
/// eprintln!("{}", report.summary());
/// assert!(report.verdict.is_safe());
/// # Ok(())
/// # }
/// ```
pub async fn run(cfg: &RunConfig) -> Result<Report> {
    if cfg.processes < 2 {
        bail!("a contest needs at least 2 processes");
    }
    if !matches!(cfg.backend.as_str(), "redis" | "etcd" | "mysql") {
        bail!("unknown backend {:?} (redis, etcd or mysql)", cfg.backend);
    }
    if !cfg.contender.exists() {
        bail!("no contender binary at {}", cfg.contender.display());
    }
    let namespace = format!(
        "locksafety-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let log_dir = cfg.log_dir.join(&namespace);
    std::fs::create_dir_all(&log_dir).with_context(|| format!("creating {}", log_dir.display()))?;
    let cfg = &RunConfig {
        log_dir: log_dir.clone(),
        ..cfg.clone()
    };
    let server = cfg
        .server
        .split(',')
        .next()
        .unwrap_or_default()
        .trim()
        .to_owned();
    let store = FencedStore::start().await?;
    let mut pool = Pool {
        cfg,
        namespace: namespace.clone(),
        server: server.clone(),
        store: store.addr(),
        deadline: Instant::now() + cfg.duration,
        contenders: Vec::new(),
        spawned: 0,
        crashes: Vec::new(),
    };
    for _ in 0..cfg.processes {
        pool.spawn().await?;
    }
    let mut kills = Vec::new();
    let mut freezes = Vec::new();
    let mut notes = Vec::new();
    let driven = drive(cfg, &store, &mut pool, &mut kills, &mut freezes, &mut notes).await;

    // Wind down: thaw everyone, let them finish on their own, kill the rest.
    for c in &pool.contenders {
        c.proxy.thaw();
    }
    let slowest = cfg.timeout.max(cfg.patient_timeout);
    let grace = Instant::now() + cfg.ttl * 2 + slowest * 4 + Duration::from_secs(5);
    while pool.alive() > 0 && Instant::now() < grace {
        pool.reap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    pool.reap();
    for c in &mut pool.contenders {
        if c.exit.is_none() {
            notes.push(format!("{} did not exit by itself; killed", c.id));
            c.killed = true;
            let _ = c.child.kill();
            c.exit = c.child.wait().ok();
        }
    }
    driven?;

    // Clean up the namespace through a direct connection (best effort).
    match LockBackend::connect(
        &cfg.backend,
        &cfg.server,
        &namespace,
        Duration::from_secs(5),
    )
    .await
    {
        Ok(b) => {
            if let Err(e) = b.purge().await {
                notes.push(format!("purging {namespace}: {e:#}"));
            }
            let _ = b.close().await;
        }
        Err(e) => notes.push(format!("connecting to purge {namespace}: {e:#}")),
    }

    let events = store.events();
    let record: String = events.iter().map(|e| format!("{e}\n")).collect();
    let store_log = log_dir.join("store.log");
    if let Err(e) = std::fs::write(&store_log, record) {
        notes.push(format!("writing {}: {e}", store_log.display()));
    }
    let verdict = judge(&events);
    if verdict.sections.is_empty() {
        if let Some(c) = pool.contenders.first() {
            notes.push(format!(
                "no critical section at all; the end of {}'s output:\n{}",
                c.id,
                tail(&c.log, 10)
            ));
        }
    }
    for k in &mut kills {
        k.in_section = verdict.sections.iter().any(|s| {
            s.process == k.process
                && s.token == k.token
                && matches!(s.end, SectionEnd::Abandoned(_))
        });
        k.next_begin_after = verdict
            .sections
            .iter()
            .find(|s| s.begin > k.at)
            .map(|s| s.begin - k.at);
    }
    Ok(Report {
        backend: cfg.backend.clone(),
        seed: cfg.seed,
        verdict,
        kills,
        freezes,
        crashes: std::mem::take(&mut pool.crashes),
        spawned: pool.spawned,
        notes,
        log_dir,
    })
}

/// The action loop of [`run`].
async fn drive(
    cfg: &RunConfig,
    store: &FencedStore,
    pool: &mut Pool<'_>,
    kills: &mut Vec<Kill>,
    freezes: &mut Vec<Freeze>,
    notes: &mut Vec<String>,
) -> Result<()> {
    let deadline = pool.deadline;
    let mut rng = fastrand::Rng::with_seed(cfg.seed);
    let mut holder = store.holder();
    let patience = cfg.ttl * 2 + Duration::from_secs(1);
    // The first actions are one of each, in a random order.
    let mut plan = vec![Action::Kill, Action::FreezeHolder, Action::FreezeWaiter];
    rng.shuffle(&mut plan);

    // Let the contenders start and the first sections happen.
    let first = wait_holder(&mut holder, Duration::from_secs(20), |_| true).await;
    if first.is_none() {
        notes.push("no critical section within 20 s of the start".to_owned());
    }

    // Nothing new starts unless a TTL is left for it to play out.
    while Instant::now() + cfg.ttl < deadline {
        let patience = patience.min(deadline.saturating_duration_since(Instant::now()));
        pool.reap();
        while pool.alive() < cfg.processes {
            pool.spawn().await?;
        }
        // A freeze needs someone left to take the lock: with fewer than
        // two processes neither frozen nor dead, kill instead.
        let available = pool.contenders.iter().filter(|c| c.available()).count();
        if available < 2 && plan.last() != Some(&Action::Kill) {
            plan.retain(|a| *a != Action::Kill);
            plan.push(Action::Kill);
        }
        let action = plan.pop().unwrap_or_else(|| {
            *rng.choice([Action::Kill, Action::FreezeHolder, Action::FreezeWaiter].iter())
                .expect("not empty")
        });
        match action {
            Action::Kill => {
                let p = &*pool;
                let Some(h) =
                    wait_holder(&mut holder, patience, |h| p.is_available(&h.process)).await
                else {
                    notes.push("kill: no available holder in time".to_owned());
                    continue;
                };
                let at = store.now();
                if let Some(c) = pool.get(&h.process) {
                    c.killed = true;
                    let _ = c.child.kill();
                    c.exit = c.child.wait().ok();
                }
                kills.push(Kill {
                    process: h.process.clone(),
                    token: h.token,
                    at,
                    in_section: false,
                    next_begin_after: None,
                });
                // Keep the contest going.
                pool.spawn().await?;
                // Half the time, also hold back the answers to a waiter:
                // the dead holder's lease runs out unannounced and the
                // waiters race for it.
                if rng.bool() {
                    match pool.pick_waiter(&h.process, cfg.waiter_freeze_for, &mut rng) {
                        Some(w) => {
                            let at = store.now();
                            let timeout = pool.freeze(&w, true, cfg.waiter_freeze_for);
                            freezes.push(Freeze {
                                process: w,
                                kind: FreezeKind::WaiterRepliesAfterKill,
                                token: None,
                                at,
                                duration: cfg.waiter_freeze_for,
                                timeout,
                            });
                        }
                        None => notes.push("no waiter to freeze after the kill".to_owned()),
                    }
                }
            }
            Action::FreezeHolder => {
                let p = &*pool;
                let long = |h: &OpenSection| h.planned.is_some_and(|d| d >= cfg.ttl);
                let mut found = wait_holder(&mut holder, patience, |h| {
                    long(h) && p.is_available(&h.process)
                })
                .await;
                if found.is_none() {
                    found =
                        wait_holder(&mut holder, patience, |h| p.is_available(&h.process)).await;
                }
                let Some(h) = found else {
                    notes.push("holder freeze: no available holder in time".to_owned());
                    continue;
                };
                let at = store.now();
                let timeout = pool.freeze(&h.process, false, cfg.freeze_for);
                freezes.push(Freeze {
                    process: h.process.clone(),
                    kind: if long(&h) {
                        FreezeKind::HolderLong
                    } else {
                        FreezeKind::Holder
                    },
                    token: Some(h.token),
                    at,
                    duration: cfg.freeze_for,
                    timeout,
                });
            }
            Action::FreezeWaiter => {
                // Wait for a section to begin and then to end: the holder
                // is about to release and the waiters race for the lock.
                let p = &*pool;
                let Some(h) =
                    wait_holder(&mut holder, patience, |h| p.is_available(&h.process)).await
                else {
                    notes.push("waiter freeze: no section in time".to_owned());
                    continue;
                };
                let ended = tokio::time::timeout(
                    patience,
                    holder.wait_for(|x| x.as_ref().is_none_or(|x| x.token != h.token)),
                )
                .await;
                if ended.is_err() {
                    notes.push(format!("waiter freeze: {} held on for too long", h.process));
                    continue;
                }
                // Preferably one that will still take an answer held for
                // longer than the TTL: a grant it learns of late.
                let Some(w) = pool.pick_waiter(&h.process, cfg.waiter_freeze_for, &mut rng) else {
                    notes.push("waiter freeze: no available waiter".to_owned());
                    continue;
                };
                let at = store.now();
                let timeout = pool.freeze(&w, true, cfg.waiter_freeze_for);
                freezes.push(Freeze {
                    process: w,
                    kind: FreezeKind::WaiterReplies,
                    token: None,
                    at,
                    duration: cfg.waiter_freeze_for,
                    timeout,
                });
            }
        }
        let gap = cfg.ttl / 4 + (cfg.ttl / 2).mul_f64(rng.f64());
        let left = deadline.saturating_duration_since(Instant::now());
        tokio::time::sleep(gap.min(left)).await;
    }
    // Let the last freezes and kills play out until the end.
    let left = deadline.saturating_duration_since(Instant::now());
    tokio::time::sleep(left).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(ms: u64, kind: Kind, p: &str, token: u64, accepted: bool) -> StoreEvent {
        StoreEvent {
            at: Duration::from_millis(ms),
            kind,
            process: p.to_owned(),
            token,
            planned: None,
            last_held: None,
            accepted,
            reason: None,
        }
    }

    #[test]
    fn clean_sections_with_a_kill_and_a_timely_loss_are_safe() {
        let v = judge(&[
            ev(0, Kind::Begin, "a", 1, true),
            ev(10, Kind::End, "a", 1, true),
            ev(20, Kind::Begin, "b", 2, true),
            // b is killed; c takes over later.
            ev(2100, Kind::Begin, "c", 3, true),
            ev(2200, Kind::Lost, "c", 3, true),
            ev(4300, Kind::Begin, "a", 5, true),
            ev(4310, Kind::End, "a", 5, true),
        ]);
        assert_eq!((v.completed, v.lost, v.abandoned), (2, 1, 1));
        assert!(v.is_safe(), "{:?}", v.violations());
        assert_eq!(
            v.sections[1].end,
            SectionEnd::Abandoned(Some(Duration::from_millis(2100)))
        );
    }

    #[test]
    fn a_rejected_end_is_a_violation_and_an_overlap() {
        let v = judge(&[
            ev(0, Kind::Begin, "a", 1, true),
            ev(2000, Kind::Begin, "b", 2, true),
            ev(2500, Kind::End, "a", 1, false),
            ev(2600, Kind::End, "b", 2, true),
        ]);
        assert_eq!(v.rejected.len(), 1);
        assert_eq!(v.overlaps.len(), 1);
        assert_eq!(v.overlaps[0].by, Duration::from_millis(500));
        assert_eq!((v.completed, v.abandoned), (1, 1));
        assert!(!v.is_safe());
    }

    #[test]
    fn a_late_loss_notice_is_a_violation() {
        let v = judge(&[
            ev(0, Kind::Begin, "a", 1, true),
            ev(2000, Kind::Begin, "b", 2, true),
            ev(2003, Kind::Lost, "a", 1, true),
        ]);
        assert_eq!(v.late_losses.len(), 1);
        assert_eq!(v.late_losses[0].late_by, Duration::from_millis(3));
        assert_eq!(v.late_losses[0].successor, "b");
        assert!(!v.is_safe());
    }

    #[test]
    fn a_notice_is_dated_by_when_the_lock_was_last_seen_held() {
        let mut lost = ev(2003, Kind::Lost, "a", 1, true);
        // Sent 5 ms after a last saw its lock held: before b began.
        lost.last_held = Some(Duration::from_millis(1998));
        let v = judge(&[
            ev(0, Kind::Begin, "a", 1, true),
            ev(2000, Kind::Begin, "b", 2, true),
            lost.clone(),
        ]);
        assert!(v.is_safe(), "{:?}", v.violations());
        assert_eq!(
            v.sections[0].end,
            SectionEnd::Lost(Duration::from_millis(1998))
        );
        // Last seen held 1 ms after b began: late by 1 ms.
        lost.last_held = Some(Duration::from_millis(2001));
        let v = judge(&[
            ev(0, Kind::Begin, "a", 1, true),
            ev(2000, Kind::Begin, "b", 2, true),
            lost,
        ]);
        assert_eq!(v.late_losses.len(), 1);
        assert_eq!(v.late_losses[0].late_by, Duration::from_millis(1));
        assert_eq!(v.overlaps[0].by, Duration::from_millis(1));
    }

    #[test]
    fn protocol_errors_are_reported() {
        let v = judge(&[
            ev(0, Kind::End, "a", 1, true),
            ev(1, Kind::Begin, "b", 2, true),
            ev(2, Kind::End, "b", 2, true),
            ev(3, Kind::End, "b", 2, true),
        ]);
        assert_eq!(v.protocol.len(), 2, "{:?}", v.protocol);
        assert!(!v.is_safe());
    }

    #[test]
    fn token_order_is_checked() {
        // The store would never accept this; judge must still catch it.
        let v = judge(&[
            ev(0, Kind::Begin, "a", 5, true),
            ev(1, Kind::End, "a", 5, true),
            ev(2, Kind::Begin, "b", 4, true),
            ev(3, Kind::End, "b", 4, true),
        ]);
        assert_eq!(v.token_order.len(), 1);
        assert!(!v.is_safe());
    }

    #[tokio::test]
    async fn the_store_fences_stale_and_reused_tokens() {
        let store = FencedStore::start().await.unwrap();
        let mut a = StoreClient::connect(store.addr(), "a").await.unwrap();
        let mut b = StoreClient::connect(store.addr(), "b").await.unwrap();
        let ms = Duration::from_millis(1);
        assert!(a.begin(1, ms).await.unwrap());
        assert!(a.end(1).await.unwrap());
        assert!(b.begin(2, ms).await.unwrap());
        assert!(!a.begin(2, ms).await.unwrap(), "token 2 belongs to b");
        assert!(!a.begin(1, ms).await.unwrap(), "token 1 is stale");
        assert!(b.end(2).await.unwrap());
        let v = store.verdict();
        assert_eq!(v.completed, 2);
        assert_eq!(v.rejected.len(), 2);
        let events = store.events();
        assert!(events.windows(2).all(|w| w[0].at <= w[1].at));
        // A malformed line is an error, not a write.
        let mut raw = TcpStream::connect(store.addr()).await.unwrap();
        raw.write_all(b"BEGIN x\n").await.unwrap();
        let mut line = String::new();
        BufReader::new(&mut raw).read_line(&mut line).await.unwrap();
        assert!(line.starts_with("ERR"), "{line:?}");
        assert_eq!(store.events().len(), events.len());
    }

    #[tokio::test]
    async fn the_holder_view_follows_the_sections() {
        let store = FencedStore::start().await.unwrap();
        let holder = store.holder();
        let mut a = StoreClient::connect(store.addr(), "a").await.unwrap();
        let mut b = StoreClient::connect(store.addr(), "b").await.unwrap();
        a.begin(1, Duration::from_secs(3)).await.unwrap();
        let h = holder.borrow().clone().unwrap();
        assert_eq!((h.process.as_str(), h.token), ("a", 1));
        assert_eq!(h.planned, Some(Duration::from_secs(3)));
        // a is superseded without a word: b holds.
        b.begin(2, Duration::from_millis(5)).await.unwrap();
        assert_eq!(holder.borrow().as_ref().map(|h| h.token), Some(2));
        // a's late notice does not end b's section.
        a.lost(1, Duration::ZERO).await.unwrap();
        assert_eq!(holder.borrow().as_ref().map(|h| h.token), Some(2));
        b.lost(2, Duration::ZERO).await.unwrap();
        assert!(holder.borrow().is_none());
        let v = store.verdict();
        assert_eq!(v.late_losses.len(), 1);
        assert_eq!(v.lost, 1);
    }
}
