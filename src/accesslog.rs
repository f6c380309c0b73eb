//! The access log: one line per request, to stderr or a file, written off the
//! request path.
//!
//! The request path only fills an [`Entry`] and `try_send`s it into a bounded channel
//! ([`CAPACITY`]); a writer task formats and writes. When the channel is full (the
//! disk cannot keep up) the entry is dropped and counted in
//! `launchday_access_log_dropped_total`: a slow disk must never slow the requests.
//! The line is written when the response head is sent (like HAProxy's `option
//! logasap`): `bytes` is the answer's `Content-Length` when known, `-` otherwise.
//!
//! Formats: `combined` — the Apache/nginx combined format followed by launchday's
//! fields (`pool=`, `backend=`, `upstream=`, `queue=`, `shed=`, `time=`, seconds);
//! `json` — one object a line with the same fields.

use std::io::Write;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use std::sync::Arc;

use http::HeaderValue;
use prometheus::IntCounter;
use serde::Serialize;
use tokio::sync::mpsc;

use crate::config::{AccessLogFormat, AccessLogSpec};

/// Entries waiting to be written before new ones are dropped.
pub const CAPACITY: usize = 16 * 1024;

/// One request, as logged.
#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    /// Unix time in seconds (with fractions).
    pub time: f64,
    pub client: IpAddr,
    #[serde(serialize_with = "as_str")]
    pub method: http::Method,
    /// Path and query.
    #[serde(serialize_with = "target")]
    pub target: http::Uri,
    pub version: &'static str,
    #[serde(serialize_with = "opt_header")]
    pub host: Option<HeaderValue>,
    pub status: u16,
    pub bytes: Option<u64>,
    #[serde(serialize_with = "opt_header")]
    pub referer: Option<HeaderValue>,
    #[serde(serialize_with = "opt_header")]
    pub user_agent: Option<HeaderValue>,
    pub listener: Arc<str>,
    pub pool: Option<Arc<str>>,
    pub backend: Option<Arc<str>>,
    /// Seconds from sending to the back end to its response head.
    pub upstream_seconds: Option<f64>,
    /// Seconds spent waiting for admission.
    pub queue_seconds: Option<f64>,
    /// Why the maintenance page was served.
    pub shed: Option<&'static str>,
    /// Seconds from request head to response head.
    pub duration_seconds: f64,
}

fn as_str<S: serde::Serializer>(m: &http::Method, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(m.as_str())
}

fn target<S: serde::Serializer>(u: &http::Uri, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(u.path_and_query().map_or("/", |pq| pq.as_str()))
}

fn opt_header<S: serde::Serializer>(v: &Option<HeaderValue>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(v) => s.serialize_str(&String::from_utf8_lossy(v.as_bytes())),
        None => s.serialize_none(),
    }
}

/// What the request path learns while handling a request, for its log line.
#[derive(Debug, Default, Clone)]
pub struct Facts {
    pub pool: Option<Arc<str>>,
    pub backend: Option<Arc<str>>,
    pub upstream: Option<Duration>,
    pub queue: Option<Duration>,
    pub shed: Option<&'static str>,
}

/// A running access log.
#[derive(Debug, Clone)]
pub struct AccessLog {
    tx: mpsc::Sender<Entry>,
    dropped: IntCounter,
}

impl AccessLog {
    /// Opens the log and starts its writer task (on the current runtime).
    pub fn start(spec: &AccessLogSpec, dropped: IntCounter) -> std::io::Result<AccessLog> {
        let out: Box<dyn Write + Send> = match &spec.path {
            Some(path) => Box::new(open(path)?),
            None => Box::new(std::io::stderr()),
        };
        let (tx, rx) = mpsc::channel(CAPACITY);
        let format = spec.format;
        tokio::spawn(write_all(
            rx,
            std::io::BufWriter::with_capacity(64 * 1024, out),
            format,
        ));
        Ok(AccessLog { tx, dropped })
    }

    /// Queues `entry`; drops (and counts) it if the writer is behind.
    pub fn log(&self, entry: Entry) {
        if self.tx.try_send(entry).is_err() {
            self.dropped.inc();
        }
    }
}

fn open(path: &PathBuf) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
}

/// How often the writer wakes to write what has queued. Senders never wake it, so
/// logging costs the request path one channel push.
pub const FLUSH_EVERY: std::time::Duration = std::time::Duration::from_millis(20);

async fn write_all(mut rx: mpsc::Receiver<Entry>, mut out: impl Write, format: AccessLogFormat) {
    let mut tick = tokio::time::interval(FLUSH_EVERY);
    loop {
        tick.tick().await;
        let mut wrote = false;
        loop {
            match rx.try_recv() {
                Ok(entry) => {
                    if let Err(e) = write_line(&mut out, &entry, format) {
                        tracing::warn!(error = %e, "writing the access log");
                    }
                    wrote = true;
                }
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    let _ = out.flush();
                    return;
                }
            }
        }
        if wrote {
            if let Err(e) = out.flush() {
                tracing::warn!(error = %e, "flushing the access log");
            }
        }
    }
}

/// Writes one line, with its newline.
pub fn write_line(out: &mut impl Write, e: &Entry, format: AccessLogFormat) -> std::io::Result<()> {
    match format {
        AccessLogFormat::Json => {
            serde_json::to_writer(&mut *out, e)?;
            out.write_all(b"\n")
        }
        AccessLogFormat::Combined => {
            let target = e.target.path_and_query().map_or("/", |pq| pq.as_str());
            write!(
                out,
                "{} - - [{}] \"{} {} {}\" {} ",
                e.client,
                clf_time(e.time),
                e.method,
                target,
                e.version,
                e.status
            )?;
            match e.bytes {
                Some(b) => write!(out, "{b}")?,
                None => out.write_all(b"-")?,
            }
            write!(out, " \"")?;
            quoted(out, e.referer.as_ref())?;
            write!(out, "\" \"")?;
            quoted(out, e.user_agent.as_ref())?;
            write!(
                out,
                "\" pool={} backend={} upstream=",
                e.pool.as_deref().unwrap_or("-"),
                e.backend.as_deref().unwrap_or("-")
            )?;
            secs(out, e.upstream_seconds)?;
            out.write_all(b" queue=")?;
            secs(out, e.queue_seconds)?;
            writeln!(
                out,
                " shed={} time={:.3}",
                e.shed.unwrap_or("-"),
                e.duration_seconds
            )
        }
    }
}

fn secs(out: &mut impl Write, d: Option<f64>) -> std::io::Result<()> {
    match d {
        Some(d) => write!(out, "{d:.3}"),
        None => out.write_all(b"-"),
    }
}

/// A header value inside double quotes: `"` and `\` escaped, `-` when absent.
fn quoted(out: &mut impl Write, v: Option<&HeaderValue>) -> std::io::Result<()> {
    let Some(v) = v else {
        return out.write_all(b"-");
    };
    for &b in v.as_bytes() {
        match b {
            b'"' | b'\\' => out.write_all(&[b'\\', b])?,
            _ => out.write_all(&[b])?,
        }
    }
    Ok(())
}

/// One formatted line, with its newline (for tests and tools).
pub fn format_line(e: &Entry, format: AccessLogFormat) -> String {
    let mut v = Vec::with_capacity(256);
    let _ = write_line(&mut v, e, format);
    String::from_utf8_lossy(&v).into_owned()
}

/// Unix seconds as the common log format's `26/Nov/2026:14:00:00 +0000`.
fn clf_time(unix: f64) -> String {
    let secs = unix.max(0.0) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    format!(
        "{:02}/{}/{}:{:02}:{:02}:{:02} +0000",
        day,
        MONTHS[(month - 1) as usize],
        year,
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// Now, as Unix seconds.
pub fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Entry {
        Entry {
            time: 1_795_701_600.25, // 2026-11-26T14:00:00.25Z
            client: "2001:db8::7".parse().expect("ip"),
            method: http::Method::GET,
            target: "/2026/launch?x=1".parse().expect("uri"),
            version: "HTTP/1.1",
            host: Some(HeaderValue::from_static("blog.example.org")),
            status: 503,
            bytes: Some(4108),
            referer: None,
            user_agent: Some(HeaderValue::from_static("curl/8 \"quoted\"")),
            listener: "public".into(),
            pool: Some("blog".into()),
            backend: None,
            upstream_seconds: None,
            queue_seconds: Some(0.0123),
            shed: Some("queue_full"),
            duration_seconds: 0.0125,
        }
    }

    #[test]
    fn combined_line() {
        assert_eq!(
            format_line(&entry(), AccessLogFormat::Combined),
            "2001:db8::7 - - [26/Nov/2026:14:00:00 +0000] \"GET /2026/launch?x=1 HTTP/1.1\" 503 4108 \"-\" \
             \"curl/8 \\\"quoted\\\"\" pool=blog backend=- upstream=- queue=0.012 shed=queue_full time=0.013\n"
        );
    }

    #[test]
    fn json_line() {
        let line = format_line(&entry(), AccessLogFormat::Json);
        assert!(line.ends_with('\n'));
        let v: serde_json::Value = serde_json::from_str(&line).expect("json");
        assert_eq!(v["status"], 503);
        assert_eq!(v["client"], "2001:db8::7");
        assert_eq!(v["shed"], "queue_full");
        assert_eq!(v["pool"], "blog");
        assert_eq!(v["backend"], serde_json::Value::Null);
        assert_eq!(v["user_agent"], "curl/8 \"quoted\"");
    }

    #[test]
    fn clf_dates() {
        assert_eq!(clf_time(0.0), "01/Jan/1970:00:00:00 +0000");
        assert_eq!(clf_time(951_782_400.0), "29/Feb/2000:00:00:00 +0000");
        assert_eq!(clf_time(1_795_701_600.0), "26/Nov/2026:14:00:00 +0000");
    }
}
