//! The HTTP API: deploy and manage functions, invoke them, health and metrics.
//! Every error is JSON `{"error": {"code", "message"}}` with a status that says whose
//! fault it was.
//!
//! **Invariant:** an invocation runs on its own task: a client that disconnects does
//! not cancel a transaction half-way (it commits or aborts as if the client stayed).

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde_json::json;

use crate::node::{AdminError, Answer, InvokeError, Node};

pub const IDEMPOTENCY_KEY: &str = "idempotency-key";
pub const TXN_HEADER: &str = "understudy-txn";
pub const REPLAYED_HEADER: &str = "idempotent-replayed";
/// In a cluster: `<node> <epoch>`, the primary that answered and its epoch.
pub const SERVED_BY_HEADER: &str = "understudy-served-by";

/// An error answer.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: String,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code: code.to_owned(),
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({ "error": { "code": self.code, "message": self.message } });
        (self.status, Json(body)).into_response()
    }
}

impl From<InvokeError> for ApiError {
    fn from(e: InvokeError) -> ApiError {
        let status = match &e {
            InvokeError::UnknownFunction(_) => StatusCode::NOT_FOUND,
            InvokeError::Stopped(_) => StatusCode::SERVICE_UNAVAILABLE,
            InvokeError::BadIdempotencyKey(_) => StatusCode::BAD_REQUEST,
            InvokeError::Trap(_) => StatusCode::INTERNAL_SERVER_ERROR,
            InvokeError::Deadline(_) => StatusCode::GATEWAY_TIMEOUT,
            InvokeError::ResourceCap(_) => StatusCode::INTERNAL_SERVER_ERROR,
            InvokeError::Conflict(_) => StatusCode::CONFLICT,
            InvokeError::CalleeFailedAcrossNodes(_) => StatusCode::UNPROCESSABLE_ENTITY,
            InvokeError::Busy(_) => StatusCode::SERVICE_UNAVAILABLE,
            InvokeError::OutputTooLarge(_) => StatusCode::INTERNAL_SERVER_ERROR,
            InvokeError::Storage(_) => StatusCode::INTERNAL_SERVER_ERROR,
            InvokeError::NotPrimary(_) | InvokeError::Unavailable(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
        };
        ApiError::new(status, e.code(), e.to_string())
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

pub fn router(node: Node) -> Router {
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
    admin.merge(public).with_state(node)
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

fn authorize(node: &Node, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(token) = node
        .config()
        .admin_token
        .as_deref()
        .filter(|t| !t.is_empty())
    else {
        return Ok(());
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if given == Some(token) {
        return Ok(());
    }
    Err(ApiError::new(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "this needs `Authorization: Bearer <admin token>`",
    ))
}

#[derive(serde::Deserialize)]
struct DeployQuery {
    replicas: Option<u8>,
}

async fn deploy(
    State(node): State<Node>,
    Path(name): Path<String>,
    Query(query): Query<DeployQuery>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    authorize(&node, &headers)?;
    let body = body.map_err(|r| body_error(r, node.config().component_max_bytes))?;
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
        let info =
            run_to_completion(async move { cluster.deploy(&name, body.to_vec(), replicas).await })
                .await??;
        let status = if existed {
            StatusCode::OK
        } else {
            StatusCode::CREATED
        };
        return Ok((status, Json(info)).into_response());
    }
    let existed = node.is_deployed(&name);
    let info = run_to_completion(async move { node.deploy(&name, body.to_vec()).await }).await??;
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

async fn invoke(
    State(node): State<Node>,
    Path((name, method)): Path<(String, String)>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(|r| body_error(r, node.config().body_max_bytes))?;
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
    let task = tokio::spawn(async move {
        match node.cluster() {
            Some(cluster) => cluster.invoke(&name, &method, &input, key.as_deref()).await,
            None => node.invoke(&name, &method, &input, key.as_deref()).await,
        }
    });
    let answer = task.await.map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("invocation task failed: {e}"),
        )
    })??;
    Ok(answer_response(answer))
}

fn answer_response(answer: Answer) -> Response {
    let mut response = match answer.outcome {
        Ok(output) => {
            let mut r = (StatusCode::OK, output).into_response();
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            r
        }
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
    let mut r = node.metrics().encode().into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    r
}

/// Serve the API on `listener` until `shutdown` resolves.
///
/// Fails on I/O errors of the listener.
pub async fn serve(
    node: Node,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(node))
        .with_graceful_shutdown(shutdown)
        .await
}
