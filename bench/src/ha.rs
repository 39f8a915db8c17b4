//! High availability, part 2 (issue 16): the fleet across leader changes, measured on
//! three `drover controller` processes (release build) with real `drover node`
//! processes given every member's admission address:
//!
//! - leader SIGKILL → the first price accepted under the new leader: K kills (the
//!   killed member restarted and caught up between kills); the figure is the time from
//!   the signal to a price produced after it (its upstream time is later than the
//!   kill, the simulated source ticks every 100 ms) read through the new leader,
//!   polled every 20 ms; pairs moved to another node by each kill are counted;
//! - planned handover (`drover cluster transfer-leader`): T transfers; the figure is
//!   the longest interval between consecutive accepted prices of any pair across the
//!   handover, as a poller reading every 20 ms through the group sees them (the
//!   source's own tick is 100 ms, so 100–200 ms is the floor).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use drover_proto::{Payload, v1};

use crate::cluster::{Proc, leader_of};

const PAIRS: [&str; 6] = ["EURUSD", "GBPUSD", "USDJPY", "AUDUSD", "USDCHF", "NZDUSD"];

/// Each pair's streamer and latest accepted upstream time, through the members at
/// `grpcs`.
async fn prices(grpcs: &str, admin: &str) -> Option<BTreeMap<String, (String, i64)>> {
    let ctx = drover_cli::Ctx {
        controller: grpcs.to_owned(),
        timeout: Duration::from_secs(2),
        json: false,
        token: Some(admin.to_owned()),
        ca: None,
    };
    let out = drover_cli::request(&ctx, vec![], v1::ControllerPricesV1Req { pairs: vec![], watch: false }.into())
        .await
        .ok()?;
    let rows = out.replies.into_iter().find_map(|r| match r.payload {
        Payload::ControllerPricesV1Reply(p) => Some(p.prices),
        _ => None,
    })?;
    Some(
        rows.into_iter()
            .filter_map(|v| {
                let p = v.price?;
                Some((p.pair, (v.streamer, p.upstream_time_ms)))
            })
            .collect(),
    )
}

fn unix_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

/// The leader once every member answers caught up.
async fn settled(members: &[Proc]) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        for m in members {
            if let Some((l, 3)) = leader_of(&m.http).await {
                return l;
            }
        }
        assert!(Instant::now() < deadline, "the group did not settle with three caught-up members");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until every pair is streamed; who streams what.
async fn all_streamed(grpcs: &str, admin: &str) -> BTreeMap<String, String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(p) = prices(grpcs, admin).await
            && PAIRS.iter().all(|pair| p.get(*pair).is_some_and(|(s, _)| !s.is_empty()))
        {
            return p.into_iter().map(|(k, (s, _))| (k, s)).collect();
        }
        assert!(Instant::now() < deadline, "not every pair streamed within 60 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn run(kills: usize, transfers: usize, nodes: usize) {
    let (_tmp, root) = crate::cluster::bench_dir();
    let dir: &Path = &root;
    let mut members = crate::cluster::group(dir, 3);
    let deadline = Instant::now() + Duration::from_secs(30);
    let admin = loop {
        if let Some(t) = members.iter().find_map(|m| std::fs::read_to_string(m.data.join("admin.token")).ok()) {
            break t.trim().to_owned();
        }
        assert!(Instant::now() < deadline, "no admin token within 30 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let all_grpc = members.iter().map(|m| m.grpc.clone()).collect::<Vec<_>>().join(",");
    let join = {
        let ctx = drover_cli::Ctx {
            controller: all_grpc.clone(),
            timeout: Duration::from_secs(5),
            json: false,
            token: Some(admin.clone()),
            ca: None,
        };
        let req = v1::ControllerTokenCreateV1Req {
            role: v1::TokenRole::Join as i32,
            ttl_ms: 0,
            uses: 0,
            description: "bench".into(),
        };
        let out = drover_cli::request(&ctx, vec![], req.into()).await.expect("a join token");
        out.replies
            .into_iter()
            .find_map(|r| match r.payload {
                Payload::ControllerTokenCreateV1Reply(t) => Some(t.token),
                _ => None,
            })
            .unwrap()
    };
    // Nodes: each knows three pairs; admission lists rotated so their control channels
    // are spread over the members.
    let admissions: Vec<String> = members.iter().map(|m| m.admission.clone()).collect();
    let mut fleet = Vec::new();
    for i in 0..nodes {
        let mut list = admissions.clone();
        list.rotate_left(i % 3);
        let pairs: Vec<&str> = (0..3).map(|k| PAIRS[(i + k) % PAIRS.len()]).collect();
        let log = std::fs::File::create(dir.join(format!("node{i}.log"))).unwrap();
        fleet.push(
            std::process::Command::new(crate::drover_bin())
                .args(["node", "--admission", &list.join(","), "--token", &join, "--name", &format!("n{i}")])
                .args(["--pairs", &pairs.join(",")])
                .env("DROVER_LOG", "warn")
                .stdout(std::process::Stdio::null())
                .stderr(log)
                .spawn()
                .expect("spawn a node"),
        );
    }
    all_streamed(&all_grpc, &admin).await;

    // Kills.
    let mut to_price = Vec::new();
    let mut moved = 0usize;
    for _ in 0..kills {
        let leader = settled(&members).await;
        let before = all_streamed(&all_grpc, &admin).await;
        let victim = leader as usize - 1;
        // The survivors only, so a read never waits on the dead member.
        let survivors = members
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != victim)
            .map(|(_, m)| m.grpc.clone())
            .collect::<Vec<_>>()
            .join(",");
        let (killed, killed_ms) = (Instant::now(), unix_ms());
        members[victim].kill();
        loop {
            if let Some(p) = prices(&survivors, &admin).await
                && p.values().any(|(_, t)| *t > killed_ms)
            {
                break;
            }
            assert!(killed.elapsed() < Duration::from_secs(30), "no price accepted within 30 s of the kill");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        to_price.push(killed.elapsed().as_secs_f64() * 1e3);
        let after = all_streamed(&survivors, &admin).await;
        moved += PAIRS.iter().filter(|p| before.get(**p) != after.get(**p)).count();
        members[victim].spawn();
    }

    // Planned handovers: the longest interval between accepted prices across each.
    let mut gaps = Vec::new();
    for k in 0..transfers {
        let leader = settled(&members).await;
        let to = (leader % 3) + 1;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let poller = {
            let (grpcs, admin, stop) = (all_grpc.clone(), admin.clone(), stop.clone());
            tokio::spawn(async move {
                let mut last: BTreeMap<String, i64> = BTreeMap::new();
                let mut worst = 0i64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if let Some(p) = prices(&grpcs, &admin).await {
                        for (pair, (_, t)) in p {
                            if let Some(prev) = last.insert(pair, t)
                                && t > prev
                            {
                                worst = worst.max(t - prev);
                            }
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                worst
            })
        };
        tokio::time::sleep(Duration::from_millis(500)).await;
        let http = &members[leader as usize - 1].http;
        let out = std::process::Command::new(crate::drover_bin())
            .args(["cluster", "transfer-leader", "--http", http, "--token", &admin, &to.to_string()])
            .output()
            .unwrap();
        assert!(out.status.success(), "transfer {k}: {}", String::from_utf8_lossy(&out.stderr));
        tokio::time::sleep(Duration::from_millis(1500)).await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        gaps.push(poller.await.unwrap() as f64);
    }
    for mut n in fleet {
        let _ = n.kill();
        let _ = n.wait();
    }
    drop(members);
    to_price.sort_by(f64::total_cmp);
    gaps.sort_by(f64::total_cmp);
    let p = crate::percentile;
    println!("command: cd bench && cargo run --release -- ha --kills {kills} --transfers {transfers} --nodes {nodes}");
    println!(
        "\n| three controllers, {nodes} node processes, {} pairs | trials | p50 ms | p90 ms | p99 ms | max ms | pairs moved |\n| --- | --- | --- | --- | --- | --- | --- |",
        PAIRS.len()
    );
    if !to_price.is_empty() {
        println!(
            "| leader SIGKILL → first price accepted under the new leader (goal p99 ≤ 2000) | {} | {:.0} | {:.0} | {:.0} | {:.0} | {moved} |",
            to_price.len(),
            p(&to_price, 0.5),
            p(&to_price, 0.9),
            p(&to_price, 0.99),
            to_price.last().unwrap()
        );
    }
    if !gaps.is_empty() {
        println!(
            "| transfer-leader → longest interval between accepted prices (goal p99 ≤ 300) | {} | {:.0} | {:.0} | {:.0} | {:.0} | - |",
            gaps.len(),
            p(&gaps, 0.5),
            p(&gaps, 0.9),
            p(&gaps, 0.99),
            gaps.last().unwrap()
        );
    }
    let all: Vec<String> = to_price.iter().map(|e| format!("{e:.0}")).collect();
    println!("\nevery kill, sorted (ms): {}", all.join(" "));
    let all: Vec<String> = gaps.iter().map(|e| format!("{e:.0}")).collect();
    println!("every transfer's longest gap, sorted (ms): {}", all.join(" "));
}
