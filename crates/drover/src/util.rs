//! Small helpers shared by the subcommands: durations on the command line, the
//! shutdown signal, and the open-file limit.

use std::time::Duration;

/// Parses `250ms`, `3s`, `2m`, `1h` (a bare number is seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().map_err(|_| format!("{s:?} is not a duration like 500ms, 3s, 2m"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "" | "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("unknown unit {unit:?} in {s:?} (use ms, s, m, h)")),
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("{s:?} is not a valid duration"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// Raises the soft open-file limit to the hard limit (as servers commonly do: a
/// controller holds two sockets per connected node) and returns the admission
/// connection cap that limit can carry: `max_connections`, or less when the limit is
/// lower. Lowering is said once at INFO, not warned on every default start: nothing is
/// wrong until the fleet actually grows that large, and then the cap (with its
/// `conn:close` reason) is what protects the controller from running out of descriptors.
pub fn fit_connections_to_fd_limit(max_connections: usize) -> usize {
    let limit = rlimit::increase_nofile_limit(u64::MAX).unwrap_or(0);
    let fits = connections_that_fit(limit) as u64;
    if (max_connections as u64) <= fits {
        return max_connections;
    }
    tracing::info!(
        limit,
        max_connections,
        cap = fits,
        "the open-file limit caps admission connections (raise it with ulimit -n or LimitNOFILE= for larger fleets)"
    );
    fits as usize
}

/// Admission connections an open-file `limit` carries: two descriptors per node (its
/// control channel and its gRPC connection), after a reserve for the journal, the
/// listeners, CLI and HTTP connections (1,024, or a quarter of a small limit).
fn connections_that_fit(limit: u64) -> usize {
    let reserved = (limit / 4).min(1024);
    (limit.saturating_sub(reserved) / 2).max(1) as usize
}

/// Raises the soft open-file limit to the hard limit for a process that needs `wanted`
/// descriptors (the fleet bench's simulated nodes), warning when even that is short.
pub fn raise_fd_limit(wanted: u64) -> u64 {
    let limit = rlimit::increase_nofile_limit(u64::MAX).unwrap_or(0);
    if limit < wanted {
        tracing::warn!(limit, wanted, "the open-file limit is low for this many connections; raise it (ulimit -n)");
    }
    limit
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_small_open_file_limit_still_leaves_room_for_nodes() {
        assert_eq!(connections_that_fit(1_024), 384, "a quarter reserved, two per node");
        assert_eq!(connections_that_fit(20_000), 9_488, "1,024 reserved");
        assert_eq!(connections_that_fit(65_536), 32_256);
        assert_eq!(connections_that_fit(0), 1, "never zero");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("3s"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("5"), Ok(Duration::from_secs(5)));
        assert!(parse_duration("3 parsecs").is_err());
        assert!(parse_duration("").is_err());
    }
}
