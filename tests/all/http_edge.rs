//! The API refuses what a web page or a rebound DNS name could send it (a foreign `Host`,
//! a foreign `Origin`, a body not declared as what it is), answers every error in its
//! JSON shape, and says so when a function's output is not JSON.

use reqwest::Method;
use serde_json::{json, Value};

use crate::support::{component, NodeOptions, NodeProcess, Reply};

/// Panics unless `reply` is an error in the documented shape, `{"error": {"code", "message"}}`
/// served as JSON, with `status` and `code`.
#[track_caller]
fn expect_json_error(reply: Reply, status: u16, code: &str) -> Reply {
    assert_eq!(
        reply.header("content-type"),
        Some("application/json"),
        "not JSON: {} {}",
        reply.status,
        reply.text
    );
    assert!(!reply.message().is_empty(), "no message: {}", reply.text);
    reply.expect_error(status, code)
}

#[test]
fn cross_site_requests_are_refused_and_change_nothing() {
    let node = NodeProcess::start();
    let api = node.api();
    api.deploy_component("c", "counter");
    let port = node.port();

    // A page on another site sends a simple request: text/plain with a JSON body.
    let from_page = api
        .request(Method::POST, "/v1/functions/c/increment")
        .header("origin", "http://evil.example")
        .header("content-type", "text/plain;charset=UTF-8")
        .body(r#"{"by": 5}"#);
    expect_json_error(
        api.send(from_page).expect("request"),
        403,
        "forbidden-origin",
    );
    let stop = api
        .request(Method::POST, "/v1/functions/c/stop")
        .header("origin", "http://evil.example");
    expect_json_error(api.send(stop).expect("request"), 403, "forbidden-origin");
    // The same body with no Origin is still refused: it does not say it is JSON.
    for content_type in [Some("text/plain;charset=UTF-8"), None] {
        let mut request = api
            .request(Method::POST, "/v1/functions/c/increment")
            .body(r#"{"by": 5}"#);
        if let Some(t) = content_type {
            request = request.header("content-type", t);
        }
        expect_json_error(
            api.send(request).expect("request"),
            415,
            "unsupported-media-type",
        );
    }
    // DNS rebinding: the page's own name, resolved to the node.
    let rebound = api
        .request(Method::DELETE, "/v1/functions/c")
        .header("host", format!("evil.example:{port}"));
    expect_json_error(api.send(rebound).expect("request"), 403, "forbidden-host");
    // A component sent as anything but a component.
    let deploy = api
        .request(Method::PUT, "/v1/functions/d")
        .header("content-type", "application/x-www-form-urlencoded")
        .body(component("counter"));
    expect_json_error(
        api.send(deploy).expect("request"),
        415,
        "unsupported-media-type",
    );

    // Nothing happened.
    assert_eq!(api.ok("c", "get", Value::Null), json!({ "value": 0 }));
    assert_eq!(api.describe("c").expect_status(200).body["running"], true);
    api.describe("d").expect_error(404, "unknown-function");

    // The node's own names are fine, and so is an invocation that declares its JSON
    // (a charset aside) or has no body at all.
    let own = api
        .request(Method::GET, "/healthz")
        .header("host", format!("localhost:{port}"));
    api.send(own).expect("request").expect_status(200);
    let declared = api
        .request(Method::POST, "/v1/functions/c/increment")
        .header("content-type", "application/json; charset=utf-8")
        .body(r#"{"by": 2}"#);
    assert_eq!(
        api.send(declared).expect("request").expect_status(200).body,
        json!({ "value": 2 })
    );
    assert_eq!(
        api.post("/v1/functions/c/increment")
            .expect_status(200)
            .body,
        json!({ "value": 3 })
    );
}

#[test]
fn configured_hosts_and_origins_reach_the_api() {
    let node = NodeProcess::start_with(NodeOptions {
        config_toml: Some(
            "[http]\nallowed_hosts = [\"understudy.test\"]\nallowed_origins = [\"https://console.example\"]\n"
                .into(),
        ),
        ..Default::default()
    });
    let api = node.api();
    api.deploy_component("c", "counter");
    let named = api
        .request(Method::GET, "/v1/functions/c")
        .header("host", "understudy.test:8443");
    api.send(named).expect("request").expect_status(200);
    let console = api
        .request(Method::POST, "/v1/functions/c/increment")
        .header("origin", "https://console.example")
        .header("content-type", "application/json")
        .body("{}");
    api.send(console).expect("request").expect_status(200);
    let other = api
        .request(Method::POST, "/v1/functions/c/increment")
        .header("origin", "https://other.example")
        .header("content-type", "application/json")
        .body("{}");
    expect_json_error(api.send(other).expect("request"), 403, "forbidden-origin");
}

#[test]
fn every_error_is_json() {
    let node = NodeProcess::start();
    let api = node.api();
    api.deploy_component("c", "counter");

    let wrong_verb = api.send(api.request(Method::GET, "/v1/functions/c/increment"));
    let reply = expect_json_error(wrong_verb.expect("request"), 405, "method-not-allowed");
    assert!(
        reply.header("allow").is_some(),
        "405 without Allow: {reply:?}"
    );
    let wrong_verb = api.send(api.request(Method::PATCH, "/v1/functions/c"));
    expect_json_error(wrong_verb.expect("request"), 405, "method-not-allowed");

    for path in ["/nope", "/v1/functions/c/increment/more/parts", "/v1"] {
        let reply = api.send(api.request(Method::GET, path)).expect("request");
        expect_json_error(reply, 404, "not-found");
    }

    let bad_query = api
        .request(Method::PUT, "/v1/functions/d?replicas=lots")
        .header("content-type", "application/wasm")
        .body(component("counter"));
    let refused = expect_json_error(api.send(bad_query).expect("request"), 400, "bad-request");
    // Its body was never read: the client must not reuse the connection.
    assert_eq!(refused.header("connection"), Some("close"), "{refused:?}");

    // %FF decodes to a byte that is not UTF-8.
    let bad_path = api.send(api.request(Method::GET, "/v1/functions/%FF"));
    expect_json_error(bad_path.expect("request"), 400, "bad-request");
    let bad_path = api.send(
        api.request(Method::POST, "/v1/functions/c/%FF%FE")
            .header("content-type", "application/json")
            .body("{}"),
    );
    expect_json_error(bad_path.expect("request"), 400, "bad-request");
}

#[test]
fn output_that_is_not_json_is_a_500_naming_the_function_and_method() {
    let node = NodeProcess::start();
    let api = node.api();
    api.deploy_component("h", "hostile");

    let reply = api.invoke("h", "raw", &json!({ "text": "plain words" }));
    let reply = expect_json_error(reply, 500, "bad-output");
    assert!(
        reply.message().contains("`h`") && reply.message().contains("`raw`"),
        "the message names neither the function nor the method: {}",
        reply.text
    );

    assert_eq!(
        api.ok("h", "raw", json!({ "text": "[1, 2]" })),
        json!([1, 2])
    );
    // No output at all stands for null, as no input does.
    let empty = api
        .invoke("h", "raw", &json!({ "text": "" }))
        .expect_status(200);
    assert_eq!((empty.text.as_str(), empty.body), ("null", Value::Null));
}

/// The CLI sends each body with the media type the API requires.
#[test]
fn cli_deploys_and_invokes_with_the_right_media_types() {
    let node = NodeProcess::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("counter.wasm");
    std::fs::write(&file, component("counter")).expect("write the component");
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_understudy"))
            .args(args)
            .args(["--node", &node.api().url("")])
            .env_remove("UNDERSTUDY_ADMIN_TOKEN")
            .env_remove("UNDERSTUDY_INVOKE_TOKEN")
            .output()
            .expect("run the CLI");
        assert!(
            out.status.success(),
            "understudy {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    cli(&["deploy", "c", &file.display().to_string()]);
    let output = cli(&["invoke", "c", "increment", r#"{"by": 2}"#]);
    assert_eq!(output.trim(), r#"{"value":2}"#);
}
