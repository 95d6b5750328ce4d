//! A fault-injecting TCP proxy on loopback.
//!
//! - [`FaultProxy::cut`] closes every open connection at once (a forced close
//!   as the client sees it: the socket ends).
//! - [`FaultProxy::blackhole`] stops forwarding in both directions without
//!   closing anything: the pulled cable. Only heartbeats can tell.
//! - [`FaultProxy::restore`] resumes forwarding; bytes held back flow again.
//! - [`FaultProxy::drop_replies`] is a one-way fault on one connection: the
//!   client's bytes still reach the broker, the broker's are thrown away (a
//!   publish lands, its confirm is lost); [`FaultProxy::cut_connection`]
//!   then closes that connection alone.
//! - [`FaultProxy::delay_replies`] slows what the broker sends (a slow link).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Control {
    /// Connections opened before the latest cut end.
    epoch: u64,
    blackhole: bool,
    /// Connections (by their number, see [`FaultProxy::accepted`]) whose
    /// bytes from the broker are read and thrown away.
    drop_replies: BTreeSet<u64>,
    /// Connections cut one by one.
    cut: BTreeSet<u64>,
    /// How long each read from the broker waits before it is forwarded.
    reply_delay: std::time::Duration,
}

/// A TCP proxy from a loopback port to the broker. Stops when dropped.
#[derive(Debug)]
pub struct FaultProxy {
    local: SocketAddr,
    control: watch::Sender<Control>,
    accepted: Arc<AtomicU64>,
    dropped: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl FaultProxy {
    /// Starts a proxy on an ephemeral loopback port forwarding to `upstream`.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<Self> {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0)), upstream).await
    }

    /// Starts a proxy on `listen` (a loopback address) forwarding to `upstream`.
    pub async fn start_on(listen: SocketAddr, upstream: SocketAddr) -> std::io::Result<Self> {
        if !listen.ip().is_loopback() || !upstream.ip().is_loopback() {
            return Err(std::io::Error::other(
                "the fault proxy only runs between loopback addresses",
            ));
        }
        let listener = TcpListener::bind(listen).await?;
        let local = listener.local_addr()?;
        let (control, _) = watch::channel(Control::default());
        let accepted = Arc::new(AtomicU64::new(0));
        let dropped = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn(accept_loop(
            listener,
            upstream,
            control.clone(),
            accepted.clone(),
            dropped.clone(),
        ));
        Ok(FaultProxy {
            local,
            control,
            accepted,
            dropped,
            task,
        })
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.local
    }

    /// Closes every connection open now. New connections are accepted.
    pub fn cut(&self) {
        self.control.send_modify(|c| c.epoch += 1);
    }

    /// Stops forwarding without closing anything, for open and new connections.
    pub fn blackhole(&self) {
        self.control.send_modify(|c| c.blackhole = true);
    }

    /// Resumes forwarding after [`blackhole`](Self::blackhole).
    pub fn restore(&self) {
        self.control.send_modify(|c| c.blackhole = false);
    }

    /// Connections accepted so far. Connections are numbered in the order
    /// they were accepted, from 1: the `n`-th one is connection `n`.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    /// A one-way fault on connection `n`: what the client sends still
    /// reaches the broker, what the broker sends is read and thrown away. A
    /// request lands and its answer is lost: a publish is stored and its
    /// confirm never arrives. The thrown-away bytes leave the stream broken,
    /// so this is undone only by [`cut_connection`](Self::cut_connection).
    pub fn drop_replies(&self, n: u64) {
        self.control.send_modify(|c| {
            c.drop_replies.insert(n);
        });
    }

    /// Bytes from the broker thrown away so far ([`drop_replies`](Self::drop_replies)).
    pub fn replies_dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Closes connection `n` alone; the others go on.
    pub fn cut_connection(&self, n: u64) {
        self.control.send_modify(|c| {
            c.cut.insert(n);
        });
    }

    /// A slow link: every read from the broker, on every connection, waits
    /// `delay` before it is forwarded (zero: no delay). One publish waiting
    /// for its confirm then takes at least `delay`.
    pub fn delay_replies(&self, delay: std::time::Duration) {
        self.control.send_modify(|c| c.reply_delay = delay);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.cut();
        self.task.abort();
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    control: watch::Sender<Control>,
    accepted: Arc<AtomicU64>,
    dropped: Arc<AtomicU64>,
) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        let n = accepted.fetch_add(1, Ordering::Relaxed) + 1;
        let rx = control.subscribe();
        let dropped = dropped.clone();
        tokio::spawn(async move {
            let epoch = rx.borrow().epoch;
            let Ok(server) = TcpStream::connect(upstream).await else {
                return;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let (client_read, client_write) = client.into_split();
            let (server_read, server_write) = server.into_split();
            // Either direction ending (EOF, error or a cut) ends both: the
            // halves are dropped together and both sockets close.
            let to_server = Pump {
                control: rx.clone(),
                epoch,
                connection: n,
                replies: None,
            };
            let to_client = Pump {
                control: rx,
                epoch,
                connection: n,
                replies: Some(dropped),
            };
            tokio::select! {
                _ = to_server.run(client_read, server_write) => {}
                _ = to_client.run(server_read, client_write) => {}
            }
        });
    }
}

/// One direction of one connection.
struct Pump {
    control: watch::Receiver<Control>,
    epoch: u64,
    /// The connection's number.
    connection: u64,
    /// From the broker to the client: the count of bytes thrown away.
    replies: Option<Arc<AtomicU64>>,
}

impl Pump {
    async fn run(
        mut self,
        mut from: tokio::net::tcp::OwnedReadHalf,
        mut to: tokio::net::tcp::OwnedWriteHalf,
    ) {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let (ended, held, discard, delay) = {
                let now = self.control.borrow_and_update();
                (
                    now.epoch != self.epoch || now.cut.contains(&self.connection),
                    now.blackhole,
                    self.replies.is_some() && now.drop_replies.contains(&self.connection),
                    if self.replies.is_some() {
                        now.reply_delay
                    } else {
                        std::time::Duration::ZERO
                    },
                )
            };
            if ended {
                return;
            }
            if held {
                if self.control.changed().await.is_err() {
                    return;
                }
                continue;
            }
            tokio::select! {
                read = from.read(&mut buf) => match read {
                    Ok(0) | Err(_) => return,
                    Ok(n) if discard => {
                        if let Some(dropped) = &self.replies {
                            dropped.fetch_add(n as u64, Ordering::Relaxed);
                        }
                    }
                    Ok(n) => {
                        if !delay.is_zero() {
                            tokio::time::sleep(delay).await;
                        }
                        if to.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                },
                changed = self.control.changed() => if changed.is_err() { return },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn refuses_non_loopback_addresses() {
        let err = FaultProxy::start(SocketAddr::from(([10, 0, 0, 1], 5672))).await;
        assert!(err.is_err());
    }

    #[tokio::test]
    async fn forwards_cuts_blackholes_and_restores() {
        let echo = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let echo_addr = echo.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut s, _)) = echo.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        let proxy = FaultProxy::start(echo_addr).await.expect("proxy");
        let mut c = TcpStream::connect(proxy.addr()).await.expect("connect");
        let mut buf = [0u8; 5];
        c.write_all(b"hello").await.expect("write");
        c.read_exact(&mut buf).await.expect("echo");
        assert_eq!(&buf, b"hello");

        proxy.blackhole();
        c.write_all(b"later").await.expect("write");
        let held = tokio::time::timeout(
            std::time::Duration::from_millis(300),
            c.read_exact(&mut buf),
        )
        .await;
        assert!(held.is_err(), "nothing may pass while blackholed");
        proxy.restore();
        c.read_exact(&mut buf).await.expect("echo after restore");
        assert_eq!(&buf, b"later");

        proxy.cut();
        let n = c.read(&mut buf).await.unwrap_or(0);
        assert_eq!(n, 0, "a cut closes the connection");
        assert_eq!(proxy.accepted(), 1);
    }
}

#[cfg(test)]
mod one_way_tests {
    use super::*;
    use std::time::Duration;

    /// An upstream that records what it receives and answers `ok:` and the
    /// bytes, per read.
    async fn recording_upstream() -> (SocketAddr, Arc<std::sync::Mutex<Vec<u8>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let received: Arc<std::sync::Mutex<Vec<u8>>> = Arc::default();
        let seen = received.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let seen = seen.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        seen.lock().expect("lock").extend_from_slice(&buf[..n]);
                        let reply = [b"ok:".as_slice(), &buf[..n]].concat();
                        if s.write_all(&reply).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        (addr, received)
    }

    async fn wait_for(what: &str, check: impl Fn() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !check() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn dropped_replies_lose_the_answer_not_the_request_on_one_connection() {
        let (upstream, received) = recording_upstream().await;
        let proxy = FaultProxy::start(upstream).await.expect("proxy");
        let mut first = TcpStream::connect(proxy.addr()).await.expect("connect 1");
        let mut second = TcpStream::connect(proxy.addr()).await.expect("connect 2");
        let mut buf = [0u8; 7];
        // Both connections are accepted (and numbered) before the fault.
        first.write_all(b"a1").await.expect("write");
        first.read_exact(&mut buf[..5]).await.expect("answer 1");
        second.write_all(b"b1").await.expect("write");
        second.read_exact(&mut buf[..5]).await.expect("answer 2");
        assert_eq!(proxy.accepted(), 2);

        proxy.drop_replies(2);
        second.write_all(b"b2").await.expect("write");
        // The request reaches the upstream, whose answer is thrown away.
        wait_for("the request to land", || {
            received.lock().expect("lock").ends_with(b"b2")
        })
        .await;
        wait_for("the answer to be dropped", || proxy.replies_dropped() == 5).await;
        let lost = tokio::time::timeout(Duration::from_millis(300), second.read(&mut buf)).await;
        assert!(lost.is_err(), "no answer may reach the client: {lost:?}");
        // The other connection is untouched.
        first.write_all(b"a2").await.expect("write");
        first.read_exact(&mut buf[..5]).await.expect("answer");
        assert_eq!(&buf[..5], b"ok:a2");

        proxy.cut_connection(2);
        let n = second.read(&mut buf).await.unwrap_or(0);
        assert_eq!(n, 0, "a cut closes the connection");
        first.write_all(b"a3").await.expect("write");
        first
            .read_exact(&mut buf[..5])
            .await
            .expect("answer after the cut");
        assert_eq!(&buf[..5], b"ok:a3");
    }
}

#[cfg(test)]
mod drop_tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dropped_proxy_refuses_new_connections() {
        let upstream = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let upstream_addr = upstream.local_addr().expect("addr");
        tokio::spawn(async move { while upstream.accept().await.is_ok() {} });
        let proxy = FaultProxy::start(upstream_addr).await.expect("proxy");
        let addr = proxy.addr();
        TcpStream::connect(addr).await.expect("connect while up");
        drop(proxy);
        // The accept task ends soon after the drop: wait for that, bounded.
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        while TcpStream::connect(addr).await.is_ok() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "still accepting 5 s after drop"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }
}
