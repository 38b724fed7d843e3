//! Who may reach the API from where. A node on loopback with no token is still reachable
//! by any web page its operator visits: a page can send simple cross-site requests (it
//! cannot read the answers, but a transfer or a delete does its harm anyway), and DNS
//! rebinding makes a page's own name resolve to the node. So:
//!
//! - the `Host` a request names must be an address the node serves (its listen address,
//!   `localhost` and loopback addresses when it listens on loopback, the cluster's
//!   virtual address) or one the operator allowed (`http.allowed_hosts`): a rebound name
//!   is refused;
//! - a request carrying a browser's `Origin` is refused unless that origin is the node's
//!   own or one the operator allowed (`http.allowed_origins`); the one exception is the
//!   console's read-only stream, which a page served by another member of the cluster
//!   may read (so a console whose node died reads on through another);
//! - a body must say what it is (`application/json` for an invocation): a page cannot
//!   send that cross-site without a CORS preflight, which the node never grants;
//! - tokens are compared in constant time.
//!
//! Leaves routing, and what each route answers, to `http`.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq;

use super::{ApiError, Options};

/// The port a `Host` without one names.
const HTTP_PORT_DEFAULT: u16 = 80;

/// Whether an origin (`http://host:port`) is the HTTP address of a member of the
/// cluster, as the cluster state knows it now.
pub type MemberOrigins = Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// The hosts and origins a node answers, fixed when it starts serving.
pub struct Edge {
    port: u16,
    /// Listening on every address: any address literal names this node.
    every_address: bool,
    /// Loopback is served: `localhost` and loopback addresses name this node.
    loopback: bool,
    addresses: Vec<IpAddr>,
    /// Lowercase `name` or `name:port`.
    hosts: Vec<String>,
    hosts_any: bool,
    /// Lowercase `scheme://host[:port]`.
    origins: Vec<String>,
    origins_any: bool,
    /// In a cluster: the members' pages, which may read the console's stream.
    members: Option<MemberOrigins>,
}

impl std::fmt::Debug for Edge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Edge")
            .field("port", &self.port)
            .field("hosts", &self.hosts)
            .field("origins", &self.origins)
            .finish_non_exhaustive()
    }
}

impl Edge {
    /// The edge of a node listening at `listening` (the bound address, port included),
    /// holding the virtual address `vip` when it is the master.
    pub fn new(listening: SocketAddr, vip: Option<IpAddr>, options: &Options) -> Edge {
        let ip = listening.ip();
        let normalized = |list: &[String]| -> Vec<String> {
            list.iter()
                .map(|s| s.trim().trim_end_matches('/').to_ascii_lowercase())
                .collect()
        };
        let hosts = normalized(&options.allowed_hosts);
        let origins = normalized(&options.allowed_origins);
        Edge {
            port: listening.port(),
            every_address: ip.is_unspecified(),
            loopback: ip.is_loopback() || ip.is_unspecified(),
            addresses: std::iter::once(ip).chain(vip).collect(),
            hosts_any: hosts.iter().any(|h| h == "*"),
            origins_any: origins.iter().any(|o| o == "*"),
            hosts,
            origins,
            members: None,
        }
    }

    /// Let pages served by the cluster's members read the console's stream.
    pub fn with_members(mut self, members: MemberOrigins) -> Edge {
        self.members = Some(members);
        self
    }

    /// The origin of a request that another member's console page may make: a `GET` of
    /// the console's stream from a member's address, answered with CORS headers. The
    /// stream is read-only and public (as `GET /v1/cluster` is), so this grants a page
    /// nothing it could harm with.
    pub fn console_peer_origin(
        &self,
        method: &axum::http::Method,
        path: &str,
        headers: &HeaderMap,
    ) -> Option<header::HeaderValue> {
        let members = self.members.as_ref()?;
        if method != axum::http::Method::GET || path != super::console::STREAM_PATH {
            return None;
        }
        let origin = headers.get(header::ORIGIN)?;
        let text = origin.to_str().ok()?.trim().to_ascii_lowercase();
        let text = text.replacen("http://localhost:", "http://127.0.0.1:", 1);
        members(&text).then(|| origin.clone())
    }

    /// Whether `host` (a `Host` header's value) names this node.
    pub fn host_allowed(&self, host: &str) -> bool {
        let host = host.trim().to_ascii_lowercase();
        if self.hosts_any || self.hosts.contains(&host) {
            return true;
        }
        let Some((name, port)) = split_host(&host) else {
            return false;
        };
        if self.hosts.iter().any(|h| h == name) {
            return true;
        }
        if port.unwrap_or(HTTP_PORT_DEFAULT) != self.port {
            return false;
        }
        if name == "localhost" {
            return self.loopback;
        }
        let literal = name.trim_start_matches('[').trim_end_matches(']');
        match literal.parse::<IpAddr>() {
            Ok(ip) => {
                self.every_address
                    || self.addresses.contains(&ip)
                    || (self.loopback && ip.is_loopback())
            }
            Err(_) => false,
        }
    }

    /// Whether a page at `origin` may call the node through `host` (already allowed):
    /// only the node's own origin, or one the operator allowed.
    pub fn origin_allowed(&self, origin: &str, host: &str) -> bool {
        let origin = origin.trim().trim_end_matches('/').to_ascii_lowercase();
        let own = format!("http://{}", host.trim().to_ascii_lowercase());
        self.origins_any || self.origins.contains(&origin) || origin == own
    }

    /// Fails with 403 `forbidden-host` or `forbidden-origin` for a request that may not
    /// reach the API.
    pub fn check(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let host = self.check_host(headers)?;
        if let Some(origin) = headers.get(header::ORIGIN) {
            let origin = String::from_utf8_lossy(origin.as_bytes());
            if !self.origin_allowed(&origin, host) {
                return Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    "forbidden-origin",
                    format!(
                        "requests from web pages at {origin:?} are refused: add the origin to http.allowed_origins to allow it"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Fails with 403 `forbidden-host` unless the request's `Host` names this node;
    /// returns it.
    fn check_host<'h>(&self, headers: &'h HeaderMap) -> Result<&'h str, ApiError> {
        let host = headers
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if !self.host_allowed(host) {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden-host",
                format!(
                    "this node does not answer to Host {host:?}: use its address, or add the name to http.allowed_hosts"
                ),
            ));
        }
        Ok(host)
    }
}

/// Middleware: refuse what [`Edge::check`] refuses, before any route runs; answer a
/// member's console page reading the stream with the CORS header it needs.
pub async fn guard(State(edge): State<Arc<Edge>>, request: Request, next: Next) -> Response {
    let peer = edge.console_peer_origin(request.method(), request.uri().path(), request.headers());
    let checked = match peer {
        Some(_) => edge.check_host(request.headers()).map(|_| ()),
        None => edge.check(request.headers()),
    };
    if let Err(e) = checked {
        return e.into_response();
    }
    let mut response = next.run(request).await;
    if let Some(origin) = peer {
        let headers = response.headers_mut();
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        headers.insert(header::VARY, header::HeaderValue::from_static("origin"));
    }
    response
}

/// Fails with 415 `unsupported-media-type` unless the request's `Content-Type` is one of
/// `accepted` (parameters such as `charset` aside).
pub fn require_media_type(headers: &HeaderMap, accepted: &[&str]) -> Result<(), ApiError> {
    let given = headers
        .get(header::CONTENT_TYPE)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    let essence = given
        .as_deref()
        .map(|v| v.split(';').next().unwrap_or("").trim());
    if essence.is_some_and(|e| accepted.iter().any(|a| e.eq_ignore_ascii_case(a))) {
        return Ok(());
    }
    Err(ApiError::new(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported-media-type",
        format!(
            "send the body with Content-Type: {} (it came with {})",
            accepted.join(" or "),
            given.map_or("none".to_owned(), |g| format!("{g:?}"))
        ),
    ))
}

/// Whether the request carries `Authorization: Bearer <token>`. Compared in constant
/// time, on digests, so that neither the token's bytes nor its length show in timing.
pub fn bearer_is(headers: &HeaderMap, token: &str) -> bool {
    let Some(given) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return false;
    };
    let given = Sha256::digest(given.as_bytes());
    let token = Sha256::digest(token.as_bytes());
    bool::from(given.as_slice().ct_eq(token.as_slice()))
}

/// `name` and port of a `Host` value (`name`, `name:port`, `[v6]`, `[v6]:port`), or
/// `None` when it is malformed.
fn split_host(host: &str) -> Option<(&str, Option<u16>)> {
    let (name, port) = if host.starts_with('[') {
        let end = host.find(']')?;
        let (name, rest) = host.split_at(end + 1);
        match rest {
            "" => (name, None),
            _ => (name, Some(rest.strip_prefix(':')?)),
        }
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) => (name, Some(port)),
            None => (host, None),
        }
    };
    if name.is_empty() {
        return None;
    }
    let port = match port {
        Some(p) => Some(p.parse().ok()?),
        None => None,
    };
    Some((name, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn edge(listen: &str, hosts: &[&str], origins: &[&str]) -> Edge {
        let options = Options {
            allowed_hosts: hosts.iter().map(|s| s.to_string()).collect(),
            allowed_origins: origins.iter().map(|s| s.to_string()).collect(),
            ..Options::default()
        };
        Edge::new(listen.parse().expect("address"), None, &options)
    }

    #[test]
    fn loopback_node_answers_to_its_loopback_names_only() {
        let e = edge("127.0.0.1:7070", &[], &[]);
        for ok in [
            "127.0.0.1:7070",
            "localhost:7070",
            "[::1]:7070",
            "LOCALHOST:7070",
        ] {
            assert!(e.host_allowed(ok), "{ok}");
        }
        for refused in [
            "evil.example:7070",
            "127.0.0.1:7071",
            "localhost",
            "10.0.0.1:7070",
            "",
            "127.0.0.1:x",
        ] {
            assert!(!e.host_allowed(refused), "{refused}");
        }
    }

    #[test]
    fn configured_hosts_and_every_address() {
        let e = edge("0.0.0.0:7070", &["api.example", "proxy.example:443"], &[]);
        assert!(e.host_allowed("10.1.2.3:7070"));
        assert!(e.host_allowed("api.example:9999"));
        assert!(e.host_allowed("proxy.example:443"));
        assert!(!e.host_allowed("proxy.example:444"));
        assert!(!e.host_allowed("rebound.example:7070"));
        let specific = edge("10.0.0.5:7070", &[], &[]);
        assert!(specific.host_allowed("10.0.0.5:7070"));
        assert!(!specific.host_allowed("10.0.0.6:7070"));
        assert!(!specific.host_allowed("localhost:7070"));
        assert!(edge("127.0.0.1:7070", &["*"], &[]).host_allowed("anything:1"));
    }

    #[test]
    fn origins_other_than_the_nodes_own_are_refused_unless_allowed() {
        let e = edge("127.0.0.1:7070", &[], &["https://console.example"]);
        assert!(e.origin_allowed("http://127.0.0.1:7070", "127.0.0.1:7070"));
        assert!(e.origin_allowed("https://console.example/", "127.0.0.1:7070"));
        assert!(!e.origin_allowed("http://evil.example", "127.0.0.1:7070"));
        assert!(!e.origin_allowed("null", "127.0.0.1:7070"));
        assert!(!e.origin_allowed("http://localhost:7070", "127.0.0.1:7070"));
    }

    #[test]
    fn only_members_pages_may_read_the_console_stream_from_elsewhere() {
        let members: MemberOrigins = Arc::new(|o: &str| o == "http://127.0.0.1:7071");
        let e = edge("127.0.0.1:7070", &[], &[]).with_members(members);
        let get = axum::http::Method::GET;
        let stream = crate::http::console::STREAM_PATH;
        let from = |origin: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(header::ORIGIN, origin.parse().expect("header"));
            headers
        };
        for member in ["http://127.0.0.1:7071", "http://localhost:7071"] {
            assert!(
                e.console_peer_origin(&get, stream, &from(member)).is_some(),
                "{member}"
            );
        }
        assert!(e
            .console_peer_origin(&get, stream, &from("http://evil.example"))
            .is_none());
        assert!(e
            .console_peer_origin(&get, "/v1/cluster", &from("http://127.0.0.1:7071"))
            .is_none());
        let post = axum::http::Method::POST;
        assert!(e
            .console_peer_origin(&post, stream, &from("http://127.0.0.1:7071"))
            .is_none());
        assert!(edge("127.0.0.1:7070", &[], &[])
            .console_peer_origin(&get, stream, &from("http://127.0.0.1:7071"))
            .is_none());
    }

    #[test]
    fn media_types_ignore_parameters_and_case() {
        let mut headers = HeaderMap::new();
        assert!(require_media_type(&headers, &["application/json"]).is_err());
        headers.insert(
            header::CONTENT_TYPE,
            "Application/JSON; charset=utf-8".parse().expect("header"),
        );
        assert!(require_media_type(&headers, &["application/json"]).is_ok());
        headers.insert(
            header::CONTENT_TYPE,
            "text/plain;charset=UTF-8".parse().expect("header"),
        );
        assert!(require_media_type(&headers, &["application/json"]).is_err());
    }

    #[test]
    fn bearer_tokens_must_match_exactly() {
        let mut headers = HeaderMap::new();
        assert!(!bearer_is(&headers, "s3cret"));
        headers.insert(
            header::AUTHORIZATION,
            "Bearer s3cret".parse().expect("header"),
        );
        assert!(bearer_is(&headers, "s3cret"));
        assert!(!bearer_is(&headers, "s3cre"));
        assert!(!bearer_is(&headers, "s3cret2"));
    }
}
