//! Running one task attempt as a real process.
//!
//! The job is a local path or an `http(s)://` URL downloaded into a cache and checked
//! against the task's sha256 (any failure is `DownloadError`). The process gets the
//! task's arguments directly (never a shell), a clean environment (`PATH` plus the
//! task's variables), its own process group, and an address-space limit from the
//! task's memory. stdout and stderr are captured up to a bound each; the rest is
//! dropped and a marker says how much. On timeout or abort the whole process group is
//! killed; after a normal exit, anything the job left behind in its group is killed too.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use drover_proto::v1;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;
use tokio::sync::oneshot;

/// Largest job download accepted.
pub const MAX_DOWNLOAD: u64 = 256 << 20;

/// Why an attempt did not complete.
pub type Failure = (v1::TaskErrorKind, String);

use drover_wire::unix_ms as now_ms;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Downloads `url` into `cache` (once per URL and digest) and returns the file's path.
pub async fn fetch(url: &str, sha256: Option<&str>, cache: &Path) -> Result<PathBuf, String> {
    let name = hex(&Sha256::digest(format!("{url}\n{}", sha256.unwrap_or("")).as_bytes()));
    let path = cache.join(&name);
    if let Some(want) = sha256
        && let Ok(bytes) = tokio::fs::read(&path).await
        && hex(&Sha256::digest(&bytes)).eq_ignore_ascii_case(want)
    {
        return Ok(path);
    }
    tokio::fs::create_dir_all(cache).await.map_err(|e| format!("cache {}: {e}", cache.display()))?;
    let url_owned = url.to_owned();
    let bytes = tokio::task::spawn_blocking(move || -> Result<Vec<u8>, String> {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(60)))
            .http_status_as_error(true)
            .build()
            .into();
        let mut response = agent.get(&url_owned).call().map_err(|e| format!("GET {url_owned}: {e}"))?;
        response
            .body_mut()
            .with_config()
            .limit(MAX_DOWNLOAD)
            .read_to_vec()
            .map_err(|e| format!("GET {url_owned}: reading the body: {e}"))
    })
    .await
    .map_err(|e| format!("download task failed: {e}"))??;
    let got = hex(&Sha256::digest(&bytes));
    if let Some(want) = sha256
        && !got.eq_ignore_ascii_case(want)
    {
        return Err(format!("sha256 mismatch for {url}: expected {want}, got {got}"));
    }
    let tmp = cache.join(format!("{name}.part"));
    {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(0o755)
            .open(&tmp)
            .map_err(|e| format!("cache {}: {e}", tmp.display()))?;
        std::io::Write::write_all(&mut f, &bytes).map_err(|e| format!("cache {}: {e}", tmp.display()))?;
        f.sync_all().map_err(|e| format!("cache {}: {e}", tmp.display()))?;
    }
    std::fs::rename(&tmp, &path).map_err(|e| format!("cache {}: {e}", path.display()))?;
    Ok(path)
}

/// Reads a pipe to its end, keeping the first `max` bytes; returns them (with a
/// truncation marker appended when bytes were dropped) and whether it truncated.
async fn capture(mut pipe: impl tokio::io::AsyncRead + Unpin, max: usize) -> (Vec<u8>, bool) {
    let mut kept = Vec::new();
    let mut dropped = 0u64;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let room = max.saturating_sub(kept.len()).min(n);
                kept.extend_from_slice(&buf[..room]);
                dropped += (n - room) as u64;
            }
        }
    }
    if dropped > 0 {
        kept.extend_from_slice(format!("\n[drover: output truncated, {dropped} more bytes dropped]\n").as_bytes());
    }
    (kept, dropped > 0)
}

fn kill_group(pgid: Option<u32>) {
    if let Some(p) = pgid
        && let Ok(p) = i32::try_from(p)
    {
        // ESRCH (nobody left) is the usual answer after a clean exit.
        let _ = killpg(Pid::from_raw(p), Signal::SIGKILL);
    }
}

/// Sets the child's address-space limit (runs between fork and exec).
#[allow(unsafe_code)]
fn limit_memory(cmd: &mut tokio::process::Command, memory_mb: u64) {
    if memory_mb == 0 {
        return;
    }
    let bytes = memory_mb.saturating_mul(1 << 20);
    // SAFETY: the closure runs in the forked child before exec and only calls
    // setrlimit(2), which is async-signal-safe; it allocates nothing and touches no lock.
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_AS, bytes, bytes)
                .map_err(std::io::Error::from)
        });
    }
}

/// Runs one attempt. `started` is called once the process exists; `kill` aborts it.
pub async fn run(
    spec: &v1::TaskSpec,
    cache: &Path,
    max_output: usize,
    kill: oneshot::Receiver<()>,
    started: impl FnOnce(i64),
) -> Result<v1::TaskOutcome, Failure> {
    let path = if spec.job_addr.starts_with("http://") || spec.job_addr.starts_with("https://") {
        fetch(&spec.job_addr, spec.sha256.as_deref(), cache).await.map_err(|e| (v1::TaskErrorKind::DownloadError, e))?
    } else {
        PathBuf::from(&spec.job_addr)
    };
    let mut cmd = tokio::process::Command::new(&path);
    cmd.args(&spec.args)
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .envs(&spec.env)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    limit_memory(&mut cmd, spec.memory_mb);
    let mut child =
        cmd.spawn().map_err(|e| (v1::TaskErrorKind::RunningError, format!("cannot start {}: {e}", path.display())))?;
    let pgid = child.id();
    let started_ms = now_ms();
    started(started_ms);
    let stdout = child.stdout.take().map(|p| tokio::spawn(capture(p, max_output)));
    let stderr = child.stderr.take().map(|p| tokio::spawn(capture(p, max_output)));
    let timeout = Duration::from_millis(spec.timeout_ms.max(1));
    let ended = tokio::select! {
        status = child.wait() => Ok(status),
        _ = tokio::time::sleep(timeout) => Err((v1::TaskErrorKind::TimedOut, format!("exceeded its timeout of {} ms; killed", spec.timeout_ms))),
        _ = kill => Err((v1::TaskErrorKind::Aborted, "aborted by the manager; killed".to_owned())),
    };
    // Whatever happened, nothing of the job's process group outlives the attempt.
    kill_group(pgid);
    let _ = child.wait().await;
    let finished_ms = now_ms();
    let collect = |h: Option<tokio::task::JoinHandle<(Vec<u8>, bool)>>| async move {
        match h {
            Some(h) => {
                tokio::time::timeout(Duration::from_secs(2), h).await.ok().and_then(Result::ok).unwrap_or_default()
            }
            None => (Vec::new(), false),
        }
    };
    let (out, out_cut) = collect(stdout).await;
    let (err, err_cut) = collect(stderr).await;
    let status = ended?.map_err(|e| (v1::TaskErrorKind::RunningError, format!("waiting for the job: {e}")))?;
    let exit_code = match status.code() {
        Some(c) => c,
        None => {
            use std::os::unix::process::ExitStatusExt;
            128 + status.signal().unwrap_or(0)
        }
    };
    Ok(v1::TaskOutcome {
        exit_code,
        stdout: out,
        stderr: err,
        stdout_truncated: out_cut,
        stderr_truncated: err_cut,
        started_at_ms: started_ms,
        finished_at_ms: finished_ms,
    })
}
