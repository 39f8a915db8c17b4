//! Price sources: what a node asks "its upstream" for. `NodeLatestPricesApi` in the
//! seed's words.
//!
//! [`Simulator`] is a pure function of (pair, time), computed in integers, so every
//! node asking about the same pair at the same moment sees the same price and a
//! failover does not make the price jump. [`CsvTicks`] replays a tick file, anchored to
//! the Unix epoch so that all nodes replaying the same file agree too.

use std::collections::BTreeMap;
use std::path::Path;

/// One observation from upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quote {
    /// Price mantissa.
    pub mantissa: i64,
    /// Decimal places.
    pub scale: u32,
    /// Upstream timestamp, Unix ms.
    pub upstream_time_ms: i64,
}

/// A source of prices.
pub trait PriceSource: Send + Sync {
    /// The newest quote for `pair` at time `now_ms`, if the source has the pair.
    fn latest(&self, pair: &str, now_ms: i64) -> Option<Quote>;
}

fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3))
}

/// A deterministic upstream: prices tick every `step_ms`; each pair follows two
/// triangle waves plus a hashed jitter around a base price, all in integers.
#[derive(Clone, Copy, Debug)]
pub struct Simulator {
    /// Tick interval of the simulated upstream.
    pub step_ms: i64,
}

impl Default for Simulator {
    fn default() -> Self {
        Simulator { step_ms: 100 }
    }
}

fn base(pair: &str) -> i64 {
    // Scale 5: 108000 is 1.08000.
    match pair {
        "EURUSD" => 108_000,
        "GBPUSD" => 127_000,
        "USDJPY" => 15_000_000,
        "AUDUSD" => 66_000,
        "USDCHF" => 88_000,
        "USDCAD" => 136_000,
        "NZDUSD" => 61_000,
        "EURGBP" => 85_000,
        _ => 50_000 + (fnv(pair) % 150_000) as i64,
    }
}

fn triangle(t: i64, period: i64, amplitude: i64) -> i64 {
    let phase = t.rem_euclid(period);
    let half = period / 2;
    let up = if phase < half { phase } else { period - phase };
    amplitude * (2 * up - half) / half.max(1)
}

impl PriceSource for Simulator {
    fn latest(&self, pair: &str, now_ms: i64) -> Option<Quote> {
        let t = now_ms - now_ms.rem_euclid(self.step_ms);
        let b = base(pair);
        let h = fnv(pair);
        let wave =
            triangle(t + (h % 60_000) as i64, 60_000, b / 500) + triangle(t + (h % 7_000) as i64, 7_000, b / 2_000);
        let step = t / self.step_ms;
        let jitter = ((h ^ (step as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)).rotate_left(17) % 7) as i64 - 3;
        Some(Quote { mantissa: b + wave + jitter, scale: 5, upstream_time_ms: t })
    }
}

/// Ticks replayed from a CSV file of `pair,offset_ms,price` lines (price a decimal
/// string). The file's span repeats forever, anchored to the Unix epoch.
#[derive(Clone, Debug)]
pub struct CsvTicks {
    ticks: BTreeMap<String, Vec<(i64, i64, u32)>>,
    span_ms: i64,
}

/// A CSV tick file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CsvError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// A line is not `pair,offset_ms,price`.
    #[error("line {line}: {reason}")]
    Line {
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// No ticks at all.
    #[error("the file holds no ticks")]
    Empty,
}

/// Parses an exact decimal like `1.08452` into mantissa and scale.
pub fn parse_decimal(s: &str) -> Option<(i64, u32)> {
    let s = s.trim();
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    if frac.len() > 18 || int.is_empty() && frac.is_empty() {
        return None;
    }
    let digits = format!("{int}{frac}");
    let mantissa: i64 = digits.parse().ok()?;
    Some((mantissa, frac.len() as u32))
}

impl CsvTicks {
    /// Loads a tick file.
    pub fn load(path: &Path) -> Result<CsvTicks, CsvError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| CsvError::Read { path: path.display().to_string(), source })?;
        CsvTicks::parse(&text)
    }

    /// Parses tick lines; `#` starts a comment, a header line `pair,...` is skipped.
    pub fn parse(text: &str) -> Result<CsvTicks, CsvError> {
        let mut ticks: BTreeMap<String, Vec<(i64, i64, u32)>> = BTreeMap::new();
        let mut span = 0;
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') || line.starts_with("pair,") {
                continue;
            }
            let err = |reason: &str| CsvError::Line { line: i + 1, reason: reason.into() };
            let mut parts = line.split(',');
            let (Some(pair), Some(t), Some(price), None) = (parts.next(), parts.next(), parts.next(), parts.next())
            else {
                return Err(err("expected pair,offset_ms,price"));
            };
            let t: i64 = t.trim().parse().map_err(|_| err("offset_ms is not an integer"))?;
            if t < 0 {
                return Err(err("offset_ms is negative"));
            }
            let (m, scale) = parse_decimal(price).ok_or_else(|| err("price is not a decimal"))?;
            ticks.entry(pair.trim().to_owned()).or_default().push((t, m, scale));
            span = span.max(t + 1);
        }
        if ticks.is_empty() {
            return Err(CsvError::Empty);
        }
        for v in ticks.values_mut() {
            v.sort_by_key(|x| x.0);
        }
        Ok(CsvTicks { ticks, span_ms: span })
    }
}

impl PriceSource for CsvTicks {
    fn latest(&self, pair: &str, now_ms: i64) -> Option<Quote> {
        let ticks = self.ticks.get(pair)?;
        let cycle_start = now_ms - now_ms.rem_euclid(self.span_ms);
        let offset = now_ms - cycle_start;
        let i = ticks.partition_point(|t| t.0 <= offset);
        // Before the pair's first tick in this cycle, the last tick of the previous one holds.
        let (t, m, scale, start) = match i {
            0 => {
                let last = ticks[ticks.len() - 1];
                (last.0, last.1, last.2, cycle_start - self.span_ms)
            }
            _ => {
                let x = ticks[i - 1];
                (x.0, x.1, x.2, cycle_start)
            }
        };
        Some(Quote { mantissa: m, scale, upstream_time_ms: start + t })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simulator_is_a_function_of_pair_and_time() {
        let a = Simulator::default();
        let b = Simulator::default();
        for t in (1_700_000_000_000..1_700_000_100_000).step_by(37) {
            assert_eq!(a.latest("EURUSD", t), b.latest("EURUSD", t));
            let q = a.latest("EURUSD", t).unwrap();
            assert_eq!(q.upstream_time_ms % 100, 0);
            assert!((q.mantissa - 108_000).abs() < 1_000, "{q:?}");
        }
        assert_ne!(a.latest("EURUSD", 1_700_000_000_000), a.latest("EURUSD", 1_700_000_030_000));
    }

    #[test]
    fn csv_ticks_replay_anchored_to_the_epoch() {
        let csv =
            CsvTicks::parse("pair,offset_ms,price\nEURUSD,0,1.08000\nEURUSD,500,1.08010\nGBPUSD,250,1.27\n").unwrap();
        // The file spans 501 ms; cycles are anchored at multiples of 501 since the epoch.
        let k = 501 * 3_000_000_000;
        let q = csv.latest("EURUSD", k + 500).unwrap();
        assert_eq!((q.mantissa, q.scale, q.upstream_time_ms), (108_010, 5, k + 500));
        let q = csv.latest("EURUSD", k + 10).unwrap();
        assert_eq!((q.mantissa, q.upstream_time_ms), (108_000, k));
        // Before GBPUSD's first tick in a cycle, the previous cycle's last tick holds.
        let q = csv.latest("GBPUSD", k + 10).unwrap();
        assert_eq!((q.mantissa, q.scale, q.upstream_time_ms), (127, 2, k - 501 + 250));
        assert_eq!(csv.latest("XXX", 5), None);
        assert!(matches!(CsvTicks::parse("EURUSD,x,1"), Err(CsvError::Line { line: 1, .. })));
        assert!(matches!(CsvTicks::parse(""), Err(CsvError::Empty)));
    }

    #[test]
    fn decimals_are_exact() {
        assert_eq!(parse_decimal("1.08452"), Some((108_452, 5)));
        assert_eq!(parse_decimal("150"), Some((150, 0)));
        assert_eq!(parse_decimal("abc"), None);
    }
}
