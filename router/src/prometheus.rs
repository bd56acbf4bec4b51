//! What the `/metrics` pages of `weft-node` and `weft-router` share (DESIGN §7): the
//! table each binary keeps of the families it exports ([`Family`]), their `# HELP` and
//! `# TYPE` registration with the `metrics` recorder ([`describe`]), and the
//! `process_*` families ([`ProcessSample`], [`PROCESS_FAMILIES`]), read from
//! `/proc/self` at scrape time and rendered here rather than through the recorder,
//! whose counters are integers: CPU seconds need their fraction.
//!
//! Every family a page carries is described once, so the page passes
//! `promtool check metrics`; each binary has a test that holds it to that.

/// The Prometheus type of a family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    /// The word `# TYPE` uses.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// A family a binary exports: name, type, help.
pub type Family = (&'static str, Kind, &'static str);

/// The `process_*` families, the same in every Weft binary.
pub const PROCESS_FAMILIES: &[Family] = &[
    (
        "process_cpu_seconds_total",
        Kind::Counter,
        "User and system CPU time spent by the process, seconds.",
    ),
    (
        "process_resident_memory_bytes",
        Kind::Gauge,
        "Resident set size of the process, bytes.",
    ),
    (
        "process_virtual_memory_bytes",
        Kind::Gauge,
        "Virtual memory size of the process, bytes.",
    ),
    (
        "process_open_fds",
        Kind::Gauge,
        "Open file descriptors of the process.",
    ),
    (
        "process_max_fds",
        Kind::Gauge,
        "The process's limit on open file descriptors.",
    ),
    ("process_threads", Kind::Gauge, "Threads of the process."),
    (
        "process_start_time_seconds",
        Kind::Gauge,
        "Start time of the process since the Unix epoch, seconds.",
    ),
];

/// Builds `builder`'s recorder and installs it as the process-wide one, describes
/// `families` and sets `build_info` to 1, labelled with the version and the commit (set
/// by the container build, `--build-arg GIT_COMMIT=…`; "unknown" otherwise). Another
/// recorder may already be installed (an embedding application); then the series go
/// there and the returned handle renders only what it recorded itself.
pub fn install(
    builder: metrics_exporter_prometheus::PrometheusBuilder,
    families: &[Family],
    build_info: &'static str,
) -> metrics_exporter_prometheus::PrometheusHandle {
    let recorder = builder.build_recorder();
    let handle = recorder.handle();
    let _ = metrics::set_global_recorder(recorder);
    describe(families);
    metrics::gauge!(
        build_info,
        "version" => env!("CARGO_PKG_VERSION"),
        "commit" => option_env!("WEFT_GIT_COMMIT").unwrap_or("unknown"),
    )
    .set(1.0);
    handle
}

/// Registers `# HELP` / `# TYPE` for every family in `families` with the installed
/// recorder.
pub fn describe(families: &[Family]) {
    for &(name, kind, help) in families {
        match kind {
            Kind::Counter => metrics::describe_counter!(name, help),
            Kind::Gauge => metrics::describe_gauge!(name, help),
            Kind::Histogram => metrics::describe_histogram!(name, help),
        }
    }
}

/// `recorded` (a recorder's rendering) followed by the `process_*` families.
pub fn with_process(mut recorded: String) -> String {
    if let Some(p) = ProcessSample::read() {
        p.render_into(&mut recorded);
    }
    recorded
}

/// Checks a family table: no name twice, every help non-empty, counters and only
/// counters end in `_total`. For each binary's unit tests.
pub fn check_families(families: &[Family]) -> Result<(), String> {
    let mut names: Vec<_> = families.iter().map(|f| f.0).collect();
    names.sort_unstable();
    if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
        return Err(format!("{} is listed twice", w[0]));
    }
    for (name, kind, help) in families {
        if help.is_empty() {
            return Err(format!("{name} has no help"));
        }
        if (*kind == Kind::Counter) != name.ends_with("_total") {
            return Err(format!("{name}: counters and only counters end in _total"));
        }
    }
    Ok(())
}

/// One reading of the process's own figures (Linux `/proc`; `None` elsewhere).
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessSample {
    pub cpu_seconds: f64,
    pub rss_bytes: u64,
    pub vsize_bytes: u64,
    pub open_fds: u64,
    pub max_fds: Option<u64>,
    pub threads: u64,
    pub start_time_seconds: f64,
}

impl ProcessSample {
    pub fn read() -> Option<Self> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        let boot = std::fs::read_to_string("/proc/stat").ok()?;
        let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
        let open_fds = std::fs::read_dir("/proc/self/fd").ok()?.count() as u64;
        // SAFETY: sysconf only reads a system constant.
        let (tick, page) = unsafe {
            (
                libc::sysconf(libc::_SC_CLK_TCK),
                libc::sysconf(libc::_SC_PAGESIZE),
            )
        };
        if tick <= 0 || page <= 0 {
            return None;
        }
        Self::parse(&stat, &boot, &limits, open_fds, tick as u64, page as u64)
    }

    /// Builds a sample from the text of `/proc/self/stat`, `/proc/stat` and
    /// `/proc/self/limits` (pure, so it is unit tested on fixed text).
    pub fn parse(
        stat: &str,
        proc_stat: &str,
        limits: &str,
        open_fds: u64,
        ticks_per_s: u64,
        page_bytes: u64,
    ) -> Option<Self> {
        // The command name (field 2) is in parentheses and may hold spaces: the
        // numbered fields start after the last ')'. Field 3 is index 0 here.
        let rest = &stat[stat.rfind(')')? + 1..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        let field = |n: usize| -> Option<u64> { f.get(n - 3)?.parse().ok() };
        let (utime, stime) = (field(14)?, field(15)?);
        let threads = field(20)?;
        let start_ticks = field(22)?;
        let vsize = field(23)?;
        let rss_pages = field(24)?;
        let btime: u64 = proc_stat
            .lines()
            .find_map(|l| l.strip_prefix("btime "))?
            .trim()
            .parse()
            .ok()?;
        let max_fds = limits
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .and_then(|l| l.split_whitespace().nth(3))
            .and_then(|soft| soft.parse().ok());
        let tps = ticks_per_s as f64;
        Some(Self {
            cpu_seconds: (utime + stime) as f64 / tps,
            rss_bytes: rss_pages * page_bytes,
            vsize_bytes: vsize,
            open_fds,
            max_fds,
            threads,
            start_time_seconds: btime as f64 + start_ticks as f64 / tps,
        })
    }

    /// Appends the `process_*` families, each with its HELP and TYPE.
    pub fn render_into(&self, out: &mut String) {
        use std::fmt::Write;
        let mut family = |name: &str, value: String| {
            let (_, kind, help) = PROCESS_FAMILIES
                .iter()
                .find(|(n, _, _)| *n == name)
                .expect("process families are listed in PROCESS_FAMILIES");
            let kind = kind.name();
            let _ = write!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n\n"
            );
        };
        family("process_cpu_seconds_total", format!("{}", self.cpu_seconds));
        family("process_resident_memory_bytes", self.rss_bytes.to_string());
        family("process_virtual_memory_bytes", self.vsize_bytes.to_string());
        family("process_open_fds", self.open_fds.to_string());
        if let Some(max) = self.max_fds {
            family("process_max_fds", max.to_string());
        }
        family("process_threads", self.threads.to_string());
        family(
            "process_start_time_seconds",
            format!("{}", self.start_time_seconds),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_text() {
        // A command name with a space and a parenthesis, as the kernel writes it.
        let stat = "4242 (weft (node) x) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 7 0 1000 123456789 2048 18446744073709551615";
        let proc_stat = "cpu  1 2 3\nbtime 1700000000\nprocesses 9\n";
        let limits = "Limit                     Soft Limit           Hard Limit           Units\nMax open files            1048576              1048576              files\n";
        let p = ProcessSample::parse(stat, proc_stat, limits, 12, 100, 4096).unwrap();
        assert_eq!(p.cpu_seconds, 3.0);
        assert_eq!(p.threads, 7);
        assert_eq!(p.start_time_seconds, 1_700_000_010.0);
        assert_eq!(p.vsize_bytes, 123_456_789);
        assert_eq!(p.rss_bytes, 2048 * 4096);
        assert_eq!(p.max_fds, Some(1_048_576));
        assert_eq!(p.open_fds, 12);
        assert!(ProcessSample::parse("garbage", proc_stat, limits, 1, 100, 4096).is_none());
    }

    #[test]
    fn reads_this_process() {
        let p = ProcessSample::read().expect("/proc is readable on Linux");
        assert!(p.rss_bytes > 0 && p.open_fds > 0 && p.threads > 0);
        let mut page = String::new();
        p.render_into(&mut page);
        assert!(page.contains("# TYPE process_cpu_seconds_total counter\n"));
        assert!(page.contains("\nprocess_resident_memory_bytes "));
    }

    #[test]
    fn process_families_are_well_formed() {
        check_families(PROCESS_FAMILIES).unwrap();
        assert!(check_families(&[("a_total", Kind::Gauge, "x")]).is_err());
        assert!(check_families(&[("a", Kind::Gauge, "x"), ("a", Kind::Gauge, "y")]).is_err());
    }
}
