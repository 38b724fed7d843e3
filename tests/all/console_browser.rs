//! The live console (`GET /ui`) in a real browser: Debian's `chromium`, driven by
//! `chromedriver` over the WebDriver protocol (plain HTTP). A three-node cluster serves
//! the bank under load; the console is opened on the node holding the bank's primary,
//! and that node is killed with SIGKILL. The page must read on through another node and
//! show the node down, the new primary in a new epoch, the events on its timeline, and
//! the new primary's throughput. It saves a screenshot
//! (`console.png` in `CARGO_TARGET_TMPDIR`, `target/tmp/` by default).
//!
//! Needs `chromium` and `chromium-driver` (scripts/test.sh installs them as root); the
//! test fails, saying so, where they are missing, rather than pass without a browser.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::cluster_failover::{bank, deploy_filler, wait_for, Workload, ACCOUNTS, INITIAL};
use crate::cluster_form::{cluster_init, converged_leader, status};
use crate::support::{component, free_port, NodeOptions, NodeProcess};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// How long the page may take to show what the cluster did.
const PAGE_TIMEOUT: Duration = Duration::from_secs(30);

/// A headless chromium session through chromedriver, both ended on drop.
struct Browser {
    driver: Child,
    base: String,
    session: String,
    http: reqwest::blocking::Client,
    _profile: tempfile::TempDir,
}

impl Browser {
    fn start() -> Browser {
        for (path, package) in [(CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")] {
            assert!(
                Path::new(path).exists(),
                "{path} is missing: install {package} (scripts/test.sh does, as root: apt-get install chromium chromium-driver)"
            );
        }
        let port = free_port();
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let base = format!("http://127.0.0.1:{port}");
        let http = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .expect("an HTTP client");
        let started = Instant::now();
        while !http
            .get(format!("{base}/status"))
            .send()
            .is_ok_and(|r| r.status().is_success())
        {
            assert!(
                started.elapsed() < PAGE_TIMEOUT,
                "chromedriver never answered"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let profile = tempfile::tempdir().expect("a profile directory");
        let capabilities = json!({ "capabilities": { "alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--window-size=1560,1080", "--hide-scrollbars",
                    format!("--user-data-dir={}", profile.path().display()),
                ],
            },
        }}});
        let reply: Value = http
            .post(format!("{base}/session"))
            .json(&capabilities)
            .send()
            .and_then(|r| r.json())
            .expect("a WebDriver session");
        let session = reply["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("chromedriver refused a session: {reply}"))
            .to_owned();
        Browser {
            driver,
            base,
            session,
            http,
            _profile: profile,
        }
    }

    fn command(&self, path: &str, body: Value) -> Value {
        let url = format!("{}/session/{}{path}", self.base, self.session);
        let reply: Value = self
            .http
            .post(&url)
            .json(&body)
            .send()
            .and_then(|r| r.json())
            .unwrap_or_else(|e| panic!("WebDriver {path}: {e}"));
        assert!(
            reply["value"]["error"].is_null(),
            "WebDriver {path} failed: {reply}"
        );
        reply["value"].clone()
    }

    /// Type `text` into the page's open `prompt()` and accept it.
    fn answer_prompt(&self, text: &str) {
        let started = Instant::now();
        loop {
            let url = format!("{}/session/{}/alert/text", self.base, self.session);
            let open: Value = self
                .http
                .get(&url)
                .send()
                .and_then(|r| r.json())
                .expect("WebDriver alert");
            if open["value"]["error"].is_null() {
                break;
            }
            assert!(started.elapsed() < PAGE_TIMEOUT, "no prompt opened: {open}");
            std::thread::sleep(Duration::from_millis(50));
        }
        self.command("/alert/text", json!({ "text": text }));
        self.command("/alert/accept", json!({}));
    }

    /// Click the element `selector` names (it must be there). The click runs after the
    /// script returns: a click that opens a `prompt()` would hold the script otherwise.
    fn click(&self, selector: &str) {
        let script = format!(
            "const e = document.querySelector({}); if (!e) return false; setTimeout(() => e.click(), 0); return true;",
            Value::String(selector.to_owned())
        );
        assert_eq!(
            self.eval(&script),
            Value::Bool(true),
            "nothing on the page matches {selector}"
        );
    }

    fn open(&self, url: &str) {
        self.command("/url", json!({ "url": url }));
    }

    /// Run `script` (a function body) in the page; its return value.
    fn eval(&self, script: &str) -> Value {
        self.command("/execute/sync", json!({ "script": script, "args": [] }))
    }

    fn screenshot(&self, to: &Path) {
        let url = format!("{}/session/{}/screenshot", self.base, self.session);
        let reply: Value = self
            .http
            .get(url)
            .send()
            .and_then(|r| r.json())
            .expect("a screenshot");
        let png = base64::Engine::decode(
            &base64::engine::general_purpose::STANDARD,
            reply["value"].as_str().expect("a base64 PNG"),
        )
        .expect("a base64 PNG");
        std::fs::write(to, png).expect("write the screenshot");
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self
            .http
            .delete(format!("{}/session/{}", self.base, self.session))
            .send();
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// What the page shows, read from its DOM.
const READ_PAGE: &str = r#"
const q = (s) => document.querySelector(s);
const bank = q('#functions tr[data-function="bank"]');
const nodes = {};
for (const r of document.querySelectorAll('#nodes tr[data-node]')) {
  nodes[r.dataset.node] = { health: r.dataset.health, link: r.dataset.link };
}
return {
  view: q('#view').dataset.node,
  self_lost: q('#view').dataset.selfLost,
  banner: q('#banner').style.display === 'block' ? q('#banner').textContent : '',
  primary: bank ? bank.dataset.primary : null,
  epoch: bank ? Number(bank.dataset.epoch) : null,
  tps: bank ? Number(bank.dataset.tps) : null,
  nodes,
  timeline: [...document.querySelectorAll('#timeline li[data-kind]')]
    .map((li) => li.dataset.kind + ':' + li.dataset.node),
};
"#;

/// Wait until the page shows what `done` wants: the last reading, as `Err` if it never
/// did within `PAGE_TIMEOUT`.
fn try_wait_for_page(browser: &Browser, done: impl Fn(&Value) -> bool) -> Result<Value, Value> {
    let started = Instant::now();
    loop {
        let page = browser.eval(READ_PAGE);
        if done(&page) {
            return Ok(page);
        }
        if started.elapsed() >= PAGE_TIMEOUT {
            return Err(page);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Wait until the page shows what `done` wants; the last reading.
fn wait_for_page(browser: &Browser, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    try_wait_for_page(browser, done)
        .unwrap_or_else(|page| panic!("the console never showed {what}; it shows: {page:#}"))
}

/// Three members whose configs name each other's HTTP addresses (the console finds the
/// other nodes through them).
fn start_cluster(certs: &Path) -> Vec<NodeProcess> {
    start_cluster_with_token(certs, None)
}

/// The same, each node taking `admin_token` for its admin routes.
fn start_cluster_with_token(certs: &Path, admin_token: Option<&str>) -> Vec<NodeProcess> {
    let members: Vec<(u64, u16, u16)> = (1..=3).map(|id| (id, free_port(), free_port())).collect();
    let list: Vec<String> = members
        .iter()
        .map(|(id, peer, http)| {
            format!("{{ id = {id}, peer_addr = \"127.0.0.1:{peer}\", http_addr = \"127.0.0.1:{http}\" }}")
        })
        .collect();
    members
        .iter()
        .map(|(id, peer, http)| {
            let config = format!(
                "[cluster]\nnode_id = {id}\npeer_listen = \"127.0.0.1:{peer}\"\ncerts_dir = \"{}\"\nmembers = [{}]\n",
                certs.display(),
                list.join(", ")
            );
            NodeProcess::start_with(NodeOptions {
                config_toml: Some(config),
                port: Some(*http),
                admin_token: admin_token.map(str::to_owned),
                ..NodeOptions::default()
            })
        })
        .collect()
}

fn screenshot_path() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("console.png")
}

/// Open the console on the node that holds the bank's primary now, and wait until the
/// page shows it as such with every node's stream live; that node and the bank's epoch
/// as the page shows it. A busy machine can fail a node over on its own before the
/// page settles: then the console is opened again on the new primary.
fn open_on_primary(browser: &Browser, nodes: &[NodeProcess]) -> (u64, u64) {
    const ATTEMPTS: usize = 3;
    for attempt in 1..=ATTEMPTS {
        let primary = bank(&nodes[0])["primary"]
            .as_u64()
            .or_else(|| bank(&nodes[1])["primary"].as_u64())
            .expect("the bank's primary");
        browser.open(&nodes[(primary - 1) as usize].api().url("/ui"));
        let id = primary.to_string();
        let settled = try_wait_for_page(browser, |p| {
            p["view"] == id.as_str()
                && (1..=3).all(|n| p["nodes"][n.to_string()]["link"] == "live")
                && p["primary"].as_str().is_some_and(|p| !p.is_empty())
        });
        match settled {
            Ok(page) if page["primary"] == id.as_str() => {
                return (primary, page["epoch"].as_u64().expect("an epoch"));
            }
            Ok(page) | Err(page) => println!(
                "attempt {attempt}: the bank's primary is no longer node {primary}: {page:#}"
            ),
        }
    }
    panic!("the bank's primary kept moving: {ATTEMPTS} attempts");
}

#[test]
fn console_in_a_browser_follows_a_killed_primary_through_another_node() {
    let started = Instant::now();
    let certs = tempfile::tempdir().expect("tempdir");
    cluster_init(certs.path(), &[1, 2, 3]);
    let mut nodes = start_cluster(certs.path());
    let master = converged_leader(&nodes.iter().collect::<Vec<_>>());
    deploy_filler(&nodes[0]);
    nodes[0]
        .api()
        .put_bytes("/v1/functions/bank?replicas=3", component("bank"))
        .expect_status(201);
    for account in ACCOUNTS {
        nodes[0].api().ok(
            "bank",
            "open",
            json!({ "account": account, "initial": INITIAL }),
        );
    }
    let browser = Browser::start();
    let (primary, epoch_before) = open_on_primary(&browser, &nodes);
    println!("master {master}, bank's primary {primary}: the console is open on node {primary}");
    let survivors: Vec<usize> = (0..3).filter(|i| *i as u64 + 1 != primary).collect();
    let load = Workload::start(
        survivors.iter().map(|i| nodes[*i].api().clone()).collect(),
        2,
    );
    wait_for("transfers before the kill", || load.acked() >= 20);
    // A few seconds of the old primary's throughput on the chart, for the screenshot.
    std::thread::sleep(Duration::from_secs(3));

    nodes[(primary - 1) as usize].kill9();
    let acked_at_kill = load.acked();
    let id = |n: u64| n.to_string();
    let page = wait_for_page(&browser, "the failover", |p| {
        let timeline: Vec<&str> = p["timeline"]
            .as_array()
            .map(|t| t.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        p["self_lost"] == "true"
            && p["view"] != id(primary)
            && p["nodes"][id(primary)]["health"] == "down"
            && p["nodes"][id(primary)]["link"] == "lost"
            && p["primary"]
                .as_str()
                .is_some_and(|p| !p.is_empty() && p != id(primary))
            && p["epoch"].as_u64().is_some_and(|e| e > epoch_before)
            && timeline.contains(&format!("node-down:{primary}").as_str())
            && timeline.iter().any(|k| k.starts_with("promoted:"))
    });
    println!("the console shows: {page:#}");
    // What it shows is what the cluster says.
    let truth = bank(&nodes[survivors[0]]);
    assert_eq!(
        page["primary"],
        id(truth["primary"].as_u64().expect("primary"))
    );
    assert_eq!(page["epoch"], truth["epoch"]);
    assert!(
        page["banner"]
            .as_str()
            .is_some_and(|b| b.contains("unreachable")),
        "the page says its node is gone: {page}"
    );
    // The load goes on through the new primary, and the page draws its throughput.
    wait_for("transfers after the kill", || {
        load.acked() >= acked_at_kill + 20
    });
    wait_for_page(&browser, "the new primary's throughput", |p| {
        p["tps"].as_u64().is_some_and(|n| n > 0) && p["primary"] == page["primary"]
    });

    // Let the chart gather a few seconds of the new primary's throughput.
    std::thread::sleep(Duration::from_secs(3));
    let shot = screenshot_path();
    browser.screenshot(&shot);
    println!("screenshot: {}", shot.display());
    load.finish();
    println!("the test took {:?}", started.elapsed());
}

/// The admin controls as the page shows them, and what it says of the bank and node 3.
const READ_ADMIN: &str = r#"
const q = (s) => document.querySelector(s);
const bank = q('#functions tr[data-function="bank"]');
const three = q('#nodes tr[data-node="3"]');
const toast = q('#toast');
return {
  token: q('#token').textContent,
  buttons: [...document.querySelectorAll('button[data-act]')]
    .filter((b) => b.offsetParent !== null)
    .map((b) => b.dataset.act + ':' + (b.dataset.fn || b.dataset.id)),
  bank: bank ? bank.children[2].textContent.trim() : null,
  node3: three ? three.children[2].textContent.trim() : null,
  toast: toast.style.display === 'block' ? toast.textContent : '',
};
"#;

/// The admin buttons in a browser: without the token the page offers none; given the
/// token through the page's own prompt, Stop stops the bank (it refuses invocations),
/// Start runs it again and Drain drains node 3, each as the cluster itself then reports;
/// with a wrong token the node refuses and the page says why, and nothing changes.
#[test]
fn console_admin_buttons_stop_and_start_a_function_and_drain_a_node() {
    const TOKEN: &str = "console-admin-secret";
    let certs = tempfile::tempdir().expect("tempdir");
    cluster_init(certs.path(), &[1, 2, 3]);
    let nodes = start_cluster_with_token(certs.path(), Some(TOKEN));
    converged_leader(&nodes.iter().collect::<Vec<_>>());
    let admin = nodes[0].api().with_token(TOKEN);
    admin
        .put_bytes("/v1/functions/bank?replicas=2", component("bank"))
        .expect_status(201);
    wait_for("the bank's primary", || {
        bank(&nodes[0])["primary"].as_u64().is_some()
    });
    let browser = Browser::start();
    browser.open(&nodes[0].api().url("/ui"));
    let read = || browser.eval(READ_ADMIN);
    let wait = |what: &str, done: &dyn Fn(&Value) -> bool| {
        let started = Instant::now();
        loop {
            let page = read();
            if done(&page) {
                return page;
            }
            assert!(
                started.elapsed() < PAGE_TIMEOUT,
                "the console never showed {what}; it shows: {page:#}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let has = |p: &Value, button: &str| {
        p["buttons"]
            .as_array()
            .is_some_and(|b| b.iter().any(|x| x == button))
    };
    // Read-only until a token is given.
    let page = wait("the bank, running", &|p| p["bank"] == "running");
    assert_eq!(
        page["buttons"],
        json!([]),
        "no admin buttons without a token: {page}"
    );

    // A wrong token: the buttons appear, and the node refuses what they ask.
    browser.click("#token");
    browser.answer_prompt("not-the-token");
    wait("the stop button", &|p| has(p, "stop:bank"));
    browser.click(r#"button[data-act="stop"][data-fn="bank"]"#);
    let page = wait("the refusal", &|p| {
        p["toast"]
            .as_str()
            .is_some_and(|t| t.starts_with("stop:") && t != "stop: done")
    });
    println!("with a wrong token: {page:#}");
    assert_eq!(page["bank"], "running");
    assert_eq!(
        bank(&nodes[0])["running"],
        json!(true),
        "{}",
        bank(&nodes[0])
    );

    // The right token: stop, start, drain.
    browser.click("#token");
    browser.answer_prompt(TOKEN);
    wait("the admin mode", &|p| {
        p["token"] == "Admin: on" && has(p, "stop:bank")
    });
    browser.click(r#"button[data-act="stop"][data-fn="bank"]"#);
    wait("the bank stopped", &|p| {
        p["bank"] == "stopped" && has(p, "start:bank")
    });
    assert_eq!(
        bank(&nodes[1])["running"],
        json!(false),
        "{}",
        bank(&nodes[1])
    );
    let refused = nodes[1]
        .api()
        .invoke("bank", "open", &json!({ "account": "a", "initial": 1 }));
    assert_eq!(
        refused.status, 503,
        "a stopped function refuses: {}",
        refused.text
    );
    browser.click(r#"button[data-act="start"][data-fn="bank"]"#);
    wait("the bank running again", &|p| {
        p["bank"] == "running" && has(p, "stop:bank")
    });
    nodes[1]
        .api()
        .ok("bank", "open", json!({ "account": "a", "initial": 1 }));

    wait("node 3's drain button", &|p| has(p, "drain:3"));
    browser.click(r#"button[data-act="drain"][data-id="3"]"#);
    let page = wait("node 3 draining", &|p| {
        p["node3"].as_str().is_some_and(|s| s.contains("draining")) && !has(p, "drain:3")
    });
    println!("after the drain: {page:#}");
    let members = status(&nodes[0]).expect("the cluster's status");
    let three = members["nodes"]
        .as_array()
        .and_then(|n| n.iter().find(|n| n["id"] == 3))
        .cloned()
        .expect("node 3 in the status");
    assert_ne!(
        three["status"], "active",
        "the cluster drains node 3: {three}"
    );
}
