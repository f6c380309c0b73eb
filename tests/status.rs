//! The admin status page and API: what an operator reads on launch day.

mod common;

use bytes::Bytes;
use common::{config, fill, get, request, Backend, Balancer, Client};
use http::Method;
use http::StatusCode;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_and_api_show_pools_back_ends_weights_and_states() {
    let vm = Backend::start("vm").await;
    let pi = Backend::start("pi").await;
    let text = fill(
        &config(
            "",
            r#"
[[routes]]
pool = "blog"

[pools.blog]
queue_depth = 16
backends = [
  { name = "blog-vm-1", address = "{{vm}}", weight = 11 },
  { name = "raspberry-pi-3", address = "{{pi}}", weight = 0 },
]

[pools.forums]
maintenance = true
backends = []
"#,
        ),
        &[&vm, &pi],
    );
    let lb = Balancer::start(&text).await;

    let api = get(lb.admin, "/api/status").await;
    assert_eq!(api.status, StatusCode::OK);
    assert_eq!(
        api.header("content-type").as_deref(),
        Some("application/json")
    );
    let json: serde_json::Value = serde_json::from_slice(&api.body).expect("json");
    let pools = json["pools"].as_array().expect("pools");
    assert_eq!(pools.len(), 2);
    let blog = &pools[0];
    assert_eq!(blog["name"], "blog");
    assert_eq!(blog["queue_limit"], 16);
    assert_eq!(blog["maintenance"], false);
    let b = blog["backends"].as_array().expect("backends");
    assert_eq!(b[0]["name"], "blog-vm-1");
    assert_eq!(b[0]["weight"], 11);
    assert_eq!(b[0]["effective_weight"], 11.0);
    assert_eq!(b[0]["state"], "up");
    assert_eq!(b[1]["state"], "drained");
    assert_eq!(pools[1]["name"], "forums");
    assert_eq!(pools[1]["maintenance"], true);

    let page = get(lb.admin, "/status").await;
    assert_eq!(page.status, StatusCode::OK);
    assert_eq!(
        page.header("content-type").as_deref(),
        Some("text/html; charset=utf-8")
    );
    let html = page.text();
    assert!(
        html.contains("<meta http-equiv=refresh"),
        "refreshes itself"
    );
    assert!(html.contains("<h2>blog</h2>"), "{html}");
    assert!(html.contains("forums &mdash; in maintenance"), "{html}");
    // The whole share of new requests goes to the only serving back end.
    assert!(html.contains("width:100.0%"), "{html}");
    assert!(html.contains("<td class=drained>drained</td>"), "{html}");
    assert!(
        !html.contains("http://") && !html.contains("https://"),
        "no external assets"
    );

    // Never on a public listener: there /status is routed like any path.
    let public = get(lb.v4, "/status").await;
    assert_eq!(public.status, StatusCode::OK);
    assert_eq!(public.text(), "served by vm\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_requires_the_bearer_token_when_one_is_configured() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("admin.token"), "s3cret-token\n").expect("write");
    let text = r#"shutdown_grace = "1s"
[admin]
listen = ["127.0.0.1:0"]
token_file = "admin.token"

[[listeners]]
name = "public"
bind = ["127.0.0.1:0", "[::1]:0"]

[[routes]]
pool = "m"

[pools.m]
maintenance = true
backends = []
"#;
    let lb = Balancer::start_in(text, dir.path()).await;
    let mut c = Client::connect(lb.admin).await;
    let none = c.get("/metrics").await;
    assert_eq!(none.status, StatusCode::UNAUTHORIZED);
    assert_eq!(none.header("www-authenticate").as_deref(), Some("Bearer"));
    let wrong = c
        .send(request(
            Method::GET,
            "/metrics",
            &[("authorization", "Bearer nope")],
            Bytes::new(),
        ))
        .await;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
    let ok = c
        .send(request(
            Method::GET,
            "/metrics",
            &[("authorization", "Bearer s3cret-token")],
            Bytes::new(),
        ))
        .await;
    assert_eq!(ok.status, StatusCode::OK);
    assert!(ok.text().contains("# TYPE launchday_build_info gauge"));
}

#[test]
fn a_remote_admin_address_needs_allow_remote_and_a_token() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = |admin: &str| {
        format!(
            "[admin]\n{admin}\n[[listeners]]\nname = \"p\"\nbind = [\"127.0.0.1:0\"]\n\
             [[routes]]\npool = \"m\"\n[pools.m]\nmaintenance = true\nbackends = []\n"
        )
    };
    let errors = |admin: &str| -> Vec<String> {
        match launchday::config::load_str(&base(admin), dir.path(), None) {
            Ok(_) => Vec::new(),
            Err(e) => e.0.iter().map(ToString::to_string).collect(),
        }
    };
    let e = errors("listen = [\"0.0.0.0:0\"]");
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(
        e[0].starts_with("admin.listen[0]: 0.0.0.0:0 is not a loopback address"),
        "{e:?}"
    );
    let e = errors("listen = [\"0.0.0.0:0\"]\nallow_remote = true");
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(
        e[0].starts_with("admin.token_file: required with allow_remote = true"),
        "{e:?}"
    );
    std::fs::write(dir.path().join("t"), "tok").expect("write");
    assert!(errors("listen = [\"0.0.0.0:0\"]\nallow_remote = true\ntoken_file = \"t\"").is_empty());
    let e = errors("token_file = \"missing\"");
    assert!(e[0].starts_with("admin.token_file: "), "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_each_back_ends_traffic_share_next_to_its_configured_share() {
    let vm = Backend::start("vm").await;
    let pi = Backend::start("pi").await;
    let text = fill(
        &config(
            "",
            r#"
[[routes]]
pool = "blog"

[pools.blog]
backends = [
  { name = "vm", address = "{{vm}}", weight = 11 },
  { name = "pi", address = "{{pi}}", weight = 1 },
]
"#,
        ),
        &[&vm, &pi],
    );
    let lb = Balancer::start(&text).await;
    let mut c = Client::connect(lb.v4).await;
    // Traffic for about 2.5 s so that several one-second samples see it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(2500);
    let mut sent = 0;
    while std::time::Instant::now() < deadline && sent < 100_000 {
        for _ in 0..12 {
            assert_eq!(c.get("/").await.status, StatusCode::OK);
            sent += 1;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let api = get(lb.admin, "/api/status").await;
    let json: serde_json::Value = serde_json::from_slice(&api.body).expect("json");
    let pool = &json["pools"][0];
    let backends = pool["backends"].as_array().expect("backends");
    let pi_status = backends.iter().find(|b| b["name"] == "pi").expect("pi");
    let share = pi_status["traffic_share"].as_f64().expect("share");
    assert!(
        (share - 1.0 / 12.0).abs() < 0.02,
        "pi's traffic share {share}: {pool}"
    );
    let configured = pi_status["configured_share"].as_f64().expect("configured");
    assert!((configured - 1.0 / 12.0).abs() < 1e-9);
    assert!(
        pool["requests_per_second"].as_f64().expect("rate") > 10.0,
        "{pool}"
    );
    assert!(!pool["sparkline"].as_array().expect("sparkline").is_empty());
    let html = get(lb.admin, "/status").await.text();
    assert!(html.contains("<polyline"), "sparkline drawn");
    assert!(html.contains("8.3% configured"), "{html}");
}
