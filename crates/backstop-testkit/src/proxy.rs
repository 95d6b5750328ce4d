//! A fault-injecting TCP proxy on loopback.
//!
//! - [`FaultProxy::cut`] closes every open connection at once (a forced close
//!   as the client sees it: the socket ends).
//! - [`FaultProxy::blackhole`] stops forwarding in both directions without
//!   closing anything: the pulled cable. Only heartbeats can tell.
//! - [`FaultProxy::restore`] resumes forwarding; bytes held back flow again.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Control {
    /// Connections opened before the latest cut end.
    epoch: u64,
    blackhole: bool,
}

/// A TCP proxy from a loopback port to the broker. Stops when dropped.
#[derive(Debug)]
pub struct FaultProxy {
    local: SocketAddr,
    control: watch::Sender<Control>,
    accepted: Arc<AtomicU64>,
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
        let (control, _) = watch::channel(Control {
            epoch: 0,
            blackhole: false,
        });
        let accepted = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn(accept_loop(
            listener,
            upstream,
            control.clone(),
            accepted.clone(),
        ));
        Ok(FaultProxy {
            local,
            control,
            accepted,
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

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
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
) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        accepted.fetch_add(1, Ordering::Relaxed);
        let rx = control.subscribe();
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
            tokio::select! {
                _ = pump(client_read, server_write, rx.clone(), epoch) => {}
                _ = pump(server_read, client_write, rx, epoch) => {}
            }
        });
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut control: watch::Receiver<Control>,
    epoch: u64,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let now = *control.borrow_and_update();
        if now.epoch != epoch {
            return;
        }
        if now.blackhole {
            if control.changed().await.is_err() {
                return;
            }
            continue;
        }
        tokio::select! {
            read = from.read(&mut buf) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if to.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            },
            changed = control.changed() => if changed.is_err() { return },
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
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert!(
            TcpStream::connect(addr).await.is_err(),
            "still accepting after drop"
        );
    }
}
