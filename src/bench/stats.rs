//! Timing summaries.

/// Median and mean of per-iteration times in milliseconds.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct Timing {
    pub median_ms: f64,
    pub mean_ms: f64,
    pub min_ms: f64,
}

impl Timing {
    pub fn of(ms: &[f64]) -> Timing {
        assert!(!ms.is_empty(), "no timed iterations");
        let mut sorted = ms.to_vec();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let median = if n % 2 == 1 { sorted[n / 2] } else { (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0 };
        Timing { median_ms: median, mean_ms: ms.iter().sum::<f64>() / n as f64, min_ms: sorted[0] }
    }
}

pub fn gib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

#[cfg(test)]
mod tests {
    #[test]
    fn median_of_even_and_odd_counts() {
        assert_eq!(super::Timing::of(&[3.0, 1.0, 2.0]).median_ms, 2.0);
        let t = super::Timing::of(&[4.0, 1.0, 2.0, 3.0]);
        assert_eq!((t.median_ms, t.mean_ms, t.min_ms), (2.5, 2.5, 1.0));
    }
}
