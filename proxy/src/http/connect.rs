//! The connect stage, at the bottom of the stack: sends a request to the
//! endpoint the balancer [`Picked`] on the target cluster's pooled client
//! (a pool per worker; TLS when the cluster asks for it), and tells a
//! failure to connect from a connection that broke before an answer.

use http_body_util::BodyExt;
use tower::Service;

use super::{Failure, Request, balance::Picked, filters::upstream_request, forward::Target};
use crate::upstream::BoxError;

#[derive(Debug, Clone, Copy)]
pub struct Connect;

impl Service<Request> for Connect {
    super::stage_service!(Failure);

    fn call(&mut self, request: Request) -> Self::Future {
        let extensions = request.extensions();
        let (Some(Target(cluster)), Some(Picked(addr))) = (
            extensions.get::<Target>().cloned(),
            extensions.get::<Picked>().copied(),
        ) else {
            let why = Failure::BadRequest("no endpoint picked".into());
            return super::fail(why);
        };
        let (parts, body) = request.into_parts();
        let request = match upstream_request(parts, addr, body) {
            Ok(r) => r,
            Err(e) => {
                let why = Failure::BadRequest(format!("request: {e}"));
                return super::fail(why);
            }
        };
        let sent = cluster.client().request(request);
        Box::pin(async move {
            match sent.await {
                Ok(response) => {
                    Ok(response.map(|b| b.map_err(|e| Box::new(e) as BoxError).boxed()))
                }
                Err(e) if e.is_connect() => Err(Failure::ConnectFailed(error_chain(&e))),
                Err(e) => Err(Failure::Reset(error_chain(&e))),
            }
        })
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpListener,
    };
    use tower::ServiceExt;

    use super::*;
    use crate::http::Response;
    use crate::{
        http::test_support::{request, text},
        upstream::testing,
    };

    async fn send(to: SocketAddr, mut request: Request) -> Result<Response, Failure> {
        let upstreams = testing::upstreams(vec![testing::cluster("a", &[to])]).await;
        let extensions = request.extensions_mut();
        extensions.insert(Target(upstreams.get("a").unwrap()));
        extensions.insert(Picked(to));
        Connect.oneshot(request).await
    }

    #[tokio::test]
    async fn a_request_goes_to_the_picked_endpoint_without_hop_by_hop_headers() {
        let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let to = server.local_addr().unwrap();
        let app = tokio::spawn(async move {
            let (mut conn, _) = server.accept().await.unwrap();
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.ends_with(b"\r\n\r\n") {
                let n = conn.read(&mut buf).await.unwrap();
                head.extend_from_slice(&buf[..n]);
            }
            conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                .await
                .unwrap();
            String::from_utf8(head).unwrap().to_ascii_lowercase()
        });
        let mut request = request("/ratings?x=1");
        request
            .headers_mut()
            .insert("proxy-connection", "keep-alive".parse().unwrap());
        request
            .headers_mut()
            .insert("x-user", "jason".parse().unwrap());
        let response = send(to, request).await.unwrap();
        assert_eq!(text(response).await, "ok");
        let head = app.await.unwrap();
        assert!(head.starts_with("get /ratings?x=1 http/1.1\r\n"), "{head}");
        assert!(head.contains("x-user: jason"), "{head}");
        assert!(!head.contains("proxy-connection"), "{head}");
    }

    #[tokio::test]
    async fn no_connection_is_a_connect_failure_a_broken_one_a_reset() {
        let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let to = closed.local_addr().unwrap();
        drop(closed);
        let refused = send(to, request("/")).await.unwrap_err();
        assert!(matches!(refused, Failure::ConnectFailed(_)), "{refused:?}");

        let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let to = server.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut conn, _) = server.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = conn.read(&mut buf).await;
            // Gone before answering.
        });
        let reset = send(to, request("/")).await.unwrap_err();
        assert!(matches!(reset, Failure::Reset(_)), "{reset:?}");
    }
}
