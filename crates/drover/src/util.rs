//! Small helpers shared by the subcommands: durations on the command line, the
//! shutdown signal, the open-file limit, and the Raft port's TLS from PEM files.

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
/// controller holds two sockets per connected node) and fits the connection caps of the
/// three ports into it, keeping a reserve for the journal (segments, checkpoints), the
/// listeners and the process itself, so a flood of connections can never leave a
/// checkpoint without a descriptor. Lowering is said once at INFO, not warned on every
/// default start: nothing is wrong until the fleet actually grows that large, and then
/// the caps (with their refusals) are what protect the controller.
pub fn fit_connections_to_fd_limit(config: &mut drover_controller::ControllerConfig) {
    let limit = rlimit::increase_nofile_limit(u64::MAX).unwrap_or(0);
    let fit = connections_that_fit(limit);
    let wanted = (config.max_connections, config.max_cli_connections, config.max_http_connections);
    config.max_connections = config.max_connections.min(fit.nodes);
    config.max_cli_connections = config.max_cli_connections.min(fit.others);
    config.max_http_connections = config.max_http_connections.min(fit.others);
    let got = (config.max_connections, config.max_cli_connections, config.max_http_connections);
    if got != wanted {
        tracing::info!(
            limit,
            nodes = got.0,
            cli_connections = got.1,
            http_connections = got.2,
            "the open-file limit caps connections (raise it with ulimit -n or LimitNOFILE= for larger fleets)"
        );
    }
}

/// The connection caps an open-file limit carries.
#[derive(Debug, PartialEq, Eq)]
struct Fit {
    /// Admission connections: two descriptors per node (its control channel and its
    /// gRPC connection).
    nodes: usize,
    /// gRPC connections beyond the nodes' (CLIs), and HTTP connections: each.
    others: usize,
}

/// How `limit` descriptors are shared: a reserve (1,024, or a quarter of a small limit)
/// of which a quarter each goes to CLI and HTTP connections and the other half stays
/// free for the journal, the listeners and the process; the rest, two per node.
fn connections_that_fit(limit: u64) -> Fit {
    let reserved = (limit / 4).min(1024);
    Fit { nodes: (limit.saturating_sub(reserved) / 2).max(1) as usize, others: (reserved / 4).max(1) as usize }
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

/// Mutual TLS for a Raft port (the controllers' and the coordinator replicas'): this
/// member's certificate and key, and the cluster CA that issued every member's.
pub fn raft_tls(
    ca: &std::path::Path,
    cert: &std::path::Path,
    key: &std::path::Path,
) -> anyhow::Result<drover_raft::tls::RaftTls> {
    use anyhow::Context;
    let read = |p: &std::path::Path| std::fs::read(p).with_context(|| format!("cannot read {}", p.display()));
    Ok(drover_raft::tls::RaftTls::new(&read(cert)?, &read(key)?, &read(ca)?)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_small_open_file_limit_still_leaves_room_for_nodes() {
        assert_eq!(connections_that_fit(1_024), Fit { nodes: 384, others: 64 }, "a quarter reserved, two per node");
        assert_eq!(connections_that_fit(20_000), Fit { nodes: 9_488, others: 256 }, "1,024 reserved");
        assert_eq!(connections_that_fit(65_536), Fit { nodes: 32_256, others: 256 });
        assert_eq!(connections_that_fit(0), Fit { nodes: 1, others: 1 }, "never zero");
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
