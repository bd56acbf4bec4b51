//! What a scenario means, independent of how many processes run it.
//!
//! A run has `subscribers` numbered `0..S` and a global open-loop schedule of events
//! numbered `0..rate×duration`; event `k` is intended at `start + k/rate`. A [`Slot`]
//! `i/n` (a shard, a worker, or both) runs the subscribers `j` and the events `k` with
//! `j % n == i` and `k % n == i`, so n processes together run exactly the whole plan and
//! every choice below is a pure function of the plan and the index — two processes never
//! disagree about which topic subscriber 17 watches.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Which scenario a plan comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScenarioKind {
    Connect,
    Fanout,
    Chat,
    Ticker,
    Churn,
    Rolling,
    Subscribe,
}

impl ScenarioKind {
    pub fn name(self) -> &'static str {
        match self {
            ScenarioKind::Connect => "connect",
            ScenarioKind::Fanout => "fanout",
            ScenarioKind::Chat => "chat",
            ScenarioKind::Ticker => "ticker",
            ScenarioKind::Churn => "churn",
            ScenarioKind::Rolling => "rolling",
            ScenarioKind::Subscribe => "subscribe",
        }
    }
}

impl fmt::Display for ScenarioKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How subscribers are spread over topics, and where scheduled events go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    /// Subscriber `j` watches topic `j % T`; event `k` goes to topic `k % T`.
    RoundRobin,
    /// Chat: subscriber `j` is member `j % members` of room `j / members`; event `k` is
    /// sent by member `k % S` to that member's room.
    Rooms { members: usize },
    /// Ticker: subscriber `j` watches `per_subscriber` distinct pseudo-random topics;
    /// event `k` updates a pseudo-random topic.
    Random { per_subscriber: usize, seed: u64 },
    /// Subscribe: topics dealt out like cards — subscriber `j` of `S` watches topics
    /// `j, j + S, j + 2S, …`; event `k` goes to topic `k % T`.
    Dealt,
}

/// Sessions that end on purpose and resume with their cursors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Churn {
    /// Mean session lifetime; each session lives a uniform 0.5–1.5× of it.
    pub lifetime: Duration,
    /// Pause between a session's end and the reconnect.
    pub gap: Duration,
}

/// `subscribe`: subscriptions are the load. Topic `i` is subscribed at
/// `start + i/rate` (on the connection that watches it, opened during the ramp); once
/// every topic's subscribe is due, one event per topic is published at the same rate,
/// so each subscription is also checked to receive what follows its reply.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SubscribeSchedule {
    /// Subscribe commands per second over the whole run.
    pub rate: f64,
}

impl SubscribeSchedule {
    /// Offset of topic `i`'s subscribe from the load's start, µs.
    pub fn offset_us(&self, i: usize) -> u64 {
        (i as f64 * 1_000_000.0 / self.rate).round() as u64
    }
}

/// `rolling`: a shell command run while the load runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restart {
    pub command: String,
    /// Delay after the load starts.
    pub after: Duration,
    /// The command is killed after this long.
    pub timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct Plan {
    pub kind: ScenarioKind,
    /// Global topic names, indexed by topic number.
    pub topics: Vec<String>,
    pub subscribers: usize,
    pub layout: Layout,
    /// Events per second over the whole run (all slots together); 0 publishes nothing.
    pub rate: f64,
    /// Length of the publishing phase (`connect`: how long connections are held).
    pub duration: Duration,
    pub payload_bytes: usize,
    pub churn: Option<Churn>,
    pub restart: Option<Restart>,
    /// Subscriptions made on a schedule during the load (`subscribe`); otherwise each
    /// subscriber subscribes to everything as soon as it connects, during the ramp.
    pub subscribe: Option<SubscribeSchedule>,
}

/// Topic names are `<prefix>.<run id>.<scenario>.<n>`: unique per run, so concurrent or
/// earlier runs against the same node never mix their events.
pub fn topic_names(prefix: &str, run_id: &str, kind: ScenarioKind, count: usize) -> Vec<String> {
    (0..count)
        .map(|i| topic_name(prefix, run_id, kind, i))
        .collect()
}

/// The `i`-th name of [`topic_names`].
pub fn topic_name(prefix: &str, run_id: &str, kind: ScenarioKind, i: usize) -> String {
    format!("{prefix}.{run_id}.{}.{i}", kind.name())
}

impl Plan {
    /// Events in the whole schedule (`subscribe`: one per topic).
    pub fn total_events(&self) -> u64 {
        if self.rate <= 0.0 {
            return 0;
        }
        if self.subscribe.is_some() {
            return self.topics.len() as u64;
        }
        (self.rate * self.duration.as_secs_f64()).floor() as u64
    }

    /// Offset of event `k` from the load's start, µs (`subscribe`: publishing starts
    /// when the last subscribe is due).
    pub fn event_offset_us(&self, k: u64) -> u64 {
        let after = match self.subscribe {
            Some(_) => self.subscribe_offset_us(self.topics.len()),
            None => 0,
        };
        after + (k as f64 * 1_000_000.0 / self.rate).round() as u64
    }

    /// Offset of topic `i`'s subscribe from the load's start, µs (`subscribe` only;
    /// 0 otherwise).
    pub fn subscribe_offset_us(&self, i: usize) -> u64 {
        self.subscribe.map_or(0, |s| s.offset_us(i))
    }

    /// Topics subscriber `j` watches (distinct, ascending).
    pub fn subscriber_topics(&self, j: usize) -> Vec<usize> {
        let t = self.topics.len();
        match &self.layout {
            Layout::RoundRobin => vec![j % t],
            Layout::Dealt => (j..t).step_by(self.subscribers.max(1)).collect(),
            Layout::Rooms { members } => vec![(j / members) % t],
            Layout::Random {
                per_subscriber,
                seed,
            } => {
                let want = (*per_subscriber).min(t);
                let mut out = Vec::with_capacity(want);
                let mut state = seed ^ (j as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                // Partial Fisher–Yates would need O(T) memory; rejection sampling with a
                // bounded number of draws is enough for per_subscriber ≤ T.
                let mut draws = 0usize;
                while out.len() < want && draws < want * 64 {
                    let pick = (splitmix64(&mut state) % t as u64) as usize;
                    if !out.contains(&pick) {
                        out.push(pick);
                    }
                    draws += 1;
                }
                let mut next = 0;
                while out.len() < want {
                    if !out.contains(&next) {
                        out.push(next);
                    }
                    next += 1;
                }
                out.sort_unstable();
                out
            }
        }
    }

    /// The topic event `k` is published to.
    pub fn event_topic(&self, k: u64) -> usize {
        let t = self.topics.len() as u64;
        match &self.layout {
            Layout::RoundRobin | Layout::Dealt => (k % t) as usize,
            Layout::Rooms { .. } => {
                let member = (k % self.subscribers.max(1) as u64) as usize;
                self.subscriber_topics(member)[0]
            }
            Layout::Random { seed, .. } => {
                let mut state = seed.rotate_left(17) ^ k.wrapping_mul(0xD1B5_4A32_D192_ED03);
                (splitmix64(&mut state) % t) as usize
            }
        }
    }

    /// The events of the schedule's first `total` that go to `topic`, in order
    /// (`--ordered`). Round robin and dealt layouts step through them; the others
    /// filter the whole schedule.
    pub fn topic_events(
        &self,
        topic: usize,
        total: u64,
    ) -> Box<dyn Iterator<Item = u64> + Send + '_> {
        match self.layout {
            Layout::RoundRobin | Layout::Dealt => {
                Box::new((topic as u64..total).step_by(self.topics.len().max(1)))
            }
            _ => Box::new((0..total).filter(move |&k| self.event_topic(k) == topic)),
        }
    }

    /// Whether event `k`'s topic is `k % T` (what `--system nats` accounting needs).
    pub fn is_round_robin(&self) -> bool {
        matches!(self.layout, Layout::RoundRobin | Layout::Dealt)
    }

    /// The publisher id stamped on event `k` (chat: the sending member).
    pub fn event_publisher(&self, k: u64, slot: Slot) -> u64 {
        match &self.layout {
            Layout::Rooms { .. } => k % self.subscribers.max(1) as u64,
            _ => slot.index as u64,
        }
    }
}

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The part `index` of `count` of a run that one process executes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Slot {
    pub index: usize,
    pub count: usize,
}

impl Default for Slot {
    fn default() -> Self {
        Self { index: 0, count: 1 }
    }
}

impl Slot {
    pub fn owns(&self, n: u64) -> bool {
        n % self.count as u64 == self.index as u64
    }

    /// Worker `w` of `workers` inside this slot: a finer slot of the same run that owns
    /// exactly the numbers this slot owns and that are `≡ w` in its own sequence.
    pub fn split(&self, w: usize, workers: usize) -> Slot {
        Slot {
            index: self.index + w * self.count,
            count: self.count * workers,
        }
    }

    /// How many of `0..n` this slot owns.
    pub fn share(&self, n: u64) -> u64 {
        let (i, c) = (self.index as u64, self.count as u64);
        if n > i {
            (n - i).div_ceil(c)
        } else {
            0
        }
    }
}

impl FromStr for Slot {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (i, n) = s
            .split_once('/')
            .ok_or_else(|| format!("shard `{s}` must look like `i/n`, e.g. `0/4`"))?;
        let index: usize = i
            .trim()
            .parse()
            .map_err(|_| format!("shard index `{i}` is not a number"))?;
        let count: usize = n
            .trim()
            .parse()
            .map_err(|_| format!("shard count `{n}` is not a number"))?;
        if count == 0 || index >= count {
            return Err(format!(
                "shard `{s}`: the index counts from 0 and must be below the count"
            ));
        }
        Ok(Slot { index, count })
    }
}

impl fmt::Display for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(layout: Layout, topics: usize, subs: usize) -> Plan {
        Plan {
            kind: ScenarioKind::Fanout,
            topics: topic_names("lt", "r1", ScenarioKind::Fanout, topics),
            subscribers: subs,
            layout,
            rate: 1000.0,
            duration: Duration::from_secs(2),
            payload_bytes: 64,
            churn: None,
            restart: None,
            subscribe: None,
        }
    }

    #[test]
    fn slots_partition_the_run() {
        let root: Slot = "1/3".parse().unwrap();
        let workers: Vec<Slot> = (0..4).map(|w| root.split(w, 4)).collect();
        for n in 0..1000u64 {
            let owners = workers.iter().filter(|s| s.owns(n)).count();
            assert_eq!(owners, usize::from(root.owns(n)), "n={n}");
        }
        let total: u64 = (0..7).map(|i| Slot { index: i, count: 7 }.share(100)).sum();
        assert_eq!(total, 100);
        assert_eq!(Slot { index: 3, count: 4 }.share(3), 0);
        assert_eq!(Slot { index: 3, count: 4 }.share(4), 1);
    }

    #[test]
    fn slot_parse_errors_are_clear() {
        assert!("4/4"
            .parse::<Slot>()
            .unwrap_err()
            .contains("below the count"));
        assert!("x/4".parse::<Slot>().unwrap_err().contains("not a number"));
        assert!("3".parse::<Slot>().unwrap_err().contains("i/n"));
        assert_eq!("0/1".parse::<Slot>().unwrap(), Slot::default());
    }

    #[test]
    fn schedule_and_round_robin() {
        let p = plan(Layout::RoundRobin, 3, 10);
        assert_eq!(p.total_events(), 2000);
        assert_eq!(p.event_offset_us(1500), 1_500_000);
        assert_eq!(p.subscriber_topics(7), vec![1]);
        assert_eq!(p.event_topic(5), 2);
        assert_eq!(p.topics[2], "lt.r1.fanout.2");
        // A topic's events, in order, are every T-th of the schedule.
        assert_eq!(p.topic_events(1, 10).collect::<Vec<_>>(), vec![1, 4, 7]);
        let all: usize = (0..3).map(|t| p.topic_events(t, 2000).count()).sum();
        assert_eq!(all, 2000);
        let rooms = plan(Layout::Rooms { members: 2 }, 2, 4);
        for t in 0..2 {
            assert!(rooms.topic_events(t, 40).all(|k| rooms.event_topic(k) == t));
        }
    }

    #[test]
    fn subscribe_schedule_deals_topics_then_publishes_one_event_each() {
        let mut p = plan(Layout::Dealt, 10, 4);
        p.rate = 100.0;
        p.subscribe = Some(SubscribeSchedule { rate: 100.0 });
        assert_eq!(p.subscriber_topics(0), vec![0, 4, 8]);
        assert_eq!(p.subscriber_topics(3), vec![3, 7]);
        let all: usize = (0..4).map(|j| p.subscriber_topics(j).len()).sum();
        assert_eq!(all, 10, "every topic is watched exactly once");
        assert_eq!(p.total_events(), 10, "one event per topic");
        assert_eq!(p.event_topic(7), 7);
        assert_eq!(p.subscribe_offset_us(3), 30_000);
        // Topic 9's subscribe is due at 90 ms; the first event at 100 ms.
        assert_eq!(p.event_offset_us(0), 100_000);
        assert_eq!(p.event_offset_us(9), 190_000);
        // Without a subscribe schedule nothing moves.
        p.subscribe = None;
        assert_eq!(p.subscribe_offset_us(3), 0);
        assert_eq!(p.event_offset_us(1), 10_000);
    }

    #[test]
    fn rooms() {
        let p = plan(Layout::Rooms { members: 4 }, 3, 12);
        assert_eq!(p.subscriber_topics(5), vec![1]);
        // Event 5 is sent by member 5, who sits in room 1.
        assert_eq!(p.event_topic(5), 1);
        assert_eq!(p.event_topic(17), 1);
        assert_eq!(p.event_publisher(17, Slot::default()), 5);
    }

    #[test]
    fn random_layout_is_deterministic_and_distinct() {
        let p = plan(
            Layout::Random {
                per_subscriber: 5,
                seed: 42,
            },
            20,
            100,
        );
        for j in 0..100 {
            let t = p.subscriber_topics(j);
            assert_eq!(t.len(), 5);
            let mut d = t.clone();
            d.dedup();
            assert_eq!(d.len(), 5);
            assert_eq!(t, p.subscriber_topics(j));
        }
        let mut hits = vec![0; 20];
        for k in 0..20_000 {
            hits[p.event_topic(k)] += 1;
        }
        assert!(hits.iter().all(|&h| h > 700), "{hits:?}");
        // More topics per subscriber than topics: all of them.
        let small = plan(
            Layout::Random {
                per_subscriber: 9,
                seed: 1,
            },
            3,
            1,
        );
        assert_eq!(small.subscriber_topics(0), vec![0, 1, 2]);
    }
}
