//! The file seam under the journal.
//!
//! The journal touches files only through [`Storage`], so the same code runs on the
//! real file system ([`FsStorage`]), in memory with an explicit notion of what has been
//! synced ([`MemStorage`], whose `crash` drops every byte not yet synced), and under
//! injected faults ([`FaultyStorage`]: failed fsync, short writes, ENOSPC). One
//! conformance suite runs against all of them.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// A file opened for appending.
pub trait AppendFile: Send {
    /// Writes the whole buffer at the end of the file.
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()>;
    /// Makes everything written so far durable (`fdatasync`).
    fn sync_data(&mut self) -> io::Result<()>;
}

/// The operations the journal needs from a file system.
pub trait Storage: Send + Sync + 'static {
    /// Creates a directory and its parents.
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// The names of the files directly inside `dir`.
    fn list(&self, dir: &Path) -> io::Result<Vec<String>>;
    /// A whole file's contents.
    fn read(&self, path: &Path) -> io::Result<Vec<u8>>;
    /// Opens (creating if missing) a file for appending.
    fn open_append(&self, path: &Path) -> io::Result<Box<dyn AppendFile>>;
    /// Replaces `path` atomically with `bytes`: temp file, fsync, rename, fsync the
    /// directory.
    fn write_atomic(&self, path: &Path, bytes: &[u8]) -> io::Result<()>;
    /// Cuts a file to `len` bytes and syncs it.
    fn truncate(&self, path: &Path, len: u64) -> io::Result<()>;
    /// Removes a file.
    fn remove(&self, path: &Path) -> io::Result<()>;
    /// Makes the directory's entries (creations, renames, removals) durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
}

/// The real file system.
#[derive(Clone, Copy, Debug, Default)]
pub struct FsStorage;

struct FsFile(File);

impl AppendFile for FsFile {
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.0.write_all(buf)
    }
    fn sync_data(&mut self) -> io::Result<()> {
        self.0.sync_data()
    }
}

/// Journal directories are created owner-only (0700) and files 0600: inputs hold task
/// environments, task output and token metadata. A directory an earlier release made
/// with wider permissions is narrowed when the journal opens it.
pub(crate) const DIR_MODE: u32 = 0o700;
/// See [`DIR_MODE`].
pub(crate) const FILE_MODE: u32 = 0o600;

/// Creates `dir` and its missing parents with mode 0700; with `narrow`, also narrows
/// `dir` itself to 0700 if it already existed wider (for directories drover owns, such
/// as `journal/`, never for a data directory an operator named, which may be any
/// directory of theirs).
pub fn create_private_dir(dir: &Path, narrow: bool) -> io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    fs::DirBuilder::new().recursive(true).mode(DIR_MODE).create(dir)?;
    let meta = fs::metadata(dir)?;
    if narrow && meta.permissions().mode() & 0o077 != 0 {
        fs::set_permissions(dir, fs::Permissions::from_mode(DIR_MODE))?;
    }
    Ok(())
}

impl Storage for FsStorage {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        create_private_dir(dir, true)?;
        // Files an earlier release wrote 0644 are narrowed too.
        use std::os::unix::fs::PermissionsExt;
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            let meta = entry.metadata()?;
            if meta.is_file() && meta.permissions().mode() & 0o077 != 0 {
                fs::set_permissions(entry.path(), fs::Permissions::from_mode(FILE_MODE))?;
            }
        }
        Ok(())
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                names.push(entry.file_name().to_string_lossy().into_owned());
            }
        }
        names.sort();
        Ok(names)
    }
    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        fs::read(path)
    }
    fn open_append(&self, path: &Path) -> io::Result<Box<dyn AppendFile>> {
        use std::os::unix::fs::OpenOptionsExt;
        Ok(Box::new(FsFile(OpenOptions::new().create(true).append(true).mode(FILE_MODE).open(path)?)))
    }
    fn write_atomic(&self, path: &Path, bytes: &[u8]) -> io::Result<()> {
        let tmp = path.with_extension("tmp");
        {
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = OpenOptions::new().create(true).write(true).truncate(true).mode(FILE_MODE).open(&tmp)?;
            f.write_all(bytes)?;
            f.sync_all()?;
        }
        fs::rename(&tmp, path)?;
        self.sync_dir(path.parent().unwrap_or(Path::new(".")))
    }
    fn truncate(&self, path: &Path, len: u64) -> io::Result<()> {
        let f = OpenOptions::new().write(true).open(path)?;
        f.set_len(len)?;
        f.sync_all()
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        fs::remove_file(path)
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }
}

#[derive(Debug, Default)]
struct MemFile {
    data: Vec<u8>,
    synced: usize,
}

/// An in-memory file system that knows which bytes were synced. `crash` keeps only
/// those, as a power loss would.
#[derive(Clone, Debug, Default)]
pub struct MemStorage {
    files: Arc<Mutex<BTreeMap<PathBuf, MemFile>>>,
}

impl MemStorage {
    /// An empty file system.
    pub fn new() -> Self {
        MemStorage::default()
    }

    fn files(&self) -> MutexGuard<'_, BTreeMap<PathBuf, MemFile>> {
        // A poisoned lock means a test thread panicked; the data is still usable.
        self.files.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Drops every byte that was written but not synced.
    pub fn crash(&self) {
        for f in self.files().values_mut() {
            f.data.truncate(f.synced);
        }
    }

    /// A copy of a file's current contents (synced or not).
    pub fn contents(&self, path: &Path) -> Option<Vec<u8>> {
        self.files().get(path).map(|f| f.data.clone())
    }

    /// Overwrites a file's contents (as durable), for damage tests.
    pub fn set_contents(&self, path: &Path, data: Vec<u8>) {
        let synced = data.len();
        self.files().insert(path.to_owned(), MemFile { data, synced });
    }
}

struct MemAppend {
    fs: MemStorage,
    path: PathBuf,
}

impl AppendFile for MemAppend {
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.fs.files().entry(self.path.clone()).or_default().data.extend_from_slice(buf);
        Ok(())
    }
    fn sync_data(&mut self) -> io::Result<()> {
        let mut files = self.fs.files();
        let f = files.entry(self.path.clone()).or_default();
        f.synced = f.data.len();
        Ok(())
    }
}

fn not_found(path: &Path) -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, format!("{} not found", path.display()))
}

impl Storage for MemStorage {
    fn create_dir_all(&self, _dir: &Path) -> io::Result<()> {
        Ok(())
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        Ok(self
            .files()
            .keys()
            .filter(|p| p.parent() == Some(dir))
            .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect())
    }
    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        self.contents(path).ok_or_else(|| not_found(path))
    }
    fn open_append(&self, path: &Path) -> io::Result<Box<dyn AppendFile>> {
        self.files().entry(path.to_owned()).or_default();
        Ok(Box::new(MemAppend { fs: self.clone(), path: path.to_owned() }))
    }
    fn write_atomic(&self, path: &Path, bytes: &[u8]) -> io::Result<()> {
        self.set_contents(path, bytes.to_vec());
        Ok(())
    }
    fn truncate(&self, path: &Path, len: u64) -> io::Result<()> {
        let mut files = self.files();
        let f = files.get_mut(path).ok_or_else(|| not_found(path))?;
        let len = usize::try_from(len).unwrap_or(usize::MAX).min(f.data.len());
        f.data.truncate(len);
        f.synced = f.synced.min(len);
        Ok(())
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        self.files().remove(path).map(|_| ()).ok_or_else(|| not_found(path))
    }
    fn sync_dir(&self, _dir: &Path) -> io::Result<()> {
        Ok(())
    }
}

/// Which faults to inject; shared between the test and the storage.
#[derive(Debug, Default)]
pub struct Faults {
    /// Fail every `sync_data` once this many have succeeded.
    pub fail_sync_after: AtomicU64,
    /// Accept this many more appended bytes, then write a short piece and fail with
    /// ENOSPC.
    pub space_left: AtomicU64,
    /// A slow disk: while this file exists, every `sync_data` first sleeps for the
    /// number of milliseconds it holds (a process test's switch; see
    /// `DROVER_TEST_SLOW_FSYNC` in docs/operations.md).
    pub stall_while: Option<std::path::PathBuf>,
}

impl Faults {
    /// No faults: every limit at its maximum.
    pub fn none() -> Arc<Faults> {
        Arc::new(Faults::nothing())
    }

    /// No faults, as a value (to set one field and leave the others).
    pub fn nothing() -> Faults {
        Faults { fail_sync_after: AtomicU64::new(u64::MAX), space_left: AtomicU64::new(u64::MAX), stall_while: None }
    }

    /// How long the next sync stalls (0: the switch file is absent or unreadable).
    fn stall(&self) -> std::time::Duration {
        let ms = self
            .stall_while
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .and_then(|t| t.trim().parse::<u64>().ok())
            .unwrap_or(0);
        std::time::Duration::from_millis(ms.min(60_000))
    }
}

/// Wraps another storage and injects the faults in [`Faults`] into appends and syncs.
#[derive(Clone)]
pub struct FaultyStorage {
    inner: Arc<dyn Storage>,
    faults: Arc<Faults>,
}

impl FaultyStorage {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn Storage>, faults: Arc<Faults>) -> Self {
        FaultyStorage { inner, faults }
    }
}

struct FaultyFile {
    inner: Box<dyn AppendFile>,
    faults: Arc<Faults>,
}

impl AppendFile for FaultyFile {
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        let left = self.faults.space_left.load(Ordering::SeqCst);
        if (buf.len() as u64) > left {
            // A short write: part of the buffer lands, then the disk is full.
            let part = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
            self.inner.write_all(&buf[..part])?;
            self.faults.space_left.store(0, Ordering::SeqCst);
            return Err(io::Error::from_raw_os_error(28)); // ENOSPC
        }
        self.faults.space_left.fetch_sub(buf.len() as u64, Ordering::SeqCst);
        self.inner.write_all(buf)
    }
    fn sync_data(&mut self) -> io::Result<()> {
        let left = self.faults.fail_sync_after.load(Ordering::SeqCst);
        if left == 0 {
            return Err(io::Error::other("injected fsync failure (EIO)"));
        }
        self.faults.fail_sync_after.store(left.saturating_sub(1), Ordering::SeqCst);
        let stall = self.faults.stall();
        if !stall.is_zero() {
            std::thread::sleep(stall);
        }
        self.inner.sync_data()
    }
}

impl Storage for FaultyStorage {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        self.inner.create_dir_all(dir)
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        self.inner.list(dir)
    }
    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        self.inner.read(path)
    }
    fn open_append(&self, path: &Path) -> io::Result<Box<dyn AppendFile>> {
        Ok(Box::new(FaultyFile { inner: self.inner.open_append(path)?, faults: self.faults.clone() }))
    }
    fn write_atomic(&self, path: &Path, bytes: &[u8]) -> io::Result<()> {
        self.inner.write_atomic(path, bytes)
    }
    fn truncate(&self, path: &Path, len: u64) -> io::Result<()> {
        self.inner.truncate(path, len)
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        self.inner.remove(path)
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        self.inner.sync_dir(dir)
    }
}
