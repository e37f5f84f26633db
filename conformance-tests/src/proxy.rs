//! A loopback TCP proxy that can freeze traffic, for partition tests.
//!
//! A client (a Redis, etcd or MySQL backend) is pointed at the proxy instead
//! of the server. [`FreezeProxy::freeze`] then stops every byte in both
//! directions without closing anything: the client sees a network that
//! hangs, not a reset. [`FreezeProxy::thaw`] delivers what was held back, in
//! order, on the connections that are still open.
//!
//! While frozen, each direction of a connection holds at most one buffer
//! (16 KiB) it had already read; beyond that it stops reading, so the data
//! waits in the kernel's socket buffers and the sender is eventually blocked
//! by TCP flow control. Nothing is ever dropped. A connection accepted while
//! frozen completes the TCP handshake with the proxy but the proxy connects
//! to the target only after the thaw, as a partitioned network would.
//! [`FreezeProxy::freeze_replies`] freezes one direction only (the server's
//! answers), an asymmetric partition.
//!
//! ```
//! use std::time::Duration;
//! use im_infra_conformance::proxy::FreezeProxy;
//! use tokio::io::{AsyncReadExt, AsyncWriteExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> anyhow::Result<()> {
//! // A one-connection echo server stands in for the real server.
//! let server = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let target = server.local_addr()?.to_string();
//! tokio::spawn(async move {
//!     let (mut s, _) = server.accept().await?;
//!     let (mut r, mut w) = s.split();
//!     tokio::io::copy(&mut r, &mut w).await?;
//!     anyhow::Ok(())
//! });
//!
//! let proxy = FreezeProxy::start(&target).await?;
//! let mut client = tokio::net::TcpStream::connect(proxy.addr()).await?;
//! client.write_all(b"ping").await?;
//! let mut buf = [0u8; 4];
//! client.read_exact(&mut buf).await?;
//! assert_eq!(&buf, b"ping");
//!
//! proxy.freeze();
//! client.write_all(b"held").await?;
//! let hung = tokio::time::timeout(Duration::from_millis(200), client.read(&mut buf)).await;
//! assert!(hung.is_err(), "nothing gets through while frozen");
//!
//! proxy.thaw();
//! client.read_exact(&mut buf).await?;
//! assert_eq!(&buf, b"held");
//! # Ok(())
//! # }
//! ```

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Bytes one direction of a connection reads before it waits for them to be
/// written (and, while frozen, the most it holds).
const BUFFER: usize = 16 * 1024;

/// The proxy's switches, seen by every task through one watch channel.
#[derive(Debug, Clone, Copy, Default)]
struct Control {
    /// Client to target traffic is held.
    requests_frozen: bool,
    /// Target to client traffic is held.
    replies_frozen: bool,
    /// Bumped by [`FreezeProxy::cut`]: a connection older than the current
    /// value closes.
    cut: u64,
}

/// One direction of a proxied connection.
#[derive(Debug, Clone, Copy)]
enum Direction {
    /// Client to target.
    Requests,
    /// Target to client.
    Replies,
}

impl Control {
    fn holds(&self, d: Direction) -> bool {
        match d {
            Direction::Requests => self.requests_frozen,
            Direction::Replies => self.replies_frozen,
        }
    }
}

/// A loopback TCP proxy in front of one `host:port` target, whose traffic
/// can be frozen and thawed (see the [module documentation](self)).
///
/// Dropping it stops the listener and closes every connection.
///
/// ```
/// use im_infra_conformance::proxy::FreezeProxy;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> anyhow::Result<()> {
/// // The target need not be up yet: the proxy connects per client connection.
/// let proxy = FreezeProxy::start("127.0.0.1:6379").await?;
/// let url = proxy.url("redis://127.0.0.1:6379/0")?;
/// assert_eq!(url, format!("redis://{}/0", proxy.addr()));
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct FreezeProxy {
    addr: SocketAddr,
    /// Where new connections go (see [`retarget`](Self::retarget)).
    target: Arc<Mutex<String>>,
    control: watch::Sender<Control>,
    open: Arc<AtomicUsize>,
    listener: JoinHandle<()>,
}

impl FreezeProxy {
    /// Starts a proxy listening on `127.0.0.1:0` (a free port, see
    /// [`addr`](Self::addr)) that forwards every connection to `target`
    /// (`host:port`). The target is resolved and connected to per accepted
    /// connection, so it need not be reachable yet.
    ///
    /// ```
    /// use im_infra_conformance::proxy::FreezeProxy;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> anyhow::Result<()> {
    /// let proxy = FreezeProxy::start("127.0.0.1:2379").await?;
    /// assert!(proxy.addr().ip().is_loopback());
    /// assert_eq!(proxy.target(), "127.0.0.1:2379");
    /// # Ok(())
    /// # }
    /// ```
    pub async fn start(target: &str) -> Result<FreezeProxy> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the proxy's listener on 127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let (control, rx) = watch::channel(Control::default());
        let open = Arc::new(AtomicUsize::new(0));
        let target = Arc::new(Mutex::new(target.to_owned()));
        let task = tokio::spawn(accept_loop(listener, target.clone(), rx, open.clone()));
        Ok(FreezeProxy {
            addr,
            target,
            control,
            open,
            listener: task,
        })
    }

    /// Starts a proxy in front of the server of `url` (a URL like
    /// `redis://host:port/0`, `mysql://user:pass@host:port/db` or
    /// `http://host:port`, or a bare `host:port`). Use
    /// [`url`](Self::url) to get the URL the client should use instead.
    ///
    /// ```
    /// use im_infra_conformance::proxy::FreezeProxy;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> anyhow::Result<()> {
    /// let proxy = FreezeProxy::for_url("mysql://u:p@127.0.0.1:3306/db").await?;
    /// assert_eq!(proxy.target(), "127.0.0.1:3306");
    /// assert_eq!(
    ///     proxy.url("mysql://u:p@127.0.0.1:3306/db")?,
    ///     format!("mysql://u:p@{}/db", proxy.addr())
    /// );
    /// # Ok(())
    /// # }
    /// ```
    pub async fn for_url(url: &str) -> Result<FreezeProxy> {
        FreezeProxy::start(&crate::servers::host_port(url)?).await
    }

    /// The address the proxy listens on (`127.0.0.1:<port>`).
    ///
    /// ```
    /// use im_infra_conformance::proxy::FreezeProxy;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> anyhow::Result<()> {
    /// let proxy = FreezeProxy::start("127.0.0.1:6379").await?;
    /// let client = tokio::net::TcpStream::connect(proxy.addr()).await?;
    /// # drop(client);
    /// # Ok(())
    /// # }
    /// ```
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The `host:port` the proxy forwards new connections to.
    ///
    /// ```
    /// use im_infra_conformance::proxy::FreezeProxy;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> anyhow::Result<()> {
    /// let proxy = FreezeProxy::start("localhost:6379").await?;
    /// assert_eq!(proxy.target(), "localhost:6379");
    /// # Ok(())
    /// # }
    /// ```
    pub fn target(&self) -> String {
        self.target
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Sends the connections accepted from now on to `target`; those open
    /// stay with the old one. What a DNS name or a load balancer that moves
    /// to another server does to a client: its next connection reaches the
    /// new server while its old connections still talk to the old one.
    ///
    /// ```
    /// use im_infra_conformance::proxy::FreezeProxy;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> anyhow::Result<()> {
    /// let proxy = FreezeProxy::start("127.0.0.1:6379").await?;
    /// proxy.retarget("127.0.0.1:6380");
    /// assert_eq!(proxy.target(), "127.0.0.1:6380");
    /// # Ok(())
    /// # }
    /// ```
    pub fn retarget(&self, target: &str) {
        *self.target.lock().unwrap_or_else(|p| p.into_inner()) = target.to_owned();
    }

    /// `url` with its `host:port` replaced by the proxy's address; scheme,
    /// credentials, path and query are kept. A bare `host:port` becomes the
    /// proxy's `host:port`. Fails if `url` has no `host:port`.
    ///
    /// ```
    /// use im_infra_conformance::proxy::FreezeProxy;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> anyhow::Result<()> {
    /// let proxy = FreezeProxy::start("127.0.0.1:2379").await?;
    /// let a = proxy.addr();
    /// assert_eq!(proxy.url("http://127.0.0.1:2379")?, format!("http://{a}"));
    /// assert_eq!(proxy.url("127.0.0.1:2379")?, a.to_string());
    /// assert!(proxy.url("redis://no-port").is_err());
    /// # Ok(())
    /// # }
    /// ```
    pub fn url(&self, url: &str) -> Result<String> {
        replace_host_port(url, &self.addr.to_string())
    }

    /// Stops forwarding, in both directions, on every connection (current
    /// and future) until [`thaw`](Self::thaw). Nothing is closed and nothing
    /// is dropped.
    ///
    /// ```
    /// use im_infra_conformance::proxy::FreezeProxy;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> anyhow::Result<()> {
    /// let proxy = FreezeProxy::start("127.0.0.1:6379").await?;
    /// proxy.freeze();
    /// assert!(proxy.is_frozen());
    /// # Ok(())
    /// # }
    /// ```
    pub fn freeze(&self) {
        self.control.send_modify(|c| {
            c.requests_frozen = true;
            c.replies_frozen = true;
        });
    }

    /// Freezes only what the target sends back: an asymmetric partition in
    /// which the client's requests still reach the server (and take effect
    /// there) while the answers are held until [`thaw`](Self::thaw). It is
    /// the way to make a client learn of a grant long after the server made
    /// it. New connections still reach the target.
    ///
    /// ```
    /// use im_infra_conformance::proxy::FreezeProxy;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> anyhow::Result<()> {
    /// let proxy = FreezeProxy::start("127.0.0.1:6379").await?;
    /// proxy.freeze_replies();
    /// assert!(proxy.is_frozen());
    /// proxy.thaw();
    /// assert!(!proxy.is_frozen());
    /// # Ok(())
    /// # }
    /// ```
    pub fn freeze_replies(&self) {
        self.control.send_modify(|c| c.replies_frozen = true);
    }

    /// Resumes forwarding: the bytes held back are delivered, in order, on
    /// the connections still open, and connections accepted while frozen
    /// connect to the target.
    ///
    /// ```
    /// use im_infra_conformance::proxy::FreezeProxy;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> anyhow::Result<()> {
    /// let proxy = FreezeProxy::start("127.0.0.1:6379").await?;
    /// proxy.freeze();
    /// proxy.thaw();
    /// assert!(!proxy.is_frozen());
    /// # Ok(())
    /// # }
    /// ```
    pub fn thaw(&self) {
        self.control.send_modify(|c| {
            c.requests_frozen = false;
            c.replies_frozen = false;
        });
    }

    /// Whether traffic is frozen (in either direction).
    ///
    /// ```
    /// use im_infra_conformance::proxy::FreezeProxy;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> anyhow::Result<()> {
    /// let proxy = FreezeProxy::start("127.0.0.1:6379").await?;
    /// assert!(!proxy.is_frozen());
    /// # Ok(())
    /// # }
    /// ```
    pub fn is_frozen(&self) -> bool {
        let c = *self.control.borrow();
        c.requests_frozen || c.replies_frozen
    }

    /// Closes every connection open now (both sides: the client sees EOF or
    /// a reset, so does the server). The closing happens on the proxy's
    /// tasks right after the call returns. Connections accepted later are
    /// not affected, and the frozen state is unchanged.
    ///
    /// ```
    /// use im_infra_conformance::proxy::FreezeProxy;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> anyhow::Result<()> {
    /// let proxy = FreezeProxy::start("127.0.0.1:6379").await?;
    /// proxy.cut();
    /// assert_eq!(proxy.connections(), 0);
    /// # Ok(())
    /// # }
    /// ```
    pub fn cut(&self) {
        self.control.send_modify(|c| c.cut += 1);
    }

    /// How many client connections are open (accepted and not yet closed,
    /// including those waiting for a thaw to reach the target).
    ///
    /// ```
    /// use im_infra_conformance::proxy::FreezeProxy;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> anyhow::Result<()> {
    /// let proxy = FreezeProxy::start("127.0.0.1:6379").await?;
    /// assert_eq!(proxy.connections(), 0);
    /// # Ok(())
    /// # }
    /// ```
    pub fn connections(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }
}

impl Drop for FreezeProxy {
    fn drop(&mut self) {
        // Dropping `control` (after this) ends every connection task: their
        // receivers see the channel closed. The listener goes now.
        self.listener.abort();
    }
}

/// `url` with its `host:port` replaced by `with`.
fn replace_host_port(url: &str, with: &str) -> Result<String> {
    let hp = crate::servers::host_port(url)?;
    let authority_start = url.find("://").map_or(0, |i| i + 3);
    let rest = &url[authority_start..];
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let host_start = rest[..authority_end].rfind('@').map_or(0, |i| i + 1);
    let start = authority_start + host_start;
    anyhow::ensure!(
        url[start..].starts_with(&hp),
        "cannot locate {hp:?} in {url:?}"
    );
    Ok(format!(
        "{}{with}{}",
        &url[..start],
        &url[start + hp.len()..]
    ))
}

/// Counts an open client connection while it lives.
struct OpenConnection(Arc<AtomicUsize>);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

async fn accept_loop(
    listener: TcpListener,
    target: Arc<Mutex<String>>,
    mut rx: watch::Receiver<Control>,
    open: Arc<AtomicUsize>,
) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            // Every change is just a wake-up; a closed channel is the end.
            changed = rx.changed() => match changed {
                Ok(()) => continue,
                Err(_) => return,
            },
        };
        let Ok((client, _)) = accepted else {
            // A failed accept (e.g. out of descriptors) concerns one client.
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            continue;
        };
        let _ = client.set_nodelay(true);
        open.fetch_add(1, Ordering::AcqRel);
        let counted = OpenConnection(open.clone());
        // A cut after this point closes this connection, even if its task
        // has not started yet.
        let born = rx.borrow().cut;
        let rx = rx.clone();
        let target = target.lock().unwrap_or_else(|p| p.into_inner()).clone();
        tokio::spawn(async move {
            let _counted = counted;
            connection(client, &target, born, rx).await;
        });
    }
}

/// One client connection, from its acceptance until it closes, is cut, or
/// the proxy is dropped.
async fn connection(client: TcpStream, target: &str, born: u64, rx: watch::Receiver<Control>) {
    let mut ender = rx.clone();
    let ended = async move {
        // Returns when cut or when the proxy is gone.
        let _ = ender.wait_for(|c| c.cut != born).await;
    };
    tokio::select! {
        _ = ended => {}
        _ = forward(client, target, rx) => {}
    }
    // Dropping the sockets here closes both sides.
}

async fn forward(client: TcpStream, target: &str, mut rx: watch::Receiver<Control>) {
    // A partitioned network does not carry the SYN either: reach the target
    // only once requests flow.
    if flowing(&mut rx, Direction::Requests).await.is_err() {
        return;
    }
    let Ok(server) = TcpStream::connect(target).await else {
        return;
    };
    let _ = server.set_nodelay(true);
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    // An error (reset) in either direction ends both; a clean EOF in one
    // direction is passed on as a half-close and the other keeps going.
    let _ = tokio::try_join!(
        pump(cr, sw, Direction::Requests, rx.clone()),
        pump(sr, cw, Direction::Replies, rx)
    );
}

/// Waits until direction `d` is not frozen; `Err` when the proxy is gone.
async fn flowing(rx: &mut watch::Receiver<Control>, d: Direction) -> io::Result<()> {
    rx.wait_for(|c| !c.holds(d))
        .await
        .map(drop)
        .map_err(|_| io::Error::other("proxy dropped"))
}

/// Waits until direction `d` is frozen; `Err` when the proxy is gone.
async fn held(rx: &mut watch::Receiver<Control>, d: Direction) -> io::Result<()> {
    rx.wait_for(|c| c.holds(d))
        .await
        .map(drop)
        .map_err(|_| io::Error::other("proxy dropped"))
}

/// Copies direction `d`, holding at most one buffer while it is frozen.
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    d: Direction,
    mut rx: watch::Receiver<Control>,
) -> io::Result<()> {
    let mut buf = vec![0u8; BUFFER];
    loop {
        // No new read starts while frozen; a read already waiting may
        // complete (one buffer), and is then held below.
        flowing(&mut rx, d).await?;
        let n = match from.read(&mut buf).await {
            Ok(n) => n,
            Err(e) => {
                // A reset does not cross a frozen network either.
                flowing(&mut rx, d).await?;
                return Err(e);
            }
        };
        if n == 0 {
            flowing(&mut rx, d).await?;
            return to.shutdown().await;
        }
        let mut done = 0;
        while done < n {
            flowing(&mut rx, d).await?;
            // A write that has not completed when a freeze comes is
            // abandoned (tokio's `write` writes nothing when cancelled) and
            // retried after the thaw.
            tokio::select! {
                biased;
                f = held(&mut rx, d) => f?,
                w = to.write(&buf[done..n]) => match w? {
                    0 => return Err(io::ErrorKind::WriteZero.into()),
                    k => done += k,
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// An echo server: every connection gets its bytes back.
    async fn echo_server() -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    async fn read_n(s: &mut TcpStream, n: usize) -> Vec<u8> {
        let mut buf = vec![0u8; n];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf))
            .await
            .expect("bytes within 5 s")
            .expect("read");
        buf
    }

    /// Asserts that nothing arrives on `s` for `d` and that it is not closed.
    async fn nothing_for(s: &mut TcpStream, d: Duration) {
        let mut buf = [0u8; 64];
        match tokio::time::timeout(d, s.read(&mut buf)).await {
            Err(_) => {}
            Ok(Ok(0)) => panic!("the connection was closed"),
            Ok(Ok(n)) => panic!("{n} bytes got through: {:?}", &buf[..n]),
            Ok(Err(e)) => panic!("the connection failed: {e}"),
        }
    }

    async fn wait_connections(proxy: &FreezeProxy, n: usize) {
        for _ in 0..500 {
            if proxy.connections() == n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{} connections, expected {n}", proxy.connections());
    }

    #[tokio::test]
    async fn bytes_flow_both_ways() {
        let proxy = FreezeProxy::start(&echo_server().await).await.unwrap();
        let mut c = TcpStream::connect(proxy.addr()).await.unwrap();
        c.write_all(b"hello").await.unwrap();
        assert_eq!(read_n(&mut c, 5).await, b"hello");
        // More than one buffer, in order.
        let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let (mut r, mut w) = c.into_split();
        let sent = big.clone();
        let writer = tokio::spawn(async move { w.write_all(&sent).await.map(|_| w) });
        let mut back = vec![0u8; big.len()];
        tokio::time::timeout(Duration::from_secs(10), r.read_exact(&mut back))
            .await
            .unwrap()
            .unwrap();
        assert!(back == big, "the echo differs from what was sent");
        let _w = writer.await.unwrap().unwrap();
        assert_eq!(proxy.connections(), 1);
    }

    #[tokio::test]
    async fn frozen_holds_bytes_without_closing_and_thaw_delivers_them_in_order() {
        let proxy = FreezeProxy::start(&echo_server().await).await.unwrap();
        let mut c = TcpStream::connect(proxy.addr()).await.unwrap();
        c.write_all(b"a").await.unwrap();
        assert_eq!(read_n(&mut c, 1).await, b"a");

        proxy.freeze();
        assert!(proxy.is_frozen());
        c.write_all(b"one,").await.unwrap();
        c.write_all(b"two,").await.unwrap();
        nothing_for(&mut c, Duration::from_millis(300)).await;
        c.write_all(b"three").await.unwrap();
        nothing_for(&mut c, Duration::from_millis(300)).await;
        assert_eq!(proxy.connections(), 1, "still open");

        proxy.thaw();
        assert!(!proxy.is_frozen());
        assert_eq!(read_n(&mut c, 13).await, b"one,two,three");
        c.write_all(b"after").await.unwrap();
        assert_eq!(read_n(&mut c, 5).await, b"after");
    }

    #[tokio::test]
    async fn frozen_holds_more_than_a_buffer_and_loses_nothing() {
        let proxy = FreezeProxy::start(&echo_server().await).await.unwrap();
        let c = TcpStream::connect(proxy.addr()).await.unwrap();
        let (mut r, mut w) = c.into_split();
        proxy.freeze();
        // Far more than the proxy holds: the rest waits in kernel buffers.
        let big: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
        let sent = big.clone();
        let writer = tokio::spawn(async move { w.write_all(&sent).await.map(|_| w) });
        let mut one = [0u8; 1];
        assert!(
            tokio::time::timeout(Duration::from_millis(300), r.read(&mut one))
                .await
                .is_err(),
            "nothing echoed while frozen"
        );
        proxy.thaw();
        let mut back = vec![0u8; big.len()];
        tokio::time::timeout(Duration::from_secs(10), r.read_exact(&mut back))
            .await
            .unwrap()
            .unwrap();
        assert!(back == big, "the echo differs from what was sent");
        let _w = writer.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_connection_opened_while_frozen_gets_nothing_until_thaw() {
        let proxy = FreezeProxy::start(&echo_server().await).await.unwrap();
        proxy.freeze();
        let mut c = TcpStream::connect(proxy.addr()).await.unwrap();
        c.write_all(b"early").await.unwrap();
        nothing_for(&mut c, Duration::from_millis(300)).await;
        wait_connections(&proxy, 1).await;
        proxy.thaw();
        assert_eq!(read_n(&mut c, 5).await, b"early");
    }

    #[tokio::test]
    async fn a_server_greeting_is_held_too() {
        // A server that speaks first (like MySQL): the greeting waits.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let _ = s.write_all(b"hi").await;
                    tokio::time::sleep(Duration::from_secs(30)).await;
                });
            }
        });
        let proxy = FreezeProxy::start(&target).await.unwrap();
        let mut c = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(read_n(&mut c, 2).await, b"hi");
        proxy.freeze();
        let mut c2 = TcpStream::connect(proxy.addr()).await.unwrap();
        nothing_for(&mut c2, Duration::from_millis(300)).await;
        proxy.thaw();
        assert_eq!(read_n(&mut c2, 2).await, b"hi");
    }

    #[tokio::test]
    async fn freezing_replies_lets_requests_through_and_holds_the_answers() {
        // A server that counts what it received and answers each byte.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = listener.local_addr().unwrap().to_string();
        let received = Arc::new(AtomicUsize::new(0));
        let seen = received.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let seen = seen.clone();
                tokio::spawn(async move {
                    let mut b = [0u8; 1];
                    while let Ok(1) = s.read(&mut b).await {
                        seen.fetch_add(1, Ordering::SeqCst);
                        let _ = s.write_all(&b).await;
                    }
                });
            }
        });
        let proxy = FreezeProxy::start(&target).await.unwrap();
        let mut c = TcpStream::connect(proxy.addr()).await.unwrap();
        c.write_all(b"1").await.unwrap();
        assert_eq!(read_n(&mut c, 1).await, b"1");
        proxy.freeze_replies();
        c.write_all(b"23").await.unwrap();
        nothing_for(&mut c, Duration::from_millis(300)).await;
        assert_eq!(received.load(Ordering::SeqCst), 3, "the requests arrived");
        proxy.thaw();
        assert_eq!(read_n(&mut c, 2).await, b"23");
        // A full freeze holds the requests too.
        proxy.freeze();
        c.write_all(b"4").await.unwrap();
        nothing_for(&mut c, Duration::from_millis(300)).await;
        assert_eq!(
            received.load(Ordering::SeqCst),
            3,
            "nothing reached the server"
        );
        proxy.thaw();
        assert_eq!(read_n(&mut c, 1).await, b"4");
        assert_eq!(received.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn cut_closes_current_connections_only() {
        let proxy = FreezeProxy::start(&echo_server().await).await.unwrap();
        let mut c = TcpStream::connect(proxy.addr()).await.unwrap();
        c.write_all(b"x").await.unwrap();
        assert_eq!(read_n(&mut c, 1).await, b"x");
        let mut frozen_one = TcpStream::connect(proxy.addr()).await.unwrap();
        wait_connections(&proxy, 2).await;
        proxy.freeze();
        frozen_one.write_all(b"held").await.unwrap();
        proxy.cut();
        for s in [&mut c, &mut frozen_one] {
            let mut buf = [0u8; 8];
            match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => {}
                Ok(Ok(n)) => panic!("{n} bytes instead of a close"),
                Err(_) => panic!("not closed within 5 s"),
            }
        }
        wait_connections(&proxy, 0).await;
        // The proxy still serves new connections.
        proxy.thaw();
        let mut again = TcpStream::connect(proxy.addr()).await.unwrap();
        again.write_all(b"y").await.unwrap();
        assert_eq!(read_n(&mut again, 1).await, b"y");
    }

    #[tokio::test]
    async fn dropping_the_proxy_closes_everything() {
        let proxy = FreezeProxy::start(&echo_server().await).await.unwrap();
        let addr = proxy.addr();
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"x").await.unwrap();
        assert_eq!(read_n(&mut c, 1).await, b"x");
        drop(proxy);
        let mut buf = [0u8; 8];
        match tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {}
            other => panic!("expected a close, got {other:?}"),
        }
        // The listener is gone too (give the aborted task a moment).
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(TcpStream::connect(addr).await.is_err());
    }

    #[tokio::test]
    async fn client_close_is_passed_on_as_a_half_close() {
        let proxy = FreezeProxy::start(&echo_server().await).await.unwrap();
        let c = TcpStream::connect(proxy.addr()).await.unwrap();
        let (mut r, mut w) = c.into_split();
        w.write_all(b"bye").await.unwrap();
        w.shutdown().await.unwrap();
        let mut all = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), r.read_to_end(&mut all))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(all, b"bye");
        wait_connections(&proxy, 0).await;
    }

    #[test]
    fn urls_are_rewritten() {
        let to = "127.0.0.1:9";
        for (from, want) in [
            ("redis://127.0.0.1:6380/0", "redis://127.0.0.1:9/0"),
            (
                "mysql://u:p@h:3306/db?x=1",
                "mysql://u:p@127.0.0.1:9/db?x=1",
            ),
            ("http://localhost:2379", "http://127.0.0.1:9"),
            ("10.0.0.1:1", "127.0.0.1:9"),
        ] {
            assert_eq!(replace_host_port(from, to).unwrap(), want);
        }
        assert!(replace_host_port("redis://nohost/0", to).is_err());
    }
}
