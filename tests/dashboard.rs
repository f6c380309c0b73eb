//! The Grafana dashboard (`grafana/launchday.json`) against the real balancer: every
//! metric a panel, the template variable or an annotation queries must be a family the
//! balancer actually exports, so the dashboard can never show "No data" because of a
//! renamed or misspelt metric. Also checks that the dashboard is importable with any
//! Prometheus data source (`__inputs` with `DS_PROMETHEUS`, used everywhere).
//!
//! The real balancer runs in-process on port 0, the back end on `[::1]:0`.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::{config, fill, get, metric, Backend, Balancer, Client, STEP};
use http::StatusCode;
use serde_json::Value;

const DASHBOARD: &str = include_str!("../grafana/launchday.json");
const DATASOURCE: &str = "${DS_PROMETHEUS}";
const BEACON: &str = "/.well-known/launchday/beacon";

/// Families the dashboard must show (one panel or more each).
const EXPECTED: [&str; 18] = [
    "launchday_requests_total",
    "launchday_request_duration_seconds",
    "launchday_backend_weight",
    "launchday_backend_in_flight",
    "launchday_shed_total",
    "launchday_queue_depth",
    "launchday_queue_wait_seconds",
    "launchday_maintenance_pages_total",
    "launchday_maintenance_beacons_total",
    "launchday_maintenance_unique_visitors",
    "launchday_backend_up",
    "launchday_health_checks_total",
    "launchday_retries_total",
    "launchday_config_reloads_total",
    "launchday_config_last_reload_success_timestamp_seconds",
    "launchday_connections",
    "launchday_connections_parked",
    "launchday_connections_refused_total",
];

fn dashboard() -> Value {
    serde_json::from_str(DASHBOARD).expect("grafana/launchday.json is valid JSON")
}

/// Every panel, rows' nested panels included (a collapsed row holds its panels).
fn panels(dash: &Value) -> Vec<&Value> {
    fn walk<'a>(list: &'a Value, out: &mut Vec<&'a Value>) {
        for p in list.as_array().into_iter().flatten() {
            out.push(p);
            if let Some(nested) = p.get("panels") {
                walk(nested, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(&dash["panels"], &mut out);
    out
}

/// Every PromQL query of the dashboard, with where it is: panel targets, template
/// variables, annotations.
fn queries(dash: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for p in panels(dash) {
        let title = p["title"].as_str().unwrap_or("?");
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().unwrap_or_default();
            out.push((
                format!("panel {title:?} target {}", t["refId"]),
                expr.into(),
            ));
        }
    }
    for v in dash["templating"]["list"].as_array().into_iter().flatten() {
        let q = match &v["query"] {
            Value::String(s) => s.clone(),
            q => q["query"].as_str().unwrap_or_default().to_owned(),
        };
        out.push((format!("variable {}", v["name"]), q));
    }
    for a in dash["annotations"]["list"].as_array().into_iter().flatten() {
        if let Some(expr) = a["expr"].as_str() {
            out.push((format!("annotation {}", a["name"]), expr.into()));
        }
    }
    out
}

/// The metric names in a PromQL expression: tokens `launchday_[a-z_]+` that are not
/// part of a longer identifier.
fn metric_names(expr: &str) -> Vec<String> {
    let bytes = expr.as_bytes();
    let mut names = Vec::new();
    let mut from = 0;
    while let Some(i) = expr[from..].find("launchday_").map(|i| i + from) {
        let glued = i > 0 && (bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
        let end = expr[i..]
            .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
            .map_or(expr.len(), |n| i + n);
        if !glued && end > i + "launchday_".len() {
            names.push(expr[i..end].to_owned());
        }
        from = end.max(i + 1);
    }
    names
}

/// `# TYPE name type` lines of a scrape: name → type.
fn families(scrape: &str) -> BTreeMap<String, String> {
    scrape
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| {
            let (name, kind) = l.split_once(' ')?;
            Some((name.to_owned(), kind.trim().to_owned()))
        })
        .collect()
}

/// The family a queried series belongs to, if the scrape has it: the name itself, or
/// for `_bucket`/`_sum`/`_count` the histogram (or summary) it was cut from.
fn family_of(name: &str, families: &BTreeMap<String, String>) -> Option<String> {
    if families.contains_key(name) {
        return Some(name.to_owned());
    }
    ["_bucket", "_sum", "_count"].iter().find_map(|suffix| {
        let base = name.strip_suffix(suffix)?;
        let kind = families.get(base)?;
        let fits = kind == "histogram" || (kind == "summary" && *suffix != "_bucket");
        fits.then(|| base.to_owned())
    })
}

#[test]
fn metric_names_are_whole_tokens() {
    let expr = r#"histogram_quantile(0.99, sum by (pool, le) (rate(launchday_queue_wait_seconds_bucket{pool=~"$pool"}[1m]))) / ignoring(backend) group_left launchday_backend_weight"#;
    assert_eq!(
        metric_names(expr),
        [
            "launchday_queue_wait_seconds_bucket",
            "launchday_backend_weight"
        ]
    );
    assert!(metric_names("my_launchday_thing + launchday_").is_empty());
    let fam: BTreeMap<String, String> = [
        ("launchday_h".to_owned(), "histogram".to_owned()),
        ("launchday_c_count".to_owned(), "counter".to_owned()),
    ]
    .into();
    assert_eq!(
        family_of("launchday_h_bucket", &fam).as_deref(),
        Some("launchday_h")
    );
    assert_eq!(
        family_of("launchday_c_count", &fam).as_deref(),
        Some("launchday_c_count")
    );
    assert_eq!(family_of("launchday_c", &fam), None);
    assert_eq!(family_of("launchday_x_bucket", &fam), None);
}

#[test]
fn dashboard_is_importable_with_any_prometheus() {
    let dash = dashboard();
    let inputs = dash["__inputs"].as_array().expect("__inputs");
    assert!(
        inputs.iter().any(|i| i["name"] == "DS_PROMETHEUS"
            && i["type"] == "datasource"
            && i["pluginId"] == "prometheus"),
        "no DS_PROMETHEUS prometheus data-source input: {inputs:?}"
    );
    assert!(dash["schemaVersion"].as_u64().expect("schemaVersion") >= 36);
    assert!(
        dash["id"].is_null(),
        "an exported dashboard has no database id"
    );

    let is_ours = |ds: &Value| ds["uid"] == DATASOURCE && ds["type"] == "prometheus";
    let mut ids = BTreeSet::new();
    let mut targets = 0;
    for p in panels(&dash) {
        let title = p["title"].as_str().expect("every panel has a title");
        let id = p["id"].as_u64().expect("every panel has an id");
        assert!(ids.insert(id), "panel id {id} used twice");
        if p["type"] == "row" {
            continue;
        }
        assert!(
            matches!(p["type"].as_str(), Some("timeseries" | "stat")),
            "panel {title:?}: type {}",
            p["type"]
        );
        assert!(is_ours(&p["datasource"]), "panel {title:?}: datasource");
        let ts = p["targets"].as_array().expect("targets");
        assert!(!ts.is_empty(), "panel {title:?} has no targets");
        for t in ts {
            targets += 1;
            assert!(
                is_ours(&t["datasource"]),
                "panel {title:?} target {}: datasource {}",
                t["refId"],
                t["datasource"]
            );
            let expr = t["expr"].as_str().unwrap_or_default();
            assert!(
                !metric_names(expr).is_empty(),
                "panel {title:?} target {}: no launchday metric in {expr:?}",
                t["refId"]
            );
        }
    }
    assert!(targets >= EXPECTED.len(), "only {targets} targets");

    let vars = dash["templating"]["list"].as_array().expect("templating");
    let pool = vars
        .iter()
        .find(|v| v["name"] == "pool")
        .expect("a `pool` variable");
    assert!(is_ours(&pool["datasource"]), "variable pool: datasource");
    let q = pool["query"]["query"].as_str().or(pool["query"].as_str());
    assert_eq!(q, Some("label_values(launchday_requests_total, pool)"));
    for a in dash["annotations"]["list"].as_array().into_iter().flatten() {
        let builtin = a["builtIn"] == 1;
        assert!(
            builtin || is_ours(&a["datasource"]),
            "annotation {}: datasource",
            a["name"]
        );
    }
    // No data-source uid but the input anywhere (a leftover uid from the exporting
    // Grafana would break the import elsewhere).
    let mut stack = vec![&dash];
    while let Some(v) = stack.pop() {
        match v {
            Value::Object(m) => {
                if let Some(ds) = m.get("datasource").filter(|d| d.is_object()) {
                    let uid = ds["uid"].as_str().unwrap_or_default();
                    assert!(
                        uid == DATASOURCE || uid == "-- Grafana --",
                        "datasource uid {uid:?}"
                    );
                }
                stack.extend(m.values());
            }
            Value::Array(a) => stack.extend(a),
            _ => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboard_queries_is_exported() {
    let web = Backend::start("web1").await;
    let tables = fill(
        r#"
[[routes]]
path_prefix = "/closed/"
pool = "closed"

[[routes]]
pool = "web"

[pools.web]
queue_depth = 8
queue_timeout = "1s"
backends = [
  { name = "web1", address = "{{web1}}", weight = 3, max_connections = 4 },
]

[pools.web.health_check]
path = "/health"
interval = "100ms"
timeout = "50ms"

[pools.closed]
maintenance = true
backends = []
"#,
        &[&web],
    );
    let lb = Balancer::start(&config("", &tables)).await;

    // Wait for the active checks to bring the back end up (rise 2 at 100 ms).
    let up = r#"launchday_backend_up{backend="web1",pool="web"}"#;
    let ok_checks = r#"launchday_health_checks_total{backend="web1",pool="web",result="success"}"#;
    let start = std::time::Instant::now();
    loop {
        let text = lb.metrics().await;
        if metric(&text, up) == Some(1.0) && metric(&text, ok_checks).unwrap_or(0.0) >= 2.0 {
            break;
        }
        assert!(start.elapsed() < STEP, "back end not up in time:\n{text}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }

    // Traffic: proxied requests on both front ends, the maintenance pool, the beacon.
    for addr in [lb.v4, lb.v6] {
        let mut c = Client::connect(addr).await;
        for i in 0..5 {
            let r = c.get(&format!("/page/{i}")).await;
            assert_eq!(r.status, StatusCode::OK, "{addr}: {r:?}");
        }
        let page = c.get("/closed/").await;
        assert_eq!(
            page.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{addr}: {page:?}"
        );
        let beacon = c.get(BEACON).await;
        assert_eq!(beacon.status, StatusCode::NO_CONTENT, "{addr}: {beacon:?}");
    }
    assert_eq!(
        get(lb.v4, "/closed/again").await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );

    let scrape = lb.metrics().await;
    let exported = families(&scrape);
    assert_eq!(
        metric(
            &scrape,
            r#"launchday_requests_total{backend="web1",code="2xx",pool="web"}"#
        ),
        Some(10.0)
    );
    assert_eq!(
        metric(
            &scrape,
            r#"launchday_maintenance_pages_total{pool="closed"}"#
        ),
        Some(3.0)
    );
    assert_eq!(
        metric(&scrape, "launchday_maintenance_beacons_total"),
        Some(2.0)
    );

    // Every metric every query uses is an exported family.
    let dash = dashboard();
    let mut used = BTreeSet::new();
    let mut missing = Vec::new();
    for (place, expr) in queries(&dash) {
        for name in metric_names(&expr) {
            match family_of(&name, &exported) {
                Some(family) => {
                    used.insert(family);
                }
                None => missing.push(format!("{place}: {name}")),
            }
        }
    }
    assert!(
        missing.is_empty(),
        "the dashboard queries metrics the balancer does not export (no `# TYPE` line):\n  {}\n--- exported ---\n{}",
        missing.join("\n  "),
        exported.keys().cloned().collect::<Vec<_>>().join("\n")
    );

    // And it shows every family it is meant to.
    let unshown: Vec<_> = EXPECTED.iter().filter(|f| !used.contains(**f)).collect();
    assert!(unshown.is_empty(), "no panel for {unshown:?}");
    for f in EXPECTED {
        assert!(exported.contains_key(f), "{f} missing from the scrape");
    }
}
