//! The relay between nodes, end to end: three `weft-router` processes and three or four
//! `weft-node` processes on 127.0.0.x (issue 3). What a client on one node sees of
//! topics owned and published elsewhere:
//!
//! - every event, in offset order, exactly once, each publisher's own events in the
//!   order it published them, whichever node published and whichever owns the topic;
//! - every node names the same owner for a topic under the same ring version, and a
//!   fourth node takes about a quarter of the topics, from the others only;
//! - the data path does not need the router leader, and the routers keep membership,
//!   ring and registry across a restart of all three on their data dirs;
//! - when an owner dies its topics move to the survivors in a new epoch, and each
//!   subscriber is told with a `reset` before any event of the new epoch, never a gap;
//! - an owner sends each event once per interested node, not once per subscriber.
//!
//! Each test uses its own block of loopback addresses (see `weft_testkit::cluster`), every
//! wait is bounded, and process logs are printed only when a test fails.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use weft_testkit::api::NodeApi;
use weft_testkit::metrics::parse_metric;
use weft_testkit::proc_cluster::{ProcCluster, HEARTBEAT_TIMEOUT_MS, LEADER_WITHIN};
use weft_testkit::wait::{wait_for, wait_until};
use weft_testkit::watch::Seen;
use weft_testkit::{assert_contiguous, Delivered};

const NODES: [&str; 3] = ["a", "b", "c"];
/// Nodes join, heartbeat and activate; the slot table is recomputed per activation.
const CONVERGE_WITHIN: Duration = Duration::from_secs(30);
/// Reading every expected event once they are all published.
const READ_WITHIN: Duration = Duration::from_secs(30);

const SENT: &str = "weft_relay_events_sent_total";
const RECEIVED: &str = "weft_relay_events_received_total";
const BAD_FRAMES: &str = "weft_relay_bad_frames_total";

/// Scans `{prefix}.0`, `{prefix}.1`, … asking `api` for owners until each of `owners`
/// owns `per_owner` of them.
async fn topics_by_owner(
    api: &NodeApi,
    prefix: &str,
    per_owner: usize,
    owners: &[&str],
) -> BTreeMap<String, Vec<String>> {
    let mut found: BTreeMap<String, Vec<String>> =
        owners.iter().map(|o| (o.to_string(), Vec::new())).collect();
    for i in 0..10_000 {
        if found.values().all(|ts| ts.len() >= per_owner) {
            return found;
        }
        let topic = format!("{prefix}.{i}");
        let owner = api.owner(&topic).await.owner;
        if let Some(ts) = found.get_mut(&owner) {
            if ts.len() < per_owner {
                ts.push(topic);
            }
        }
    }
    panic!("no {per_owner} topics each for {owners:?} among 10,000 names: {found:?}");
}

/// One topic's events as a subscriber received them: offsets `1..=n` in one epoch
/// (`epoch`, when the transport carries it), every event of every publisher exactly
/// once (`per_publisher`: publisher → how many it published, numbered `n` = 0..), and
/// each publisher's events in the order it published them.
fn assert_in_order_exactly_once(
    who: &str,
    topic: &str,
    events: &[Delivered],
    epoch: &str,
    per_publisher: &BTreeMap<String, u64>,
) {
    let total: u64 = per_publisher.values().sum();
    assert_eq!(
        events.len() as u64,
        total,
        "{who}: {topic}: event count (publishers {per_publisher:?})"
    );
    assert_contiguous(events, 1);
    for e in events {
        assert_eq!(e.epoch, epoch, "{who}: {topic}: offset {} epoch", e.offset);
    }
    let mut next: BTreeMap<String, u64> = per_publisher.keys().map(|p| (p.clone(), 0)).collect();
    for e in events {
        let p = e.data["p"].as_str().unwrap_or_default();
        let n = e.data["n"].as_u64();
        let Some(expect) = next.get_mut(p) else {
            panic!("{who}: {topic}: event from an unknown publisher: {e:?}");
        };
        assert_eq!(
            n,
            Some(*expect),
            "{who}: {topic}: publisher {p} out of order or repeated at offset {}",
            e.offset
        );
        *expect += 1;
    }
    assert_eq!(&next, per_publisher, "{who}: {topic}: events per publisher");
}

fn payload(publisher: &str, n: u64) -> Value {
    json!({ "p": publisher, "n": n })
}

#[test]
fn metric_lines_are_matched_by_name_and_node() {
    let page = "# TYPE weft_relay_events_sent_total counter\n\
                weft_relay_events_sent_total{node=\"a\"} 200\n\
                weft_relay_events_sent_total{node=\"b\"} 7\n\
                weft_relay_events_sent_total_extra{node=\"a\"} 9\n\
                weft_relay_links{node=\"a\",peer=\"b\"} 1\n\
                weft_relay_links{node=\"a\",peer=\"c\"} 1\n";
    assert_eq!(parse_metric(page, SENT, "a"), Some(200.0));
    assert_eq!(parse_metric(page, "weft_relay_links", "a"), Some(2.0));
    assert_eq!(parse_metric(page, "weft_relay_links", "c"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_published_on_other_nodes_arrive_in_order_exactly_once() {
    const PER_PUBLISHER: u64 = 40;
    let c = ProcCluster::start("order", 100, &NODES).await;
    c.converged(CONVERGE_WITHIN).await;
    let a = c.node("a");
    // 8 topics owned by each node, A included: remote owners and a local one.
    let by_owner = topics_by_owner(&a, "orders", 8, &NODES).await;
    let topics: Vec<String> = by_owner.values().flatten().cloned().collect();
    let sse_topics: Vec<String> = by_owner
        .values()
        .flat_map(|ts| ts.iter().take(2))
        .cloned()
        .collect();

    let mut ws = a.watcher().await;
    let epochs = subscribe_fresh(&mut ws, &topics).await;
    let mut sse = a.multi_sse(&sse_topics).await;

    let publishers = ["b", "c"];
    let per_publisher: BTreeMap<String, u64> = publishers
        .iter()
        .map(|p| (p.to_string(), PER_PUBLISHER))
        .collect();
    let total = (PER_PUBLISHER as usize) * publishers.len();
    let want_ws: BTreeMap<String, usize> = topics.iter().map(|t| (t.clone(), total)).collect();
    let want_sse: BTreeMap<String, usize> = sse_topics.iter().map(|t| (t.clone(), total)).collect();
    let ws_reader = tokio::spawn(async move { ws.collect(&want_ws, READ_WITHIN).await });
    let sse_reader = tokio::spawn(async move { sse.collect(&want_sse, READ_WITHIN).await });

    // One sequential publisher per (node, topic), all at once: a publisher's next event
    // goes out only after the previous one was acknowledged.
    let mut tasks = Vec::new();
    for p in publishers {
        let api = c.node(p);
        for t in &topics {
            let (api, t) = (api.clone(), t.clone());
            tasks.push(tokio::spawn(async move {
                for n in 0..PER_PUBLISHER {
                    api.publish(&t, &payload(&api.name, n)).await;
                }
            }));
        }
    }
    for t in tasks {
        t.await.expect("publisher");
    }

    let got = ws_reader.await.expect("WebSocket reader");
    for t in &topics {
        assert_in_order_exactly_once("WebSocket", t, &got[t], &epochs[t], &per_publisher);
    }
    let got = sse_reader.await.expect("SSE reader");
    for t in &sse_topics {
        assert_in_order_exactly_once("SSE", t, &got[t], &epochs[t], &per_publisher);
    }
    for n in NODES {
        let bad = c.node(n).metric(BAD_FRAMES).await.unwrap_or(0.0);
        assert_eq!(bad, 0.0, "{n}: relay frames refused");
    }
}

/// Every node's answer for every topic: the same owner and slot at `version`.
async fn agreed_owners(c: &ProcCluster, topics: &[String], version: u64) -> Vec<String> {
    let apis: Vec<NodeApi> = c.node_names().iter().map(|n| c.node(n)).collect();
    let answers = futures_util::future::join_all(apis.iter().map(|api| api.owners(topics))).await;
    let first = &answers[0];
    for (api, owners) in apis.iter().zip(&answers) {
        for (t, o) in topics.iter().zip(owners) {
            assert_eq!(&o.topic, t);
            assert_eq!(
                o.ring_version, version,
                "{}: {t} answered at ring version {}",
                api.name, o.ring_version
            );
        }
        assert_eq!(
            owners, first,
            "{} and {} disagree on owners at ring version {version}",
            api.name, apis[0].name
        );
    }
    first.iter().map(|o| o.owner.clone()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owners_agree_and_a_fourth_node_moves_about_a_quarter() {
    let mut c = ProcCluster::start("ring", 120, &NODES).await;
    let v1 = c.converged(CONVERGE_WITHIN).await;
    let topics: Vec<String> = (0..1000).map(|i| format!("ring.{i}")).collect();
    let before = agreed_owners(&c, &topics, v1).await;
    for n in NODES {
        let owned = before.iter().filter(|o| *o == n).count();
        assert!(owned > 0, "{n} owns none of 1,000 topics");
    }

    c.add_node("d").await;
    let v2 = c.converged(CONVERGE_WITHIN).await;
    assert!(v2 > v1, "the ring version moved past {v1} (now {v2})");
    let after = agreed_owners(&c, &topics, v2).await;
    let mut moved = 0usize;
    for ((t, was), now) in topics.iter().zip(&before).zip(&after) {
        if was != now {
            moved += 1;
            assert_eq!(
                now, "d",
                "{t} moved from {was} to {now}, not to the new node"
            );
        }
    }
    let share = moved as f64 / topics.len() as f64;
    assert!(
        (0.15..=0.35).contains(&share),
        "{moved} of 1,000 topics moved ({share:.3}); a fourth node should take about a quarter"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_router_leader_does_not_stop_delivery() {
    const PUBLISH_FOR: Duration = Duration::from_secs(4);
    /// Per publisher; two publishers make about 50 events per second in total.
    const PUBLISH_EVERY: Duration = Duration::from_millis(40);
    let mut c = ProcCluster::start("leader", 140, &NODES).await;
    c.converged(CONVERGE_WITHIN).await;
    let a = c.node("a");
    let topics: Vec<String> = topics_by_owner(&a, "failover", 2, &["b", "c"])
        .await
        .into_values()
        .flatten()
        .collect();
    let mut ws = a.watcher().await;
    let epochs = subscribe_fresh(&mut ws, &topics).await;

    let view = a.cluster().await;
    let leader = view["router"]["leader_id"]
        .as_u64()
        .unwrap_or_else(|| panic!("A's /v1/cluster names no router leader: {view}"));
    assert_eq!(
        leader,
        c.router_leader(LEADER_WITHIN).await,
        "A's view names the leader the routers agree on"
    );
    let interest_of_c = view["interest"]["topics_per_node"]["c"]
        .as_u64()
        .unwrap_or(0);
    c.kill_router(leader);

    // B and C publish to every topic (their own and the other's) while the routers
    // elect a new leader.
    let started = Instant::now();
    let mut tasks = Vec::new();
    for p in ["b", "c"] {
        let api = c.node(p);
        let topics = topics.clone();
        tasks.push(tokio::spawn(async move {
            let mut count: BTreeMap<String, u64> = topics.iter().map(|t| (t.clone(), 0)).collect();
            let mut tick = tokio::time::interval(PUBLISH_EVERY);
            let mut i = 0;
            while started.elapsed() < PUBLISH_FOR {
                tick.tick().await;
                let t = &topics[i % topics.len()];
                let n = count[t];
                api.publish(t, &payload(&api.name, n)).await;
                *count.get_mut(t).expect("topic") += 1;
                i += 1;
            }
            (api.name.clone(), count)
        }));
    }
    let mut per_topic: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    for t in tasks {
        let (p, count) = t.await.expect("publisher");
        for (topic, n) in count {
            per_topic.entry(topic).or_default().insert(p.clone(), n);
        }
    }
    let want: BTreeMap<String, usize> = per_topic
        .iter()
        .map(|(t, ps)| (t.clone(), ps.values().sum::<u64>() as usize))
        .collect();
    let got = ws.collect(&want, READ_WITHIN).await;
    for t in &topics {
        assert_in_order_exactly_once("WebSocket", t, &got[t], &epochs[t], &per_topic[t]);
    }

    // Metadata writes go through again: a first subscriber on C reaches the registry
    // (under the new leader) and A's view of it.
    let mut fresh = c.node("c").watcher().await;
    fresh.subscribe("failover.fresh").await;
    let a = &a;
    wait_until(
        Duration::from_secs(10),
        "A's view shows C's interest in a new topic",
        || async move {
            a.cluster().await["interest"]["topics_per_node"]["c"]
                .as_u64()
                .unwrap_or(0)
                == interest_of_c + 1
        },
    )
    .await;
}

/// Members (id, address, state), ring version and slots per node, and interest, from a
/// node's `/v1/cluster`.
fn durable_part(view: &Value) -> Value {
    let members: Vec<Value> = view["members"]
        .as_array()
        .map(|ms| {
            ms.iter()
                .map(|m| json!({ "id": m["id"], "addr": m["addr"], "state": m["state"] }))
                .collect()
        })
        .unwrap_or_default();
    json!({
        "members": members,
        "ring_version": view["ring"]["version"],
        "slots_per_node": view["ring"]["slots_per_node"],
        "interest": view["interest"],
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routers_restart_on_their_data_dirs_keep_membership_ring_and_registry() {
    // A timeout well above the restart (and the nodes' 1 s heartbeats): no member may
    // be expired for the silence the restart causes, so membership and ring version
    // must come back exactly as they were.
    let mut c = ProcCluster::start_with("restart", 160, &NODES, 8000).await;
    c.converged(CONVERGE_WITHIN).await;
    let mut sessions = Vec::new();
    for (node, topics) in [
        ("a", &["keep.1", "keep.2", "keep.3"][..]),
        ("b", &["keep.1", "keep.4"][..]),
        ("c", &["keep.5"][..]),
    ] {
        let mut w = c.node(node).watcher().await;
        for t in topics {
            w.subscribe(t).await;
        }
        sessions.push(w);
    }
    let want = json!({ "topics": 5, "topics_per_node": { "a": 3, "b": 2, "c": 1 } });
    let mut before = BTreeMap::new();
    for n in NODES {
        let api = c.node(n);
        let api = &api;
        let want = &want;
        let view = wait_for(
            Duration::from_secs(10),
            &format!("{n}'s view holds every node's interest"),
            || async move {
                let v = api.try_get_json("/v1/cluster").await?;
                if v["interest"] == *want {
                    Ok(v)
                } else {
                    Err(v["interest"].to_string())
                }
            },
        )
        .await;
        before.insert(n, durable_part(&view));
    }
    for n in NODES {
        assert_eq!(before[n], before["a"], "{n} and a see the same cluster");
    }
    let router_before = c.router_state().await;

    for id in c.router_ids() {
        c.kill_router(id);
    }
    for id in [1, 2, 3] {
        c.restart_router(id).await;
    }
    c.router_leader(LEADER_WITHIN).await;

    // The routers themselves: what they recovered from their data dirs.
    let router_after = {
        let c = &c;
        let want = router_before.version;
        wait_for(
            Duration::from_secs(10),
            "the new leader applies the recovered log",
            || async move {
                let s = c.router_state().await;
                if s.version >= want {
                    Ok(s)
                } else {
                    Err(format!("version {} < {want}", s.version))
                }
            },
        )
        .await
    };
    let members = |s: &weft_proto::grpc::ClusterState| {
        s.members
            .iter()
            .map(|m| (m.id.clone(), m.addr.clone(), m.state))
            .collect::<Vec<_>>()
    };
    assert_eq!(members(&router_after), members(&router_before));
    assert_eq!(router_after.slots, router_before.slots);
    assert_eq!(router_after.interest, router_before.interest);

    // The nodes' views follow the restarted routers: a new write shows up everywhere,
    // and everything else is as it was.
    let mut extra = c.node("b").watcher().await;
    extra.subscribe("keep.6").await;
    for n in NODES {
        let api = c.node(n);
        let api = &api;
        let view = wait_for(
            Duration::from_secs(15),
            &format!("{n}'s view shows B's new interest"),
            || async move {
                let v = api.try_get_json("/v1/cluster").await?;
                if v["interest"]["topics_per_node"]["b"] == 3 {
                    Ok(v)
                } else {
                    Err(v["interest"].to_string())
                }
            },
        )
        .await;
        let mut expect = before[n].clone();
        expect["interest"] = json!({ "topics": 6, "topics_per_node": { "a": 3, "b": 3, "c": 1 } });
        assert_eq!(
            durable_part(&view),
            expect,
            "{n}: members, ring and registry after the routers' restart"
        );
    }
    drop(sessions);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_node_loses_its_topics_to_new_owners() {
    const BEFORE: u64 = 5;
    const AFTER: u64 = 5;
    let mut c = ProcCluster::start("crash", 180, &NODES).await;
    let v1 = c.converged(CONVERGE_WITHIN).await;
    let (a, b) = (c.node("a"), c.node("b"));
    let topics = topics_by_owner(&a, "crash", 3, &["c"]).await["c"].clone();
    let mut ws = a.watcher().await;
    let mut old_epoch = BTreeMap::new();
    for t in &topics {
        let (epoch, offset) = ws.subscribe(t).await;
        assert_eq!(offset, 0, "{t} has had no event yet");
        old_epoch.insert(t.clone(), epoch);
    }
    for t in &topics {
        for n in 0..BEFORE {
            b.publish(t, &payload("b", n)).await;
        }
    }
    let want: BTreeMap<String, usize> = topics
        .iter()
        .map(|t| (t.clone(), BEFORE as usize))
        .collect();
    let got = ws.collect(&want, READ_WITHIN).await;
    let only_b = BTreeMap::from([("b".to_string(), BEFORE)]);
    for t in &topics {
        assert_in_order_exactly_once("WebSocket", t, &got[t], &old_epoch[t], &only_b);
    }

    c.sigkill_node("c");
    let v2 = c
        .converged(Duration::from_millis(HEARTBEAT_TIMEOUT_MS) + Duration::from_secs(10))
        .await;
    assert!(v2 > v1, "the ring moved past version {v1} (now {v2})");
    for t in &topics {
        let (on_a, on_b) = (a.owner(t).await, b.owner(t).await);
        assert_eq!(on_a, on_b, "{t}: A and B name different owners");
        assert!(
            on_a.owner == "a" || on_a.owner == "b",
            "{t}: owner {} after C died",
            on_a.owner
        );
        assert_eq!(
            on_a.ring_version, v2,
            "{t}: answered at an old ring version"
        );
    }

    for t in &topics {
        for n in 0..AFTER {
            let key = format!("crash-{t}-{n}");
            b.publish_retrying(t, &payload("b.after", n), &key, Duration::from_secs(10))
                .await;
        }
    }

    // Per topic: a reset to a new epoch, then that epoch's events from offset 1, each
    // exactly once; an event is only ever the next offset of the epoch last announced.
    struct Track {
        epoch: String,
        last: u64,
        reset: Option<(String, u64)>,
        new: Vec<Delivered>,
    }
    let mut track: BTreeMap<String, Track> = topics
        .iter()
        .map(|t| {
            (
                t.clone(),
                Track {
                    epoch: old_epoch[t].clone(),
                    last: BEFORE,
                    reset: None,
                    new: Vec::new(),
                },
            )
        })
        .collect();
    let deadline = tokio::time::Instant::now() + READ_WITHIN;
    while track
        .values()
        .any(|s| s.reset.is_none() || (s.new.len() as u64) < AFTER)
    {
        let seen = tokio::time::timeout_at(deadline, ws.next())
            .await
            .unwrap_or_else(|_| panic!("not every reset and event within {READ_WITHIN:?}"));
        match seen {
            Seen::Event(d) => {
                let s = track
                    .get_mut(&d.topic)
                    .unwrap_or_else(|| panic!("event of a topic not watched: {d:?}"));
                assert!(
                    s.reset.is_some(),
                    "{}: offset {} delivered after its owner died, before any reset",
                    d.topic,
                    d.offset
                );
                assert_eq!(
                    d.offset,
                    s.last + 1,
                    "{}: offset {} after {} in epoch {} without a reset",
                    d.topic,
                    d.offset,
                    s.last,
                    s.epoch
                );
                s.last = d.offset;
                s.new.push(d);
            }
            Seen::Reset {
                topic,
                epoch,
                offset,
            } => {
                let s = track
                    .get_mut(&topic)
                    .unwrap_or_else(|| panic!("reset of a topic not watched: {topic}"));
                assert_ne!(
                    epoch, old_epoch[&topic],
                    "{topic}: a reset must announce a new epoch"
                );
                if s.reset.is_none() {
                    s.reset = Some((epoch.clone(), offset));
                }
                s.epoch = epoch;
                s.last = offset;
            }
            Seen::Closed(code) => panic!("A's session closed ({code:?}) after C died"),
        }
    }
    let published = BTreeMap::from([("b.after".to_string(), AFTER)]);
    for (t, s) in &track {
        let (epoch, offset) = s.reset.clone().expect("reset seen");
        assert_eq!(offset, 0, "{t}: the new owner starts epoch {epoch} empty");
        assert_in_order_exactly_once("WebSocket after the crash", t, &s.new, &epoch, &published);
        let state = a.state(t).await;
        assert_eq!(
            (state.epoch.as_str(), state.offset),
            (epoch.as_str(), AFTER),
            "{t}: state on A after the move"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_sends_each_event_once_per_interested_node() {
    const EVENTS: u64 = 100;
    const SUBSCRIBERS_PER_NODE: usize = 5;
    let c = ProcCluster::start("fanout", 200, &NODES).await;
    c.converged(CONVERGE_WITHIN).await;
    let owner = c.node("a");
    let topic = topics_by_owner(&owner, "fanout", 1, &["a"]).await["a"][0].clone();
    let mirrors = ["b", "c"];
    let mut readers = Vec::new();
    for m in mirrors {
        for _ in 0..SUBSCRIBERS_PER_NODE {
            let mut w = c.node(m).watcher().await;
            let (epoch, offset) = w.subscribe(&topic).await;
            assert_eq!(offset, 0, "{topic} has had no event yet");
            let want = BTreeMap::from([(topic.clone(), EVENTS as usize)]);
            readers.push(tokio::spawn(async move {
                let got = w.collect(&want, READ_WITHIN).await;
                (w.node.clone(), epoch, got)
            }));
        }
    }
    let sent_before = owner.metric(SENT).await.unwrap_or(0.0);
    let mut received_before = BTreeMap::new();
    for m in mirrors {
        received_before.insert(m, c.node(m).metric(RECEIVED).await.unwrap_or(0.0));
    }

    for n in 0..EVENTS {
        owner.publish(&topic, &payload("a", n)).await;
    }
    let only_a = BTreeMap::from([("a".to_string(), EVENTS)]);
    for r in readers {
        let (node, epoch, got) = r.await.expect("reader");
        assert_in_order_exactly_once(
            &format!("WebSocket on {node}"),
            &topic,
            &got[&topic],
            &epoch,
            &only_a,
        );
    }

    // Every subscriber has every event, so the owner has sent all it will send.
    let sent = owner
        .settled_metric(SENT, Duration::from_secs(10))
        .await
        .unwrap_or_else(|| panic!("{SENT} is not exported by the owner"));
    assert_eq!(
        sent - sent_before,
        (EVENTS as usize * mirrors.len()) as f64,
        "the owner relays each event once per interested node, not per subscriber"
    );
    for m in mirrors {
        let received = c
            .node(m)
            .settled_metric(RECEIVED, Duration::from_secs(10))
            .await
            .unwrap_or_else(|| panic!("{RECEIVED} is not exported by {m}"));
        assert_eq!(
            received - received_before[m],
            EVENTS as f64,
            "{m} receives each event once for its {SUBSCRIBERS_PER_NODE} subscribers"
        );
    }
    // Relay lag, per peer link: the owner exports what its links hold, and once every
    // event is delivered they hold nothing.
    let queued = owner
        .settled_metric("weft_relay_link_queued_bytes", Duration::from_secs(10))
        .await
        .expect("the owner exports its links' backlog");
    assert_eq!(queued, 0.0, "bytes still queued after every event arrived");
}

/// Subscribes to topics that have had no event yet; their epochs, by topic.
async fn subscribe_fresh(
    ws: &mut weft_testkit::watch::Watcher,
    topics: &[String],
) -> BTreeMap<String, String> {
    let mut epochs = BTreeMap::new();
    for t in topics {
        let (epoch, offset) = ws.subscribe(t).await;
        assert_eq!(offset, 0, "{t} has had no event yet");
        epochs.insert(t.clone(), epoch);
    }
    epochs
}
