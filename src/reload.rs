//! Reload triggers: a change of the config file, or of any file it names (the
//! maintenance page, certificates and keys), seen by a file watcher.
//!
//! The watcher watches the *directories* of those files, not the files: editors and
//! config-management tools often write a temporary file and rename it over the old
//! one, which a watch on the old file's inode would miss. Events are debounced: a
//! reload starts once no relevant event has arrived for [`DEBOUNCE`], so a burst of
//! writes (cert and key replaced one after the other) gives one reload. After every
//! attempt the watched set is recomputed from the running snapshot.
//!
//! The other triggers, `SIGHUP` and `POST /api/reload`, call
//! [`Server::reload_file`] directly; all three share its validate → build → swap path
//! and its metrics.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

use crate::config::Snapshot;
use crate::server::Server;

/// Quiet time after the last file event before reloading.
pub const DEBOUNCE: Duration = Duration::from_millis(200);
/// Longest a reload waits for events to settle (a file rewritten continuously still
/// reloads at least this often).
pub const MAX_DELAY: Duration = Duration::from_secs(1);

/// Errors of setting up the watcher.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("watching config files: {0}")]
    Notify(#[from] notify::Error),
}

/// Every file a snapshot was built from.
pub fn files(snapshot: &Snapshot) -> BTreeSet<PathBuf> {
    let mut out = BTreeSet::new();
    out.extend(snapshot.source.clone());
    out.extend(snapshot.maintenance.page.clone());
    for l in &snapshot.listeners {
        for c in l.tls.iter().flat_map(|t| &t.certificates) {
            out.insert(c.cert_path.clone());
            out.insert(c.key_path.clone());
        }
    }
    out.into_iter().map(|p| absolute(&p)).collect()
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_owned())
}

/// Watches the files of the running snapshot and reloads `path` when one changes.
/// Runs until the server's runtime stops.
pub fn watch(server: Arc<Server>, path: PathBuf) -> Result<(), WatchError> {
    let (tx, mut rx) = mpsc::unbounded_channel::<notify::Result<notify::Event>>();
    let mut watcher = notify::recommended_watcher(move |ev| {
        let _ = tx.send(ev);
    })?;
    let mut watched_dirs = BTreeSet::new();
    let mut wanted = files(&server.proxy().live().snapshot);
    rewatch(&mut watcher, &mut watched_dirs, &wanted);
    tokio::spawn(async move {
        // Keep the watcher alive as long as this task.
        let mut watcher = watcher;
        while let Some(ev) = rx.recv().await {
            if !relevant(&ev, &wanted) {
                continue;
            }
            // Debounce: wait until DEBOUNCE passes without another event, at most
            // MAX_DELAY in all.
            let first = tokio::time::Instant::now();
            loop {
                let left =
                    (first + MAX_DELAY).saturating_duration_since(tokio::time::Instant::now());
                if left.is_zero() {
                    break;
                }
                match tokio::time::timeout(DEBOUNCE.min(left), rx.recv()).await {
                    Ok(Some(_)) => continue,
                    Ok(None) => return,
                    Err(_) => break,
                }
            }
            match server.reload_file(&path).await {
                Ok(()) => tracing::info!(config = %path.display(), "reloaded (file changed)"),
                Err(e) => {
                    tracing::error!(
                        "reload after a file change rejected, the running config stays:\n{e}"
                    )
                }
            }
            wanted = files(&server.proxy().live().snapshot);
            rewatch(&mut watcher, &mut watched_dirs, &wanted);
        }
    });
    Ok(())
}

fn relevant(ev: &notify::Result<notify::Event>, wanted: &BTreeSet<PathBuf>) -> bool {
    match ev {
        Ok(ev) => {
            !matches!(ev.kind, notify::EventKind::Access(_))
                && ev.paths.iter().any(|p| wanted.contains(&absolute(p)))
        }
        Err(e) => {
            tracing::warn!(error = %e, "file watcher error");
            false
        }
    }
}

fn rewatch(watcher: &mut impl Watcher, watched: &mut BTreeSet<PathBuf>, files: &BTreeSet<PathBuf>) {
    let dirs: BTreeSet<PathBuf> = files
        .iter()
        .filter_map(|f| f.parent().map(Path::to_owned))
        .collect();
    for gone in watched.difference(&dirs) {
        let _ = watcher.unwatch(gone);
    }
    for new in dirs.difference(watched) {
        if let Err(e) = watcher.watch(new, RecursiveMode::NonRecursive) {
            tracing::warn!(dir = %new.display(), error = %e, "cannot watch for config changes");
        }
    }
    *watched = dirs;
}
