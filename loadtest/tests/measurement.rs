//! The harness measures what it claims to: against small fake servers whose behaviour
//! is known exactly (a stalled publish acknowledgement, an SSE stream with a fixed
//! delay, a gap, a duplicate and a reordering), the publisher and a subscriber report
//! those same numbers.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;
use weft_loadtest::plan::{topic_names, Layout, Plan, ScenarioKind, Slot};
use weft_loadtest::publisher::{Publisher, Via};
use weft_loadtest::recorder::Recorder;
use weft_loadtest::stamp::{now_us, Stamp};
use weft_loadtest::stats::{ErrorLog, LiveStats};
use weft_loadtest::subscriber::{Finals, Shared, Subscriber};
use weft_loadtest::transport::{System, Transport};
use weft_proto::Cursor;

mod common;

/// One HTTP/1.1 request: method + path, and the body.
async fn read_request(r: &mut BufReader<TcpStream>) -> Option<(String, Vec<u8>)> {
    let mut head = String::new();
    let mut len = 0usize;
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).await.ok()? == 0 {
            return None;
        }
        if line == "\r\n" {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().ok()?;
        }
        if head.is_empty() {
            head = line
                .split_whitespace()
                .take(2)
                .collect::<Vec<_>>()
                .join(" ");
        }
    }
    let mut body = vec![0; len];
    r.read_exact(&mut body).await.ok()?;
    Some((head, body))
}

async fn respond(w: &mut BufReader<TcpStream>, status: &str, body: &str) {
    let msg = format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let _ = w.get_mut().write_all(msg.as_bytes()).await;
}

/// With one request in flight at a time and the first acknowledgement stalled for
/// 300 ms, a closed-loop publisher would report one slow request. The open-loop
/// publisher keeps every event's scheduled time, so each event queued behind the stall
/// shows the wait it suffered.
#[tokio::test]
async fn publisher_is_open_loop_no_coordinated_omission() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let bodies: Arc<Mutex<Vec<Stamp>>> = Arc::default();
    let seen = bodies.clone();
    tokio::spawn(async move {
        let mut first = true;
        while let Ok((s, _)) = listener.accept().await {
            let seen = seen.clone();
            let stall = std::mem::take(&mut first);
            tokio::spawn(async move {
                let mut r = BufReader::new(s);
                let mut stall = stall;
                while let Some((_, body)) = read_request(&mut r).await {
                    seen.lock()
                        .unwrap()
                        .push(Stamp::decode(std::str::from_utf8(&body).unwrap()).unwrap());
                    if std::mem::take(&mut stall) {
                        tokio::time::sleep(Duration::from_millis(300)).await;
                    }
                    respond(
                        &mut r,
                        "201 Created",
                        r#"{"topic":"t","epoch":"e","offset":1}"#,
                    )
                    .await;
                }
            });
        }
    });

    let plan = Plan {
        kind: ScenarioKind::Fanout,
        topics: topic_names("lt", "co", ScenarioKind::Fanout, 1),
        subscribers: 1,
        layout: Layout::RoundRobin,
        rate: 100.0,
        duration: Duration::from_secs(1),
        payload_bytes: 64,
        churn: None,
        restart: None,
        subscribe: None,
    };
    let recorder = Arc::new(Recorder::new());
    let publisher = Arc::new(Publisher {
        net: common::plain_net(addr).await,
        topics: Arc::new(plan.topics.clone()),
        recorder: recorder.clone(),
        stats: Arc::new(LiveStats::default()),
        errors: Arc::new(ErrorLog::default()),
        run_id: "co".into(),
        max_inflight: 1,
        timeout: Duration::from_secs(5),
        epoch_ends: Default::default(),
        ordered: false,
        via: Via::Http,
        bytes: Default::default(),
        last_ack_us: Default::default(),
    });
    let start_us = now_us() + 50_000;
    let start = Instant::now() + Duration::from_micros(50_000);
    let out = publisher
        .clone()
        .run(&plan, Slot::default(), start, start_us)
        .await;
    assert_eq!((out.published, out.failed), (100, 0));
    // The 201 bodies were read: the fake node always says e:1.
    let ends = publisher.epoch_ends.lock().unwrap().clone();
    assert_eq!(
        ends.into_iter().collect::<Vec<_>>(),
        vec![((0, "e".to_string()), 1)]
    );

    let mut stamps = bodies.lock().unwrap().clone();
    stamps.sort_by_key(|s| s.s);
    assert_eq!(stamps.len(), 100);
    for (k, s) in stamps.iter().enumerate() {
        assert_eq!(s.s, k as u64);
        let scheduled = start_us + k as u64 * 10_000;
        // Never earlier than the schedule; an on-time publisher stamps when its timer
        // fired, which is at most a tick (and a loaded machine's wake-up) later.
        assert!(
            (scheduled..scheduled + 20_000).contains(&s.t),
            "event {k}: stamped {} µs after its schedule",
            s.t as i64 - scheduled as i64
        );
        // Events 2..=25 came due while the publisher was held by the stall (event 0's
        // acknowledgement, with event 1 waiting for the window): they carry the
        // schedule to the microsecond, however late they were sent.
        if (2..=25).contains(&k) {
            assert_eq!(s.t, scheduled, "event {k}");
        }
    }
    let publish = recorder.snapshot().publish;
    assert_eq!(publish.len(), 100);
    // Events 0..=10 were due within 100 ms of the start and waited for the 300 ms stall.
    let slow = publish
        .iter_recorded()
        .filter(|v| v.value_iterated_to() >= 195_000)
        .map(|v| v.count_at_value())
        .sum::<u64>();
    assert!(slow >= 10, "only {slow} events show the stall");
    assert!(publish.max() >= 295_000, "max {}", publish.max());
}

/// A fake node serving one topic over SSE. `script` lists the offsets to send, in
/// order; each event is stamped when the server makes it and sent `delay` later.
async fn fake_sse_node(script: Vec<u64>, delay: Duration) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let script = script.clone();
            tokio::spawn(async move {
                let mut r = BufReader::new(s);
                while let Some((head, _)) = read_request(&mut r).await {
                    if !head.contains("watch=true") {
                        respond(
                            &mut r,
                            "200 OK",
                            r#"{"topic":"t","epoch":"e","offset":0,"last":null}"#,
                        )
                        .await;
                        continue;
                    }
                    let w = r.get_mut();
                    let _ = w
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n: ping\n\n")
                        .await;
                    for &o in &script {
                        let stamp = Stamp {
                            p: 0,
                            s: o,
                            t: now_us(),
                        }
                        .encode(64);
                        tokio::time::sleep(delay).await;
                        let ev = format!("id: e:{o}\nevent: message\ndata: {stamp}\n\n");
                        if w.write_all(ev.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                    // Hold the stream open until the client leaves.
                    let mut buf = [0u8; 64];
                    let _ = r.read(&mut buf).await;
                    return;
                }
            });
        }
    });
    addr
}

async fn subscribe_once(
    addr: std::net::SocketAddr,
    final_offset: u64,
    expect_events: u64,
) -> (weft_loadtest::subscriber::SubscriberOutcome, Arc<Recorder>) {
    let recorder = Arc::new(Recorder::new());
    let stats = Arc::new(LiveStats::default());
    let shared = Arc::new(Shared {
        net: common::plain_net(addr).await,
        system: System::Weft,
        transport: Transport::Sse,
        topics: Arc::new(vec!["t".to_string()]),
        recorder: recorder.clone(),
        stats: stats.clone(),
        errors: Arc::new(ErrorLog::default()),
        churn: None,
        longpoll_wait: Duration::from_secs(1),
        schedule: None,
    });
    let (finals_tx, finals_rx) = watch::channel::<Option<Arc<Finals>>>(None);
    let (stop_tx, stop_rx) = watch::channel(false);
    let sub = Subscriber::new(0, vec![0], finals_rx, stop_rx);
    let task = tokio::spawn(sub.run(shared, Instant::now()));
    // Wait until the script has played, then publish the final cursor.
    let deadline = Instant::now() + Duration::from_secs(10);
    while stats.delivered.load(std::sync::atomic::Ordering::Relaxed)
        + stats.duplicates.load(std::sync::atomic::Ordering::Relaxed)
        < expect_events
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    finals_tx.send_replace(Some(Arc::new(Finals::new(
        [(0, Cursor::new("e", final_offset))].into(),
    ))));
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop_tx.send_replace(true);
    let outcome = tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap();
    (outcome, recorder)
}

/// Every event reaches the subscriber exactly 80 ms after its stamp: the latency
/// accounting must say 80 ms (plus loopback noise), not more, not less.
#[tokio::test]
async fn injected_delivery_delay_is_reported() {
    let addr = fake_sse_node((1..=20).collect(), Duration::from_millis(80)).await;
    let (out, recorder) = subscribe_once(addr, 20, 20).await;
    assert_eq!(
        (out.counts.expected, out.counts.delivered, out.counts.lost),
        (20, 20, 0)
    );
    let lat = recorder.snapshot().latency;
    assert_eq!(lat.len(), 20);
    assert!(
        lat.min() >= 79_900,
        "min {}µs is below the injected 80 ms",
        lat.min()
    );
    assert!(
        lat.value_at_quantile(0.5) < 100_000,
        "p50 {}µs is far above 80 ms",
        lat.value_at_quantile(0.5)
    );
}

/// A stream with a gap that is filled late (reordered), a duplicate, and an event that
/// never comes: the subscriber's books say exactly that.
#[tokio::test]
async fn stream_anomalies_are_counted_end_to_end() {
    let addr = fake_sse_node(vec![1, 2, 4, 3, 5, 5, 7], Duration::from_millis(1)).await;
    // The topic ends at offset 8: 6 and 8 never arrive.
    let (out, _) = subscribe_once(addr, 8, 7).await;
    let c = out.counts;
    assert_eq!(c.expected, 8);
    assert_eq!(c.delivered, 6, "{c:?}");
    assert_eq!(c.lost, 2, "{c:?}");
    assert_eq!(c.reordered, 1, "{c:?}");
    assert_eq!(c.duplicates, 1, "{c:?}");
    assert_eq!(c.resets, 0, "{c:?}");
}
