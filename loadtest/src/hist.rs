//! HDR histograms in reports: percentiles, and a base64 encoding (HdrHistogram's V2
//! deflate format) so that partial reports from workers or pods merge exactly.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use hdrhistogram::serialization::{Deserializer, Serializer, V2DeflateSerializer};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Significant digits of the run-wide histograms.
pub const SIGFIG: u8 = 3;
/// Significant digits of the per-second histograms (cheaper; they only feed plots).
pub const SIGFIG_TIMELINE: u8 = 2;

/// An empty auto-resizing histogram.
pub fn new_hist(sigfig: u8) -> Histogram<u64> {
    Histogram::new(sigfig).expect("sigfig is 2 or 3")
}

/// Base64 of the V2 deflate encoding.
pub fn encode(h: &Histogram<u64>) -> String {
    let mut buf = Vec::new();
    V2DeflateSerializer::new()
        .serialize(h, &mut buf)
        .expect("serialising to memory cannot fail");
    STANDARD.encode(buf)
}

/// Decodes [`encode`]'s output; an empty string is an empty histogram.
pub fn decode(s: &str) -> anyhow::Result<Histogram<u64>> {
    if s.is_empty() {
        return Ok(new_hist(SIGFIG));
    }
    let bytes = STANDARD
        .decode(s)
        .map_err(|e| anyhow::anyhow!("histogram is not base64: {e}"))?;
    let mut h: Histogram<u64> = Deserializer::new()
        .deserialize(&mut bytes.as_slice())
        .map_err(|e| anyhow::anyhow!("histogram does not decode: {e:?}"))?;
    h.auto(true);
    Ok(h)
}

/// Adds the encoded histogram `b` into the encoded histogram `a`.
pub fn merge_encoded(a: &str, b: &str) -> anyhow::Result<String> {
    if b.is_empty() {
        return Ok(a.to_owned());
    }
    if a.is_empty() {
        return Ok(b.to_owned());
    }
    let mut ha = decode(a)?;
    let hb = decode(b)?;
    ha.add(&hb)
        .map_err(|e| anyhow::anyhow!("histograms do not merge: {e:?}"))?;
    Ok(encode(&ha))
}

/// The usual percentiles of a histogram, in its unit (µs in reports).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    pub count: u64,
    pub mean: f64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
}

impl Percentiles {
    pub fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        Self {
            count: h.len(),
            mean: (h.mean() * 10.0).round() / 10.0,
            p50: h.value_at_quantile(0.50),
            p90: h.value_at_quantile(0.90),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_decode_merge() {
        let mut a = new_hist(SIGFIG);
        let mut b = new_hist(SIGFIG);
        for v in 1..=1000u64 {
            a.record(v).unwrap();
            b.record(v * 1000).unwrap();
        }
        let m = merge_encoded(&encode(&a), &encode(&b)).unwrap();
        let h = decode(&m).unwrap();
        assert_eq!(h.len(), 2000);
        assert!(h.max() >= 999_000 && h.max() <= 1_001_000);
        let p = Percentiles::of(&h);
        assert!((995..=1005).contains(&p.p50), "{p:?}");
        assert_eq!(merge_encoded("", &encode(&a)).unwrap(), encode(&a));
        assert_eq!(decode("").unwrap().len(), 0);
        assert!(decode("not base64!").is_err());
    }
}
