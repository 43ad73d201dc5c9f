//! What the RabbitMQ tests share: the broker's URL and a proxy that fails the network on
//! demand.
#![allow(dead_code)] // each test binary uses its own part

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use lapin::uri::AMQPUri;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

/// The broker the tests use (`NIGHTSHIFT_QUEUE__URL`, else the local dev broker).
pub fn broker_url() -> String {
    std::env::var("NIGHTSHIFT_QUEUE__URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

/// A TCP proxy in front of the broker that a test can cut (every open connection dies) and
/// close (new connections are dropped at once): a network failure on demand.
pub struct Proxy {
    open: Arc<AtomicBool>,
    links: Arc<Mutex<Vec<AbortHandle>>>,
    accept: AbortHandle,
}

impl Proxy {
    /// Forwards what `listener` accepts to `upstream` (`host:port`).
    pub fn start(listener: TcpListener, upstream: String) -> Self {
        let open = Arc::new(AtomicBool::new(true));
        let links = Arc::new(Mutex::new(Vec::new()));
        let (open2, links2) = (open.clone(), links.clone());
        let accept = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if !open2.load(Ordering::SeqCst) {
                    continue; // dropped: closed at once
                }
                let upstream = upstream.clone();
                let link = tokio::spawn(async move {
                    if let Ok(mut server) = TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
                links2.lock().expect("proxy lock").push(link.abort_handle());
            }
        })
        .abort_handle();
        Self {
            open,
            links,
            accept,
        }
    }

    /// Kills every proxied connection.
    pub fn cut(&self) {
        for link in self.links.lock().expect("proxy lock").drain(..) {
            link.abort();
        }
    }

    pub fn set_open(&self, open: bool) {
        self.open.store(open, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

/// The broker's `host:port`, and a URL that reaches the same broker and vhost through the
/// proxy at `proxy` (plain AMQP; credentials without URL-reserved characters).
pub fn through_proxy(proxy: SocketAddr) -> (String, String) {
    let uri: AMQPUri = broker_url().parse().expect("broker url");
    let auth = &uri.authority;
    let url = format!(
        "amqp://{}:{}@{proxy}/{}",
        auth.userinfo.username,
        auth.userinfo.password,
        uri.vhost.replace('/', "%2f")
    );
    (format!("{}:{}", auth.host, auth.port), url)
}
