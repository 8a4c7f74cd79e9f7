//! Protocol detection, the first stage of a connection: within the
//! detection timeout, tells a TLS client (its first byte opens a handshake
//! record; its ClientHello's server name and ALPN are read without being
//! taken, so that a chain may still pass the connection through as it
//! came) from a
//! plaintext one, and one that said nothing in time. HTTP/1 and HTTP/2
//! are told apart later, by hyper, from the connection's first bytes.

use std::{
    convert::Infallible,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use tokio::net::TcpStream;
use tower::{Layer, Service};

use crate::tls;

/// What detection found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Detected {
    /// A TLS ClientHello, with the server name and ALPN protocols it asks
    /// for.
    Tls(tls::Hello),
    /// Something else.
    Plaintext,
    /// Nothing within the timeout: a server-first protocol, or a client
    /// that says nothing.
    Silent,
}

#[derive(Clone)]
pub struct Detect<S> {
    timeout: Duration,
    inner: S,
}

pub fn layer<S>(timeout: Duration) -> impl Layer<S, Service = Detect<S>> + Clone {
    tower::layer::layer_fn(move |inner| Detect { timeout, inner })
}

impl<S> Service<TcpStream> for Detect<S>
where
    S: Service<(Detected, TcpStream), Response = (), Error = Infallible> + Clone + Send + 'static,
    S::Future: Send,
{
    type Response = ();
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<(), Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, stream: TcpStream) -> Self::Future {
        let (timeout, mut inner) = (self.timeout, self.inner.clone());
        Box::pin(async move {
            let detect = async {
                match first_byte(&stream).await? {
                    0x16 => Some(match tls::peek_hello(&stream).await {
                        Some(hello) => Detected::Tls(hello),
                        None => Detected::Plaintext,
                    }),
                    _ => Some(Detected::Plaintext),
                }
            };
            match tokio::time::timeout(timeout, detect).await {
                // Closed before it said anything: nothing to serve.
                Ok(None) => Ok(()),
                Ok(Some(detected)) => inner.call((detected, stream)).await,
                Err(_) => inner.call((Detected::Silent, stream)).await,
            }
        })
    }
}

/// Whether the client sends something within `timeout`.
pub async fn speaks_within(stream: &TcpStream, timeout: Duration) -> bool {
    matches!(
        tokio::time::timeout(timeout, first_byte(stream)).await,
        Ok(Some(_))
    )
}

/// The client's first byte, read without taking it; `None` when it closes.
async fn first_byte(stream: &TcpStream) -> Option<u8> {
    let mut first = [0u8; 1];
    match stream.peek(&mut first).await {
        Ok(1) => Some(first[0]),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokio::{io::AsyncWriteExt, net::TcpListener, sync::mpsc, time::Instant};
    use tower::ServiceExt;

    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(5);

    /// What detection finds on a connection whose client sends `first`
    /// (and then stays, or closes when `close`), and when.
    async fn detect(first: &[u8], close: bool) -> Option<(Detected, Duration)> {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        client.write_all(first).await.unwrap();
        if close {
            client.shutdown().await.unwrap();
        }
        let (server, _) = listener.accept().await.unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let found = tower::service_fn(move |(detected, _): (Detected, TcpStream)| {
            let _ = tx.send(detected);
            std::future::ready(Ok::<_, Infallible>(()))
        });
        let started = Instant::now();
        layer(TIMEOUT).layer(found).oneshot(server).await.unwrap();
        let detected = rx.recv().await?;
        drop(client);
        Some((detected, started.elapsed()))
    }

    fn client_hello(alpn: &[&str]) -> Vec<u8> {
        client_hello_to("Ratings.Shop", alpn)
    }

    /// A ClientHello as rustls sends it, for `name`, offering `alpn`.
    fn client_hello_to(name: &str, alpn: &[&str]) -> Vec<u8> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
        let name = name.to_string().try_into().unwrap();
        let mut client = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
        let mut hello = Vec::new();
        client.write_tls(&mut hello).unwrap();
        hello
    }

    #[tokio::test(start_paused = true)]
    async fn a_tls_client_is_known_by_its_hello_its_server_name_and_alpn_read() {
        let hello = client_hello(&["istio-peer-exchange", "istio"]);
        let (detected, took) = detect(&hello, false).await.unwrap();
        let alpn = vec!["istio-peer-exchange".to_string(), "istio".to_string()];
        let sni = Some("ratings.shop".to_string());
        assert_eq!(detected, Detected::Tls(tls::Hello { sni, alpn }));
        assert!(took < TIMEOUT);
    }

    #[tokio::test(start_paused = true)]
    async fn anything_else_is_plaintext_at_once() {
        let (detected, took) = detect(b"GET / HTTP/1.1\r\n", false).await.unwrap();
        assert_eq!(detected, Detected::Plaintext);
        assert!(took < TIMEOUT);
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_says_nothing_is_silent_after_the_timeout() {
        let (detected, took) = detect(b"", false).await.unwrap();
        assert_eq!(detected, Detected::Silent);
        assert_eq!(took, TIMEOUT);
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_closes_first_is_not_served() {
        assert_eq!(detect(b"", true).await, None);
    }

    mod fuzz {
        use proptest::prelude::*;
        use testkit::fuzz;

        use super::*;
        use crate::tls::{HelloRead, read_hello};

        proptest! {
            #[test]
            fn any_first_bytes_read_as_a_hello_or_not(
                bytes in proptest::collection::vec(any::<u8>(), 0..2048),
            ) {
                let _ = read_hello(&bytes);
            }

            /// A hello's name and ALPN are read whole, and a hello cut
            /// anywhere (it came in several segments) is waited for,
            /// never taken for plaintext.
            #[test]
            fn a_hello_is_read_whole_and_waited_for_when_cut(
                name in "[a-zA-Z0-9]{1,10}(\\.[a-zA-Z0-9]{1,10}){0,3}\\.[a-zA-Z]{1,6}",
                alpn in proptest::collection::vec("[a-z0-9/.-]{1,20}", 0..4),
                cut in any::<prop::sample::Index>(),
            ) {
                let alpn_refs: Vec<&str> = alpn.iter().map(String::as_str).collect();
                let hello = client_hello_to(&name, &alpn_refs);
                let read = read_hello(&hello);
                let whole = HelloRead::Complete(tls::Hello {
                    sni: Some(name.to_ascii_lowercase()),
                    alpn,
                });
                prop_assert_eq!(read, whole);
                prop_assert_eq!(read_hello(&hello[..cut.index(hello.len())]), HelloRead::Partial);
            }

            #[test]
            fn a_mutated_hello_reads_as_a_hello_or_not(edits in fuzz::edits()) {
                let _ = read_hello(&fuzz::mutated(&client_hello(&["h2", "http/1.1"]), &edits));
            }
        }
    }
}
