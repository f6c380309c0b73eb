//! `launchday check -c FILE`, run as a real process: exit 0 and exactly `ok\n` on
//! stdout for a valid config; otherwise exit 1 and every error on stderr, one a
//! line, as `KEY.PATH: problem (hint)`.

use std::path::Path;
use std::process::Command;

/// What `launchday check` did.
struct Checked {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Checked {
    fn lines(&self) -> Vec<&str> {
        self.stderr.lines().collect()
    }

    #[track_caller]
    fn assert_ok(&self) {
        assert_eq!(
            (self.code, self.stdout.as_str()),
            (Some(0), "ok\n"),
            "stderr:\n{}",
            self.stderr
        );
    }

    /// Exit 1, nothing on stdout, and stderr is exactly `lines`.
    #[track_caller]
    fn assert_errors(&self, lines: &[&str]) {
        assert_eq!(self.code, Some(1), "stdout: {:?}", self.stdout);
        assert_eq!(self.stdout, "");
        assert_eq!(self.lines(), lines);
    }

    /// Exit 1 and one stderr line that starts with `prefix`.
    #[track_caller]
    fn assert_one_error_starting(&self, prefix: &str) {
        assert_eq!(self.code, Some(1), "stdout: {:?}", self.stdout);
        let lines = self.lines();
        assert_eq!(lines.len(), 1, "{lines:#?}");
        assert!(
            lines[0].starts_with(prefix),
            "{:?} does not start with {prefix:?}",
            lines[0]
        );
    }
}

fn check_file(path: &Path) -> Checked {
    let out = Command::new(env!("CARGO_BIN_EXE_launchday"))
        .arg("check")
        .arg("-c")
        .arg(path)
        .env("RUST_LOG", "off")
        .output()
        .expect("run launchday check");
    Checked {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Writes `config` as `launchday.toml` into `dir` and checks it.
fn check_in(dir: &Path, config: &str) -> Checked {
    let path = dir.join("launchday.toml");
    std::fs::write(&path, config).expect("write config");
    check_file(&path)
}

fn check(config: &str) -> Checked {
    let dir = tempfile::tempdir().expect("tempdir");
    check_in(dir.path(), config)
}

const LISTENER: &str =
    "[[listeners]]\nname = \"public\"\nbind = [\"127.0.0.1:8080\", \"[::1]:8080\"]\n";
const ROUTE: &str = "[[routes]]\npool = \"blog\"\n";
const BLOG: &str = "[pools.blog]\nbackends = [\n  \
    { name = \"vm-1\", address = \"[2001:db8::10]:80\", weight = 11, max_connections = 64 },\n  \
    { name = \"pi\", address = \"[2001:db8::3]:80\", weight = 1, served_by = \"Raspberry Pi 3\" },\n]\n";

/// A valid config with `top` at the top level and `rest` after the blog pool.
fn config(top: &str, rest: &str) -> String {
    format!("{top}\n{LISTENER}{ROUTE}{BLOG}{rest}")
}

#[test]
fn a_valid_config_prints_ok() {
    check(&config("", "")).assert_ok();
}

#[test]
fn the_example_config_is_valid() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/launchday.toml");
    if example.exists() {
        check_file(&example).assert_ok();
    }
}

#[test]
fn a_missing_file_is_an_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let checked = check_file(&dir.path().join("nope.toml"));
    checked.assert_one_error_starting("(file): cannot read ");
    assert!(checked.stderr.contains("nope.toml"), "{}", checked.stderr);
}

#[test]
fn an_unknown_key_is_an_error_at_its_path() {
    let rest = "[pools.forums]\nbackends = [{ name = \"f\", address = \"[2001:db8::20]:80\", wieght = 2 }]\n";
    check(&config("", rest)).assert_one_error_starting(
        "pools.forums.backends[0].wieght: unknown key (expected one of: name, address, weight, \
         max_connections, served_by, backup; line ",
    );
    check(&config("shutdown_grac = \"5s\"", ""))
        .assert_one_error_starting("shutdown_grac: unknown key (expected one of: shutdown_grace,");
}

#[test]
fn a_toml_syntax_error_is_one_line() {
    check(&config("", "[maintenance\n")).assert_one_error_starting("(syntax): ");
}

#[test]
fn an_unparsable_bind_address_is_an_error() {
    let listener = "[[listeners]]\nname = \"public\"\nbind = [\"[::1]:8080\", \"[::1]:80800\"]\n";
    check(&format!("{listener}{ROUTE}{BLOG}")).assert_errors(&[
        "listeners.public.bind[1]: \"[::1]:80800\" has an invalid port \"80800\" (use an IP literal and port, \
         e.g. \"[::]:8080\" or \"0.0.0.0:8080\")",
    ]);
}

#[test]
fn an_unparsable_back_end_address_is_an_error() {
    let rest = "[pools.forums]\nbackends = [{ name = \"f\", address = \"2001:db8::20\" }]\n";
    check(&config("", rest)).assert_one_error_starting(
        "pools.forums.backends[0].address: \"2001:db8::20\" has no port",
    );
}

#[test]
fn an_unparsable_duration_is_an_error() {
    let rest = "[pools.forums]\nqueue_timeout = \"2 parsecs\"\nmaintenance = true\n";
    check(&config("", rest)).assert_errors(&[
        "pools.forums.queue_timeout: \"2 parsecs\" is not a duration (use e.g. \"2s\", \"500ms\")",
    ]);
}

#[test]
fn an_ipv4_back_end_is_an_error_unless_allowed() {
    let rest =
        "[pools.forums]\nbackends = [\n  { name = \"a\", address = \"[2001:db8::20]:80\" },\n  \
                { name = \"b\", address = \"10.0.0.7:80\" },\n]\n";
    check(&config("", rest)).assert_errors(&[
        "pools.forums.backends[1].address: 10.0.0.7:80 is IPv4; back ends are IPv6-only \
         (set allow_ipv4_backends = true)",
    ]);
    check(&config("allow_ipv4_backends = true", rest)).assert_ok();
}

#[test]
fn a_route_naming_a_missing_pool_is_an_error() {
    let routes = "[[routes]]\nhost = \"forums.example.org\"\npool = \"forum\"\n";
    let forums = "[pools.forums]\nmaintenance = true\n";
    check(&config("", &format!("{forums}{routes}")))
        .assert_errors(&["routes[1].pool: no pool named \"forum\" (pools: blog, forums)"]);
}

#[test]
fn a_duplicate_back_end_name_is_an_error() {
    let rest =
        "[pools.forums]\nbackends = [\n  { name = \"vm-1\", address = \"[2001:db8::20]:80\" },\n  \
                { name = \"vm-2\", address = \"[2001:db8::21]:80\" },\n  \
                { name = \"vm-1\", address = \"[2001:db8::22]:80\" },\n]\n";
    check(&config("", rest)).assert_errors(&[
        "pools.forums.backends[2].name: duplicate back-end name \"vm-1\" (first at backends[0])",
    ]);
}

#[test]
fn a_duplicate_listener_name_is_an_error() {
    let second = "[[listeners]]\nname = \"public\"\nbind = [\"[::1]:8443\"]\n";
    check(&format!("{LISTENER}{second}{ROUTE}{BLOG}")).assert_errors(&[
        "listeners[1].name: duplicate listener name \"public\" (first at listeners[0])",
    ]);
}

#[test]
fn a_duplicate_bind_is_an_error() {
    let listeners = "[[listeners]]\nname = \"a\"\nbind = [\"[::]:8080\"]\n\
                     [[listeners]]\nname = \"b\"\nbind = [\"[::]:8080\"]\n";
    check(&format!("{listeners}{ROUTE}{BLOG}"))
        .assert_errors(&["listeners.b.bind[0]: [::]:8080 is already bound by listeners.a.bind[0]"]);
    let admin = "[admin]\nlisten = [\"[::1]:8080\"]\n";
    check(&format!("{admin}{LISTENER}{ROUTE}{BLOG}")).assert_errors(&[
        "listeners.public.bind[1]: [::1]:8080 is already bound by admin.listen[0]",
    ]);
}

#[test]
fn a_pool_without_back_ends_is_an_error_unless_in_maintenance() {
    check(&config("", "[pools.forums]\n")).assert_errors(&[
        "pools.forums.backends: no back ends (add one, or set maintenance = true)",
    ]);
    check(&config("", "[pools.forums]\nmaintenance = true\n")).assert_ok();
}

#[test]
fn a_missing_maintenance_page_is_an_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = config("", "[maintenance]\npage = \"maint.html\"\n");
    let page = dir.path().join("maint.html");
    check_in(dir.path(), &text).assert_errors(&[&format!(
        "maintenance.page: {} does not exist",
        page.display()
    )]);
    std::fs::write(&page, "<h1>Back soon</h1>{{analytics}}").expect("write page");
    check_in(dir.path(), &text).assert_ok();
}

#[test]
fn weight_zero_is_accepted() {
    let rest = "[pools.forums]\nbackends = [{ name = \"drained\", address = \"[2001:db8::20]:80\", weight = 0 }]\n";
    check(&config("", rest)).assert_ok();
}

#[test]
fn every_error_in_a_file_is_printed() {
    let text = "shutdown_grace = \"a while\"\n\
                [[listeners]]\nname = \"a\"\nbind = [\"[::1]:8080\"]\n\
                [[listeners]]\nname = \"a\"\nbind = [\"[::1]:8080\"]\n\
                [[routes]]\npool = \"blog\"\n[[routes]]\npool = \"forum\"\npath_prefix = \"/forum\"\n\
                [pools.blog]\nbackends = [\n  { name = \"vm-1\", address = \"10.0.0.7:80\" },\n  \
                { name = \"vm-1\", address = \"[2001:db8::11]:80\", max_connections = 0 },\n]\n\
                [pools.forums]\n";
    check(text).assert_errors(&[
        "shutdown_grace: \"a while\" is not a duration (use e.g. \"2s\", \"500ms\")",
        "listeners[1].name: duplicate listener name \"a\" (first at listeners[0])",
        "listeners[1].bind[0]: [::1]:8080 is already bound by listeners.a.bind[0]",
        "routes[1].pool: no pool named \"forum\" (pools: blog, forums)",
        "pools.blog.backends[0].address: 10.0.0.7:80 is IPv4; back ends are IPv6-only \
         (set allow_ipv4_backends = true)",
        "pools.blog.backends[1].max_connections: 0 is less than 1 \
         (omit it for unlimited, or set weight = 0 to drain)",
        "pools.blog.backends[1].name: duplicate back-end name \"vm-1\" (first at backends[0])",
        "pools.forums.backends: no back ends (add one, or set maintenance = true)",
    ]);
}
