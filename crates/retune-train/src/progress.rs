//! Training progress on stderr: an indicatif bar (step/total, loss, learning rate, tokens/s,
//! ETA) on a terminal; off a terminal a plain line every N steps instead; nothing when quiet.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// Plain lines are printed every this many steps off a terminal, by default.
pub const DEFAULT_PLAIN_EVERY: u64 = 10;

enum Mode {
    Bar(ProgressBar),
    Plain {
        every: u64,
        sink: Box<dyn Write + Send>,
    },
    Quiet,
}

/// Progress of a run of `total` optimizer steps.
pub struct Progress {
    mode: Mode,
    total: u64,
    /// Step the run (re)started from; the rate and ETA count from here.
    start_step: u64,
    started: Instant,
}

impl Progress {
    /// A bar on stderr when it is a terminal; otherwise plain lines every
    /// [`DEFAULT_PLAIN_EVERY`] steps; nothing when `quiet`. `start_step` is the step a resumed run
    /// starts from (0 for a new run).
    pub fn new(total: u64, start_step: u64, quiet: bool) -> Self {
        if quiet {
            return Self::with_mode(Mode::Quiet, total, start_step);
        }
        if std::io::stderr().is_terminal() {
            let style = ProgressStyle::with_template(
                "{bar:30.cyan/blue} {pos}/{len} {msg} [{elapsed_precise}]",
            )
            .map(|s| s.progress_chars("=> "))
            .unwrap_or_else(|_| ProgressStyle::default_bar());
            let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr())
                .with_style(style)
                .with_position(start_step);
            return Self::with_mode(Mode::Bar(bar), total, start_step);
        }
        Self::plain(
            total,
            start_step,
            DEFAULT_PLAIN_EVERY,
            Box::new(std::io::stderr()),
        )
    }

    /// Plain lines to `sink` every `every` steps (and at the last step).
    pub fn plain(total: u64, start_step: u64, every: u64, sink: Box<dyn Write + Send>) -> Self {
        let every = every.max(1);
        Self::with_mode(Mode::Plain { every, sink }, total, start_step)
    }

    fn with_mode(mode: Mode, total: u64, start_step: u64) -> Self {
        Progress {
            mode,
            total,
            start_step,
            started: Instant::now(),
        }
    }

    /// Estimated time left after `step`, from the rate since the (re)start.
    pub fn eta(&self, step: u64) -> Option<Duration> {
        let done = step.checked_sub(self.start_step).filter(|&d| d > 0)?;
        let per_step = self.started.elapsed().as_secs_f64() / done as f64;
        Some(Duration::from_secs_f64(
            per_step * self.total.saturating_sub(step) as f64,
        ))
    }

    /// Reports optimizer step `step` (from 1) with its loss, learning rate and throughput.
    pub fn update(&mut self, step: u64, loss: f64, lr: f64, tokens_per_s: f64) {
        let eta = self.eta(step);
        let msg = status(loss, lr, tokens_per_s, eta);
        let total = self.total;
        match &mut self.mode {
            Mode::Bar(bar) => {
                bar.set_position(step);
                bar.set_message(msg);
            }
            Mode::Plain { every, sink } => {
                if step.is_multiple_of(*every) || step == total {
                    let pct = (step * 100).checked_div(total).unwrap_or(100);
                    // Progress is best effort: a closed stderr must not stop training.
                    let _ = writeln!(sink, "step {step}/{total} ({pct}%)  {msg}");
                }
            }
            Mode::Quiet => {}
        }
    }

    /// Prints a line (above the bar on a terminal), unless quiet.
    pub fn println(&mut self, text: &str) {
        match &mut self.mode {
            Mode::Bar(bar) => bar.println(text),
            Mode::Plain { sink, .. } => {
                let _ = writeln!(sink, "{text}");
            }
            Mode::Quiet => {}
        }
    }

    /// Removes the bar (plain and quiet modes have nothing to finish).
    pub fn finish(&mut self) {
        if let Mode::Bar(bar) = &self.mode {
            bar.finish_and_clear();
        }
    }
}

/// `loss 2.3412  lr 2.00e-4  1234 tok/s  eta 5m12s`.
fn status(loss: f64, lr: f64, tokens_per_s: f64, eta: Option<Duration>) -> String {
    let eta = eta.map_or_else(|| "?".to_string(), format_duration);
    format!("loss {loss:.4}  lr {lr:.2e}  {tokens_per_s:.0} tok/s  eta {eta}")
}

/// `1h02m03s`, `5m12s`, `12s`.
pub fn format_duration(d: Duration) -> String {
    let s = d.as_secs_f64().round() as u64;
    let (h, m, s) = (s / 3600, s % 3600 / 60, s % 60);
    if h > 0 {
        format!("{h}h{m:02}m{s:02}s")
    } else if m > 0 {
        format!("{m}m{s:02}s")
    } else {
        format!("{s}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn plain_lines_every_n_steps_and_at_the_end() {
        let out = Shared::default();
        let mut p = Progress::plain(25, 0, 10, Box::new(out.clone()));
        for step in 1..=25 {
            p.update(step, 2.345_67, 2e-4, 1234.4);
        }
        p.println("saved checkpoint");
        p.finish();
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert!(lines[0].starts_with("step 10/25 (40%)  loss 2.3457  lr 2.00e-4  1234 tok/s  eta "));
        assert!(lines[1].starts_with("step 20/25 (80%)"));
        assert!(lines[2].starts_with("step 25/25 (100%)") && lines[2].ends_with("eta 0s"));
        assert_eq!(lines[3], "saved checkpoint");
    }

    #[test]
    fn quiet_prints_nothing_and_eta_counts_from_the_restart() {
        let mut p = Progress::new(100, 40, true);
        p.update(41, 1.0, 1e-4, 10.0);
        p.println("hidden");
        assert_eq!(p.eta(40), None, "no step done since the restart");
        assert!(p.eta(41).is_some());
    }

    #[test]
    fn durations_are_compact() {
        assert_eq!(format_duration(Duration::from_secs(12)), "12s");
        assert_eq!(format_duration(Duration::from_secs(312)), "5m12s");
        assert_eq!(format_duration(Duration::from_secs(3723)), "1h02m03s");
    }
}
