//! Reading a Prometheus page. Every node labels its series `node="<id>"`, every router
//! `router="<id>"`; a test asks for one series of one member, summed over its other
//! labels.

/// Sums the samples of `name` carrying `node="<node>"` in a Prometheus text page, or
/// `None` when there is no such series.
pub fn parse_metric(text: &str, name: &str, node: &str) -> Option<f64> {
    parse_labelled(text, name, "node", node)
}

/// Sums the samples of `name` carrying the label `key="<value>"`, or `None` when there
/// is no such series.
pub fn parse_labelled(text: &str, name: &str, key: &str, value: &str) -> Option<f64> {
    let label = format!("{key}=\"{value}\"");
    let mut sum = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let (series, rest) = match line.find('{') {
            Some(open) => {
                let Some(close) = line[open..].find('}') else {
                    continue;
                };
                (&line[..open + close + 1], &line[open + close + 1..])
            }
            None => match line.split_once(' ') {
                Some((s, r)) => (s, r),
                None => continue,
            },
        };
        let metric = series.split('{').next().unwrap_or("");
        if metric != name || !series.contains(&label) {
            continue;
        }
        if let Some(v) = rest
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
        {
            *sum.get_or_insert(0.0) += v;
        }
    }
    sum
}
