//! End-to-end: the real balancer, started in-process on port 0, proxies to in-process
//! back ends on `[::1]` by weight and route, rewrites headers, and counts everything.

mod common;

use bytes::Bytes;
use common::{
    closed_port, config, fill, metric, request, Backend, Balancer, Client, RawBackend, RawMode,
};
use http::{Method, StatusCode};

/// One pool `web` behind a catch-all route.
fn one_pool(backends: &str) -> String {
    config(
        "",
        &format!(
            r#"
[[routes]]
pool = "web"

[pools.web]
backends = [
{backends}
]
"#
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_11_to_1_send_exactly_every_12th_request_to_the_small_back_end() {
    let big = Backend::start("big").await;
    let small = Backend::start("small").await;
    let text = fill(
        &one_pool(
            r#"  { name = "big", address = "{{big}}", weight = 11, served_by = "big-vm" },
  { name = "small", address = "{{small}}", weight = 1, served_by = "raspberry-pi" },"#,
        ),
        &[&big, &small],
    );
    let lb = Balancer::start(&text).await;
    let mut v4 = Client::connect(lb.v4).await;
    let mut v6 = Client::connect(lb.v6).await;

    let mut small_at = Vec::new();
    for i in 0..1200usize {
        let client = if i % 2 == 0 { &mut v4 } else { &mut v6 };
        let r = client.get(&format!("/page/{i}")).await;
        assert_eq!(r.status, StatusCode::OK, "request {i}: {}", r.text());
        match r.header("x-served-by").as_deref() {
            Some("raspberry-pi") => {
                assert_eq!(r.text(), "served by small\n", "request {i}");
                small_at.push(i);
            }
            Some("big-vm") => assert_eq!(r.text(), "served by big\n", "request {i}"),
            other => panic!("request {i}: X-Served-By {other:?}"),
        }
    }

    assert_eq!(small_at.len(), 100, "small back end at {small_at:?}");
    let gaps: Vec<usize> = small_at.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(gaps.iter().all(|&g| g == 12), "gaps {gaps:?}");
    assert!(small_at[0] < 12, "first small pick at {}", small_at[0]);

    // The back ends' own view agrees, request by request.
    assert_eq!(small.count(), 100);
    assert_eq!(big.count(), 1100);
    let small_paths: Vec<String> = small
        .requests()
        .iter()
        .map(|s| s.uri.path().to_owned())
        .collect();
    let expected: Vec<String> = small_at.iter().map(|i| format!("/page/{i}")).collect();
    assert_eq!(small_paths, expected);
    // Requests alternated between the front ends: each back end saw every request
    // with the peer address of the front end it was sent to.
    for b in [&big, &small] {
        for s in b.requests() {
            let i: usize = s.uri.path()["/page/".len()..].parse().expect("index");
            let peer = if i % 2 == 0 { "127.0.0.1" } else { "::1" };
            assert_eq!(s.all("x-forwarded-for"), [peer], "{} request {i}", b.name());
        }
    }
    let m = lb.metrics().await;
    assert_eq!(
        metric(
            &m,
            r#"launchday_requests_total{backend="big",code="2xx",pool="web"}"#
        ),
        Some(1100.0)
    );
    assert_eq!(
        metric(
            &m,
            r#"launchday_requests_total{backend="small",code="2xx",pool="web"}"#
        ),
        Some(100.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_3_to_2_split_300_200_without_bursts() {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let text = fill(
        &one_pool(
            r#"  { name = "a", address = "{{a}}", weight = 3, served_by = "a" },
  { name = "b", address = "{{b}}", weight = 2, served_by = "b" },"#,
        ),
        &[&a, &b],
    );
    let lb = Balancer::start(&text).await;
    let mut c = Client::connect(lb.v6).await;
    let mut order = String::new();
    for i in 0..500 {
        let r = c.get("/").await;
        assert_eq!(r.status, StatusCode::OK, "request {i}");
        let by = r.header("x-served-by").expect("x-served-by");
        assert_eq!(r.header("x-backend"), Some(by.clone()), "request {i}");
        order.push_str(&by);
    }
    assert_eq!(order.matches('a').count(), 300);
    assert_eq!(order.matches('b').count(), 200);
    assert!(!order.contains("aaa"), "run of 3 a: {order}");
    assert!(!order.contains("bbb"), "run of 3 b: {order}");
    assert_eq!(a.count(), 300);
    assert_eq!(b.count(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_by_exact_host_wildcard_and_longest_prefix() {
    let blog = Backend::start("blog").await;
    let wild = Backend::start("wild").await;
    let forum = Backend::start("forum").await;
    let forum_admin = Backend::start("forum_admin").await;
    let rest = Backend::start("rest").await;
    let tables = r#"
[[routes]]
host = "blog.example.org"
pool = "blog"

[[routes]]
host = "*.example.org"
pool = "wild"

[[routes]]
path_prefix = "/forum"
pool = "forum"

[[routes]]
path_prefix = "/forum/admin"
pool = "forum_admin"

[[routes]]
pool = "rest"

[pools.blog]
backends = [{ name = "blog", address = "{{blog}}" }]

[pools.wild]
backends = [{ name = "wild", address = "{{wild}}" }]

[pools.forum]
backends = [{ name = "forum", address = "{{forum}}" }]

[pools.forum_admin]
backends = [{ name = "forum_admin", address = "{{forum_admin}}" }]

[pools.rest]
backends = [{ name = "rest", address = "{{rest}}" }]
"#;
    let text = fill(
        &config("", tables),
        &[&blog, &wild, &forum, &forum_admin, &rest],
    );
    let lb = Balancer::start(&text).await;
    let cases = [
        ("blog.example.org", "/", "blog"),
        ("BLOG.Example.ORG:8080", "/2026/launch", "blog"),
        ("blog.example.org.", "/", "blog"),
        // An exact host beats a host-less route with a longer prefix.
        ("blog.example.org", "/forum/admin/x", "blog"),
        ("www.example.org", "/", "wild"),
        ("WWW.EXAMPLE.ORG:80", "/forum", "wild"),
        ("a.b.example.org", "/x", "wild"),
        // A wildcard does not match the bare domain.
        ("example.org", "/", "rest"),
        ("example.org", "/forum/t/1", "forum"),
        ("other.net", "/forum", "forum"),
        ("other.net", "/forum/admin", "forum_admin"),
        ("other.net:8080", "/forum/admin/users", "forum_admin"),
        ("other.net", "/foru", "rest"),
        ("notexample.org", "/", "rest"),
        ("[::1]:8080", "/", "rest"),
    ];
    let mut c4 = Client::connect(lb.v4).await;
    let mut c6 = Client::connect(lb.v6).await;
    let all = [&blog, &wild, &forum, &forum_admin, &rest];
    for (i, (host, path, want)) in cases.iter().enumerate() {
        let c = if i % 2 == 0 { &mut c4 } else { &mut c6 };
        let before: Vec<usize> = all.iter().map(|b| b.count()).collect();
        let r = c.get_with(path, &[("host", host)]).await;
        assert_eq!(r.status, StatusCode::OK, "{host} {path}: {}", r.text());
        assert_eq!(
            r.header("x-backend").as_deref(),
            Some(*want),
            "{host} {path}"
        );
        for (b, n) in all.iter().zip(before) {
            let got = b.count() - n;
            let expected = usize::from(b.name() == *want);
            assert_eq!(got, expected, "{host} {path}: back end {}", b.name());
        }
        let seen = all
            .iter()
            .find(|b| b.name() == *want)
            .expect("back end")
            .last();
        // Host and path reach the back end as the client sent them.
        assert_eq!(seen.one("host").as_deref(), Some(*host));
        assert_eq!(seen.uri.path(), *path);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absolute_form_targets_route_by_authority_and_reach_the_back_end_in_origin_form() {
    let blog = Backend::start("blog").await;
    let rest = Backend::start("rest").await;
    let tables = r#"
[[routes]]
host = "blog.example.org"
pool = "blog"

[[routes]]
pool = "rest"

[pools.blog]
backends = [{ name = "blog", address = "{{blog}}" }]

[pools.rest]
backends = [{ name = "rest", address = "{{rest}}" }]
"#;
    let lb = Balancer::start(&fill(&config("", tables), &[&blog, &rest])).await;
    let mut c = Client::connect(lb.v4).await;
    // RFC 9112 §3.2.2: the authority of an absolute-form target wins over `Host`.
    let r = c
        .get_with(
            "http://Blog.Example.org:8080/2026/launch?x=1",
            &[("host", "other.net")],
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("x-backend").as_deref(), Some("blog"));
    assert_eq!(rest.count(), 0);
    let seen = blog.last();
    assert_eq!(seen.uri.to_string(), "/2026/launch?x=1");
    // ...and a proxy must replace `Host` with it, so the back end serves the host
    // the request was routed for.
    assert_eq!(seen.all("host"), ["Blog.Example.org:8080"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_route_is_a_local_404_counted_with_dashes() {
    let only = Backend::start("only").await;
    let tables = r#"
[[routes]]
host = "only.example.org"
pool = "only"

[pools.only]
backends = [{ name = "only", address = "{{only}}", served_by = "only" }]
"#;
    let lb = Balancer::start(&fill(&config("", tables), &[&only])).await;
    let mut c = Client::connect(lb.v4).await;
    let r = c.get_with("/", &[("host", "other.example.org")]).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.header("x-served-by").as_deref(), Some("launchday"));
    assert_eq!(r.header("x-launchday-error").as_deref(), Some("no_route"));
    assert_eq!(only.count(), 0);
    // The connection stays usable and a routed request still works.
    let ok = c.get_with("/", &[("host", "only.example.org")]).await;
    assert_eq!(ok.status, StatusCode::OK);
    assert_eq!(ok.header("x-served-by").as_deref(), Some("only"));
    assert_eq!(only.count(), 1);

    let m = lb.metrics().await;
    assert_eq!(
        metric(
            &m,
            r#"launchday_requests_total{backend="-",code="4xx",pool="-"}"#
        ),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            r#"launchday_requests_total{backend="only",code="2xx",pool="only"}"#
        ),
        Some(1.0),
        "{m}"
    );
}

const SPOOFED: [(&str, &str); 6] = [
    ("x-forwarded-for", "6.6.6.6"),
    ("x-forwarded-for", "7.7.7.7"),
    ("x-real-ip", "6.6.6.6"),
    ("forwarded", "for=6.6.6.6;proto=https"),
    ("x-forwarded-proto", "https"),
    ("host", "www.example.com:8080"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spoofed_forwarding_headers_are_replaced_by_the_peer() {
    let web = Backend::start("web").await;
    let text = fill(
        &one_pool(r#"  { name = "web", address = "{{web}}" },"#),
        &[&web],
    );
    let lb = Balancer::start(&text).await;
    for (front, peer) in [(lb.v4, "127.0.0.1"), (lb.v6, "::1")] {
        let r = Client::connect(front).await.get_with("/", &SPOOFED).await;
        assert_eq!(r.status, StatusCode::OK);
        let seen = web.last();
        assert_eq!(seen.all("x-forwarded-for"), [peer], "via {front}");
        assert_eq!(seen.all("x-real-ip"), [peer], "via {front}");
        assert_eq!(seen.all("forwarded"), Vec::<String>::new(), "via {front}");
        assert_eq!(seen.all("x-forwarded-proto"), ["http"], "via {front}");
        assert_eq!(seen.all("host"), ["www.example.com:8080"], "via {front}");
    }
    assert_eq!(web.count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trusted_proxy_keeps_its_chain_and_the_peer_is_appended() {
    let web = Backend::start("web").await;
    let tables = r#"
[[routes]]
pool = "web"

[pools.web]
backends = [{ name = "web", address = "{{web}}" }]
"#;
    let text = fill(
        &config(r#"trusted_proxies = ["127.0.0.1/32"]"#, tables),
        &[&web],
    );
    let lb = Balancer::start(&text).await;

    // 127.0.0.1 is trusted: its chain is kept, the peer appended.
    let r = Client::connect(lb.v4).await.get_with("/", &SPOOFED).await;
    assert_eq!(r.status, StatusCode::OK);
    let seen = web.last();
    assert_eq!(seen.all("x-forwarded-for"), ["6.6.6.6, 7.7.7.7, 127.0.0.1"]);
    assert_eq!(seen.all("x-real-ip"), ["6.6.6.6"]);
    assert_eq!(seen.all("forwarded"), ["for=6.6.6.6;proto=https"]);
    assert_eq!(seen.all("x-forwarded-proto"), ["http"]);
    assert_eq!(seen.all("host"), ["www.example.com:8080"]);

    // A single hop from a trusted proxy.
    let r = Client::connect(lb.v4)
        .await
        .get_with("/", &[("x-forwarded-for", "6.6.6.6")])
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(web.last().all("x-forwarded-for"), ["6.6.6.6, 127.0.0.1"]);

    // ::1 is not trusted: replaced.
    let r = Client::connect(lb.v6).await.get_with("/", &SPOOFED).await;
    assert_eq!(r.status, StatusCode::OK);
    let seen = web.last();
    assert_eq!(seen.all("x-forwarded-for"), ["::1"]);
    assert_eq!(seen.all("x-real-ip"), ["::1"]);
    assert_eq!(seen.all("forwarded"), Vec::<String>::new());
    assert_eq!(web.count(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_headers_do_not_cross_the_balancer() {
    let web = Backend::with_headers(
        "web",
        &[
            ("connection", "x-back-secret"),
            ("x-back-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("x-back-kept", "yes"),
        ],
    )
    .await;
    let text = fill(
        &one_pool(r#"  { name = "web", address = "{{web}}" },"#),
        &[&web],
    );
    let lb = Balancer::start(&text).await;
    let mut c = Client::connect(lb.v4).await;
    let r = c
        .get_with(
            "/",
            &[
                ("connection", "x-secret"),
                ("x-secret", "1"),
                ("keep-alive", "timeout=5"),
                ("te", "trailers"),
                ("proxy-connection", "keep-alive"),
                ("x-kept", "yes"),
            ],
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let seen = web.last();
    for name in [
        "connection",
        "x-secret",
        "keep-alive",
        "te",
        "proxy-connection",
    ] {
        assert_eq!(
            seen.all(name),
            Vec::<String>::new(),
            "{name} reached the back end"
        );
    }
    assert_eq!(seen.all("x-kept"), ["yes"]);
    // And the other way.
    for name in ["connection", "x-back-secret", "keep-alive"] {
        assert_eq!(
            r.all(name),
            Vec::<String>::new(),
            "{name} reached the client"
        );
    }
    assert_eq!(r.all("x-back-kept"), ["yes"]);
    // The client connection is still usable.
    assert_eq!(c.get("/again").await.status, StatusCode::OK);
    assert_eq!(web.count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn served_by_is_added_only_when_the_back_end_sends_none() {
    let own = Backend::with_served_by("own", "own-label").await;
    let plain = Backend::start("plain").await;
    let bare = Backend::start("bare").await;
    let tables = r#"
[[routes]]
path_prefix = "/own"
pool = "own"

[[routes]]
path_prefix = "/plain"
pool = "plain"

[[routes]]
pool = "bare"

[pools.own]
backends = [{ name = "own", address = "{{own}}", served_by = "config-label" }]

[pools.plain]
backends = [{ name = "plain", address = "{{plain}}", served_by = "plain-label" }]

[pools.bare]
backends = [{ name = "bare", address = "{{bare}}" }]
"#;
    let lb = Balancer::start(&fill(&config("", tables), &[&own, &plain, &bare])).await;
    let mut c = Client::connect(lb.v6).await;
    let r = c.get("/own").await;
    assert_eq!(r.header("x-backend").as_deref(), Some("own"));
    assert_eq!(r.all("x-served-by"), ["own-label"]);
    let r = c.get("/plain").await;
    assert_eq!(r.header("x-backend").as_deref(), Some("plain"));
    assert_eq!(r.all("x-served-by"), ["plain-label"]);
    let r = c.get("/other").await;
    assert_eq!(r.header("x-backend").as_deref(), Some("bare"));
    assert_eq!(r.all("x-served-by"), Vec::<String>::new());
    assert_eq!((own.count(), plain.count(), bare.count()), (1, 1, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connections_are_kept_alive_and_reused() {
    let web = Backend::start("web").await;
    let text = fill(
        &one_pool(r#"  { name = "web", address = "{{web}}" },"#),
        &[&web],
    );
    let lb = Balancer::start(&text).await;
    let mut c = Client::connect(lb.v4).await;
    for i in 0..200 {
        let r = c.get(&format!("/{i}")).await;
        assert_eq!(r.status, StatusCode::OK, "request {i}");
    }
    assert!(c.is_open());
    assert_eq!(web.count(), 200);
    let mut conns: Vec<u64> = web.requests().iter().map(|s| s.conn).collect();
    conns.dedup();
    assert!(
        web.connections() <= 2,
        "200 sequential requests took {} upstream connections",
        web.connections()
    );
    assert!(conns.len() <= 2, "requests switched connections: {conns:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodiless_answers_also_give_the_upstream_connection_back() {
    let web = Backend::start("web").await;
    let text = fill(
        &one_pool(r#"  { name = "web", address = "{{web}}" },"#),
        &[&web],
    );
    let lb = Balancer::start(&text).await;
    let mut c = Client::connect(lb.v6).await;
    for i in 0..100 {
        let method = if i % 2 == 0 {
            Method::HEAD
        } else {
            Method::GET
        };
        let r = c
            .send(request(method.clone(), &format!("/{i}"), &[], Bytes::new()))
            .await;
        assert_eq!(r.status, StatusCode::OK, "request {i}");
        let want = if method == Method::HEAD {
            ""
        } else {
            "served by web\n"
        };
        assert_eq!(r.text(), want, "request {i}");
    }
    assert_eq!(web.count(), 100);
    assert_eq!(web.requests()[0].method, Method::HEAD);
    assert!(
        web.connections() <= 2,
        "100 sequential requests took {} upstream connections",
        web.connections()
    );
    let m = lb.metrics().await;
    assert_eq!(
        metric(
            &m,
            r#"launchday_backend_in_flight{backend="web",pool="web"}"#
        ),
        Some(0.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_request_body_is_forwarded_intact() {
    let web = Backend::start("web").await;
    let text = fill(
        &one_pool(r#"  { name = "web", address = "{{web}}" },"#),
        &[&web],
    );
    let lb = Balancer::start(&text).await;
    let head = "POST /chunked HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
    let answer = common::raw(
        lb.v4,
        format!("{head}5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n").as_bytes(),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    assert!(answer.ends_with("served by web\n"), "{answer}");
    let seen = web.last();
    assert_eq!(seen.method, Method::POST);
    assert_eq!(&seen.body[..], b"hello world");
    // Re-framed by the balancer: one framing header, never both.
    assert!(
        seen.all("content-length").is_empty() || seen.all("transfer-encoding").is_empty(),
        "{:?}",
        seen.headers
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_back_end_that_closed_an_idle_connection_costs_no_request() {
    let closer = RawBackend::start(RawMode::AnswerThenClose);
    let tables = format!(
        r#"
[[routes]]
pool = "web"

[pools.web]
backends = [{{ name = "closer", address = "{}" }}]
"#,
        closer.addr
    );
    let lb = Balancer::start(&config("", &tables)).await;
    let mut c = Client::connect(lb.v4).await;
    for i in 0..50 {
        // The back end has closed the connection the balancer keeps for it, and the
        // FIN had a moment to arrive (without it this is the race of the next test).
        closer.wait_closed(i).await;
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        let r = c.get(&format!("/{i}")).await;
        assert_eq!(
            r.status,
            StatusCode::OK,
            "request {i}: {:?} {}",
            r.headers,
            r.text()
        );
        assert_eq!(r.text(), "ok\n");
    }
    assert_eq!(closer.heads(), 50, "a request was sent twice");
    assert_eq!(closer.answered(), 50);
    let m = lb.metrics().await;
    assert_eq!(
        metric(
            &m,
            r#"launchday_requests_total{backend="closer",code="2xx",pool="web"}"#
        ),
        Some(50.0)
    );
    assert_eq!(
        metric(
            &m,
            r#"launchday_requests_total{backend="closer",code="5xx",pool="web"}"#
        ),
        Some(0.0)
    );
}

/// The keep-alive race every proxy meets: the back end closes an idle connection
/// (its keep-alive timeout) just as the balancer sends the next request on it. The
/// request went out and no byte came back. A GET is safe to send again on a fresh
/// connection (nginx `proxy_next_upstream error`, HAProxy `retry-on conn-failure
/// empty-response`); a POST must not be sent twice and gets 502.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_get_on_a_reused_connection_that_dies_unanswered_is_retried_a_post_is_not() {
    let flaky = RawBackend::start(RawMode::DieOnSecond);
    let tables = format!(
        r#"
[[routes]]
pool = "web"

[pools.web]
backends = [{{ name = "flaky", address = "{}" }}]
"#,
        flaky.addr
    );
    let lb = Balancer::start(&config("", &tables)).await;
    let mut c = Client::connect(lb.v4).await;
    let r = c.get("/1").await;
    assert_eq!(r.status, StatusCode::OK);
    // Goes out on the kept connection, which the back end closes unanswered.
    let r = c.get("/2").await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "GET on a dead keep-alive connection: {:?} {}",
        r.headers,
        r.text()
    );
    assert_eq!((flaky.heads(), flaky.answered()), (3, 2));
    // The same for a POST: sent once, never again.
    let r = c
        .send(request(Method::POST, "/3", &[], Bytes::from_static(b"x")))
        .await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    assert_eq!(
        r.header("x-launchday-error").as_deref(),
        Some("upstream_failed_after_send")
    );
    assert_eq!(
        (flaky.heads(), flaky.answered()),
        (4, 2),
        "POST sent twice?"
    );
    let m = lb.metrics().await;
    assert_eq!(
        metric(
            &m,
            r#"launchday_requests_total{backend="flaky",code="2xx",pool="web"}"#
        ),
        Some(2.0)
    );
    assert_eq!(
        metric(
            &m,
            r#"launchday_requests_total{backend="flaky",code="5xx",pool="web"}"#
        ),
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_on_the_admin_listener_only() {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let text = fill(
        &one_pool(
            r#"  { name = "a", address = "{{a}}", weight = 3 },
  { name = "b", address = "{{b}}", weight = 1 },"#,
        ),
        &[&a, &b],
    );
    let lb = Balancer::start(&text).await;
    let mut c = Client::connect(lb.v4).await;
    for _ in 0..8 {
        assert_eq!(c.get("/").await.status, StatusCode::OK);
    }
    assert_eq!((a.count(), b.count()), (6, 2));

    // On the public listener /metrics is just a path, proxied like any other.
    for front in [lb.v4, lb.v6] {
        let r = common::get(front, "/metrics").await;
        assert_eq!(r.status, StatusCode::OK);
        assert!(r.text().starts_with("served by "), "{}", r.text());
        assert!(!r.text().contains("# TYPE"));
        let by = r.header("x-backend").expect("x-backend");
        let seen = if by == "a" { a.last() } else { b.last() };
        assert_eq!(seen.uri.path(), "/metrics");
    }
    assert_eq!(a.count() + b.count(), 10);

    let admin = common::get(lb.admin, "/metrics").await;
    assert_eq!(admin.status, StatusCode::OK);
    assert_eq!(
        admin.header("content-type").as_deref(),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    let m = admin.text();
    assert!(m.contains("# TYPE launchday_requests_total counter"), "{m}");
    assert!(m.contains("# HELP launchday_requests_total "), "{m}");
    assert!(m.contains("# TYPE launchday_backend_weight gauge"), "{m}");
    assert_eq!(
        metric(
            &m,
            r#"launchday_requests_total{backend="a",code="2xx",pool="web"}"#
        ),
        Some(a.count() as f64),
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            r#"launchday_requests_total{backend="b",code="2xx",pool="web"}"#
        ),
        Some(b.count() as f64),
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            r#"launchday_requests_total{backend="a",code="5xx",pool="web"}"#
        ),
        Some(0.0)
    );
    assert_eq!(
        metric(&m, r#"launchday_backend_weight{backend="a",pool="web"}"#),
        Some(3.0)
    );
    assert_eq!(
        metric(&m, r#"launchday_backend_weight{backend="b",pool="web"}"#),
        Some(1.0)
    );
    assert_eq!(
        metric(&m, r#"launchday_backend_in_flight{backend="a",pool="web"}"#),
        Some(0.0)
    );
    assert_eq!(
        metric(
            &m,
            r#"launchday_request_duration_seconds_count{pool="web"}"#
        ),
        Some(10.0)
    );
    // Nothing unrouted so far.
    assert_eq!(
        metric(
            &m,
            r#"launchday_requests_total{backend="-",code="4xx",pool="-"}"#
        ),
        Some(0.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_metrics_without_a_route_is_a_404_not_the_metrics() {
    let only = Backend::start("only").await;
    let tables = r#"
[[routes]]
host = "only.example.org"
pool = "only"

[pools.only]
backends = [{ name = "only", address = "{{only}}" }]
"#;
    let lb = Balancer::start(&fill(&config("", tables), &[&only])).await;
    for front in [lb.v4, lb.v6] {
        let r = common::get(front, "/metrics").await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "via {front}");
        assert_eq!(r.header("x-launchday-error").as_deref(), Some("no_route"));
        assert!(!r.text().contains("launchday_"), "{}", r.text());
    }
    assert_eq!(only.count(), 0);
    let m = lb.metrics().await;
    assert_eq!(
        metric(
            &m,
            r#"launchday_requests_total{backend="-",code="4xx",pool="-"}"#
        ),
        Some(2.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_connection_is_a_502_counted_for_that_back_end() {
    let dead = closed_port();
    let tables = format!(
        r#"
[[routes]]
pool = "gone"

[pools.gone]
backends = [{{ name = "dead", address = "{dead}", served_by = "dead" }}]
"#
    );
    let lb = Balancer::start(&config("", &tables)).await;
    let mut c = Client::connect(lb.v6).await;
    for _ in 0..2 {
        let r = c.get("/").await;
        assert_eq!(r.status, StatusCode::BAD_GATEWAY);
        assert_eq!(
            r.header("x-launchday-error").as_deref(),
            Some("upstream_connect_failed")
        );
        assert_eq!(r.header("x-served-by").as_deref(), Some("launchday"));
    }
    let m = lb.metrics().await;
    assert_eq!(
        metric(
            &m,
            r#"launchday_requests_total{backend="dead",code="5xx",pool="gone"}"#
        ),
        Some(2.0),
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            r#"launchday_requests_total{backend="-",code="5xx",pool="gone"}"#
        ),
        Some(0.0),
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            r#"launchday_backend_in_flight{backend="dead",pool="gone"}"#
        ),
        Some(0.0),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_weight_0_back_end_gets_nothing_and_bodies_are_forwarded_intact() {
    let live = Backend::start("live").await;
    let drained = Backend::start("drained").await;
    let text = fill(
        &one_pool(
            r#"  { name = "live", address = "{{live}}", weight = 1 },
  { name = "drained", address = "{{drained}}", weight = 0 },"#,
        ),
        &[&live, &drained],
    );
    let lb = Balancer::start(&text).await;
    let mut c = Client::connect(lb.v4).await;
    for i in 0..50 {
        let r = c.get(&format!("/{i}")).await;
        assert_eq!(
            r.header("x-backend").as_deref(),
            Some("live"),
            "request {i}"
        );
    }

    let body: Vec<u8> = (0..100 * 1024).map(|i| (i % 251) as u8).collect();
    let body = Bytes::from(body);
    let r = c
        .send(request(
            Method::POST,
            "/upload?x=1",
            &[("content-type", "application/octet-stream")],
            body.clone(),
        ))
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("x-backend").as_deref(), Some("live"));
    let seen = live.last();
    assert_eq!(seen.method, Method::POST);
    assert_eq!(seen.uri.to_string(), "/upload?x=1");
    assert_eq!(seen.all("content-length"), ["102400"]);
    assert_eq!(seen.all("content-type"), ["application/octet-stream"]);
    assert_eq!(seen.body.len(), body.len());
    assert!(seen.body == body, "the body arrived changed");

    assert_eq!(live.count(), 51);
    assert_eq!(drained.count(), 0);
    assert_eq!(drained.connections(), 0);
    let m = lb.metrics().await;
    assert_eq!(
        metric(
            &m,
            r#"launchday_backend_weight{backend="drained",pool="web"}"#
        ),
        Some(0.0)
    );
    assert_eq!(
        metric(
            &m,
            r#"launchday_requests_total{backend="drained",code="2xx",pool="web"}"#
        ),
        Some(0.0)
    );
    assert_eq!(
        metric(
            &m,
            r#"launchday_requests_total{backend="live",code="2xx",pool="web"}"#
        ),
        Some(51.0)
    );
}
