//! The handler's shortcut for pools in maintenance, against `Proxy::handle`'s rules.

use super::*;

const CONFIG: &str = r#"
[[listeners]]
name = "public"
bind = ["127.0.0.1:0"]

[[routes]]
path_prefix = "/shop"
pool = "shop"

[[routes]]
path_prefix = "/"
pool = "blog"

[pools.blog]
maintenance = true
backends = []

[pools.shop]
backends = [{ name = "vm", address = "[::1]:9" }]
"#;

fn proxy(config: &str) -> Arc<Proxy> {
    let snapshot =
        crate::config::load_str(config, std::path::Path::new("/"), None).expect("config");
    let metrics = Metrics::new(prometheus::Registry::new()).expect("metrics");
    Proxy::new(Arc::new(snapshot), metrics)
}

fn fwd() -> Forwarded {
    Forwarded {
        peer: "2001:db8::7".parse().expect("ip"),
        peer_ip: HeaderValue::from_static("2001:db8::7"),
        trusted: false,
        proto: HeaderValue::from_static("http"),
        listener: "public".into(),
        tls: None,
        track: None,
    }
}

fn now(p: &Proxy, method: Method, path: &str) -> Option<Response<Body>> {
    let mut req = Request::new(ReqBody::Empty);
    *req.method_mut() = method;
    *req.uri_mut() = path.parse().expect("path");
    req.headers_mut()
        .insert(header::HOST, HeaderValue::from_static("example.org"));
    p.maintenance_now(&mut req, &fwd(), Verdict::default())
}

#[test]
fn the_shortcut_answers_a_pool_in_maintenance_and_counts_it_as_handle_does() {
    let p = proxy(CONFIG);
    let page = now(&p, Method::GET, "/post/1").expect("a pool in maintenance");
    assert_eq!(page.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(matches!(page.body(), Body::Page { body: Some(_), .. }));
    let post = now(&p, Method::POST, "/post/1").expect("a write too");
    assert_eq!(post.status(), StatusCode::SERVICE_UNAVAILABLE);
    let icon = now(&p, Method::GET, "/favicon.ico").expect("the favicon");
    assert_eq!(icon.headers()[X_LAUNCHDAY_ERROR.clone()], "manual");
    assert!(!matches!(icon.body(), Body::Page { .. }));
    let text = String::from_utf8(p.metrics().render()).expect("utf-8");
    for line in [
        "launchday_shed_total{class=\"read\",pool=\"blog\",reason=\"manual\"} 2",
        "launchday_shed_total{class=\"write\",pool=\"blog\",reason=\"manual\"} 1",
        "launchday_maintenance_pages_total{pool=\"blog\"} 2",
        "launchday_request_duration_seconds_count{pool=\"blog\"} 2",
        "launchday_maintenance_unique_visitors 1",
    ] {
        assert!(text.contains(line), "{line} missing in:\n{text}");
    }
}

#[test]
fn everything_else_takes_the_handler() {
    let p = proxy(CONFIG);
    assert!(
        now(&p, Method::GET, "/shop/cart").is_none(),
        "a pool with a back end"
    );
    assert!(now(&p, Method::GET, BEACON_PATH).is_none(), "the beacon");
    // Both framing headers: the checks refuse it, and `handle` answers the refusal.
    let mut req = Request::new(ReqBody::Empty);
    *req.uri_mut() = Uri::from_static("/post/1");
    let verdict = Verdict {
        content_length: true,
        transfer_encoding: true,
    };
    assert!(p.maintenance_now(&mut req, &fwd(), verdict).is_none());
    // An access log's line is written by `handle`.
    let dir = std::env::temp_dir().join(format!("launchday-now-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let logged = CONFIG.replace(
        "[[routes]]\npath_prefix = \"/shop\"",
        &format!(
            "[access_log]\npath = \"{}\"\n\n[[routes]]\npath_prefix = \"/shop\"",
            dir.join("access.log").display()
        ),
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let _in_rt = rt.enter();
    let p = proxy(&logged);
    assert!(p.live().access_log.is_some());
    assert!(
        now(&p, Method::GET, "/post/1").is_none(),
        "with an access log"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
