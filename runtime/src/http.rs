//! The HTTP API: deploy and manage functions, invoke them, health and metrics.
//! Every error is JSON `{"error": {"code", "message"}}` with a status that says whose
//! fault it was, the router's own (unknown route, wrong verb, malformed path or query)
//! included. Who may reach the API is `edge`'s business; how many connections, and
//! for how long, is `conn`'s.
//!
//! **Invariant:** an invocation runs on its own task: a client that disconnects does
//! not cancel a transaction half-way (it commits or aborts as if the client stayed).

pub mod conn;
pub mod console;
pub mod edge;

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::node::{AdminError, Answer, InvokeError, Node};

pub const IDEMPOTENCY_KEY: &str = "idempotency-key";
pub const TXN_HEADER: &str = "understudy-txn";
pub const REPLAYED_HEADER: &str = "idempotent-replayed";
/// In a cluster: `<node> <epoch>`, the primary that answered and its epoch.
pub const SERVED_BY_HEADER: &str = "understudy-served-by";

/// Media types a component may be sent as.
const COMPONENT_MEDIA_TYPES: &[&str] = &["application/wasm", "application/octet-stream"];
/// Bytes of a plain-text error (an extractor's rejection) carried into the JSON answer.
const REJECTION_TEXT_MAX: usize = 4 << 10;

/// Settings of the HTTP edge (`[http]` in the config file).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Options {
    /// `Host` values the API answers to besides the addresses it serves (its listen
    /// address, `localhost` on loopback, the cluster's virtual address): `name` (any
    /// port) or `name:port`, for a DNS name or a proxy in front. `"*"` turns the check off.
    pub allowed_hosts: Vec<String>,
    /// Browser origins (`scheme://host[:port]`) allowed to call the API; any other request
    /// carrying an `Origin` is refused. `"*"` allows every origin.
    pub allowed_origins: Vec<String>,
    /// Connections open at once; more are refused at once (and logged). Lowered at
    /// start to fit the process's open-files limit.
    pub connections_max: usize,
    /// How long a client may take to send a request's headers, which is also how long a
    /// kept-alive connection may wait idle for its next request, in milliseconds.
    pub header_read_timeout_ms: u64,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            allowed_hosts: Vec::new(),
            allowed_origins: Vec::new(),
            connections_max: 1024,
            header_read_timeout_ms: 10_000,
        }
    }
}

/// An error answer.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: String,
    message: String,
    /// Seconds, for `Retry-After`.
    retry_after_s: Option<u32>,
}

impl ApiError {
    fn new(status: StatusCode, code: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code: code.to_owned(),
            message: message.into(),
            retry_after_s: None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({ "error": { "code": self.code, "message": self.message } });
        let mut response = (self.status, Json(body)).into_response();
        if let Some(s) = self.retry_after_s {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        response
    }
}

impl From<InvokeError> for ApiError {
    fn from(e: InvokeError) -> ApiError {
        let status = match &e {
            InvokeError::UnknownFunction(_) => StatusCode::NOT_FOUND,
            InvokeError::Stopped(_) => StatusCode::SERVICE_UNAVAILABLE,
            InvokeError::BadIdempotencyKey(_) => StatusCode::BAD_REQUEST,
            InvokeError::IdempotencyKeyReused(_) => StatusCode::UNPROCESSABLE_ENTITY,
            InvokeError::Trap(_) => StatusCode::INTERNAL_SERVER_ERROR,
            InvokeError::Deadline(_) => StatusCode::GATEWAY_TIMEOUT,
            InvokeError::ResourceCap(_) => StatusCode::INTERNAL_SERVER_ERROR,
            InvokeError::StateFull(_) => StatusCode::INSUFFICIENT_STORAGE,
            InvokeError::Conflict(_) => StatusCode::CONFLICT,
            InvokeError::CalleeFailedAcrossNodes(_) => StatusCode::UNPROCESSABLE_ENTITY,
            InvokeError::Busy(_)
            | InvokeError::PreparedElsewhere(_)
            | InvokeError::Overloaded(_) => StatusCode::SERVICE_UNAVAILABLE,
            InvokeError::OutputTooLarge(_) => StatusCode::INTERNAL_SERVER_ERROR,
            InvokeError::Storage(_) => StatusCode::INTERNAL_SERVER_ERROR,
            InvokeError::NotPrimary(_) | InvokeError::Unavailable(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
        };
        let mut error = ApiError::new(status, e.code(), e.to_string());
        if let InvokeError::Overloaded(_) = e {
            error.retry_after_s = Some(1);
        }
        error
    }
}

impl From<AdminError> for ApiError {
    fn from(e: AdminError) -> ApiError {
        let (status, code) = match &e {
            AdminError::BadName(_) => (StatusCode::BAD_REQUEST, "bad-name"),
            AdminError::UnknownFunction(_) => (StatusCode::NOT_FOUND, "unknown-function"),
            AdminError::Component(
                crate::wasm::Error::Io { .. } | crate::wasm::Error::Engine(_),
            ) => (StatusCode::INTERNAL_SERVER_ERROR, "storage"),
            AdminError::Component(_) => (StatusCode::BAD_REQUEST, "invalid-component"),
            AdminError::Storage(_) => (StatusCode::INTERNAL_SERVER_ERROR, "storage"),
            AdminError::Rejected(_) => (StatusCode::CONFLICT, "rejected"),
            AdminError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
        };
        ApiError::new(status, code, e.to_string())
    }
}

fn body_error(rejection: BytesRejection, limit: usize) -> ApiError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        return ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too-large",
            format!("body exceeds the limit of {limit} bytes"),
        );
    }
    ApiError::new(rejection.status(), "bad-body", rejection.body_text())
}

/// The API's routes, every error answered as JSON. Serve it with [`serve`], which adds
/// the edge's checks.
pub fn router(node: Node) -> Router {
    router_closing(node, console::Closing::new())
}

/// The API's routes, the console's streams ending when `closing` is closed.
fn router_closing(node: Node, closing: console::Closing) -> Router {
    let body_max = node.config().body_max_bytes;
    let component_max = node.config().component_max_bytes;
    let admin = Router::new()
        .route("/v1/functions/{name}", put(deploy).delete(delete))
        .route("/v1/functions/{name}/stop", post(stop))
        .route("/v1/functions/{name}/start", post(start))
        .route("/v1/cluster/nodes/{id}/drain", post(drain_node))
        .route("/v1/cluster/nodes/{id}/remove", post(remove_node))
        .layer(DefaultBodyLimit::max(component_max));
    let public = Router::new()
        .route("/v1/functions", get(list))
        .route("/v1/functions/{name}", get(describe))
        .route("/v1/functions/{name}/{method}", post(invoke))
        // Unambiguous for methods named `stop` or `start`.
        .route("/v1/functions/{name}/invoke/{method}", post(invoke))
        .route("/v1/cluster", get(cluster))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .layer(DefaultBodyLimit::max(body_max));
    admin
        .merge(public)
        .merge(console::routes(closing))
        .fallback(not_found)
        .layer(middleware::from_fn(json_errors))
        .with_state(node)
}

async fn not_found(uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not-found",
        format!("no such route: {}", uri.path()),
    )
}

/// Middleware: answer the router's own errors (a wrong verb, a path or query that does
/// not parse, a body the extractor refused) in the documented JSON shape.
async fn json_errors(request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if is_json || !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let (parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, REJECTION_TEXT_MAX)
        .await
        .unwrap_or_default();
    let text = String::from_utf8_lossy(&text).trim().to_owned();
    let message = match text.is_empty() {
        true => status.canonical_reason().unwrap_or("error").to_owned(),
        false => text,
    };
    let mut answer = ApiError::new(status, rejection_code(status), message).into_response();
    // Keep what the other headers say (`Allow` on a 405).
    for (name, value) in &parts.headers {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            answer.headers_mut().append(name, value.clone());
        }
    }
    answer
}

/// Middleware: a request refused before its body was read (a bad query, a foreign host,
/// a wrong media type, a wrong verb, no token) is answered with `Connection: close`. The
/// server drops the connection rather than read the rest of the body, and a client
/// that did not hear so would send its next request on a connection about to close (a
/// test saw that as an incomplete message).
async fn close_after_refused_body(request: Request, next: Next) -> Response {
    let has_body = request.headers().contains_key(header::TRANSFER_ENCODING)
        || request
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .is_some_and(|n| n > 0);
    let mut response = next.run(request).await;
    let refused = matches!(
        response.status(),
        StatusCode::BAD_REQUEST
            | StatusCode::UNAUTHORIZED
            | StatusCode::FORBIDDEN
            | StatusCode::NOT_FOUND
            | StatusCode::METHOD_NOT_ALLOWED
            | StatusCode::PAYLOAD_TOO_LARGE
            | StatusCode::UNSUPPORTED_MEDIA_TYPE
    );
    if has_body && refused {
        response.headers_mut().insert(
            header::CONNECTION,
            header::HeaderValue::from_static("close"),
        );
    }
    response
}

fn rejection_code(status: StatusCode) -> &'static str {
    match status {
        StatusCode::NOT_FOUND => "not-found",
        StatusCode::METHOD_NOT_ALLOWED => "method-not-allowed",
        StatusCode::PAYLOAD_TOO_LARGE => "too-large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported-media-type",
        StatusCode::UNPROCESSABLE_ENTITY => "unprocessable",
        s if s.is_server_error() => "internal",
        _ => "bad-request",
    }
}

/// Run `work` on its own task: a client that hangs up must not cancel it half-way.
async fn run_to_completion<T: Send + 'static>(
    work: impl std::future::Future<Output = T> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::spawn(work).await.map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("task failed: {e}"),
        )
    })
}

/// Fails with 401 unless the request carries the admin token (when the node has one).
fn authorize(node: &Node, headers: &HeaderMap) -> Result<(), ApiError> {
    let config = node.config();
    let Some(token) = config.admin_token.as_deref().filter(|t| !t.is_empty()) else {
        return Ok(());
    };
    if edge::bearer_is(headers, token) {
        return Ok(());
    }
    Err(ApiError::new(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "this needs `Authorization: Bearer <admin token>`",
    ))
}

/// Fails with 401 unless the request carries the invoke token or the admin token (when
/// the node has an invoke token).
fn authorize_invoke(node: &Node, headers: &HeaderMap) -> Result<(), ApiError> {
    let config = node.config();
    let Some(token) = config.invoke_token.as_deref().filter(|t| !t.is_empty()) else {
        return Ok(());
    };
    let admin = config.admin_token.as_deref().filter(|t| !t.is_empty());
    if edge::bearer_is(headers, token) || admin.is_some_and(|a| edge::bearer_is(headers, a)) {
        return Ok(());
    }
    Err(ApiError::new(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "invocations on this node need `Authorization: Bearer <invoke token>`",
    ))
}

#[derive(serde::Deserialize)]
struct DeployQuery {
    replicas: Option<u8>,
    /// The functions it may call: `a,b`, or `*` for any (none by default).
    calls: Option<String>,
}

async fn deploy(
    State(node): State<Node>,
    Path(name): Path<String>,
    Query(query): Query<DeployQuery>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    authorize(&node, &headers)?;
    edge::require_media_type(&headers, COMPONENT_MEDIA_TYPES)?;
    let body = body.map_err(|r| body_error(r, node.config().component_max_bytes))?;
    let calls = understudy_control::CallGrants::parse(query.calls.as_deref().unwrap_or(""))
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad-calls", e))?;
    if let Some(cluster) = node.cluster().cloned() {
        let replicas = query.replicas.unwrap_or(crate::cluster::REPLICAS_DEFAULT);
        if replicas == 0 {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad-replicas",
                "replicas must be at least 1",
            ));
        }
        let existed = cluster.is_deployed(&name);
        let info = run_to_completion(async move {
            cluster.deploy(&name, body.to_vec(), replicas, calls).await
        })
        .await??;
        let status = if existed {
            StatusCode::OK
        } else {
            StatusCode::CREATED
        };
        return Ok((status, Json(info)).into_response());
    }
    let existed = node.is_deployed(&name);
    let info =
        run_to_completion(async move { node.deploy(&name, body.to_vec(), calls).await }).await??;
    let status = if existed {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((status, Json(info)).into_response())
}

async fn delete(
    State(node): State<Node>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(&node, &headers)?;
    match node.cluster().cloned() {
        Some(cluster) => run_to_completion(async move { cluster.delete(&name).await }).await??,
        None => run_to_completion(async move { node.delete(&name).await }).await??,
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn stop(
    State(node): State<Node>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(&node, &headers)?;
    set_running(node, name, false).await
}

async fn start(
    State(node): State<Node>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(&node, &headers)?;
    set_running(node, name, true).await
}

async fn drain_node(
    State(node): State<Node>,
    Path(id): Path<u64>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(&node, &headers)?;
    let cluster = clustered(&node)?;
    run_to_completion(async move { cluster.drain(id).await }).await??;
    Ok(Json(json!({ "node": id, "status": "draining" })).into_response())
}

async fn remove_node(
    State(node): State<Node>,
    Path(id): Path<u64>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(&node, &headers)?;
    let cluster = clustered(&node)?;
    run_to_completion(async move { cluster.remove(id).await }).await??;
    Ok(Json(json!({ "node": id, "status": "removed" })).into_response())
}

fn clustered(node: &Node) -> Result<std::sync::Arc<crate::cluster::Cluster>, ApiError> {
    node.cluster().cloned().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not-clustered",
            "this node runs alone (no [cluster] in its config)",
        )
    })
}

async fn set_running(node: Node, name: String, running: bool) -> Result<Response, ApiError> {
    if let Some(cluster) = node.cluster().cloned() {
        let info =
            run_to_completion(async move { cluster.set_running(&name, running).await }).await??;
        return Ok(Json(info).into_response());
    }
    let info = run_to_completion(async move { node.set_running(&name, running).await }).await??;
    Ok(Json(info).into_response())
}

async fn list(State(node): State<Node>) -> Response {
    Json(json!({ "functions": node.list() })).into_response()
}

async fn describe(
    State(node): State<Node>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    Ok(Json(node.describe(&name)?).into_response())
}

/// An invocation, in a span of its trace (the request's `traceparent`, or a new trace
/// when it has none or a malformed one); the answer, error or not, names the trace and
/// the edge's span in its own `traceparent`.
async fn invoke(
    State(node): State<Node>,
    Path((name, method)): Path<(String, String)>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let incoming = headers
        .get(crate::trace::HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(crate::trace::TraceContext::parse);
    let (span, named) = crate::trace::edge_span(incoming, &name, &method);
    let mut response = invoke_in_span(node, name, method, headers, body, span)
        .await
        .unwrap_or_else(IntoResponse::into_response);
    if let Ok(v) = HeaderValue::from_str(&named.to_header()) {
        response.headers_mut().insert(crate::trace::HEADER, v);
    }
    response
}

async fn invoke_in_span(
    node: Node,
    name: String,
    method: String,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
    span: tracing::Span,
) -> Result<Response, ApiError> {
    authorize_invoke(&node, &headers)?;
    let body = body.map_err(|r| body_error(r, node.config().body_max_bytes))?;
    if !body.is_empty() {
        edge::require_media_type(&headers, &["application/json"])?;
    }
    let input: Vec<u8> = if body.iter().all(u8::is_ascii_whitespace) {
        b"null".to_vec()
    } else {
        if let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(&body) {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad-json",
                format!("the body is not valid JSON: {e}"),
            ));
        }
        body.to_vec()
    };
    let key = match headers.get(IDEMPOTENCY_KEY) {
        Some(v) => Some(
            v.to_str()
                .map_err(|_| {
                    ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "bad-idempotency-key",
                        "must be printable ASCII",
                    )
                })?
                .to_owned(),
        ),
        None => None,
    };
    if key
        .as_deref()
        .is_some_and(|k| k.starts_with(crate::store::AUTO_KEY_PREFIX))
    {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad-idempotency-key",
            format!(
                "keys starting with {:?} are reserved for the cluster's own use",
                crate::store::AUTO_KEY_PREFIX
            ),
        ));
    }
    let called = (name.clone(), method.clone());
    let task = tokio::spawn(tracing::Instrument::instrument(
        async move {
            match node.cluster() {
                Some(cluster) => cluster.invoke(&name, &method, &input, key.as_deref()).await,
                None => node.invoke(&name, &method, &input, key.as_deref()).await,
            }
        },
        span,
    ));
    let answer = task.await.map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("invocation task failed: {e}"),
        )
    })??;
    Ok(answer_response(answer, &called.0, &called.1))
}

/// The answer to an invocation of `function`'s `method`.
fn answer_response(answer: Answer, function: &str, method: &str) -> Response {
    let mut response = match answer.outcome {
        Ok(output) => match json_output(output) {
            Ok(output) => {
                let mut r = (StatusCode::OK, output).into_response();
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                r
            }
            Err(e) => ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "bad-output",
                format!(
                    "function `{function}` method `{method}` returned output that is not JSON ({e}); its transaction committed"
                ),
            )
            .into_response(),
        },
        Err(e) => {
            // The function's own error: the client's request could not be done.
            let status = if e.code == "bad-input" {
                StatusCode::BAD_REQUEST
            } else {
                StatusCode::UNPROCESSABLE_ENTITY
            };
            ApiError::new(status, &e.code, e.message).into_response()
        }
    };
    if let Some((node, epoch)) = answer.served_by {
        if let Ok(v) = HeaderValue::from_str(&format!("{node} {epoch}")) {
            response.headers_mut().insert(SERVED_BY_HEADER, v);
        }
    }
    if answer.replayed {
        response
            .headers_mut()
            .insert(REPLAYED_HEADER, HeaderValue::from_static("true"));
    } else if let Ok(v) = HeaderValue::from_str(&answer.txn.to_string()) {
        response.headers_mut().insert(TXN_HEADER, v);
    }
    response
}

/// A handler's output as served: JSON, with no output at all standing for `null` (as no
/// input does). Fails when it is not JSON.
fn json_output(output: Vec<u8>) -> Result<Vec<u8>, serde_json::Error> {
    if output.is_empty() {
        return Ok(b"null".to_vec());
    }
    serde_json::from_slice::<serde::de::IgnoredAny>(&output)?;
    Ok(output)
}

async fn cluster(State(node): State<Node>) -> Result<Response, ApiError> {
    match node.cluster() {
        Some(cluster) => Ok(Json(cluster.status()).into_response()),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not-clustered",
            "this node runs alone (no [cluster] in its config)",
        )),
    }
}

async fn healthz(State(node): State<Node>) -> Response {
    Json(json!({ "status": "ok", "lsn_durable": node.lsn_durable().0 })).into_response()
}

async fn metrics(State(node): State<Node>) -> Response {
    node.sample_metrics();
    if let Some(cluster) = node.cluster() {
        cluster.sample_metrics();
    }
    let mut r = node.metrics().encode().into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    r
}

/// Serve the API on `listener` until `shutdown` resolves: only to the hosts and origins
/// the edge allows, within the connection limits of `http` in the node's config.
///
/// Fails when the listener's address cannot be read.
pub async fn serve(
    node: Node,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listening = listener.local_addr()?;
    let options = node.config().http.clone();
    let vip = node
        .config()
        .cluster
        .as_ref()
        .and_then(|c| c.vip.as_deref())
        .and_then(|v| v.split('/').next()?.parse().ok());
    let mut edge = edge::Edge::new(listening, vip, &options);
    if let Some(cluster) = node.cluster() {
        let cluster = Arc::downgrade(cluster);
        edge = edge.with_members(Arc::new(move |origin: &str| {
            cluster
                .upgrade()
                .is_some_and(|c| c.has_member_origin(origin))
        }));
    }
    let edge = Arc::new(edge);
    let limits = conn::Limits {
        connections_max: conn::connections_max(options.connections_max),
        header_read_timeout: Duration::from_millis(options.header_read_timeout_ms),
    };
    let counters = conn::Counters {
        refused: node.metrics().http_connections_refused.clone(),
        open: node.metrics().http_connections_open.clone(),
    };
    let closing = console::Closing::new();
    let app = router_closing(node, closing.clone())
        .layer(middleware::from_fn_with_state(edge, edge::guard))
        .layer(middleware::from_fn(close_after_refused_body));
    // The console's streams never end by themselves: end them, or a graceful shutdown
    // would wait for them forever.
    let shutdown = async move {
        shutdown.await;
        closing.close();
    };
    conn::serve(app, listener, limits, counters, shutdown).await
}
