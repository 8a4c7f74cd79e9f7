//! Listeners at run time: every listener of the config that binds gets a
//! socket and an accept loop; a listener that leaves the config stops
//! accepting (its open connections carry on); one whose address changes is
//! bound again. Each connection takes the filter chain that matches it in
//! the listener's current version.

use std::{collections::HashMap, net::SocketAddr, sync::Arc, time::Duration};

use component::{CancellationToken, readiness::Condition};
use tokio::{net::TcpStream, sync::watch};

use tower::{Layer, ServiceExt};

use crate::{
    config::{
        Snapshot,
        listener::{App, Arrival, Chain, Direction, Listener},
        rbac::Subject,
    },
    detect::{self, Detected},
    http::{self, Connection},
    inbound,
    mixer::TcpConnection,
    outbound,
    stats::ListenerLabels,
    tcp,
    tls::{self, TlsContext},
    upstream::Upstreams,
    workers::Workers,
};

/// How long a connection may take before it is served, so that a client
/// that connects and says nothing does not hold a task for ever.
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct Timeouts {
    /// How long to wait for a client's first bytes where a listener tells
    /// TLS from plaintext (Envoy's `listener_filters_timeout`); after it,
    /// the connection goes on as plaintext, as a server-first protocol's
    /// would. A plaintext HTTP connection that says nothing in this time
    /// is closed (`proxy_limit_reached_total{limit="protocol_detection_timeout"}`).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
    pub protocol_detection_timeout: Duration,
    /// How long a TLS handshake may take
    /// (`proxy_limit_reached_total{limit="tls_handshake_timeout"}`).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    pub tls_handshake_timeout: Duration,
}

/// What every connection of the proxy shares.
#[derive(Clone)]
pub struct Shared {
    pub config: watch::Receiver<Arc<Snapshot>>,
    pub upstreams: Arc<Upstreams>,
    pub tls: Arc<TlsContext>,
    pub mixer: Arc<crate::mixer::MixerFilter>,
    pub access_log: bool,
    pub tracing: Arc<crate::trace::Tracing>,
    pub timeouts: Timeouts,
    pub http_limits: crate::http::HttpLimits,
}

/// Applies each config as it comes, until `shutdown`: clusters and
/// endpoints first, then listeners bound and unbound. `serving` holds once
/// a whole config is applied with every listener bound, so a proxy that
/// says it is ready routes.
pub async fn follow(
    shared: Shared,
    workers: Workers,
    serving: Condition,
    shutdown: CancellationToken,
) {
    let mut config = shared.config.clone();
    let mut bound: HashMap<String, (SocketAddr, CancellationToken)> = HashMap::new();
    let mut changed = true;
    loop {
        let snapshot = config.borrow_and_update().clone();
        // A retry of the binding alone leaves the clusters as they are.
        if changed {
            shared.upstreams.update(&snapshot).await;
        }
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
            match bind(listener.address, workers.count()) {
                Ok(sockets) => {
                    tracing::info!(listener = %name, addr = %listener.address, "listening");
                    let stop = shutdown.child_token();
                    bound.insert(name.clone(), (listener.address, stop.clone()));
                    let mut sockets = sockets.into_iter();
                    workers.each(|_| {
                        let socket = sockets.next().expect("a socket per worker");
                        accept(socket, name.clone(), shared.clone(), stop.clone())
                    });
                }
                Err(e) => {
                    tracing::error!(listener = %name, addr = %listener.address, "cannot listen: {e}")
                }
            }
        }
        let all_bound = snapshot
            .listeners
            .iter()
            .all(|(name, l)| !l.bind || bound.contains_key(name));
        serving.set(snapshot.synced && all_bound);
        // A listener that could not bind (its port briefly taken) is tried
        // again every second until it binds or leaves the config.
        let retry = async {
            if all_bound {
                std::future::pending::<()>().await;
            }
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        };
        changed = tokio::select! {
            _ = shutdown.cancelled() => return,
            next = config.changed() => if next.is_err() { return } else { true },
            _ = retry => false,
        };
    }
}

/// A listening socket on `addr`, and a copy of it for each of `count`
/// workers beyond the first.
fn bind(addr: SocketAddr, count: usize) -> std::io::Result<Vec<std::net::TcpListener>> {
    let socket = std::net::TcpListener::bind(addr)?;
    socket.set_nonblocking(true)?;
    let mut sockets = Vec::with_capacity(count);
    for _ in 1..count {
        sockets.push(socket.try_clone()?);
    }
    sockets.push(socket);
    Ok(sockets)
}

/// Accepts on a worker's copy of a listener's socket until `stop`.
async fn accept(
    socket: std::net::TcpListener,
    name: String,
    shared: Shared,
    stop: CancellationToken,
) {
    let socket = match tokio::net::TcpListener::from_std(socket) {
        Ok(s) => s,
        Err(e) => return tracing::error!(listener = %name, "cannot accept: {e}"),
    };
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
        let labels = ListenerLabels {
            listener: name.clone(),
        };
        let stats = shared.upstreams.stats.clone();
        stats.connections.get_or_create(&labels).inc();
        let active = stats.connections_active.get_or_create(&labels).clone();
        active.inc();
        let shared = shared.clone();
        let name = name.clone();
        tokio::spawn(async move {
            connection(stream, peer, name, shared).await;
            active.dec();
        });
    }
}

async fn connection(stream: TcpStream, peer: SocketAddr, name: String, shared: Shared) {
    let snapshot = shared.config.borrow().clone();
    let Some(mut listener) = snapshot.listeners.get(&name).cloned() else {
        return;
    };
    // Where the connection was going before iptables redirected it (its
    // own address when it was not redirected).
    let destination = original_destination(&stream);
    if listener.use_original_dst
        && let Some(target) = destination.and_then(|d| snapshot.listener_for(d))
        && target.name != listener.name
    {
        listener = target.clone();
    }
    let accepted = Accepted {
        listener,
        peer,
        destination,
        shared,
    };
    if !accepted.listener.inspects_tls() {
        return accepted.serve(None, stream).await;
    }
    let timeout = accepted.shared.timeouts.protocol_detection_timeout;
    let chains = tower::service_fn(move |(detected, stream): (Detected, TcpStream)| {
        let accepted = accepted.clone();
        async move {
            accepted.serve(Some(detected), stream).await;
            Ok::<_, std::convert::Infallible>(())
        }
    });
    let _ = detect::layer(timeout).layer(chains).oneshot(stream).await;
}

/// A connection accepted on a listener, before its chain is chosen.
#[derive(Clone)]
struct Accepted {
    listener: Arc<Listener>,
    peer: SocketAddr,
    destination: Option<SocketAddr>,
    shared: Shared,
}

impl Accepted {
    /// Serves the connection by the chain that matches what was detected
    /// (`None`: the listener does not look).
    async fn serve(&self, detected: Option<Detected>, stream: TcpStream) {
        let (name, peer) = (&self.listener.name, self.peer);
        let hello = match &detected {
            Some(Detected::Tls(hello)) => Some(hello),
            _ => None,
        };
        let arrival = Arrival {
            destination_port: self.destination.map_or(0, |d| d.port()),
            tls: hello.is_some(),
            sni: hello.and_then(|h| h.sni.as_deref()),
            alpn: hello.map_or(&[][..], |h| &h.alpn[..]),
        };
        let Some(chain) = self.listener.chain(&arrival) else {
            tracing::debug!(listener = %name, %peer, "no filter chain matches; closed");
            return;
        };
        let Some(settings) = &chain.tls else {
            // HTTP is the client's to begin: one that says nothing in time is
            // closed (a TCP chain waits, as a server-first protocol needs).
            let http = matches!(chain.app, App::Http(_));
            let timeout = self.shared.timeouts.protocol_detection_timeout;
            let silent = match &detected {
                Some(detected) => *detected == Detected::Silent,
                None => http && !detect::speaks_within(&stream, timeout).await,
            };
            if http && silent {
                tracing::debug!(listener = %name, %peer, "nothing said in time; closed");
                self.shared
                    .upstreams
                    .stats
                    .limit_reached("protocol_detection_timeout");
                return;
            }
            return self.serve_chain(stream, None, chain, arrival.sni).await;
        };
        let config = match self.shared.tls.server(settings) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(listener = %name, %peer, "TLS not served: {e}");
                return;
            }
        };
        let handshake = tokio_rustls::TlsAcceptor::from(config).accept(stream);
        match tokio::time::timeout(self.shared.timeouts.tls_handshake_timeout, handshake).await {
            Ok(Ok(stream)) => {
                let identity = tls::peer_identity(stream.get_ref().1.peer_certificates());
                let identity = identity.map(|i| i.to_string());
                self.serve_chain(stream, identity, chain, arrival.sni).await;
            }
            Ok(Err(e)) => tracing::info!(listener = %name, %peer, "TLS handshake failed: {e}"),
            Err(_) => {
                tracing::info!(listener = %name, %peer, "TLS handshake timed out; closed");
                self.shared
                    .upstreams
                    .stats
                    .limit_reached("tls_handshake_timeout");
            }
        }
    }

    async fn serve_chain<IO>(
        &self,
        io: IO,
        peer_identity: Option<String>,
        chain: &Chain,
        sni: Option<&str>,
    ) where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (peer, destination, shared) = (self.peer, self.destination, &self.shared);
        if let Some(rbac) = &chain.rbac {
            let subject = Subject {
                request: None,
                end_user: None,
                peer_identity: peer_identity.as_deref(),
                peer,
                destination,
            };
            if !rbac.allows(&subject) {
                tracing::debug!(%peer, "RBAC: connection refused");
                return;
            }
        }
        match &chain.app {
            App::Http(app) => {
                let connection = Arc::new(Connection {
                    peer,
                    peer_identity,
                    destination,
                    tls: chain.tls.is_some(),
                });
                match &app.direction {
                    Direction::Inbound(service) => {
                        let stack = inbound::stack(app, service, shared, connection);
                        http::serve(io, stack, shared.http_limits, &shared.upstreams.stats).await
                    }
                    Direction::Outbound => {
                        let stack = outbound::stack(app, shared, connection);
                        http::serve(io, stack, shared.http_limits, &shared.upstreams.stats).await
                    }
                }
            }
            App::Tcp(app) => {
                let started = std::time::Instant::now();
                let (received, sent) =
                    tcp::proxy(io, app, &shared.upstreams, destination, sni).await;
                if let Some(service) = app.direction.inbound() {
                    shared.mixer.report_tcp(&TcpConnection {
                        peer,
                        peer_identity: peer_identity.as_deref(),
                        service_host: &service.host,
                        port: service.port,
                        received,
                        sent,
                        duration: started.elapsed(),
                    });
                }
            }
        }
    }
}

/// `SO_ORIGINAL_DST`, else the socket's own address.
fn original_destination(stream: &TcpStream) -> Option<SocketAddr> {
    let redirected = nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::OriginalDst)
        .ok()
        .map(|sa| {
            let ip = std::net::Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr));
            SocketAddr::from((ip, u16::from_be(sa.sin_port)))
        });
    redirected.or_else(|| stream.local_addr().ok())
}
