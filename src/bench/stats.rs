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

/// A speed switch timed off and on in alternation within one run (`--compare`).
#[derive(Clone, Debug, serde::Serialize)]
pub struct Comparison {
    /// The switch's environment variable.
    pub switch: &'static str,
    pub off: Timing,
    pub on: Timing,
    /// Median on / median off, and minimum on / minimum off: below 1 the switch is faster.
    pub ratio_of_medians: f64,
    pub ratio_of_minimums: f64,
}

impl Comparison {
    pub fn of(switch: &'static str, off: &[f64], on: &[f64]) -> Comparison {
        let (off, on) = (Timing::of(off), Timing::of(on));
        Comparison { switch, off, on, ratio_of_medians: on.median_ms / off.median_ms, ratio_of_minimums: on.min_ms / off.min_ms }
    }

    pub fn summary(&self) -> String {
        format!(
            "{}: off {:.1} ms median ({:.1} min), on {:.1} ms median ({:.1} min): on/off {:.3} of medians, {:.3} of minimums",
            self.switch, self.off.median_ms, self.off.min_ms, self.on.median_ms, self.on.min_ms, self.ratio_of_medians, self.ratio_of_minimums
        )
    }
}

/// The state iteration `i` of a comparison runs in, set before it runs: pairs in ABBA order
/// (off on, on off, ...), so neither state always goes first. `None` without a comparison.
pub fn alternate(compare: Option<crate::switches::Switch>, i: usize, dev: &candle_core::Device) -> anyhow::Result<Option<bool>> {
    let Some(switch) = compare else { return Ok(None) };
    let on = on_in_turn(i);
    switch.force(on);
    crate::device::apply_switches(dev)?;
    Ok(Some(on))
}

/// ABBA: off on, on off, off on, ...
fn on_in_turn(i: usize) -> bool {
    (i / 2 % 2 == 0) == (i % 2 == 1)
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

    #[test]
    fn comparisons_alternate_in_abba_order() {
        let order: Vec<bool> = (0..8).map(super::on_in_turn).collect();
        assert_eq!(order, [false, true, true, false, false, true, true, false]);
        assert_eq!(super::alternate(None, 3, &candle_core::Device::Cpu).unwrap(), None);
        let c = super::Comparison::of("X", &[10.0, 12.0], &[5.0, 6.0]);
        assert_eq!((c.ratio_of_medians, c.ratio_of_minimums), (0.5, 0.5));
    }
}
