//! The access log: both formats written by the real balancer.

mod common;

use std::time::{Duration, Instant};

use common::{fill, Backend, Balancer, Client};
use http::StatusCode;

fn config(format: &str) -> String {
    format!(
        r#"shutdown_grace = "1s"
[admin]
listen = ["127.0.0.1:0"]

[[listeners]]
name = "public"
bind = ["127.0.0.1:0", "[::1]:0"]

[access_log]
path = "access.log"
format = "{format}"

[[routes]]
path_prefix = "/"
pool = "blog"

[[routes]]
path_prefix = "/closed/"
pool = "closed"

[pools.blog]
backends = [{{ name = "vm", address = "{{{{vm}}}}" }}]

[pools.closed]
maintenance = true
backends = []
"#
    )
}

/// The log's lines once there are `n` of them (bounded wait: the writer is async).
async fn lines(path: &std::path::Path, n: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<String> = text.lines().map(str::to_owned).collect();
        if lines.len() >= n || Instant::now() > deadline {
            return lines;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_lines_carry_pool_back_end_status_and_shed_reason() {
    let vm = Backend::start("vm").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let lb = Balancer::start_in(&fill(&config("json"), &[&vm]), dir.path()).await;
    let mut c = Client::connect(lb.v4).await;
    assert_eq!(c.get("/2026/launch?x=1").await.status, StatusCode::OK);
    assert_eq!(
        c.get("/closed/page").await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    let lines = lines(&dir.path().join("access.log"), 2).await;
    assert_eq!(lines.len(), 2, "{lines:?}");
    let ok: serde_json::Value = serde_json::from_str(&lines[0]).expect("json");
    assert_eq!(ok["status"], 200);
    assert_eq!(ok["method"], "GET");
    assert_eq!(ok["target"], "/2026/launch?x=1");
    assert_eq!(ok["client"], "127.0.0.1");
    assert_eq!(ok["pool"], "blog");
    assert_eq!(ok["backend"], "vm");
    assert!(ok["upstream_seconds"].as_f64().is_some());
    assert_eq!(ok["shed"], serde_json::Value::Null);
    let shed: serde_json::Value = serde_json::from_str(&lines[1]).expect("json");
    assert_eq!(shed["status"], 503);
    assert_eq!(shed["pool"], "closed");
    assert_eq!(shed["shed"], "manual");
    assert_eq!(shed["backend"], serde_json::Value::Null);
    assert!(shed["bytes"].as_u64().is_some_and(|b| b > 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn combined_lines_are_the_usual_format_plus_launchday_fields() {
    let vm = Backend::start("vm").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let lb = Balancer::start_in(&fill(&config("combined"), &[&vm]), dir.path()).await;
    let mut c = Client::connect(lb.v6).await;
    assert_eq!(c.get("/a").await.status, StatusCode::OK);
    assert_eq!(
        c.get("/closed/b").await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    let lines = lines(&dir.path().join("access.log"), 2).await;
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(lines[0].starts_with("::1 - - ["), "{}", lines[0]);
    assert!(
        lines[0].contains("] \"GET /a HTTP/1.1\" 200 "),
        "{}",
        lines[0]
    );
    assert!(
        lines[0].contains(" pool=blog backend=vm upstream="),
        "{}",
        lines[0]
    );
    assert!(lines[0].contains(" shed=- time="), "{}", lines[0]);
    assert!(
        lines[1].contains("\"GET /closed/b HTTP/1.1\" 503 "),
        "{}",
        lines[1]
    );
    assert!(
        lines[1].contains(" pool=closed backend=- upstream=- "),
        "{}",
        lines[1]
    );
    assert!(lines[1].contains(" shed=manual "), "{}", lines[1]);
}

#[test]
fn a_bad_format_or_directory_is_a_config_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = config("xml").replace("{{vm}}", "[::1]:1");
    let e = launchday::config::load_str(&text, dir.path(), None).expect_err("bad format");
    assert!(
        e.0.iter().any(|x| x
            .to_string()
            .starts_with("access_log.format: unknown format \"xml\"")),
        "{e}"
    );
    let text = config("json")
        .replace("{{vm}}", "[::1]:1")
        .replace("access.log", "no/such/dir/access.log");
    let e = launchday::config::load_str(&text, dir.path(), None).expect_err("bad dir");
    assert!(e.0.iter().any(|x| x.path == "access_log.path"), "{e}");
}
