//! Three `drover controller` processes as one replicated group (issue 15): they form
//! the group from the same `--peers` list with no init step, the leader serves and the
//! followers refuse by naming it, the followers' state is hot (the fleet a node joined
//! on the leader is on a follower's dashboard), and a SIGKILLed leader is replaced by
//! an elected one that holds every acknowledged input; the killed member, restarted
//! with the same flags, rejoins as a follower of the same group, and leadership is
//! handed to it on request (`drover cluster transfer-leader`).

mod common;

use std::time::{Duration, Instant};

use common::{
    Controller, Killed, Member, cli, cli_at, drover_bin, free_port, leader_via, spawn, start_member as start, status,
    text, wait_until,
};

#[test]
fn three_controllers_form_a_group_replicate_hand_over_and_survive_the_leaders_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("cluster.secret");
    let made = std::process::Command::new(drover_bin()).args(["cluster", "secret"]).output().unwrap();
    assert!(made.status.success());
    std::fs::write(&secret, &made.stdout).unwrap();

    let mut members: Vec<Member> = (1..=3)
        .map(|id| {
            let d = dir.path().join(format!("m{id}"));
            std::fs::create_dir_all(&d).unwrap();
            Member { id, raft: free_port(), ctl: Controller::new(&d, &[]) }
        })
        .collect();
    let peers = members.iter().map(|m| format!("{}=127.0.0.1:{}", m.id, m.raft)).collect::<Vec<_>>().join(",");
    for m in &mut members {
        start(m, &peers, &secret);
    }
    let mut leader = None;
    // A leader that stays (same leader and term a second apart): founders starting at
    // once may hold an election or two before one settles.
    let term_of = |http: u16| status(http).and_then(|s| s["term"].as_u64());
    assert!(
        wait_until(Duration::from_secs(30), || {
            let before = leader_via(members[0].ctl.http, 3).zip(term_of(members[0].ctl.http));
            std::thread::sleep(Duration::from_secs(1));
            let after = leader_via(members[0].ctl.http, 3).zip(term_of(members[0].ctl.http));
            leader = before.filter(|_| before == after).map(|(l, _)| l);
            leader.is_some()
        }),
        "no settled leader with three caught-up members within 30 s:\n{}",
        std::fs::read_to_string(&members[0].ctl.log).unwrap_or_default()
    );
    let first = leader.unwrap();
    // Member ids are 1, 2, 3 at positions 0, 1, 2.
    let at = |id: u64| (id - 1) as usize;
    let l = at(first);

    // The member that led first wrote the only admin token (a later leader finds one in
    // the replicated state and makes none).
    let holders: Vec<&Member> = members.iter().filter(|m| m.ctl.data.join("admin.token").exists()).collect();
    assert_eq!(holders.len(), 1, "exactly one member writes admin.token");
    let admin = std::fs::read_to_string(holders[0].ctl.data.join("admin.token")).unwrap().trim().to_owned();

    // Consensus metrics: the leader says it leads, a follower that it does not, and
    // the leader reports each member's lag.
    let metrics = |http: u16| common::http_get(http, "/metrics");
    assert!(metrics(members[l].ctl.http).contains("drover_raft_leader 1"), "{}", metrics(members[l].ctl.http));
    let other = members.iter().find(|m| m.id != first).unwrap();
    assert!(metrics(other.ctl.http).contains("drover_raft_leader 0"));
    assert!(metrics(members[l].ctl.http).contains(&format!("drover_raft_member_lag{{member=\"{}\"}}", other.id)));

    // The leader serves; a CLI sent to a follower is redirected to the leader (the
    // follower names it), and a list of members with a dead one first reaches it too.
    let leader_grpc = members[l].ctl.grpc;
    assert!(cli(leader_grpc, &admin, &["version"]).status.success());
    let follower = members.iter().find(|m| m.id != first).unwrap();
    let redirected = cli(follower.ctl.grpc, &admin, &["token", "list"]);
    assert!(redirected.status.success(), "a follower redirects the CLI to the leader: {}", text(&redirected));
    let dead = free_port();
    let all = format!("127.0.0.1:{dead},127.0.0.1:{},127.0.0.1:{leader_grpc}", follower.ctl.grpc);
    let listed = cli_at(&all, &admin, &["token", "list"]);
    assert!(listed.status.success(), "a member list finds the leader: {}", text(&listed));

    // Acknowledged inputs on the leader: a token, and a node admitted and streaming.
    let join = cli(leader_grpc, &admin, &["token", "create", "--role", "join", "--description", "before-kill"]);
    assert!(join.status.success(), "{}", text(&join));
    let join = String::from_utf8(join.stdout).unwrap().trim().to_owned();
    assert!(join.starts_with("dt1."), "a token secret is printed: {join:?}");
    let adm = format!("127.0.0.1:{}", members[l].ctl.admission);
    let node_log = dir.path().join("n1.log");
    let mut node: Killed =
        spawn(&["node", "--admission", &adm, "--token", &join, "--name", "n1", "--pairs", "EURUSD"], &node_log);
    // Fencing: the leader stamps its leader id (term, member) on every command to a node.
    // (A loaded machine may hold a needless election meanwhile: the fence is then the
    // later term's, so the term is read on both sides of the command.)
    let term = status(members[l].ctl.http).unwrap()["term"].as_u64().unwrap();
    let fence = first_command_fence(&adm, &join).expect("a fenced command");
    let after = status(members[l].ctl.http).unwrap();
    assert_eq!(fence.member, first, "the leader's id: {fence:?}");
    assert!(
        (term..=after["term"].as_u64().unwrap()).contains(&fence.term),
        "the leader's term: {fence:?}, status {term} then {after}"
    );

    // Followers are hot: the node the leader admitted is in a follower's state.
    let follower_http = follower.ctl.http;
    assert!(
        wait_until(Duration::from_secs(20), || {
            common::fleet_view(follower_http)["nodes"]
                .as_array()
                .is_some_and(|n| n.iter().any(|n| n["name"] == "n1" && n["streaming"][0] == "EURUSD"))
        }),
        "a follower's fleet view never showed n1 streaming EURUSD: {}",
        common::fleet_view(follower_http)
    );
    node.kill();
    // The journal tools read a member's Raft log: it verifies, and replaying it gives
    // the state the follower holds.
    let tool = |args: &[&str]| std::process::Command::new(drover_bin()).args(args).output().unwrap();
    let data = follower.ctl.data.to_str().unwrap();
    let verify = tool(&["journal", "verify", data]);
    assert!(verify.status.success() && text(&verify).contains("journal OK"), "{}", text(&verify));
    let state = tool(&["journal", "state", data]);
    assert!(state.status.success() && text(&state).contains("EURUSD"), "{}", text(&state));

    // SIGKILL the leader: the others elect one that holds everything acknowledged.
    let killed_at = Instant::now();
    members[l].ctl.kill();
    let survivor_http = members.iter().find(|m| m.id != first).unwrap().ctl.http;
    let mut second = None;
    assert!(
        wait_until(Duration::from_secs(20), || {
            second = leader_via(survivor_http, 2).filter(|&x| x != first);
            second.is_some()
        }),
        "no new leader within 20 s of the kill"
    );
    let second = second.unwrap();
    eprintln!("new leader {second} reported {} ms after the kill", killed_at.elapsed().as_millis());
    let n = at(second);
    let listed = cli(members[n].ctl.grpc, &admin, &["token", "list"]);
    assert!(listed.status.success(), "the first admin token works on the new leader: {}", text(&listed));
    assert!(text(&listed).contains("before-kill"), "the token made before the kill survived: {}", text(&listed));
    let after = cli(members[n].ctl.grpc, &admin, &["token", "create", "--role", "read", "--description", "after-kill"]);
    assert!(after.status.success(), "the new leader takes writes: {}", text(&after));

    // The killed member, restarted with the same flags, rejoins the same group.
    start(&mut members[l], &peers, &secret);
    assert!(
        wait_until(Duration::from_secs(30), || leader_via(members[l].ctl.http, 3) == Some(second)),
        "the restarted member did not rejoin as a caught-up follower: {:?}",
        status(members[l].ctl.http)
    );
    let s = status(members[l].ctl.http).unwrap();
    assert_eq!(s["members"].as_array().unwrap().len(), 3, "one group of three, not a second group: {s}");
    let rejoined = s["members"].as_array().unwrap().iter().find(|m| m["id"] == first).unwrap().clone();
    assert_eq!(rejoined["role"], "follower", "{s}");
    // Leadership handed over on request, to the restarted member: it leads, /readyz
    // says so on it and not on the old leader, and it takes writes.
    let moved = tool(&[
        "cluster",
        "transfer-leader",
        "--http",
        &format!("127.0.0.1:{}", members[n].ctl.http),
        "--token",
        &admin,
        &first.to_string(),
    ]);
    assert!(moved.status.success(), "transfer-leader: {}", text(&moved));
    assert_eq!(leader_via(members[n].ctl.http, 0), Some(first), "{:?}", status(members[n].ctl.http));
    // Ready once it serves (its takeover committed), a moment after it leads.
    assert!(wait_until(Duration::from_secs(5), || common::http_get(members[l].ctl.http, "/readyz")
        .starts_with("HTTP/1.1 200")));
    let readyz = common::http_get(members[n].ctl.http, "/readyz");
    assert!(readyz.starts_with("HTTP/1.1 503") && readyz.contains(&format!("member {first} leads")), "{readyz}");
    let handed = cli(members[l].ctl.grpc, &admin, &["token", "create", "--role", "read", "--description", "handed"]);
    assert!(handed.status.success(), "the member handed leadership takes writes: {}", text(&handed));
    // Elections and commit latency are on /metrics: this member saw terms begin, and
    // its commits (as leader) were timed.
    let m = metrics(members[l].ctl.http);
    let counter = |name: &str| {
        m.lines().find_map(|l| l.strip_prefix(name)).and_then(|v| v.trim().parse::<u64>().ok()).unwrap_or(0)
    };
    assert!(counter("drover_raft_elections_total ") >= 1, "{m}");
    assert!(counter("drover_raft_leader_changes_total ") >= 2, "{m}");
    assert!(counter("drover_raft_commit_seconds_count ") >= 1, "{m}");

    // A second failover: the new leader is killed too, and whichever of the other two
    // leads holds the writes from every term.
    members[l].ctl.kill();
    let rest: Vec<u16> = members.iter().filter(|m| m.id != first).map(|m| m.ctl.http).collect();
    let mut third = None;
    assert!(
        wait_until(Duration::from_secs(20), || {
            third = rest.iter().find_map(|&h| leader_via(h, 2)).filter(|&x| x != first);
            third.is_some()
        }),
        "no leader after the second kill"
    );
    // The whole member list (the killed leader first) reaches whichever member leads.
    let every: Vec<String> = members.iter().map(|m| format!("127.0.0.1:{}", m.ctl.grpc)).collect();
    let listed = cli_at(&every.join(","), &admin, &["token", "list"]);
    assert!(listed.status.success(), "{}", text(&listed));
    let listed = text(&listed);
    for made in ["before-kill", "after-kill", "handed"] {
        assert!(listed.contains(made), "{made} is missing: {listed}");
    }
}

/// Admits a node "fence-probe" at `admission` as the node agent does, opens its command
/// stream, and returns the fence on the first command the controller sends it.
fn first_command_fence(admission: &str, join: &str) -> Option<drover_proto::v1::LeaderFence> {
    use drover_proto::Payload;
    use drover_proto::v1::{self, controller_client::ControllerClient};
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let mut config = drover_node::NodeConfig::new(admission.to_owned(), join.to_owned(), vec!["GBPUSD".into()]);
        config.id = "fence-probe".into();
        let (upstream, ticket, _control) = drover_node::admit_session(&config).await.expect("admitted");
        let mut client = ControllerClient::connect(format!("http://{upstream}")).await.unwrap();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let hello = v1::NodeKnownCurrenciesV1Notify {
            pairs: vec!["GBPUSD".into()],
            name: "fence-probe".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            worker: false,
        };
        tx.send(v1::StreamFromNode {
            node_uuid: "fence-probe".into(),
            from_uuid: None,
            response: Some(Payload::from(hello).to_any()),
            request_id: String::new(),
        })
        .await
        .unwrap();
        let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        req.metadata_mut().insert("authorization", format!("Bearer {ticket}").parse().unwrap());
        let mut inbound = client.node_command_stream(req).await.unwrap().into_inner();
        let first = tokio::time::timeout(std::time::Duration::from_secs(10), inbound.message()).await;
        drop(tx);
        first.expect("a command within 10 s").expect("the stream").expect("a message").fence
    })
}

/// Membership 3 → 5 → 3 under a load of acknowledged commands, and a member away while
/// the others compacted their logs is caught up by a snapshot: every acknowledged
/// command is on the leader at the end, and the returning member holds them too. Then
/// a leader whose followers stop answering stops serving, and serves again after.
#[test]
fn membership_grows_to_five_and_back_to_three_under_load_a_member_away_catches_up_by_snapshot_and_an_isolated_leader_steps_down()
 {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("cluster.secret");
    let made = std::process::Command::new(drover_bin()).args(["cluster", "secret"]).output().unwrap();
    std::fs::write(&secret, &made.stdout).unwrap();
    // Snapshots every 20 entries, 4 kept behind: a member away for a few dozen
    // commands finds the others' logs compacted past its own.
    let mut members: Vec<Member> = (1..=5)
        .map(|id| {
            let d = dir.path().join(format!("m{id}"));
            std::fs::create_dir_all(&d).unwrap();
            Member { id, raft: free_port(), ctl: Controller::new(&d, &["--snapshot-every", "20"]) }
        })
        .collect();
    let peers = members[..3].iter().map(|m| format!("{}=127.0.0.1:{}", m.id, m.raft)).collect::<Vec<_>>().join(",");
    for m in &mut members[..3] {
        start(m, &peers, &secret);
    }
    assert!(
        wait_until(Duration::from_secs(30), || leader_via(members[0].ctl.http, 3).is_some()),
        "no leader with three caught-up members"
    );
    let admin = wait_for_admin_token(&members);
    let grpc = |ms: &[Member]| ms.iter().map(|m| format!("127.0.0.1:{}", m.ctl.grpc)).collect::<Vec<_>>().join(",");
    let create = |list: &str, description: &str| {
        let out = cli_at(list, &admin, &["token", "create", "--role", "read", "--description", description]);
        out.status.success()
    };
    let mut acknowledged = Vec::new();

    // Member 3 goes away (unless it leads: then member 2 does) while 40 commands are
    // committed by the other two, each snapshot compacting the log past it.
    let first = leader_via(members[0].ctl.http, 3).unwrap();
    let away = if first == 3 { 1 } else { 2 };
    members[away].ctl.kill();
    let list3 = grpc(&members[..3]);
    for i in 0..40 {
        let d = format!("while-away-{i}");
        if create(&list3, &d) {
            acknowledged.push(d);
        }
    }
    assert!(acknowledged.len() >= 38, "the two left commit: {} of 40", acknowledged.len());
    start(&mut members[away], &peers, &secret);
    let back_http = members[away].ctl.http;
    assert!(
        wait_until(Duration::from_secs(30), || leader_via(back_http, 3).is_some()),
        "the member back did not catch up: {:?}",
        status(back_http)
    );
    let installed = common::http_get(back_http, "/metrics")
        .lines()
        .find_map(|l| {
            l.strip_prefix("drover_raft_snapshots_installed_total ").map(|v| v.trim().parse::<u64>().unwrap())
        })
        .unwrap_or(0);
    assert!(installed >= 1, "caught up by a snapshot (the others' logs were compacted past it)");

    // 3 → 5 → 3 while a node streams prices to the leader and a loop of commands runs
    // through the member list.
    let join = cli_at(&grpc(&members[..3]), &admin, &["token", "create", "--role", "join"]);
    assert!(join.status.success(), "{}", text(&join));
    let join = String::from_utf8(join.stdout).unwrap().trim().to_owned();
    let leader_now = leader_via(members[0].ctl.http, 0).unwrap();
    let adm = format!("127.0.0.1:{}", members[leader_now as usize - 1].ctl.admission);
    let mut node = spawn(
        &["node", "--admission", &adm, "--token", &join, "--name", "n1", "--pairs", "EURUSD,GBPUSD,USDJPY"],
        &dir.path().join("n1.log"),
    );
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let (stop, list, admin) = (stop.clone(), grpc(&members), admin.clone());
        std::thread::spawn(move || {
            let mut done = Vec::new();
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let d = format!("under-change-{i}");
                let out = cli_at(&list, &admin, &["token", "create", "--role", "read", "--description", &d]);
                if out.status.success() {
                    done.push(d);
                }
                i += 1;
            }
            (done, i)
        })
    };
    let any_http = format!("127.0.0.1:{}", members[0].ctl.http);
    let cluster = |args: &[&str]| {
        let mut all = vec!["cluster"];
        all.extend_from_slice(args);
        all.extend(["--http", &any_http, "--token", &admin]);
        std::process::Command::new(drover_bin()).args(&all).output().unwrap()
    };
    for m in &mut members[3..] {
        start(m, "", &secret);
        let raft = format!("127.0.0.1:{}", m.raft);
        let added = cluster(&["add", &m.id.to_string(), &raft]);
        assert!(added.status.success(), "add {}: {}", m.id, text(&added));
    }
    assert!(
        wait_until(Duration::from_secs(30), || leader_via(members[0].ctl.http, 5).is_some()),
        "five caught-up members: {:?}",
        status(members[0].ctl.http)
    );
    // Back to three: remove two members that do not lead.
    let leader = leader_via(members[0].ctl.http, 0).unwrap();
    let away_id = members[away].id;
    let leaving: Vec<u64> =
        [5u64, 4, 3, 2, 1].into_iter().filter(|&id| id != leader && id != away_id).take(2).collect();
    for id in &leaving {
        let removed = cluster(&["remove", &id.to_string()]);
        assert!(removed.status.success(), "remove {id}: {}", text(&removed));
    }
    // The load runs on a while after the last change.
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (under_change, tried) = load.join().unwrap();
    node.kill();
    let prices = common::http_get(members[leader as usize - 1].ctl.http, "/metrics")
        .lines()
        .find_map(|l| {
            l.strip_prefix("drover_price_updates_total{outcome=\"accepted\"} ")
                .map(|v| v.trim().parse::<u64>().unwrap())
        })
        .unwrap_or(0);
    assert!(prices > 0, "the node's prices were accepted during the changes");
    assert!(under_change.len() * 10 >= tried * 9, "commands kept committing: {} of {tried}", under_change.len());
    eprintln!(
        "{} commands while member {} was away ({installed} snapshot installed on its return), {} of {tried} during 3 -> 5 -> 3, {prices} prices accepted",
        acknowledged.len(),
        away + 1,
        under_change.len()
    );
    let s = status(members[0].ctl.http).or_else(|| status(members[leader as usize - 1].ctl.http)).unwrap();
    let ids: Vec<u64> = s["members"].as_array().unwrap().iter().map(|m| m["id"].as_u64().unwrap()).collect();
    assert_eq!(ids.len(), 3, "three members again: {s}");
    assert!(leaving.iter().all(|id| !ids.contains(id)), "{s}");

    // Every acknowledged command is on the leader, and on the member that came back.
    acknowledged.extend(under_change);
    let remaining: Vec<&Member> = members.iter().filter(|m| ids.contains(&m.id)).collect();
    let listed = text(&cli_at(&grpc_of(&remaining), &admin, &["token", "list"]));
    let missing: Vec<&String> = acknowledged.iter().filter(|d| !listed.contains(d.as_str())).collect();
    assert!(missing.is_empty(), "acknowledged but missing: {missing:?}");
    // A leader cut off from its majority (both followers stopped with SIGSTOP) stops
    // serving within its lease, and serves again once they answer.
    let followers: Vec<u32> =
        remaining.iter().filter(|m| m.id != leader).map(|m| m.ctl.proc.as_ref().unwrap().pid()).collect();
    let signal = |sig: &str| {
        for pid in &followers {
            assert!(std::process::Command::new("kill").args([sig, &pid.to_string()]).status().unwrap().success());
        }
    };
    let leader_member = remaining.iter().find(|m| m.id == leader).unwrap();
    signal("-STOP");
    let stepped = wait_until(Duration::from_secs(10), || {
        std::fs::read_to_string(&leader_member.ctl.log)
            .is_ok_and(|l| l.contains("no majority has acknowledged this leader within the lease"))
    });
    let alone = cli(leader_member.ctl.grpc, &admin, &["token", "list"]);
    signal("-CONT");
    assert!(stepped, "the isolated leader did not step down");
    assert!(
        !alone.status.success() && text(&alone).contains("does not lead"),
        "the isolated leader refuses, naming why: {}",
        text(&alone)
    );
    assert!(
        wait_until(Duration::from_secs(30), || cli_at(&grpc_of(&remaining), &admin, &["token", "list"])
            .status
            .success()),
        "the group serves again once the followers answer"
    );

    // The member that came back by snapshot stayed, and is caught up (lag 0).
    assert!(ids.contains(&members[away].id));
    let back = s["members"].as_array().unwrap().iter().find(|m| m["id"] == members[away].id).unwrap().clone();
    assert!(
        wait_until(Duration::from_secs(20), || {
            status(members[away].ctl.http)
                .and_then(|s| s["members"].as_array().unwrap().iter().find(|m| m["id"] == members[away].id).cloned())
                .is_some_and(|m| m["lag"] == 0)
        }),
        "{back}"
    );

    // An upgrade rehearsal on a founding member that was never away (so it holds every
    // entry since its previous snapshot), stopped first: this binary replays from that
    // snapshot to the newest and computes the same state.
    let rehearsed = (0..3).find(|&i| i != away).unwrap();
    members[rehearsed].ctl.kill();
    let data = members[rehearsed].ctl.data.to_str().unwrap().to_owned();
    let whatif = std::process::Command::new(drover_bin()).args(["journal", "what-if", &data]).output().unwrap();
    assert!(
        whatif.status.success() && text(&whatif).contains("same state at every snapshot (1 compared)"),
        "{}",
        text(&whatif)
    );
}

/// The gRPC addresses of `ms` as a list.
fn grpc_of(ms: &[&Member]) -> String {
    ms.iter().map(|m| format!("127.0.0.1:{}", m.ctl.grpc)).collect::<Vec<_>>().join(",")
}

/// The admin token the first leader wrote into its data directory.
fn wait_for_admin_token(members: &[Member]) -> String {
    let mut token = None;
    assert!(
        wait_until(Duration::from_secs(20), || {
            token = members.iter().find_map(|m| std::fs::read_to_string(m.ctl.data.join("admin.token")).ok());
            token.is_some()
        }),
        "no admin.token"
    );
    token.unwrap().trim().to_owned()
}
