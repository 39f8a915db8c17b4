//! Instance metadata, kept locally instead of in Azure tables.
//!
//! An instance lives in `<log-dir>/<name>/`: `instance.json` (name, current version,
//! when it was registered and last upgraded) and `log/`, the AMBROSIA log (segments,
//! checkpoints and the committer id, written by `drover-journal`). The last committed
//! checkpoint and the last log file are the journal's own files, so they cannot
//! disagree with the metadata. `instance.json` is replaced atomically (write, fsync,
//! rename, fsync of the directory).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Why an instance could not be registered or loaded.
#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    /// The instance has no `instance.json`.
    #[error(
        "instance {name:?} is not registered in {dir}: run `drover coordinator register --instance {name} --log-dir {dir}`"
    )]
    NotRegistered {
        /// The instance.
        name: String,
        /// The log directory.
        dir: String,
    },
    /// Registering an instance that exists.
    #[error("instance {0:?} is already registered")]
    Exists(String),
    /// A bad name.
    #[error("instance name {0:?} must be 1..=64 letters, digits, '-' or '_'")]
    BadName(String),
    /// Reading or writing failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// `instance.json` is not what we wrote.
    #[error("{path}: not valid instance metadata: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// What `instance.json` holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    /// The instance's name (what other instances address).
    pub name: String,
    /// The application version the log belongs to.
    pub version: u64,
    /// When it was registered (Unix ms).
    pub registered_ms: i64,
    /// When it last moved to a new version (Unix ms, 0: never).
    pub upgraded_ms: i64,
    /// Where its coordinator takes links from other coordinators (`host:port`), as
    /// written by the running coordinator: the registry other instances look it up in.
    #[serde(default)]
    pub peer: Option<String>,
}

use drover_wire::unix_ms as now_ms;

/// The instance's directory.
pub fn dir(log_dir: &Path, name: &str) -> PathBuf {
    log_dir.join(name)
}

/// Its log (journal) directory.
pub fn log_path(log_dir: &Path, name: &str) -> PathBuf {
    dir(log_dir, name).join("log")
}

fn meta_path(log_dir: &Path, name: &str) -> PathBuf {
    dir(log_dir, name).join("instance.json")
}

fn valid(name: &str) -> bool {
    !name.is_empty() && name.len() <= 64 && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> InstanceError + '_ {
    move |source| InstanceError::Io { path: path.to_owned(), source }
}

fn write(log_dir: &Path, meta: &Instance) -> Result<(), InstanceError> {
    use std::io::Write;
    let d = dir(log_dir, &meta.name);
    std::fs::create_dir_all(&d).map_err(io(&d))?;
    let path = meta_path(log_dir, &meta.name);
    let tmp = path.with_extension("json.tmp");
    let bytes = serde_json::to_vec_pretty(meta)
        .map_err(|e| InstanceError::Corrupt { path: path.clone(), reason: e.to_string() })?;
    let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(&bytes).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(io(&path))?;
    std::fs::File::open(&d).and_then(|f| f.sync_all()).map_err(io(&d))?;
    Ok(())
}

/// Registers a new instance at version `version`.
pub fn register(log_dir: &Path, name: &str, version: u64) -> Result<Instance, InstanceError> {
    if !valid(name) {
        return Err(InstanceError::BadName(name.to_owned()));
    }
    if meta_path(log_dir, name).exists() {
        return Err(InstanceError::Exists(name.to_owned()));
    }
    let meta = Instance { name: name.to_owned(), version, registered_ms: now_ms(), upgraded_ms: 0, peer: None };
    write(log_dir, &meta)?;
    Ok(meta)
}

/// Loads a registered instance.
pub fn load(log_dir: &Path, name: &str) -> Result<Instance, InstanceError> {
    if !valid(name) {
        return Err(InstanceError::BadName(name.to_owned()));
    }
    let path = meta_path(log_dir, name);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(InstanceError::NotRegistered { name: name.to_owned(), dir: log_dir.display().to_string() });
        }
        Err(e) => return Err(InstanceError::Io { path, source: e }),
    };
    let meta: Instance = serde_json::from_slice(&bytes)
        .map_err(|e| InstanceError::Corrupt { path: path.clone(), reason: e.to_string() })?;
    if meta.name != name {
        return Err(InstanceError::Corrupt { path, reason: format!("it names instance {:?}", meta.name) });
    }
    Ok(meta)
}

/// Records where the instance's coordinator takes links from other coordinators.
pub fn set_peer(log_dir: &Path, meta: &mut Instance, addr: &str) -> Result<(), InstanceError> {
    meta.peer = Some(addr.to_owned());
    write(log_dir, meta)
}

/// Where instance `name` takes links, every address it may take them at (each replica
/// of a replicated instance has its own; only the primary accepts): from `peers`
/// (lines `name host:port`, one per replica) if given, else from the log directory:
/// its `instance.json` and its replicas' `replica-K/peer-address` files.
pub fn lookup_peers(log_dir: &Path, peers: Option<&Path>, name: &str) -> Vec<String> {
    if let Some(file) = peers {
        let Ok(text) = std::fs::read_to_string(file) else { return Vec::new() };
        return text
            .lines()
            .filter_map(|l| {
                let mut it = l.split_whitespace();
                (it.next() == Some(name)).then(|| it.next().map(str::to_owned)).flatten()
            })
            .collect();
    }
    let mut out: Vec<String> = load(log_dir, name).ok().and_then(|m| m.peer).into_iter().collect();
    out.extend(replica_files(log_dir, name, PEER_FILE));
    out
}

/// The contents of `file` in each `replica-K` directory of instance `name`, by
/// directory name.
fn replica_files(log_dir: &Path, name: &str, file: &str) -> Vec<String> {
    if !valid(name) {
        return Vec::new();
    }
    let Ok(entries) = std::fs::read_dir(dir(log_dir, name)) else { return Vec::new() };
    let mut found: Vec<(String, String)> = entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("replica-"))
        .filter_map(|e| {
            let text = std::fs::read_to_string(e.path().join(file)).ok()?;
            Some((e.file_name().to_string_lossy().into_owned(), text.trim().to_owned()))
        })
        .collect();
    found.sort();
    found.into_iter().map(|(_, a)| a).filter(|a| !a.is_empty()).collect()
}

/// The file in a replica's directory naming where it takes links.
pub const PEER_FILE: &str = "peer-address";

/// The file in a replica's directory naming its Raft address.
pub const RAFT_FILE: &str = "raft-address";

/// Records where replica `id` of instance `name` takes links (`replica-K/peer-address`)
/// and its Raft address (`replica-K/raft-address`, where the replica commands find it).
pub fn set_replica_addresses(log_dir: &Path, name: &str, id: u64, peer: &str, raft: &str) -> Result<(), InstanceError> {
    if !valid(name) {
        return Err(InstanceError::BadName(name.to_owned()));
    }
    let d = dir(log_dir, name).join(format!("replica-{id}"));
    std::fs::create_dir_all(&d).map_err(io(&d))?;
    for (file, value) in [(PEER_FILE, peer), (RAFT_FILE, raft)] {
        let path = d.join(file);
        let tmp = d.join(format!("{file}.tmp"));
        std::fs::write(&tmp, value).map_err(io(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(io(&path))?;
    }
    Ok(())
}

/// The Raft addresses of the replicas of `name` found in `log_dir`.
pub fn replica_raft_addresses(log_dir: &Path, name: &str) -> Vec<String> {
    replica_files(log_dir, name, RAFT_FILE)
}

/// Moves the instance to `version` (after the upgrade checkpoint is durable).
pub fn upgrade(log_dir: &Path, meta: &mut Instance, version: u64) -> Result<(), InstanceError> {
    meta.version = version;
    meta.upgraded_ms = now_ms();
    write(log_dir, meta)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn register_load_upgrade() {
        let d = tempfile::tempdir().unwrap();
        assert!(matches!(load(d.path(), "a"), Err(InstanceError::NotRegistered { .. })));
        let mut m = register(d.path(), "a", 0).unwrap();
        assert!(matches!(register(d.path(), "a", 0), Err(InstanceError::Exists(_))));
        assert!(matches!(register(d.path(), "../x", 0), Err(InstanceError::BadName(_))));
        upgrade(d.path(), &mut m, 2).unwrap();
        assert_eq!(load(d.path(), "a").unwrap().version, 2);
        std::fs::write(meta_path(d.path(), "a"), b"{").unwrap();
        assert!(matches!(load(d.path(), "a"), Err(InstanceError::Corrupt { .. })));
    }
}
