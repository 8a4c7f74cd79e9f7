//! A fake Kubernetes API server for tests. There is no Kubernetes API
//! server on the machines this project is built on, so tests serve, over
//! real HTTP, list responses in the exact shape the API server returns
//! (`tests/data/kube-lists.json`, recorded-style fixtures written for this
//! project) and watch streams of newline-delimited events that each test
//! pushes. Paths without a recording answer 404, as an API server does for a
//! custom resource whose CRD is not installed.

use std::{
    collections::HashMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use axum::{
    Router,
    body::Body,
    extract::{Request, State},
    http::StatusCode,
    response::{IntoResponse, Response},
};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::{StreamExt, wrappers::ReceiverStream};

/// The recorded lists every fake API server starts with.
pub const RECORDED_LISTS: &str = include_str!("../tests/data/kube-lists.json");

#[derive(Clone, Default)]
pub struct FakeApi {
    lists: Arc<HashMap<String, Value>>,
    /// Open watch streams, by path.
    watches: Arc<Mutex<HashMap<String, Vec<mpsc::Sender<Value>>>>>,
}

impl FakeApi {
    /// Sends a watch event to every open watch of `path`.
    pub fn push(&self, path: &str, event: Value) {
        let watches = self.watches.lock().unwrap();
        for tx in watches.get(path).into_iter().flatten() {
            tx.try_send(event.clone()).unwrap();
        }
    }

    pub fn open_watches(&self, path: &str) -> usize {
        self.watches
            .lock()
            .unwrap()
            .get(path)
            .map_or(0, |w| w.iter().filter(|tx| !tx.is_closed()).count())
    }

    /// Ends every watch of `path`, as an API server does on a timeout.
    pub fn close_watches(&self, path: &str) {
        self.watches.lock().unwrap().remove(path);
    }
}

async fn handle(State(api): State<FakeApi>, request: Request) -> Response {
    let path = request.uri().path().to_string();
    let watch = request
        .uri()
        .query()
        .unwrap_or_default()
        .split('&')
        .any(|p| p == "watch=true" || p == "watch=1");
    let not_found = || {
        let status = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": format!("the server could not find the requested resource ({path})"), "reason": "NotFound", "code": 404});
        (
            StatusCode::NOT_FOUND,
            [("content-type", "application/json")],
            status.to_string(),
        )
            .into_response()
    };
    if !watch {
        return match api.lists.get(&path) {
            Some(list) => {
                ([("content-type", "application/json")], list.to_string()).into_response()
            }
            None => not_found(),
        };
    }
    if !api.lists.contains_key(&path) {
        return not_found();
    }
    let (tx, rx) = mpsc::channel(16);
    api.watches
        .lock()
        .unwrap()
        .entry(path)
        .or_default()
        .push(tx);
    let lines = ReceiverStream::new(rx).map(|event| Ok::<_, Infallible>(format!("{event}\n")));
    (
        [("content-type", "application/json")],
        Body::from_stream(lines),
    )
        .into_response()
}

impl FakeApi {
    /// Serves the recorded lists on 127.0.0.1; returns the server and its address.
    pub async fn start() -> (Self, SocketAddr) {
        let lists: HashMap<String, Value> = serde_json::from_str(RECORDED_LISTS).unwrap();
        let api = Self {
            lists: Arc::new(lists),
            ..Self::default()
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(
            axum::serve(
                listener,
                Router::new().fallback(handle).with_state(api.clone()),
            )
            .into_future(),
        );
        (api, addr)
    }

    /// A kubeconfig that points at this server, without credentials.
    pub fn kubeconfig(addr: SocketAddr) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: fake, cluster: {{server: 'http://{addr}'}}}}]\ncontexts: [{{name: fake, context: {{cluster: fake, user: fake}}}}]\ncurrent-context: fake\nusers: [{{name: fake, user: {{}}}}]\n"
        )
    }
}
