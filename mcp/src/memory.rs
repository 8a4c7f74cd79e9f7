//! MCP between components of one process (the monolith topology): the
//! same gRPC streams and the same engine, carried over in-memory pipes
//! instead of sockets. A server listens under a name (`mem://galley`) and
//! clients connect by that name; both sides are otherwise unchanged, so
//! the split and monolith topologies differ only in the transport.

use std::{
    collections::HashMap,
    fmt, io,
    net::SocketAddr,
    pin::Pin,
    str::FromStr,
    sync::{LazyLock, Mutex},
    task::{Context, Poll},
};

use component::limits::{Limits, Tracked};
use futures::Stream;
use tokio::{
    io::{AsyncRead, AsyncWrite, DuplexStream, ReadBuf},
    net::TcpStream,
    sync::mpsc,
};
use tonic::transport::server::{Connected, TcpConnectInfo};

/// The URI scheme of in-process addresses.
pub const SCHEME: &str = "mem";

/// Bytes buffered each way in a pipe.
const PIPE_BYTES: usize = 256 * 1024;

/// Servers listening in this process, by name.
static LISTENERS: LazyLock<Mutex<HashMap<String, mpsc::UnboundedSender<DuplexStream>>>> =
    LazyLock::new(Default::default);

/// Where a gRPC server of the mesh listens: a TCP address, or a name in
/// this process (`mem://NAME`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Tcp(SocketAddr),
    Memory(String),
}

impl FromStr for ListenAddr {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        if let Some(name) = text.strip_prefix("mem://") {
            return match name.is_empty() {
                true => Err("mem:// needs a name".into()),
                false => Ok(Self::Memory(name.into())),
            };
        }
        text.parse()
            .map(Self::Tcp)
            .map_err(|_| format!("{text:?} is neither host:port nor mem://NAME"))
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp(addr) => addr.fmt(f),
            Self::Memory(name) => write!(f, "mem://{name}"),
        }
    }
}

impl ListenAddr {
    /// Starts listening: binds the socket, its connections admitted
    /// against `limits`, or takes the name (refused while another server
    /// of this process holds it).
    pub async fn bind(&self, limits: &Limits) -> io::Result<Incoming> {
        match self {
            Self::Tcp(addr) => {
                let listener = tokio::net::TcpListener::bind(addr).await?;
                Ok(Incoming::Tcp(Box::pin(limits.incoming(listener))))
            }
            Self::Memory(name) => {
                let mut listeners = LISTENERS.lock().unwrap_or_else(|e| e.into_inner());
                if listeners.get(name).is_some_and(|tx| !tx.is_closed()) {
                    return Err(io::Error::new(
                        io::ErrorKind::AddrInUse,
                        format!("mem://{name} is taken"),
                    ));
                }
                let (tx, rx) = mpsc::unbounded_channel();
                listeners.insert(name.clone(), tx);
                Ok(Incoming::Memory(rx))
            }
        }
    }
}

/// Opens a pipe to the server listening as `name` in this process.
pub fn connect(name: &str) -> io::Result<DuplexStream> {
    let listeners = LISTENERS.lock().unwrap_or_else(|e| e.into_inner());
    let refused = || {
        io::Error::new(
            io::ErrorKind::ConnectionRefused,
            format!("nothing listens as mem://{name}"),
        )
    };
    let tx = listeners.get(name).ok_or_else(refused)?;
    let (client, server) = tokio::io::duplex(PIPE_BYTES);
    tx.send(server).map_err(|_| refused())?;
    Ok(client)
}

/// The connections a server accepts.
pub enum Incoming {
    Tcp(Pin<Box<dyn Stream<Item = io::Result<Tracked<TcpStream>>> + Send>>),
    Memory(mpsc::UnboundedReceiver<DuplexStream>),
}

impl Stream for Incoming {
    type Item = io::Result<Conn>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match self.get_mut() {
            Self::Tcp(incoming) => incoming
                .as_mut()
                .poll_next(cx)
                .map(|c| c.map(|c| c.map(Conn::Tcp))),
            Self::Memory(rx) => rx.poll_recv(cx).map(|c| c.map(|c| Ok(Conn::Memory(c)))),
        }
    }
}

/// One accepted connection.
pub enum Conn {
    Tcp(Tracked<TcpStream>),
    Memory(DuplexStream),
}

impl Connected for Conn {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        match self {
            Self::Tcp(stream) => stream.connect_info(),
            Self::Memory(_) => TcpConnectInfo {
                local_addr: None,
                remote_addr: None,
            },
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Self::Memory(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Self::Memory(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_flush(cx),
            Self::Memory(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Self::Memory(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// A tonic connector for `mem://NAME` endpoints.
#[derive(Clone)]
pub struct MemoryConnector;

impl tower_service::Service<http::Uri> for MemoryConnector {
    type Response = hyper_util::rt::TokioIo<DuplexStream>;
    type Error = io::Error;
    type Future = std::future::Ready<io::Result<Self::Response>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let name = uri.host().unwrap_or_default();
        std::future::ready(connect(name).map(hyper_util::rt::TokioIo::new))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_and_print() {
        let tcp: ListenAddr = "127.0.0.1:9901".parse().unwrap();
        assert_eq!(tcp, ListenAddr::Tcp(([127, 0, 0, 1], 9901).into()));
        let memory: ListenAddr = "mem://galley".parse().unwrap();
        assert_eq!(memory.to_string(), "mem://galley");
        assert!("mem://".parse::<ListenAddr>().is_err());
        let e = "galley:99999".parse::<ListenAddr>().unwrap_err();
        assert_eq!(e, "\"galley:99999\" is neither host:port nor mem://NAME");
    }

    #[tokio::test]
    async fn a_name_is_served_once_and_refuses_when_nothing_listens() {
        assert_eq!(
            connect("nobody").unwrap_err().kind(),
            io::ErrorKind::ConnectionRefused
        );
        let addr = ListenAddr::Memory("once".into());
        let incoming = addr.bind(&Limits::default()).await.unwrap();
        assert_eq!(
            addr.bind(&Limits::default()).await.err().unwrap().kind(),
            io::ErrorKind::AddrInUse
        );
        drop(incoming);
        // Free again once the server is gone.
        let _again = addr.bind(&Limits::default()).await.unwrap();
    }
}
