//! Progress for long conversions: a byte-counting bar on a terminal, plain lines otherwise.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;

pub struct Progress {
    bar: ProgressBar,
    plain: bool,
    label: String,
}

impl Progress {
    /// A bar for `label` over `total_bytes` of tensor data.
    pub fn new(label: &str, total_bytes: u64) -> Progress {
        let plain = !std::io::stderr().is_terminal();
        let bar = ProgressBar::with_draw_target(Some(total_bytes), ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template("{prefix:>14} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {wide_msg}")
                .expect("valid template")
                .progress_chars("=> "),
        );
        bar.set_prefix(label.to_string());
        if plain {
            bar.set_draw_target(ProgressDrawTarget::hidden());
            eprintln!("{label}: converting {:.1} MB", total_bytes as f64 / 1e6);
        }
        Progress { bar, plain, label: label.to_string() }
    }

    /// One tensor of `bytes` is done.
    pub fn advance(&self, name: &str, bytes: u64) {
        self.bar.set_message(name.to_string());
        self.bar.inc(bytes);
    }

    pub fn finish(&self, what: &str) {
        self.bar.finish_and_clear();
        if self.plain || !what.is_empty() {
            eprintln!("{}: {what}", self.label);
        }
    }
}
