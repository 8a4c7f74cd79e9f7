//! A fake Kubernetes API server for tests. There is no Kubernetes API
//! server on the machines this project is built on, so tests serve, over
//! real HTTP, list responses in the exact shape the API server returns
//! (`testkit/data/kube-lists.json`, recorded-style fixtures written for this
//! project) and watch streams of newline-delimited events that each test
//! pushes. Paths without a recording answer 404, as an API server does for a
//! custom resource whose CRD is not installed.
//!
//! Namespaced core objects (`/api/v1/namespaces/<ns>/<plural>/<name>`) can
//! also be created, read, replaced and deleted, with the API server's status
//! codes (409 on a create that exists, 404 on what does not), and token
//! reviews answer for the tokens a test registers. Other objects a test
//! stores (cluster-scoped ones, say) can be read and JSON-patched.

use std::{
    collections::{BTreeMap, HashMap},
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use axum::{
    Router,
    body::Body,
    extract::{Request, State},
    http::{Method, StatusCode},
    response::{IntoResponse, Response},
};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::{StreamExt, wrappers::ReceiverStream};

/// The recorded lists every fake API server starts with.
pub const RECORDED_LISTS: &str = include_str!("../data/kube-lists.json");

#[derive(Clone, Default)]
pub struct FakeApi {
    lists: Arc<HashMap<String, Value>>,
    /// Open watch streams, by path.
    watches: Arc<Mutex<HashMap<String, Vec<mpsc::Sender<Value>>>>>,
    /// Objects written through the API, by object path.
    objects: Arc<Mutex<BTreeMap<String, Value>>>,
    /// Service account tokens: token to user name.
    tokens: Arc<Mutex<HashMap<String, String>>>,
    /// Writes so far (creates, replaces, deletes), by object path.
    writes: Arc<Mutex<Vec<(String, String)>>>,
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

    /// Stores `object` at `path` (any object path, cluster-scoped ones
    /// included), to be read and patched through the API.
    pub fn put(&self, path: &str, object: Value) {
        self.objects.lock().unwrap().insert(path.into(), object);
    }

    /// The object at `path` (`/api/v1/namespaces/<ns>/<plural>/<name>`, or
    /// one stored with [`FakeApi::put`]).
    pub fn object(&self, path: &str) -> Option<Value> {
        self.objects.lock().unwrap().get(path).cloned()
    }

    /// Every write so far, as (method, object path).
    pub fn writes(&self) -> Vec<(String, String)> {
        self.writes.lock().unwrap().clone()
    }

    /// Makes `token` authenticate as `user` in token reviews.
    pub fn token(&self, token: &str, user: &str) {
        self.tokens
            .lock()
            .unwrap()
            .insert(token.into(), user.into());
    }

    /// Ends every watch of `path`, as an API server does on a timeout.
    pub fn close_watches(&self, path: &str) {
        self.watches.lock().unwrap().remove(path);
    }
}

fn status(code: StatusCode, reason: &str, message: String) -> Response {
    let status = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code.as_u16()});
    (
        code,
        [("content-type", "application/json")],
        status.to_string(),
    )
        .into_response()
}

fn object_response(object: &Value) -> Response {
    ([("content-type", "application/json")], object.to_string()).into_response()
}

/// Reads and JSON Patches of objects a test stored; `None` when `path`
/// holds none.
async fn handle_stored(api: &FakeApi, method: &Method, path: &str, body: Body) -> Response {
    let body = axum::body::to_bytes(body, 16 << 20)
        .await
        .unwrap_or_default();
    let mut objects = api.objects.lock().unwrap();
    let Some(object) = objects.get_mut(path) else {
        return not_found(path);
    };
    match *method {
        Method::GET => object_response(object),
        Method::PATCH => {
            let patch = match serde_json::from_slice::<json_patch::Patch>(&body) {
                Ok(p) => p,
                Err(e) => return status(StatusCode::BAD_REQUEST, "BadRequest", e.to_string()),
            };
            let mut patched = object.clone();
            if let Err(e) = json_patch::patch(&mut patched, &patch) {
                return status(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", e.to_string());
            }
            *object = patched.clone();
            drop(objects);
            api.writes
                .lock()
                .unwrap()
                .push(("patch".to_string(), path.to_string()));
            object_response(&patched)
        }
        _ => status(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            format!("{method} {path}"),
        ),
    }
}

/// Writes and reads of namespaced core objects; `None` when `path` is not
/// one of those.
async fn handle_object(api: &FakeApi, method: &Method, path: &str, body: Body) -> Option<Response> {
    let rest = path.strip_prefix("/api/v1/namespaces/")?;
    let parts: Vec<&str> = rest.split('/').collect();
    let (namespace, plural, name) = match parts[..] {
        [ns, plural] if *method == Method::POST => (ns, plural, None),
        [ns, plural, name] => (ns, plural, Some(name)),
        _ => return None,
    };
    let body = axum::body::to_bytes(body, 16 << 20).await.ok()?;
    let mut objects = api.objects.lock().unwrap();
    let record = |verb: &str, path: &str| {
        api.writes
            .lock()
            .unwrap()
            .push((verb.to_string(), path.to_string()));
    };
    let response = match (method.clone(), name) {
        (Method::POST, None) => {
            let Ok(mut object) = serde_json::from_slice::<Value>(&body) else {
                return Some(status(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    "not JSON".into(),
                ));
            };
            let name = object["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            let key = format!("/api/v1/namespaces/{namespace}/{plural}/{name}");
            if objects.contains_key(&key) {
                return Some(status(
                    StatusCode::CONFLICT,
                    "AlreadyExists",
                    format!("{plural} \"{name}\" already exists"),
                ));
            }
            object["metadata"]["namespace"] = json!(namespace);
            object["metadata"]["resourceVersion"] = json!(objects.len().to_string());
            record("create", &key);
            objects.insert(key, object.clone());
            (StatusCode::CREATED, object_response(&object))
        }
        (Method::GET, Some(_)) => match objects.get(path) {
            Some(object) => (StatusCode::OK, object_response(object)),
            None => return Some(not_found(path)),
        },
        (Method::PUT, Some(_)) => {
            if !objects.contains_key(path) {
                return Some(not_found(path));
            }
            let Ok(object) = serde_json::from_slice::<Value>(&body) else {
                return Some(status(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    "not JSON".into(),
                ));
            };
            record("replace", path);
            objects.insert(path.to_string(), object.clone());
            (StatusCode::OK, object_response(&object))
        }
        (Method::DELETE, Some(_)) => match objects.remove(path) {
            Some(object) => {
                record("delete", path);
                (StatusCode::OK, object_response(&object))
            }
            None => return Some(not_found(path)),
        },
        _ => return None,
    };
    let (code, mut response) = response;
    *response.status_mut() = code;
    Some(response)
}

fn not_found(path: &str) -> Response {
    status(
        StatusCode::NOT_FOUND,
        "NotFound",
        format!("the server could not find the requested resource ({path})"),
    )
}

/// A TokenReview answered from the registered tokens.
async fn review_token(api: &FakeApi, body: Body) -> Response {
    let body = axum::body::to_bytes(body, 1 << 20)
        .await
        .unwrap_or_default();
    let Ok(mut review) = serde_json::from_slice::<Value>(&body) else {
        return status(StatusCode::BAD_REQUEST, "BadRequest", "not JSON".into());
    };
    let token = review["spec"]["token"].as_str().unwrap_or_default();
    review["status"] = match api.tokens.lock().unwrap().get(token) {
        Some(user) => json!({"authenticated": true, "user": {"username": user, "uid": "u-1",
            "groups": ["system:serviceaccounts", "system:authenticated"]}}),
        None => json!({"authenticated": false, "error": "invalid bearer token"}),
    };
    let mut response = object_response(&review);
    *response.status_mut() = StatusCode::CREATED;
    response
}

async fn handle(State(api): State<FakeApi>, request: Request) -> Response {
    let path = request.uri().path().to_string();
    let method = request.method().clone();
    if method == Method::POST && path == "/apis/authentication.k8s.io/v1/tokenreviews" {
        return review_token(&api, request.into_body()).await;
    }
    let query = request.uri().query().unwrap_or_default().to_string();
    let stored = api.objects.lock().unwrap().contains_key(&path);
    if stored && !path.starts_with("/api/v1/namespaces/") {
        return handle_stored(&api, &method, &path, request.into_body()).await;
    }
    if let Some(response) = handle_object(&api, &method, &path, request.into_body()).await {
        return response;
    }
    let watch = query
        .split('&')
        .any(|p| p == "watch=true" || p == "watch=1");
    let not_found = || not_found(&path);
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
