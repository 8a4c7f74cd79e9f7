//! Listeners at run time: every listener of the config that binds gets a
//! socket and an accept loop; a listener that leaves the config stops
//! accepting (its open connections carry on); one whose address changes is
//! bound again. Each connection takes the filter chain that matches it in
//! the listener's current version.

use std::{collections::HashMap, net::SocketAddr, sync::Arc};

use component::CancellationToken;
use tokio::{net::TcpStream, sync::watch};

use crate::{
    config::{
        Snapshot,
        listener::{App, Arrival},
    },
    http::{self, HttpContext},
    tcp,
    upstream::Upstreams,
};

/// Binds and unbinds listeners as the config changes, until `shutdown`.
pub async fn follow(
    mut config: watch::Receiver<Arc<Snapshot>>,
    upstreams: Arc<Upstreams>,
    shutdown: CancellationToken,
) {
    let mut bound: HashMap<String, (SocketAddr, CancellationToken)> = HashMap::new();
    loop {
        let snapshot = config.borrow_and_update().clone();
        bound.retain(|name, (addr, stop)| {
            let keep = snapshot
                .listeners
                .get(name)
                .is_some_and(|l| l.bind && l.address == *addr);
            if !keep {
                tracing::info!(listener = %name, %addr, "listener closed");
                stop.cancel();
            }
            keep
        });
        for (name, listener) in &snapshot.listeners {
            if !listener.bind || bound.contains_key(name) {
                continue;
            }
            match tokio::net::TcpListener::bind(listener.address).await {
                Ok(socket) => {
                    tracing::info!(listener = %name, addr = %listener.address, "listening");
                    let stop = shutdown.child_token();
                    bound.insert(name.clone(), (listener.address, stop.clone()));
                    tokio::spawn(accept(
                        socket,
                        name.clone(),
                        config.clone(),
                        upstreams.clone(),
                        stop,
                    ));
                }
                // Tried again on the next config change.
                Err(e) => {
                    tracing::error!(listener = %name, addr = %listener.address, "cannot listen: {e}")
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = config.changed() => if changed.is_err() { return },
        }
    }
}

async fn accept(
    socket: tokio::net::TcpListener,
    name: String,
    config: watch::Receiver<Arc<Snapshot>>,
    upstreams: Arc<Upstreams>,
    stop: CancellationToken,
) {
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = socket.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(listener = %name, "accept failed: {e}");
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(connection(
            stream,
            peer,
            name.clone(),
            config.clone(),
            upstreams.clone(),
        ));
    }
}

async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    name: String,
    config: watch::Receiver<Arc<Snapshot>>,
    upstreams: Arc<Upstreams>,
) {
    let Some(listener) = config.borrow().listeners.get(&name).cloned() else {
        return;
    };
    let destination_port = stream.local_addr().map_or(0, |a| a.port());
    let tls = listener.inspects_tls() && starts_tls(&stream).await;
    let arrival = Arrival {
        destination_port,
        tls,
        alpn: &[],
    };
    let Some(chain) = listener.chain(&arrival) else {
        tracing::debug!(listener = %name, %peer, "no filter chain matches; closed");
        return;
    };
    if chain.tls.is_some() {
        // Mesh TLS is not served by this build yet: refuse rather than
        // serve in the clear what config says must be encrypted.
        tracing::warn!(listener = %name, %peer, "TLS filter chains are not served yet; closed");
        return;
    }
    match &chain.app {
        App::Http(app) => {
            let context = Arc::new(HttpContext {
                app: app.clone(),
                config,
                upstreams,
                peer,
            });
            http::serve(stream, context).await;
        }
        App::Tcp(app) => tcp::proxy(stream, app, &upstreams).await,
    }
}

/// Whether the client opened with a TLS handshake record.
async fn starts_tls(stream: &TcpStream) -> bool {
    let mut first = [0u8; 1];
    matches!(stream.peek(&mut first).await, Ok(1) if first[0] == 0x16)
}
