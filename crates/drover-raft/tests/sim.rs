//! Seeded simulation of a replicated group: 3 or 5 replicas (openraft, drover's Raft
//! log over the journal, the state-machine adapter) on in-memory storage whose crash
//! drops every unsynced byte, talking over a simulated network with seeded loss,
//! delay (so reordering between messages), one-way and two-way partitions, and
//! crashes and restarts at random points, all on one thread in virtual time (tokio's
//! paused clock; the journal's writer runs as a task, see `JournalConfig::writer_task`).
//!
//! The core records every input it applies, in order, so the checks are exact:
//!
//! - every replica's applied history is a prefix of every other's (a replica's state
//!   at log position i equals every other's at i);
//! - nothing acknowledged (committed) is lost or changed: each acknowledged input is in
//!   the longest history, once, in the order of its log index; after the faults stop,
//!   every replica holds all of them (and every replica catches up);
//! - entries of one term were committed by one leader only (openraft's default mode
//!   lets two members lead the same term; only the greater leader id commits);
//! - outputs exist only for committed inputs: every output a replica's machine made is
//!   an input of the common history.
//!
//! A failure names the seed; `DROVER_SIM_SEED=N` runs that one seed,
//! `DROVER_SIM_SEEDS=K` runs K seeds (CI runs 300). The seed fixes the fault schedule,
//! the network's delays and losses, and every replica's election timeout (openraft
//! draws them from drover's runtime, `drover_raft::runtime`, seeded here). Determinism
//! is still partial: openraft's own `select!` loops pick among ready branches at
//! random, and tokio's random source cannot be seeded without `tokio_unstable`, so a
//! failing seed may need a few runs to repeat.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use drover_journal::{DecodeError, EncodeError, MemStorage, StateMachine, Storage, machine::encode_input};
use drover_raft::inbound::Inbound;
use drover_raft::log_store::journal_config;
use drover_raft::member::Timing;
use drover_raft::stats::RaftStats;
use drover_raft::{Inputs, RaftLog, RaftMachine, TypeConfig};
use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use openraft::{BasicNode, Raft};

/// A core that remembers every input it applied, in order.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct History(Vec<u64>);

impl StateMachine for History {
    type Input = u64;
    type Output = u64;
    fn apply(&mut self, input: u64, out: &mut Vec<u64>) {
        self.0.push(input);
        out.push(input);
    }
    fn encode_input(input: &u64, buf: &mut Vec<u8>) -> Result<(), EncodeError> {
        buf.extend_from_slice(&input.to_le_bytes());
        Ok(())
    }
    fn decode_input(bytes: &[u8]) -> Result<u64, DecodeError> {
        bytes.try_into().map(u64::from_le_bytes).map_err(|_| DecodeError("not 8 bytes".into()))
    }
    fn checkpoint(&self) -> Result<Vec<u8>, EncodeError> {
        Ok(self.0.iter().flat_map(|v| v.to_le_bytes()).collect())
    }
    fn restore(bytes: &[u8]) -> Result<Self, DecodeError> {
        if !bytes.len().is_multiple_of(8) {
            return Err(DecodeError("not a multiple of 8 bytes".into()));
        }
        Ok(History(bytes.chunks(8).map(|c| u64::from_le_bytes(c.try_into().unwrap())).collect()))
    }
}

/// xorshift64*: the schedule, reproducible from the seed.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1000) < per_mille
    }
}

/// The simulated network: who runs, which links are cut, how lossy it is.
struct World {
    rng: Rng,
    running: BTreeMap<u64, Inbound>,
    /// One-way cuts: (from, to).
    cut: BTreeSet<(u64, u64)>,
    loss_per_mille: u64,
    /// Every replica's counters, summed (campaigns after a refusal, in the summary).
    stats: Arc<RaftStats>,
}

type Shared = Arc<Mutex<World>>;

fn lock(w: &Shared) -> std::sync::MutexGuard<'_, World> {
    w.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Clone)]
struct SimNet {
    from: u64,
    world: Shared,
}

struct SimPeer {
    from: u64,
    to: u64,
    world: Shared,
}

impl RaftNetworkFactory<TypeConfig> for SimNet {
    type Network = SimPeer;
    async fn new_client(&mut self, target: u64, _node: &BasicNode) -> SimPeer {
        SimPeer { from: self.from, to: target, world: self.world.clone() }
    }
}

fn unreachable<E: std::error::Error>() -> RPCError<u64, BasicNode, RaftError<u64, E>> {
    RPCError::Unreachable(Unreachable::new(&std::io::Error::from(std::io::ErrorKind::ConnectionRefused)))
}

impl SimPeer {
    /// One leg of a message: its delay, and whether it arrives.
    fn leg(&self, from: u64, to: u64) -> (Duration, bool) {
        let mut w = lock(&self.world);
        let delay = Duration::from_micros(200 + w.rng.below(15_000));
        let loss = w.loss_per_mille;
        let arrives = !w.cut.contains(&(from, to)) && !w.rng.chance(loss);
        (delay, arrives)
    }

    /// Delivers a request to the target's Raft and its answer back, each leg delayed
    /// and possibly lost (a lost leg looks like a timeout to the sender).
    async fn call<T, E, F, Fut>(&self, ttl: Duration, f: F) -> Result<T, RPCError<u64, BasicNode, RaftError<u64, E>>>
    where
        E: std::error::Error,
        F: FnOnce(Inbound) -> Fut,
        Fut: std::future::Future<Output = Result<T, RaftError<u64, E>>>,
    {
        let (there, arrives) = self.leg(self.from, self.to);
        tokio::time::sleep(there.min(ttl)).await;
        let target = lock(&self.world).running.get(&self.to).cloned();
        let (Some(target), true) = (target, arrives) else {
            tokio::time::sleep(ttl.saturating_sub(there)).await;
            return Err(unreachable());
        };
        let answer = f(target).await;
        let (back, returns) = self.leg(self.to, self.from);
        tokio::time::sleep(back).await;
        if !returns {
            return Err(RPCError::Network(NetworkError::new(&std::io::Error::from(std::io::ErrorKind::TimedOut))));
        }
        answer.map_err(|e| RPCError::RemoteError(RemoteError::new(self.to, e)))
    }
}

impl RaftNetwork<TypeConfig> for SimPeer {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        self.call(option.hard_ttl(), |r| async move { r.append_entries(rpc).await }).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<u64>, RPCError<u64, BasicNode, RaftError<u64, InstallSnapshotError>>> {
        self.call(option.hard_ttl(), |r| async move { r.install_snapshot(rpc).await }).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> Result<VoteResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        self.call(option.hard_ttl(), |r| async move { r.vote(rpc).await }).await
    }
}

/// One replica's disk and, while it runs, its machine.
struct Replica {
    disk: MemStorage,
    machine: Option<RaftMachine<History>>,
}

const DIR: &str = "/replica";

async fn boot(id: u64, replica: &mut Replica, world: &Shared) {
    let storage: Arc<dyn Storage> = Arc::new(replica.disk.clone());
    let mut config = journal_config(DIR);
    config.writer_task = true;
    let log = RaftLog::open(config, storage.clone()).expect("the log reopens after a crash");
    let machine = RaftMachine::open(DIR, storage, History::default).expect("the snapshot reopens");
    let timing = Timing { snapshot_every: 40, ..Timing::default() };
    let raft_config = Arc::new(timing.config(id).unwrap());
    let net = SimNet { from: id, world: world.clone() };
    let raft = Raft::new(id, raft_config, net, log, machine.clone()).await.unwrap();
    let stats = lock(world).stats.clone();
    let inbound = Inbound::new(raft, &timing, stats);
    inbound.hold_if_restarting(&timing).await;
    lock(world).running.insert(id, inbound);
    replica.machine = Some(machine);
}

async fn crash(id: u64, replica: &mut Replica, world: &Shared) {
    let inbound = lock(world).running.remove(&id);
    if let Some(inbound) = inbound {
        let _ = tokio::time::timeout(Duration::from_secs(5), inbound.raft().shutdown()).await;
    }
    replica.machine = None;
    // A power cut: whatever was written and not synced is gone.
    replica.disk.crash();
}

/// What the clients were told was committed: value → its log index and leader id.
type Acked = BTreeMap<u64, (u64, (u64, u64))>;

/// Checks the invariants on the running replicas; `Err` says which broke.
fn check(replicas: &BTreeMap<u64, Replica>, acked: &Acked) -> Result<Vec<u64>, String> {
    let histories: Vec<(u64, Vec<u64>)> =
        replicas.iter().filter_map(|(id, r)| r.machine.as_ref().map(|m| (*id, m.with_core(|h| h.0.clone())))).collect();
    let longest = histories.iter().map(|(_, h)| h).max_by_key(|h| h.len()).cloned().unwrap_or_default();
    for (id, h) in &histories {
        if longest[..h.len()] != h[..] {
            return Err(format!("replica {id}'s history is not a prefix of the longest: {h:?} vs {longest:?}"));
        }
    }
    let mut seen = BTreeSet::new();
    for v in &longest {
        if !seen.insert(*v) {
            return Err(format!("input {v} applied twice"));
        }
    }
    // Acknowledged inputs the longest history covers are in it, in log order.
    let position: BTreeMap<u64, usize> = longest.iter().enumerate().map(|(i, v)| (*v, i)).collect();
    let mut by_index: Vec<(u64, u64)> = acked.iter().map(|(v, (index, _))| (*index, *v)).collect();
    by_index.sort();
    let mut last = None;
    for (index, v) in by_index {
        if let Some(p) = position.get(&v) {
            if last.is_some_and(|l| *p < l) {
                return Err(format!("acknowledged input {v} (index {index}) is out of log order"));
            }
            last = Some(*p);
        }
    }
    // One leader per term committed.
    let mut committers: BTreeMap<u64, BTreeSet<u64>> = BTreeMap::new();
    for (_, (term, node)) in acked.values() {
        committers.entry(*term).or_default().insert(*node);
    }
    if let Some((term, nodes)) = committers.iter().find(|(_, n)| n.len() > 1) {
        return Err(format!("term {term} had entries committed by several leaders: {nodes:?}"));
    }
    Ok(longest)
}

async fn simulate(seed: u64) -> Result<String, String> {
    drover_raft::runtime::seed_this_thread(seed);
    let mut rng = Rng::new(seed);
    let n: u64 = if seed.is_multiple_of(2) { 3 } else { 5 };
    let world: Shared = Arc::new(Mutex::new(World {
        rng: Rng::new(seed ^ 0xABCD),
        running: BTreeMap::new(),
        cut: BTreeSet::new(),
        loss_per_mille: 0,
        stats: Arc::default(),
    }));
    let mut replicas: BTreeMap<u64, Replica> =
        (1..=n).map(|id| (id, Replica { disk: MemStorage::new(), machine: None })).collect();
    for (id, r) in replicas.iter_mut() {
        boot(*id, r, &world).await;
    }
    let members: BTreeMap<u64, BasicNode> = (1..=n).map(|id| (id, BasicNode::new(format!("sim-{id}")))).collect();
    let founders: Vec<Raft<TypeConfig>> = lock(&world).running.values().map(|i| i.raft().clone()).collect();
    for raft in founders {
        let _ = raft.initialize(members.clone()).await;
    }

    let acked: Arc<Mutex<Acked>> = Arc::default();
    let next_value = Arc::new(std::sync::atomic::AtomicU64::new(1));
    let mut outputs = BTreeSet::new();
    let (mut crashes, mut partitions) = (0, 0);
    let steps = 100; // 100 steps of 100 ms: 10 s of virtual time
    for _ in 0..steps {
        // A few client writes through whoever leads right now.
        for _ in 0..rng.below(4) {
            let leader = leader_of(&world);
            if let Some(raft) = leader {
                let v = next_value.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let acked = acked.clone();
                tokio::spawn(async move {
                    let input = Inputs(encode_input::<History>(&v).unwrap().to_vec());
                    if let Ok(Ok(r)) = tokio::time::timeout(Duration::from_secs(3), raft.client_write(input)).await {
                        acknowledge(&acked, v, r.log_id);
                    }
                });
            }
        }
        // A fault, now and then.
        let roll = rng.below(100);
        let down: Vec<u64> = replicas.iter().filter(|(_, r)| r.machine.is_none()).map(|(id, _)| *id).collect();
        if roll < 6 && (down.len() as u64) < n / 2 + 1 {
            let id = 1 + rng.below(n);
            if let Some(r) = replicas.get_mut(&id)
                && r.machine.is_some()
            {
                crash(id, r, &world).await;
                crashes += 1;
            }
        } else if roll < 14 && !down.is_empty() {
            let id = down[rng.below(down.len() as u64) as usize];
            boot(id, replicas.get_mut(&id).unwrap(), &world).await;
        } else if roll < 18 {
            let (a, b) = (1 + rng.below(n), 1 + rng.below(n));
            let mut w = lock(&world);
            w.cut.insert((a, b));
            if rng.chance(500) {
                w.cut.insert((b, a));
            }
            partitions += 1;
        } else if roll < 24 {
            lock(&world).cut.clear();
        } else if roll < 28 {
            lock(&world).loss_per_mille = [0, 0, 10, 50, 200][rng.below(5) as usize];
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        for r in replicas.values() {
            if let Some(m) = &r.machine {
                outputs.extend(m.take_outputs());
            }
        }
        check(&replicas, &lock_acked(&acked)).map_err(|e| format!("seed {seed}: {e}"))?;
    }
    // The faults stop: every link heals, every replica runs, and all catch up.
    {
        let mut w = lock(&world);
        w.cut.clear();
        w.loss_per_mille = 0;
    }
    let down: Vec<u64> = replicas.iter().filter(|(_, r)| r.machine.is_none()).map(|(id, _)| *id).collect();
    for id in down {
        boot(id, replicas.get_mut(&id).unwrap(), &world).await;
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    // One more write, acknowledged, so every earlier entry is committed in this term.
    let final_value = next_value.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let mut committed = false;
    for _ in 0..100 {
        let leader = leader_of(&world);
        if let Some(raft) = leader {
            let input = Inputs(encode_input::<History>(&final_value).unwrap().to_vec());
            if let Ok(Ok(r)) = tokio::time::timeout(Duration::from_secs(3), raft.client_write(input)).await {
                acknowledge(&acked, final_value, r.log_id);
                committed = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if !committed {
        return Err(format!("seed {seed}: no leader took a write within 10 s after the faults stopped"));
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    for r in replicas.values() {
        if let Some(m) = &r.machine {
            outputs.extend(m.take_outputs());
        }
    }
    let acked = lock_acked(&acked).clone();
    let longest = check(&replicas, &acked).map_err(|e| format!("seed {seed}: {e}"))?;
    for (id, r) in &replicas {
        let h = r.machine.as_ref().unwrap().with_core(|h| h.0.clone());
        if h.len() != longest.len() {
            return Err(format!("seed {seed}: replica {id} did not catch up: {} of {} inputs", h.len(), longest.len()));
        }
    }
    let held: BTreeSet<u64> = longest.iter().copied().collect();
    if let Some(v) = acked.keys().find(|v| !held.contains(v)) {
        return Err(format!("seed {seed}: acknowledged input {v} was lost"));
    }
    // Outputs are made only when an entry is applied, that is committed: every one
    // is an input of the common history.
    if let Some(v) = outputs.iter().find(|v| !held.contains(v)) {
        return Err(format!("seed {seed}: output {v} for an input that is not in the committed history"));
    }
    let rafts: Vec<Raft<TypeConfig>> = lock(&world).running.values().map(|i| i.raft().clone()).collect();
    for raft in rafts {
        let _ = tokio::time::timeout(Duration::from_secs(5), raft.shutdown()).await;
    }
    let hastened = lock(&world).stats.campaigns_after_refusal.load(std::sync::atomic::Ordering::Relaxed);
    Ok(format!(
        "seed {seed}: {n} replicas, {} acknowledged of {} proposed, {crashes} crashes, {partitions} cuts, {hastened} campaigns after a refusal",
        acked.len(),
        final_value
    ))
}

/// Whoever leads right now, if anyone does.
fn leader_of(world: &Shared) -> Option<Raft<TypeConfig>> {
    let w = lock(world);
    w.running.values().map(Inbound::raft).find(|r| r.metrics().borrow().state == openraft::ServerState::Leader).cloned()
}

/// Records that input `v` was committed at `id`.
fn acknowledge(acked: &Mutex<Acked>, v: u64, id: openraft::LogId<u64>) {
    lock_acked(acked).insert(v, (id.index, (id.leader_id.term, id.leader_id.node_id)));
}

fn lock_acked(a: &Mutex<Acked>) -> std::sync::MutexGuard<'_, Acked> {
    a.lock().unwrap_or_else(|p| p.into_inner())
}

/// Real time one seed may take before the run is called stuck (a livelock in virtual
/// time shows up as a seed that never ends).
const STUCK_AFTER: Duration = Duration::from_secs(120);

fn run(seed: u64) -> Result<String, String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap();
        let _ = tx.send(rt.block_on(simulate(seed)));
    });
    match rx.recv_timeout(STUCK_AFTER) {
        Ok(result) => result,
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            Err(format!("seed {seed}: still running after {STUCK_AFTER:?} of real time (stuck)"))
        }
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => Err(format!("seed {seed}: the simulation panicked")),
    }
}

#[test]
fn seeded_simulation_keeps_every_acknowledged_input_and_the_replicas_agree() {
    let seeds: Vec<u64> = match std::env::var("DROVER_SIM_SEED") {
        Ok(s) => vec![s.parse().expect("DROVER_SIM_SEED is a number")],
        Err(_) => {
            let k = std::env::var("DROVER_SIM_SEEDS").ok().and_then(|k| k.parse().ok()).unwrap_or(300u64);
            (1..=k).collect()
        }
    };
    let started = std::time::Instant::now();
    let mut acknowledged = 0usize;
    for seed in &seeds {
        match run(*seed) {
            Ok(summary) => {
                acknowledged += summary.split(' ').nth(4).and_then(|n| n.parse::<usize>().ok()).unwrap_or(0);
                if std::env::var_os("DROVER_SIM_VERBOSE").is_some() {
                    eprintln!("{summary}");
                }
            }
            Err(e) => panic!("{e} (rerun: DROVER_SIM_SEED={seed} cargo test -p drover-raft --test sim)"),
        }
    }
    eprintln!(
        "{} seeds passed in {:.1} s ({acknowledged} acknowledged inputs checked)",
        seeds.len(),
        started.elapsed().as_secs_f64()
    );
}
