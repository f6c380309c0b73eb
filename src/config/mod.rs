//! Configuration: TOML text → serde model ([`model`]) → validated [`Snapshot`].
//!
//! Parse, don't validate: a [`Snapshot`] is only ever built by [`validate`], which
//! checks every value, applies every default and turns strings into typed values
//! (socket addresses, durations, CIDRs, pool indices). Code holding a `Snapshot`
//! never re-checks anything. Invariants:
//! - every problem in a config is reported, each with the key path it is at
//!   ([`ConfigError`]); `validate` never stops at the first one;
//! - unknown keys are errors (a typo is never silently ignored); TOML syntax and
//!   type errors stop parsing, so they are reported one at a time;
//! - back-end host names are resolved once, during validation (blocking DNS: call
//!   it off the async runtime, e.g. in `spawn_blocking`, when reloading).

use std::fmt;
use std::path::{Path, PathBuf};

mod fields;
pub use fields::is_host_name;
pub mod model;
pub mod snapshot;
mod validate;

pub use snapshot::*;
pub use validate::validate;

use model::RootConfig;

/// One problem in a config, at one key path.
///
/// Displays as `PATH: problem (hint)`, or `PATH: problem` without a hint, e.g.
/// `pools.blog.backends[1].address: 10.0.0.7:80 is IPv4; back ends are IPv6-only
/// (set allow_ipv4_backends = true)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Where: a key path such as `pools.blog.backends[0].weight`, or `(file)` /
    /// `(syntax)` for problems that are not at a key.
    pub path: String,
    /// What is wrong.
    pub problem: String,
    /// How to fix it, when there is something useful to say.
    pub hint: Option<String>,
}

impl ConfigError {
    pub fn new(path: impl Into<String>, problem: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            problem: problem.into(),
            hint: None,
        }
    }

    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }
}

impl fmt::Display for ConfigError {
    /// Always one line: line breaks inside (a file name with a newline, say) are
    /// written as `\n`, so that `launchday check` prints one error a line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let one = |s: &str| s.replace('\r', "\\r").replace('\n', "\\n");
        write!(f, "{}: {}", one(&self.path), one(&self.problem))?;
        if let Some(hint) = &self.hint {
            write!(f, " ({})", one(hint))?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// Every problem found in a config (never empty when returned as an error).
/// Displays one error a line, without a trailing newline.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl ConfigErrors {
    pub fn iter(&self) -> std::slice::Iter<'_, ConfigError> {
        self.0.iter()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl From<ConfigError> for ConfigErrors {
    fn from(error: ConfigError) -> Self {
        Self(vec![error])
    }
}

impl IntoIterator for ConfigErrors {
    type Item = ConfigError;
    type IntoIter = std::vec::IntoIter<ConfigError>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

impl<'a> IntoIterator for &'a ConfigErrors {
    type Item = &'a ConfigError;
    type IntoIter = std::slice::Iter<'a, ConfigError>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

/// Reads, parses and validates the config file at `path`; relative paths in it
/// (the maintenance page) are resolved against the file's directory.
pub fn load_file(path: &Path) -> Result<Snapshot, ConfigErrors> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::new("(file)", format!("cannot read {}: {e}", path.display())))?;
    let base_dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    load_str(&text, base_dir, Some(path.to_path_buf()))
}

/// Parses and validates config `text`; `base_dir` resolves relative paths and
/// `source` is recorded in the snapshot (`None` for built-in configs).
pub fn load_str(
    text: &str,
    base_dir: &Path,
    source: Option<PathBuf>,
) -> Result<Snapshot, ConfigErrors> {
    let raw = parse(text)?;
    validate(raw, base_dir, source)
}

/// Parses config `text` into the serde model. A syntax error, a wrongly typed value
/// or an unknown key stops parsing and is reported with its key path and line.
pub fn parse(text: &str) -> Result<RootConfig, ConfigError> {
    serde_path_to_error::deserialize(toml::Deserializer::new(text))
        .map_err(|e| describe_parse_error(&e, text))
}

fn describe_parse_error(
    error: &serde_path_to_error::Error<toml::de::Error>,
    text: &str,
) -> ConfigError {
    let inner = error.inner();
    let path = key_path(error.path());
    let location = inner.span().map(|span| {
        let before = &text[..span.start.min(text.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.chars().rev().take_while(|&c| c != '\n').count() + 1;
        (line, column)
    });
    let mut message = one_line(inner.message());
    if message.trim().is_empty() {
        // Some TOML errors carry no text (found by fuzzing: "a =", "#\x01").
        message = "invalid TOML".to_owned();
    }
    if let Some(expected) = unknown_key(&message) {
        let hint = match location {
            Some((line, _)) => format!("{expected}; line {line}"),
            None => expected,
        };
        return ConfigError::new(path, "unknown key").with_hint(hint);
    }
    let (path, hint) = match (path.is_empty(), location) {
        (true, Some((line, column))) => (
            "(syntax)".to_owned(),
            Some(format!("line {line}, column {column}")),
        ),
        (true, None) => ("(syntax)".to_owned(), None),
        (false, Some((line, _))) => (path, Some(format!("line {line}"))),
        (false, None) => (path, None),
    };
    let error = ConfigError::new(path, message);
    match hint {
        Some(hint) => error.with_hint(hint),
        None => error,
    }
}

/// `pools."a.b".backends[0].weight`: keys quoted where TOML would need quotes,
/// like the paths `validate` reports.
fn key_path(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut out = String::new();
    for segment in path.iter() {
        match segment {
            Segment::Seq { index } => out.push_str(&format!("[{index}]")),
            Segment::Map { key } | Segment::Enum { variant: key } => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(&fields::key_segment(key));
            }
            Segment::Unknown => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push('?');
            }
        }
    }
    out
}

/// Turns serde's "unknown field `x`, expected one of `a`, `b`" into
/// "expected one of: a, b".
fn unknown_key(message: &str) -> Option<String> {
    let rest = message.strip_prefix("unknown field `")?;
    let (_key, rest) = rest.split_once('`')?;
    let expected = rest.trim_start_matches(',').trim();
    Some(
        if let Some(list) = expected.strip_prefix("expected one of ") {
            format!("expected one of: {}", list.replace('`', ""))
        } else if let Some(list) = expected.strip_prefix("expected ") {
            format!(
                "expected one of: {}",
                list.replace('`', "").replace(" or ", ", ")
            )
        } else {
            "no keys are allowed here".to_owned()
        },
    )
}

fn one_line(message: &str) -> String {
    message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "[[listeners]]\nname = \"public\"\nbind = [\"[::1]:0\"]\n\
                         [[routes]]\npool = \"blog\"\n\
                         [pools.blog]\nbackends = [{ name = \"vm-1\", address = \"[2001:db8::10]:80\" }]\n";

    fn parse_error(text: &str) -> String {
        parse(text).err().map(|e| e.to_string()).unwrap_or_default()
    }

    #[test]
    fn an_error_displays_on_one_line_whatever_it_contains() {
        let e = ConfigError::new("maintenance.page", "\"a\nb.html\" does not exist")
            .with_hint("line\r\nbreak");
        let shown = e.to_string();
        assert!(!shown.contains('\n') && !shown.contains('\r'), "{shown}");
        assert!(shown.contains("a\\nb.html"), "{shown}");
    }

    #[test]
    fn syntax_errors_always_say_what_is_wrong() {
        for text in ["a =", "#\u{1}", "a = 1\nb ="] {
            let e = parse(text).expect_err("invalid");
            assert!(!e.problem.trim().is_empty(), "{text:?}: {e}");
            assert!(!e.path.is_empty(), "{text:?}: {e}");
        }
    }

    #[test]
    fn errors_display_as_path_problem_hint() {
        let e = ConfigError::new("a.b[0]", "is wrong");
        assert_eq!(e.to_string(), "a.b[0]: is wrong");
        let e = e.with_hint("fix it");
        assert_eq!(e.to_string(), "a.b[0]: is wrong (fix it)");
        let all = ConfigErrors(vec![
            ConfigError::new("x", "one"),
            ConfigError::new("y", "two"),
        ]);
        assert_eq!(all.to_string(), "x: one\ny: two");
        assert_eq!(all.len(), 2);
    }

    #[test]
    fn unknown_keys_are_reported_with_their_path_and_line() {
        let text = "[pools.blog]\nbackends = [\n  { name = \"a\", address = \"[::1]:80\", wieght = 3 },\n]\n";
        assert_eq!(
            parse_error(text),
            "pools.blog.backends[0].wieght: unknown key (expected one of: name, address, weight, \
             max_connections, served_by, backup; line 3)"
        );
        assert!(parse_error("bogus = 1\n")
            .starts_with("bogus: unknown key (expected one of: shutdown_grace,"));
        let tls =
            "[[listeners]]\nname = \"a\"\nbind = [\"[::1]:1\"]\n[listeners.tls]\ncert = \"x\"\n";
        assert_eq!(
            parse_error(tls),
            "listeners[0].tls.cert: unknown key (expected one of: certificates, default_certificate, hsts; line 5)"
        );
        assert!(parse_error("[pools.\"a.b\"]\nx = 1\n").starts_with("pools.\"a.b\".x: unknown key"));
    }

    #[test]
    fn syntax_and_type_errors_are_one_line() {
        assert_eq!(
            parse_error("[pools.blog\n"),
            "(syntax): invalid table header; expected `.`, `]` (line 1, column 12)"
        );
        assert_eq!(
            parse_error("[pools.blog]\nqueue_depth = \"x\"\n"),
            "pools.blog.queue_depth: invalid type: string \"x\", expected i64 (line 2)"
        );
    }

    #[test]
    fn load_file_resolves_relative_paths_against_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("launchday.toml");
        std::fs::write(dir.path().join("m.html"), "down").expect("write");
        std::fs::write(&file, format!("{VALID}[maintenance]\npage = \"m.html\"\n")).expect("write");
        let s = load_file(&file).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(s.source, Some(file.clone()));
        assert_eq!(s.maintenance.page, Some(dir.path().join("m.html")));

        let missing = dir.path().join("nope.toml");
        let e = load_file(&missing).expect_err("missing file");
        assert_eq!(e.len(), 1);
        assert_eq!(e.0[0].path, "(file)");
        assert!(e.0[0]
            .problem
            .starts_with(&format!("cannot read {}", missing.display())));
    }

    #[test]
    fn load_str_validates() {
        assert!(load_str(VALID, Path::new("."), None).is_ok());
        let e = load_str("", Path::new("."), None).expect_err("empty config");
        let paths: Vec<&str> = e.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["listeners", "routes"]);
    }
}
