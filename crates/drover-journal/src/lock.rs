//! The directory lock: one process at a time owns a data directory (a controller's) or
//! an instance directory (a coordinator's).
//!
//! Two writers on one journal destroy acknowledged writes: the second trims the segment
//! the first is still appending to. So a writer takes an exclusive advisory lock
//! (`flock`, through `std::fs::File::try_lock`) on `<dir>/LOCK` before recovery and
//! holds it for its whole life; the kernel drops it when the process dies, kill -9
//! included, so there is never a stale lock to clean up. The file holds the holder's
//! pid, for the error a second process prints. Read-only tools ([`holder`]) only probe:
//! they never take the lock, and say when a live process holds it.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Name of the lock file inside the locked directory.
pub const LOCK_FILE: &str = "LOCK";

/// How long [`DirLock::acquire`] retries while someone holds a shared probe lock (a
/// read-only tool looking, for microseconds). A writer holds it far longer than this.
const PROBE_GRACE: Duration = Duration::from_millis(500);

/// Why a directory could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another live process holds the directory.
    #[error(
        "{} is in use by another process{}: two processes on one directory would destroy each other's writes (stop it first, or use another directory)",
        dir.display(),
        pid.map(|p| format!(" (pid {p})")).unwrap_or_default()
    )]
    Held {
        /// The directory.
        dir: PathBuf,
        /// The holder's pid, as it wrote it.
        pid: Option<u32>,
    },
    /// The lock file could not be opened or written.
    #[error("cannot lock {}: {source}", path.display())]
    Io {
        /// The lock file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// An exclusive lock on a directory, held until dropped (or the process ends).
#[derive(Debug)]
pub struct DirLock {
    file: File,
    dir: PathBuf,
}

impl DirLock {
    /// Creates `dir` if needed and locks it, or says who holds it.
    pub fn acquire(dir: &Path) -> Result<DirLock, LockError> {
        let path = dir.join(LOCK_FILE);
        let io = |source| LockError::Io { path: path.clone(), source };
        crate::storage::create_private_dir(dir, false).map_err(io)?;
        let mut file =
            OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path).map_err(io)?;
        let started = Instant::now();
        loop {
            match file.try_lock() {
                Ok(()) => break,
                Err(TryLockError::WouldBlock) => {
                    // A writer writes its pid right after locking; a probe writes nothing.
                    let pid = read_pid(&mut file);
                    if pid.is_some_and(|p| p != std::process::id()) || started.elapsed() >= PROBE_GRACE {
                        return Err(LockError::Held { dir: dir.to_owned(), pid });
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(TryLockError::Error(e)) => return Err(io(e)),
            }
        }
        file.set_len(0).map_err(io)?;
        file.seek(SeekFrom::Start(0)).map_err(io)?;
        writeln!(file, "{}", std::process::id()).map_err(io)?;
        Ok(DirLock { file, dir: dir.to_owned() })
    }

    /// The locked directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for DirLock {
    fn drop(&mut self) {
        // Unlocks with the close; the file stays (deleting it would race a new holder).
        // The pid is cleared so a later reader does not name a process that is gone.
        let _ = self.file.set_len(0);
    }
}

fn read_pid(file: &mut File) -> Option<u32> {
    let mut text = String::new();
    file.seek(SeekFrom::Start(0)).ok()?;
    file.take(32).read_to_string(&mut text).ok()?;
    text.trim().parse().ok()
}

/// Whether a live process holds `dir`, and its pid if it wrote one. Never takes the
/// lock for longer than the probe itself, and never creates anything.
pub fn holder(dir: &Path) -> Option<Option<u32>> {
    let mut file = File::open(dir.join(LOCK_FILE)).ok()?;
    match file.try_lock_shared() {
        Ok(()) => {
            let _ = file.unlock();
            None
        }
        Err(TryLockError::WouldBlock) => Some(read_pid(&mut file)),
        Err(TryLockError::Error(_)) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_with_the_pid_and_the_lock_frees_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let first = DirLock::acquire(dir.path()).unwrap();
        assert_eq!(holder(dir.path()), Some(Some(std::process::id())));
        // flock conflicts between two open file descriptions, even in one process.
        match DirLock::acquire(dir.path()) {
            Err(LockError::Held { pid, .. }) => assert_eq!(pid, Some(std::process::id())),
            other => panic!("expected Held, got {other:?}"),
        }
        drop(first);
        assert_eq!(holder(dir.path()), None);
        let again = DirLock::acquire(dir.path()).unwrap();
        assert_eq!(again.dir(), dir.path());
    }

    #[test]
    fn the_error_names_the_directory_and_the_pid() {
        let e = LockError::Held { dir: PathBuf::from("/data/d"), pid: Some(42) };
        let text = e.to_string();
        assert!(text.contains("/data/d") && text.contains("pid 42"), "{text}");
    }

    #[test]
    fn holder_of_an_unlocked_or_missing_directory_is_none() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(holder(dir.path()), None);
        assert_eq!(holder(&dir.path().join("missing")), None);
    }
}
