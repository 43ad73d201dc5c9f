//! Serving the gateway's HTTP: hyper directly, for the connection timeouts `axum::serve`
//! does not expose.
//!
//! A client that opens connections and never finishes its request head (slowloris) would
//! otherwise hold a connection, a task and a file descriptor each for as long as it likes.
//! Here the whole request head must arrive within `header_read_timeout`, counted from when
//! the server starts waiting for it: from the connection's first byte, and between the
//! requests of a keep-alive connection, so an idle connection is closed after it too.
//!
//! HTTP/1.1 only. axum's server also spoke HTTP/2 over cleartext (h2c, prior knowledge), which
//! no OpenAI SDK and no browser uses (browsers use HTTP/2 only over TLS, which nightshift
//! leaves to the ingress); hyper's HTTP/2 server has no header-read timeout, and its protocol
//! sniffing waits without a deadline for a connection's first bytes, so keeping it would keep
//! the door open.
//!
//! Graceful shutdown is axum's: once `shutdown` is cancelled no connection is accepted, idle
//! ones are closed, and the requests in flight finish.

use std::convert::Infallible;
use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// The connection limits of one listener.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// The longest a request head may take to arrive, and the longest an idle keep-alive
    /// connection stays open.
    pub header_read_timeout: Duration,
}

/// How long a failed `accept` (out of file descriptors, say) waits before the next one.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Serves `app` on `listener` until `shutdown` is cancelled, then lets the connections finish
/// their requests in flight.
///
/// # Errors
/// Never at present: accept errors are per connection (logged, retried); the signature keeps
/// room for the listener failing for good.
pub async fn serve_http(
    listener: TcpListener,
    app: Router,
    limits: ConnectionLimits,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    let graceful = GracefulShutdown::new();
    loop {
        let (stream, _peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::debug!(error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        let service = TowerToHyperService::new(
            app.clone()
                .map_request(|req: http::Request<Incoming>| req.map(axum::body::Body::new)),
        );
        let connection = graceful.watch(builder.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                // timeouts, resets, malformed requests: the client's business
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

// `Router` is a `Service<Request>` whose error is `Infallible`: the compiler checks it here
// rather than in a long error at the call site.
const _: fn() = || {
    fn is_service<S: tower::Service<Request, Error = Infallible>>() {}
    is_service::<Router>();
};
