//! Bad input on the relay (`weft.v1.Relay/Link`) gets an error — never a panic, never
//! corrupted state — and the node keeps serving everyone else. The test plays a peer
//! node with a raw tonic client: it joins the node's embedded router as a member, then
//! dials the node's relay the way another node would.

use std::time::{Duration, Instant};

use bytes::Bytes;
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use weft_proto::grpc::relay_client::RelayClient;
use weft_proto::grpc::relay_frame::Kind;
use weft_proto::grpc::{self, RelayBatch, RelayFrame};
use weft_router::RouterClient;
use weft_testkit::inproc::ClusterNode;

const NODE_ID: &str = "relay-node";
/// A member at an address where nothing listens: the node's own dials to it fail,
/// so the only link between them is the one the test opens.
const FAKE: &str = "zz-fake-peer";

/// The node under test, clustered with its embedded router, joined and active.
async fn start() -> ClusterNode {
    let node = ClusterNode::start(NODE_ID, |c| c.timing.shutdown_grace_ms = 500).await;
    node.await_view("the node is active", |v| {
        v["this_node"]["state"] == "active"
    })
    .await;
    node
}

/// A counter of the node (0 before it is exported).
async fn metric(node: &ClusterNode, name: &str) -> u64 {
    node.api.metric(name).await.map_or(0, |v| v as u64)
}

/// Waits for a counter exported once a second to reach at least `min`.
async fn metric_at_least(node: &ClusterNode, name: &str, min: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let v = metric(node, name).await;
        if v >= min || Instant::now() > deadline {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn publish_http(node: &ClusterNode, topic: &str) -> u16 {
    node.api
        .http
        .post(node.api.url(&format!("/v1/topics/{topic}/events")))
        .header("content-type", "application/json")
        .body(r#"{"still":"serving"}"#)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

fn frame(kind: Kind) -> Bytes {
    Bytes::from(RelayFrame { kind: Some(kind) }.encode_to_vec())
}

fn hello(node: &str) -> RelayBatch {
    RelayBatch {
        frames: vec![frame(Kind::Hello(grpc::Hello {
            node: node.into(),
            ring_version: 0,
            ..Default::default()
        }))],
    }
}

/// One side of a link, as a peer node would hold it.
struct Link {
    tx: mpsc::Sender<RelayBatch>,
    rx: Streaming<RelayBatch>,
    /// Frames received but not looked at yet (the node batches its replies).
    queued: std::collections::VecDeque<Bytes>,
}

impl Link {
    async fn open(grpc: std::net::SocketAddr, first: RelayBatch) -> Result<Self, tonic::Status> {
        let mut client = RelayClient::connect(format!("http://{grpc}"))
            .await
            .unwrap()
            .max_encoding_message_size(64 << 20);
        let (tx, rx) = mpsc::channel(4);
        tx.send(first).await.unwrap();
        let mut rx = client.link(ReceiverStream::new(rx)).await?.into_inner();
        let reply = tokio::time::timeout(Duration::from_secs(5), rx.message())
            .await
            .expect("the node answers a link within 5 s")?
            .expect("a hello back");
        match decode(&reply.frames[0]) {
            Kind::Hello(h) => assert_eq!(h.node, NODE_ID),
            other => panic!("expected the node's hello, got {other:?}"),
        }
        Ok(Self {
            tx,
            rx,
            queued: Default::default(),
        })
    }

    async fn send(&self, frames: Vec<Bytes>) {
        let _ = self.tx.send(RelayBatch { frames }).await;
    }

    /// The next frame from the node.
    async fn next(&mut self) -> Result<Option<Kind>, tonic::Status> {
        self.next_within(Duration::from_secs(5)).await
    }

    async fn next_within(&mut self, within: Duration) -> Result<Option<Kind>, tonic::Status> {
        while self.queued.is_empty() {
            let batch = tokio::time::timeout(within, self.rx.message())
                .await
                .unwrap_or_else(|_| panic!("the node sent nothing for {within:?}"))?;
            match batch {
                Some(b) => self.queued.extend(b.frames),
                None => return Ok(None),
            }
        }
        Ok(self.queued.pop_front().map(|f| decode(&f)))
    }

    /// The next frame, or `None` on silence for `within` (or the link's end).
    async fn poll(&mut self, within: Duration) -> Option<Kind> {
        while self.queued.is_empty() {
            match tokio::time::timeout(within, self.rx.message()).await {
                Ok(Ok(Some(b))) => self.queued.extend(b.frames),
                _ => return None,
            }
        }
        self.queued.pop_front().map(|f| decode(&f))
    }

    /// Waits for the node to end the link (an error status or end of stream).
    async fn ended(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            match tokio::time::timeout(Duration::from_millis(500), self.rx.message()).await {
                Ok(Ok(Some(_))) => continue,
                Ok(Ok(None)) | Ok(Err(_)) => return true,
                Err(_) => continue,
            }
        }
        false
    }
}

fn decode(raw: &Bytes) -> Kind {
    RelayFrame::decode(raw.clone())
        .expect("the node sends decodable frames")
        .kind
        .expect("non-empty frame")
}

fn publish(req_id: u64, topic: &str, data: &[u8], ring_version: u64) -> Bytes {
    frame(Kind::Publish(grpc::RelayPublish {
        req_id,
        topic: topic.into(),
        data: Bytes::copy_from_slice(data),
        r#type: None,
        idempotency_key: None,
        ring_version,
    }))
}

/// Joins the node's router as the fake peer and keeps it alive; returns once the
/// ring gives it slots (the heartbeat task ends with the test).
async fn join_fake_peer(node: &ClusterNode) -> (tokio::task::JoinHandle<()>, u64) {
    let router = RouterClient::new(vec![node.cluster.to_string()]);
    router.join(FAKE, "127.0.0.1:9", "", 0).await.unwrap();
    let beat = tokio::spawn(async move {
        loop {
            let _ = router.heartbeat(FAKE, 0, 0).await;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
    let view = node
        .await_view("the fake peer has slots", |v| {
            v["ring"]["slots_per_node"][FAKE].as_u64().unwrap_or(0) > 0
        })
        .await;
    (beat, view["ring"]["version"].as_u64().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_on_the_relay_gets_errors_and_the_node_keeps_serving() {
    let mut node = start().await;

    // A stranger is refused before anything else.
    let err = Link::open(node.cluster, hello("stranger")).await.err();
    assert_eq!(
        err.map(|s| s.code()),
        Some(tonic::Code::PermissionDenied),
        "a node that is not a member is refused"
    );
    // A first frame that is not a hello is refused.
    let not_hello = RelayBatch {
        frames: vec![frame(Kind::Follow(grpc::Follow {
            topic: "t".into(),
            ring_version: 0,
        }))],
    };
    let err = Link::open(node.cluster, not_hello).await.err();
    assert_eq!(err.map(|s| s.code()), Some(tonic::Code::InvalidArgument));

    // Become a member (joined and heartbeating, so it gets slots).
    let (beat, ring_version) = join_fake_peer(&node).await;
    let mine = node.api.topic_owned_by("relay", NODE_ID).await;
    let theirs = node.api.topic_owned_by("relay", FAKE).await;

    let mut link = Link::open(node.cluster, hello(FAKE)).await.unwrap();
    link.send(vec![frame(Kind::HandoffDone(grpc::HandoffDone {
        ring_version,
    }))])
    .await;
    // Bad topic, bad data, stale ring: each answered with its status, by request id.
    link.send(vec![
        publish(1, "bad topic", b"1", ring_version),
        publish(2, &mine, b"{not json", ring_version),
        publish(3, &theirs, b"1", ring_version - 1),
        publish(4, &mine, br#"{"ok":true}"#, ring_version),
    ])
    .await;
    let mut answers = Vec::new();
    while answers.len() < 4 {
        match link.next().await.unwrap().expect("link open") {
            Kind::Error(e) => answers.push((e.req_id, e.status, e.ring_version)),
            Kind::PublishAck(a) => answers.push((a.req_id, 200, a.offset)),
            _ => {}
        }
    }
    answers.sort();
    assert_eq!(
        (answers[0].0, answers[0].1),
        (1, 400),
        "bad topic: {answers:?}"
    );
    assert_eq!(
        (answers[1].0, answers[1].1),
        (2, 400),
        "bad data: {answers:?}"
    );
    assert_eq!(
        (answers[2].0, answers[2].1, answers[2].2),
        (3, 421, ring_version),
        "not the owner: 421 with the node's ring version: {answers:?}"
    );
    assert_eq!((answers[3].0, answers[3].1, answers[3].2), (4, 200, 1));

    // Following a topic the node owns gives its snapshot, with the event in history.
    link.send(vec![frame(Kind::Follow(grpc::Follow {
        topic: mine.clone(),
        ring_version,
    }))])
    .await;
    loop {
        if let Kind::Followed(f) = link.next().await.unwrap().expect("link open") {
            assert_eq!(f.topic, mine);
            assert_eq!(f.last_offset, 1);
            assert_eq!(f.history.len(), 1);
            assert_eq!(&f.history[0].data[..], br#"{"ok":true}"#);
            break;
        }
    }
    let bad_before = metric(&node, "weft_relay_bad_frames_total").await;

    // Malformed frames end the link — one link at a time, each counted.
    let malformed: Vec<(&str, Vec<Bytes>)> = vec![
        (
            "undecodable bytes",
            vec![Bytes::from_static(&[0xff, 0xff, 0xff, 0x07])],
        ),
        (
            "an event whose data is not JSON",
            vec![frame(Kind::Event(grpc::RelayEvent {
                topic: theirs.clone(),
                epoch: "abc".into(),
                offset: 1,
                ts: 0,
                r#type: None,
                data: Bytes::from_static(b"{\"a\":1}\n\nevent: forged"),
            }))],
        ),
        (
            "a snapshot whose history has a hole",
            vec![frame(Kind::Followed(grpc::Followed {
                topic: theirs.clone(),
                epoch: "abc".into(),
                last_offset: 5,
                history: [1u64, 3]
                    .iter()
                    .map(|&o| grpc::RelayEvent {
                        topic: theirs.clone(),
                        epoch: "abc".into(),
                        offset: o,
                        ts: 0,
                        r#type: None,
                        data: Bytes::from_static(b"1"),
                    })
                    .collect(),
            }))],
        ),
        (
            "a message over the size limit",
            vec![Bytes::from(vec![0u8; 9 << 20])],
        ),
    ];
    for (i, (what, frames)) in malformed.into_iter().enumerate() {
        if i > 0 {
            link = Link::open(node.cluster, hello(FAKE)).await.unwrap();
        }
        link.send(frames).await;
        assert!(link.ended().await, "{what}: the node ends the link");
        assert_eq!(
            publish_http(&node, &mine).await,
            201,
            "{what}: node still serves"
        );
    }
    let bad_after = metric_at_least(&node, "weft_relay_bad_frames_total", bad_before + 3).await;
    assert!(
        bad_after >= bad_before + 4,
        "malformed frames are counted: {bad_before} → {bad_after}"
    );

    // The state is intact: the owned topic has its one relayed event and the
    // bystander publishes after it, nothing else.
    let state = node.api.get_json(&format!("/v1/topics/{mine}")).await;
    assert_eq!(state["offset"], 5, "{state}");
    beat.abort();
    let _ = node.shutdown(Duration::from_secs(20)).await;
}

/// A peer whose link stops reading never stalls the owner: past the link's budget the
/// owner drops it from the topic's followers, says `Lagged`, counts it, and keeps
/// publishing and delivering locally at full speed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_peer_never_stalls_the_owner() {
    let mut node = start().await;
    let (beat, ring_version) = join_fake_peer(&node).await;
    let mine = node.api.topic_owned_by("lag", NODE_ID).await;
    let mut link = Link::open(node.cluster, hello(FAKE)).await.unwrap();
    // As a real node does on a new link: it holds nothing the ring gives the node
    // (a node that first sees the ring with the peer in it waits for this).
    link.send(vec![frame(Kind::HandoffDone(grpc::HandoffDone {
        ring_version,
    }))])
    .await;
    link.send(vec![frame(Kind::Follow(grpc::Follow {
        topic: mine.clone(),
        ring_version: 0,
    }))])
    .await;
    let mut seen = Vec::new();
    loop {
        match link.poll(Duration::from_secs(8)).await {
            Some(Kind::Followed(_)) => break,
            Some(other) => seen.push(format!("{other:?}").chars().take(200).collect::<String>()),
            other => panic!(
                "no Followed for {mine}: {other:?}; frames before: {seen:?}; view: {}",
                node.view().await
            ),
        }
    }
    // A local subscriber on the owner, and a peer that stops reading its link.
    let mut local = weft_testkit::WsClient::connect(node.http).await;
    assert!(local
        .request(weft_testkit::subscribe_cmd(&mine, None))
        .await
        .result
        .is_some());
    let payload = format!(r#"{{"pad":"{}"}}"#, "x".repeat(32 * 1024));
    let n = 1200; // ~39 MB: well past the link's 16 MB event budget
    let reader = tokio::spawn(async move {
        let mut offsets = Vec::with_capacity(n);
        while offsets.len() < n {
            match tokio::time::timeout(Duration::from_secs(30), local.next_event()).await {
                Ok(Some(d)) => offsets.push(d.offset),
                _ => break,
            }
        }
        offsets
    });
    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    for _ in 0..n {
        let t0 = Instant::now();
        let status = node
            .api
            .http
            .post(node.api.url(&format!("/v1/topics/{mine}/events")))
            .header("content-type", "application/json")
            .body(payload.clone())
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(status, 201);
        slowest = slowest.max(t0.elapsed());
    }
    assert!(
        slowest < Duration::from_secs(2),
        "a publish waited {slowest:?} on the stalled peer"
    );
    // The local subscriber got every event, in order.
    let got = reader.await.unwrap();
    assert_eq!(
        got,
        (1..=n as u64).collect::<Vec<_>>(),
        "every event, in order"
    );
    let lagged = metric_at_least(&node, "weft_relay_lagged_total", 1).await;
    assert!(lagged >= 1, "the lagging peer was counted");
    // Reading again, the peer finds the Lagged notice after the events that fit.
    let mut events = 0u64;
    // (A generous bound: ~16 MB of queued events come first, on a loaded CI machine.)
    let saw_lagged = loop {
        match link.next_within(Duration::from_secs(20)).await.unwrap() {
            Some(Kind::Event(_)) => events += 1,
            Some(Kind::Lagged(l)) => break l.topic == mine,
            Some(_) => {}
            None => break false,
        }
    };
    assert!(saw_lagged, "the peer is told it lagged");
    assert!(
        events < n as u64,
        "the owner stopped relaying to it ({events} of {n} were queued)"
    );
    eprintln!(
        "{n} publishes in {:?}; {events} relayed before the cut",
        started.elapsed()
    );
    beat.abort();
    let _ = node.shutdown(Duration::from_secs(20)).await;
}
