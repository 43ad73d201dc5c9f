//! Connections that a handler can cut.
//!
//! hyper gives a service no way to close its connection without answering, yet "the upstream
//! went away mid-request" is exactly what the executor must survive. So `serve` accepts through
//! [`SimListener`], whose streams share a kill switch with a [`ConnHandle`] that handlers reach
//! as connect info. Once killed, the stream refuses every write and reads as end-of-file:
//! hyper fails to write the response, gives up the connection and drops the socket, and the
//! client sees the connection close with not one response byte.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use axum::serve::{IncomingStream, Listener};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

/// A TCP listener whose connections can be killed by the handlers serving them.
pub(crate) struct SimListener {
    /// The bound socket connections are accepted from.
    inner: TcpListener,
}

impl SimListener {
    pub(crate) fn new(inner: TcpListener) -> Self {
        Self { inner }
    }
}

impl Listener for SimListener {
    type Io = SimStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.inner.accept().await {
                Ok((stream, addr)) => {
                    // Small JSON answers should not wait on Nagle.
                    if let Err(error) = stream.set_nodelay(true) {
                        tracing::debug!(%error, "could not set TCP_NODELAY");
                    }
                    let stream = SimStream {
                        inner: stream,
                        killed: Arc::new(AtomicBool::new(false)),
                    };
                    return (stream, addr);
                }
                Err(error) => {
                    // Per-connection errors (reset before accept, fd exhaustion) must not end
                    // the server; back off briefly so exhaustion does not spin.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// An accepted TCP stream with a kill switch shared with its [`ConnHandle`].
pub(crate) struct SimStream {
    /// The socket itself.
    inner: TcpStream,
    /// Set by [`ConnHandle::kill`]; from then on the stream neither reads nor writes.
    killed: Arc<AtomicBool>,
}

impl SimStream {
    fn is_killed(&self) -> bool {
        self.killed.load(Ordering::Acquire)
    }
}

fn killed_error() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "connection dropped by the simulator",
    )
}

impl AsyncRead for SimStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.is_killed() {
            // End of file: hyper stops expecting further requests on this connection.
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for SimStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.is_killed() {
            return Poll::Ready(Err(killed_error()));
        }
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.is_killed() {
            return Poll::Ready(Err(killed_error()));
        }
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.is_killed() {
            return Poll::Ready(Err(killed_error()));
        }
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.is_killed() {
            return Poll::Ready(Err(killed_error()));
        }
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// A handler's grip on the connection its request arrived on.
#[derive(Clone, Debug)]
pub(crate) struct ConnHandle {
    /// Shared with the [`SimStream`] of the connection.
    killed: Arc<AtomicBool>,
}

impl ConnHandle {
    /// Makes the connection unusable. The handler must then return (any response): hyper's
    /// attempt to write it fails and the socket is closed without a byte sent.
    pub(crate) fn kill(&self) {
        self.killed.store(true, Ordering::Release);
    }
}

impl axum::extract::connect_info::Connected<IncomingStream<'_, SimListener>> for ConnHandle {
    fn connect_info(stream: IncomingStream<'_, SimListener>) -> Self {
        Self {
            killed: Arc::clone(&stream.io().killed),
        }
    }
}
