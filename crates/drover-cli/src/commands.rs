//! Each operator command: what it sends, how it prints the answer (a table, or
//! `--json`), and whether it succeeded. Node arguments may be a uuid, a unique uuid
//! prefix, or a node name.

use std::time::Duration;

use drover_proto::{Payload, v1};
use serde_json::json;

use crate::client::{CliError, Ctx, Outcome, Session, request};

/// Formats an exact decimal.
pub fn decimal(d: &v1::Decimal) -> String {
    drover_proto::format_decimal(d.mantissa, d.scale)
}

pub(crate) fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    // Every cell may hold what a peer sent (names, versions, ids, descriptions).
    let rows: Vec<Vec<String>> =
        rows.iter().map(|r| r.iter().map(|c| crate::printable(c).into_owned()).collect()).collect();
    let rows = &rows;
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    let mut out = line(headers.iter().map(|h| h.to_string()).collect());
    for r in rows {
        out.push('\n');
        out.push_str(&line(r.clone()));
    }
    out
}

fn short(id: &str) -> String {
    crate::printable(&id.chars().take(12).collect::<String>()).into_owned()
}

fn streaming(s: &[v1::StreamAssignment]) -> String {
    s.iter().map(|a| format!("{}@{}", a.pair, a.epoch)).collect::<Vec<_>>().join(",")
}

/// A moment as a UTC date and how far it is from now: `2026-12-03 19:05 UTC (in 23h)`.
fn when(ms: i64) -> String {
    let now = drover_wire::unix_ms();
    let date = match time::OffsetDateTime::from_unix_timestamp(ms.div_euclid(1000)) {
        Ok(t) => format!("{}-{:02}-{:02} {:02}:{:02} UTC", t.year(), t.month() as u8, t.day(), t.hour(), t.minute()),
        Err(_) => format!("{ms} ms"),
    };
    let s = (ms - now) / 1000;
    let span = |s: i64| match s {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    };
    if s >= 0 { format!("{date} (in {})", span(s)) } else { format!("{date} ({} ago)", span(-s)) }
}

fn ago(ms: i64) -> String {
    let now = drover_wire::unix_ms();
    let s = (now - ms).max(0) / 1000;
    if s < 120 {
        format!("{s}s ago")
    } else if s < 7200 {
        format!("{}m ago", s / 60)
    } else {
        format!("{}h ago", s / 3600)
    }
}

/// The node list.
pub async fn list_nodes(ctx: &Ctx) -> Result<Vec<v1::NodeInfo>, CliError> {
    let out = request(ctx, Vec::new(), v1::ControllerListNodesV1Req {}.into()).await?;
    out.replies
        .into_iter()
        .find_map(|r| match r.payload {
            Payload::ControllerListNodesV1Reply(l) => Some(l.nodes),
            _ => None,
        })
        .ok_or_else(|| CliError::Decode("no node list in the reply".into()))
}

/// Turns names and uuid prefixes into node uuids (unknown arguments pass through,
/// so the controller reports them missing).
pub async fn resolve(ctx: &Ctx, args: &[String]) -> Result<Vec<String>, CliError> {
    let nodes = list_nodes(ctx).await?;
    args.iter()
        .map(|a| {
            if nodes.iter().any(|n| &n.node_uuid == a) {
                return Ok(a.clone());
            }
            let hits: Vec<&v1::NodeInfo> =
                nodes.iter().filter(|n| &n.name == a || n.node_uuid.starts_with(a.as_str())).collect();
            match hits.as_slice() {
                [one] => Ok(one.node_uuid.clone()),
                [] => Err(CliError::Usage(format!(
                    "no node is named {a:?} or has an id starting with it (`drover nodes` lists them)"
                ))),
                many => Err(CliError::Usage(format!(
                    "{a:?} matches {} nodes ({}); give more of the uuid",
                    many.len(),
                    many.iter().map(|n| short(&n.node_uuid)).collect::<Vec<_>>().join(", ")
                ))),
            }
        })
        .collect()
}

fn print_incomplete(out: &Outcome) {
    for m in &out.missing {
        eprintln!("missing: {} (offline or unknown)", crate::printable(m));
    }
    if out.timed_out {
        let got: Vec<&str> = out.replies.iter().filter_map(|r| r.node.as_deref()).collect();
        eprintln!(
            "timed out: {} of {} replies came",
            out.replies.len(),
            out.expected.map_or("?".to_string(), |e| e.to_string())
        );
        let _ = got;
    }
}

/// `drover nodes`.
pub async fn nodes(ctx: &Ctx) -> Result<bool, CliError> {
    let nodes = list_nodes(ctx).await?;
    if ctx.json {
        let v: Vec<_> = nodes
            .iter()
            .map(|n| {
                json!({
                    "id": n.node_uuid, "name": n.name, "version": n.version, "state": n.state,
                    "known_pairs": n.known_pairs,
                    "streaming": n.streaming.iter().map(|a| json!({"pair": a.pair, "epoch": a.epoch})).collect::<Vec<_>>(),
                    "connected_since_ms": n.connected_since_ms, "worker": n.worker,
                    "gone_since_ms": (n.gone_since_ms != 0).then_some(n.gone_since_ms),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    } else {
        let rows: Vec<Vec<String>> = nodes
            .iter()
            .map(|n| {
                vec![
                    short(&n.node_uuid),
                    n.name.clone(),
                    n.state.clone(),
                    n.version.clone(),
                    n.known_pairs.join(","),
                    streaming(&n.streaming),
                    if n.gone_since_ms != 0 {
                        format!("gone {}", ago(n.gone_since_ms))
                    } else {
                        format!("connected {}", ago(n.connected_since_ms))
                    },
                ]
            })
            .collect();
        println!("{}", table(&["ID", "NAME", "STATE", "VERSION", "KNOWN", "STREAMING", "SINCE"], &rows));
    }
    Ok(true)
}

/// `drover version`.
pub async fn version(ctx: &Ctx) -> Result<bool, CliError> {
    let out = request(ctx, Vec::new(), v1::ControllerAppVersionV1Req {}.into()).await?;
    let Some(Payload::ControllerAppVersionV1Reply(v)) = out.replies.into_iter().next().map(|r| r.payload) else {
        return Err(CliError::Decode("no version in the reply".into()));
    };
    if ctx.json {
        println!("{}", json!({"controller": v.version, "protocol": v.protocol, "cli": env!("CARGO_PKG_VERSION")}));
    } else {
        println!("controller {} (protocol {}), cli {}", v.version, v.protocol, env!("CARGO_PKG_VERSION"));
    }
    Ok(true)
}

/// Sends a command the controller answers itself and returns its one reply, picked
/// by `pick`: `Ok(None)` if the controller refused it (the reason is printed), an
/// error if the reply is of another kind.
pub(crate) async fn controller_reply<T>(
    ctx: &Ctx,
    payload: Payload,
    pick: impl FnOnce(Payload) -> Option<T>,
) -> Result<Option<T>, CliError> {
    let out = request(ctx, Vec::new(), payload).await?;
    if !print_unknown_or(&out) {
        return Ok(None);
    }
    let reply = out.replies.into_iter().next().map(|r| r.payload).ok_or_else(|| CliError::Decode("no reply".into()))?;
    pick(reply).map(Some).ok_or_else(|| CliError::Decode("unexpected reply".into()))
}

fn print_unknown_or(out: &Outcome) -> bool {
    for r in &out.replies {
        if let Payload::UnknownCommandV1Notify(u) = &r.payload {
            eprintln!("refused: {}", crate::printable(&u.reason));
            return false;
        }
    }
    true
}

/// What `kick`, `drain` and `drain --undo` do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeAction {
    /// Disconnect; the node reconnects by itself.
    Kick,
    /// Move its pairs away, make-before-break.
    Drain,
    /// Undo a drain.
    Undrain,
}

/// `drover kick NODE…`, `drover drain [--undo] NODE…`.
pub async fn kick_or_drain(ctx: &Ctx, args: &[String], action: NodeAction) -> Result<bool, CliError> {
    let ids = resolve(ctx, args).await?;
    let payload: Payload = match action {
        NodeAction::Kick => v1::ControllerKickNodesV1Req { node_uuids: ids }.into(),
        NodeAction::Drain | NodeAction::Undrain => {
            v1::ControllerDrainNodesV1Req { node_uuids: ids, undo: action == NodeAction::Undrain }.into()
        }
    };
    let Some((done, missing)) = controller_reply(ctx, payload, |p| match p {
        Payload::ControllerKickNodesV1Reply(k) => Some((k.kicked, k.missing)),
        Payload::ControllerDrainNodesV1Reply(d) => Some((d.draining, d.missing)),
        _ => None,
    })
    .await?
    else {
        return Ok(false);
    };
    let verb = match action {
        NodeAction::Kick => "kicked",
        NodeAction::Drain => "draining",
        NodeAction::Undrain => "undrained",
    };
    if ctx.json {
        println!("{}", json!({ verb: done, "missing": missing }));
    } else {
        for d in &done {
            println!("{verb}: {}", short(d));
        }
        for m in &missing {
            eprintln!("missing: {} (offline)", short(m));
        }
    }
    Ok(missing.is_empty())
}

/// `drover status NODE…|--all`.
pub async fn status(ctx: &Ctx, args: &[String], all: bool) -> Result<bool, CliError> {
    let ids = if all {
        list_nodes(ctx).await?.into_iter().filter(|n| n.state != "gone").map(|n| n.node_uuid).collect()
    } else {
        resolve(ctx, args).await?
    };
    if ids.is_empty() {
        return Err(CliError::Usage("no nodes to ask (name some, or use --all)".into()));
    }
    let out = request(ctx, ids.clone(), v1::NodeStatusV1Req {}.into()).await?;
    let replies: Vec<(String, v1::NodeStatusV1Reply)> = out
        .replies
        .iter()
        .filter_map(|r| match &r.payload {
            Payload::NodeStatusV1Reply(s) => Some((r.node.clone().unwrap_or_default(), s.clone())),
            _ => None,
        })
        .collect();
    let silent: Vec<&String> =
        ids.iter().filter(|id| !out.missing.contains(id) && !replies.iter().any(|(n, _)| n == *id)).collect();
    if ctx.json {
        let v: Vec<_> = replies
            .iter()
            .map(|(n, s)| {
                json!({"id": n, "name": s.name, "version": s.version, "known_pairs": s.known_pairs,
                "streaming": s.streaming.iter().map(|a| json!({"pair": a.pair, "epoch": a.epoch})).collect::<Vec<_>>(),
                "uptime_ms": s.uptime_ms, "updates_sent": s.updates_sent})
            })
            .collect();
        println!("{}", json!({"replies": v, "missing": out.missing, "no_reply": silent, "expected": out.expected}));
    } else {
        let rows: Vec<Vec<String>> = replies
            .iter()
            .map(|(n, s)| {
                vec![
                    short(n),
                    s.name.clone(),
                    streaming(&s.streaming),
                    format!("{}s", s.uptime_ms / 1000),
                    s.updates_sent.to_string(),
                ]
            })
            .collect();
        println!("{}", table(&["ID", "NAME", "STREAMING", "UPTIME", "UPDATES"], &rows));
        print_incomplete(&out);
        for s in &silent {
            eprintln!("no reply: {}", crate::printable(s));
        }
    }
    Ok(out.complete())
}

/// `drover shutdown NODE…`.
pub async fn shutdown(ctx: &Ctx, args: &[String]) -> Result<bool, CliError> {
    let ids = resolve(ctx, args).await?;
    let out = request(ctx, ids, v1::NodeShutdownV1Req { reason: "operator request".into() }.into()).await?;
    let done: Vec<String> = out
        .replies
        .iter()
        .filter(|r| matches!(r.payload, Payload::NodeShutdownV1Reply(_)))
        .filter_map(|r| r.node.clone())
        .collect();
    if ctx.json {
        println!("{}", json!({"shut_down": done, "missing": out.missing, "timed_out": out.timed_out}));
    } else {
        for d in &done {
            println!("shutting down: {}", crate::printable(d));
        }
        print_incomplete(&out);
    }
    Ok(out.complete())
}

/// `drover stream NODE --pairs … [--unpin]`.
pub async fn stream(ctx: &Ctx, node: &str, pairs: Vec<String>, unpin: bool) -> Result<bool, CliError> {
    let id = resolve(ctx, &[node.to_owned()]).await?.remove(0);
    let req = v1::ControllerStreamPairsV1Req { node_uuid: id.clone(), pairs, unpin };
    let Some(r) = controller_reply(ctx, req.into(), |p| match p {
        Payload::ControllerStreamPairsV1Reply(r) => Some(r),
        _ => None,
    })
    .await?
    else {
        return Ok(false);
    };
    if ctx.json {
        println!(
            "{}",
            json!({"node": id, "assigned": r.assigned.iter().map(|a| json!({"pair": a.pair, "epoch": a.epoch})).collect::<Vec<_>>(),
                "refused": r.refused, "error": r.error})
        );
    } else {
        if !r.error.is_empty() {
            eprintln!("error: {}", crate::printable(&r.error));
        }
        for a in &r.assigned {
            println!(
                "{} → {} (epoch {}){}",
                a.pair,
                short(&id),
                a.epoch,
                if unpin { ", unpinned" } else { ", pinned" }
            );
        }
        for p in &r.refused {
            eprintln!("refused: {p} (the node does not know it)");
        }
    }
    Ok(r.error.is_empty() && r.refused.is_empty())
}

/// A price row: the streamer and epoch are who streams the pair *now* ("-" when
/// nobody does, as on the dashboard); the price's own source is in `--json`.
fn price_row(v: &v1::PriceView) -> Vec<String> {
    let p = v.price.clone().unwrap_or_default();
    let (streamer, epoch) = if v.streamer.is_empty() {
        ("-".to_owned(), "-".to_owned())
    } else {
        (short(&v.streamer), v.epoch.to_string())
    };
    vec![p.pair.clone(), p.price.as_ref().map(decimal).unwrap_or_default(), ago(p.upstream_time_ms), streamer, epoch]
}

fn price_json(v: &v1::PriceView) -> serde_json::Value {
    let p = v.price.clone().unwrap_or_default();
    json!({"pair": p.pair, "price": p.price.as_ref().map(decimal), "upstream_time_ms": p.upstream_time_ms,
        "seq": p.seq, "streamer": (!v.streamer.is_empty()).then_some(&v.streamer), "epoch": v.epoch,
        "source": v.source, "source_epoch": v.source_epoch})
}

/// `drover prices [PAIR…] [--watch [--duration D]]`. `--json` prints one document (an
/// array); with `--watch` it prints JSON Lines (the snapshot, then one object per
/// update), the usual shape of a stream. A watch outlives controller restarts: it
/// reconnects with backoff and says so on stderr.
pub async fn prices(ctx: &Ctx, pairs: Vec<String>, watch: bool, duration: Option<Duration>) -> Result<bool, CliError> {
    let until = duration.map(|d| tokio::time::Instant::now() + d);
    let mut session = Session::open(ctx).await?;
    let mut backoff = Duration::from_millis(200);
    loop {
        let req = v1::ControllerPricesV1Req { pairs: pairs.clone(), watch };
        let out = session.request(ctx, Vec::new(), req.into(), !watch).await?;
        let Some(Payload::ControllerPricesV1Reply(r)) = out.replies.into_iter().next().map(|r| r.payload) else {
            return Err(CliError::Decode("no prices in the reply".into()));
        };
        if ctx.json && !watch {
            let all: Vec<serde_json::Value> = r.prices.iter().map(price_json).collect();
            return Ok(print_line(&serde_json::Value::Array(all).to_string()));
        }
        if ctx.json {
            for v in &r.prices {
                if !print_line(&price_json(v).to_string()) {
                    return Ok(true);
                }
            }
        } else {
            let rows: Vec<Vec<String>> = r.prices.iter().map(price_row).collect();
            if !print_line(&table(&["PAIR", "PRICE", "UPSTREAM", "STREAMER", "EPOCH"], &rows)) {
                return Ok(true);
            }
        }
        if !watch {
            return Ok(true);
        }
        let lost = loop {
            let next = match until {
                Some(u) => match tokio::time::timeout_at(u, session.next()).await {
                    Ok(n) => n,
                    Err(_) => return Ok(true),
                },
                None => session.next().await,
            };
            let reply = match next {
                Ok(Some((_, reply))) => reply,
                Ok(None) => break "the controller closed the stream".to_owned(),
                Err(e) => break e.to_string(),
            };
            if let Payload::ControllerPriceV1Notify(n) = reply.payload
                && let Some(v) = n.price
            {
                let line = if ctx.json {
                    price_json(&v).to_string()
                } else {
                    let r = price_row(&v);
                    format!("{:<8} {:>12}  streamer {}  epoch {}", r[0], r[1], r[3], r[4])
                };
                // A reader that went away (`| head`) ends the watch quietly.
                if !print_line(&line) {
                    return Ok(true);
                }
            }
        };
        eprintln!("watch: {lost}; reconnecting");
        session = loop {
            let wait = match until {
                Some(u) if tokio::time::Instant::now() + backoff >= u => return Ok(true),
                _ => backoff,
            };
            tokio::time::sleep(wait).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
            match Session::open(ctx).await {
                Ok(s) => break s,
                Err(e) => eprintln!("watch: {e}"),
            }
        };
        backoff = Duration::from_millis(200);
        eprintln!("watch: reconnected");
    }
}

/// Writes one line to stdout; false once the reader has gone away.
fn print_line(line: &str) -> bool {
    use std::io::Write;
    writeln!(std::io::stdout().lock(), "{line}").is_ok()
}

fn role_name(r: i32) -> &'static str {
    match v1::TokenRole::try_from(r) {
        Ok(v1::TokenRole::Join) => "join",
        Ok(v1::TokenRole::Read) => "read",
        Ok(v1::TokenRole::Admin) => "admin",
        _ => "?",
    }
}

/// `drover token create --role … [--ttl D] [--uses N] [--description …]`.
pub async fn token_create(
    ctx: &Ctx,
    role: &str,
    ttl: Option<Duration>,
    uses: u32,
    description: String,
) -> Result<bool, CliError> {
    let role = match role {
        "join" => v1::TokenRole::Join,
        "read" => v1::TokenRole::Read,
        "admin" => v1::TokenRole::Admin,
        other => return Err(CliError::Usage(format!("unknown role {other:?}: use join, read or admin"))),
    };
    let req = v1::ControllerTokenCreateV1Req {
        role: role as i32,
        ttl_ms: ttl.map_or(0, |d| d.as_millis() as u64),
        uses,
        description,
    };
    let Some(r) = controller_reply(ctx, req.into(), |p| match p {
        Payload::ControllerTokenCreateV1Reply(r) => Some(r),
        _ => None,
    })
    .await?
    else {
        return Ok(false);
    };
    if ctx.json {
        println!("{}", json!({"id": r.id, "token": r.token, "expires_at_ms": r.expires_at_ms}));
    } else {
        // The token alone on stdout, so that `$(drover token create …)` works; the rest on stderr.
        println!("{}", r.token);
        eprintln!("token {} created; it is shown only now", r.id);
    }
    Ok(true)
}

/// `drover token list`.
pub async fn token_list(ctx: &Ctx) -> Result<bool, CliError> {
    let Some(r) = controller_reply(ctx, v1::ControllerTokenListV1Req {}.into(), |p| match p {
        Payload::ControllerTokenListV1Reply(r) => Some(r),
        _ => None,
    })
    .await?
    else {
        return Ok(false);
    };
    if ctx.json {
        let v: Vec<_> = r
            .tokens
            .iter()
            .map(|t| {
                json!({"id": t.id, "role": role_name(t.role), "description": t.description,
                "created_at_ms": t.created_at_ms, "expires_at_ms": t.expires_at_ms,
                "uses_left": if t.limited { Some(t.uses_left) } else { None }, "revoked": t.revoked})
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    } else {
        let rows: Vec<Vec<String>> = r
            .tokens
            .iter()
            .map(|t| {
                vec![
                    t.id.clone(),
                    role_name(t.role).into(),
                    if t.revoked { "revoked".into() } else { "active".into() },
                    if t.limited { t.uses_left.to_string() } else { "unlimited".into() },
                    if t.expires_at_ms == 0 { "never".into() } else { when(t.expires_at_ms) },
                    t.description.clone(),
                ]
            })
            .collect();
        println!("{}", table(&["ID", "ROLE", "STATE", "USES LEFT", "EXPIRES", "DESCRIPTION"], &rows));
    }
    Ok(true)
}

/// `drover token revoke ID…`.
pub async fn token_revoke(ctx: &Ctx, ids: Vec<String>) -> Result<bool, CliError> {
    let Some(r) = controller_reply(ctx, v1::ControllerTokenRevokeV1Req { ids }.into(), |p| match p {
        Payload::ControllerTokenRevokeV1Reply(r) => Some(r),
        _ => None,
    })
    .await?
    else {
        return Ok(false);
    };
    if ctx.json {
        println!("{}", json!({"revoked": r.revoked, "missing": r.missing}));
    } else {
        for id in &r.revoked {
            println!("revoked: {id}");
        }
        for id in &r.missing {
            eprintln!("missing: {id} (no such token)");
        }
    }
    Ok(r.missing.is_empty())
}

/// `drover evict NODE… [--reason …]`.
pub async fn evict(ctx: &Ctx, args: &[String], reason: String) -> Result<bool, CliError> {
    let ids = resolve(ctx, args).await?;
    let Some(r) =
        controller_reply(ctx, v1::ControllerEvictNodesV1Req { node_uuids: ids, reason }.into(), |p| match p {
            Payload::ControllerEvictNodesV1Reply(r) => Some(r),
            _ => None,
        })
        .await?
    else {
        return Ok(false);
    };
    if ctx.json {
        println!("{}", json!({"evicted": r.evicted, "missing": r.missing}));
    } else {
        for id in &r.evicted {
            println!("evicted: {}", short(id));
        }
        for id in &r.missing {
            eprintln!("missing: {} (unknown node)", short(id));
        }
    }
    Ok(r.missing.is_empty())
}

/// `drover forget NODE…`: gone nodes leave the listing now (and free the pairs they
/// were last to stream) instead of after the retention.
pub async fn forget(ctx: &Ctx, args: &[String]) -> Result<bool, CliError> {
    let ids = resolve(ctx, args).await?;
    let Some(r) = controller_reply(ctx, v1::ControllerForgetNodesV1Req { node_uuids: ids }.into(), |p| match p {
        Payload::ControllerForgetNodesV1Reply(r) => Some(r),
        _ => None,
    })
    .await?
    else {
        return Ok(false);
    };
    if ctx.json {
        println!("{}", json!({"forgotten": r.forgotten, "missing": r.missing, "connected": r.connected}));
    } else {
        for id in &r.forgotten {
            println!("forgotten: {}", short(id));
        }
        for id in &r.connected {
            eprintln!("not forgotten: {} is connected (kick or evict it first)", short(id));
        }
        for id in &r.missing {
            eprintln!("missing: {} (unknown node)", short(id));
        }
    }
    Ok(r.missing.is_empty() && r.connected.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimals_print_exactly() {
        assert_eq!(decimal(&v1::Decimal { mantissa: 108_452, scale: 5 }), "1.08452");
        assert_eq!(decimal(&v1::Decimal { mantissa: 5, scale: 3 }), "0.005");
        assert_eq!(decimal(&v1::Decimal { mantissa: -15, scale: 1 }), "-1.5");
        assert_eq!(decimal(&v1::Decimal { mantissa: 150, scale: 0 }), "150");
    }
}
