//! Learning-rate schedules with linear warmup, as transformers computes them
//! (`get_constant_schedule_with_warmup`, `get_linear_schedule_with_warmup`,
//! `get_cosine_schedule_with_warmup` with `num_cycles = 0.5`).
//!
//! `step` is the number of optimizer steps already taken, i.e. the 0-based index of the step the
//! rate is for; transformers' `LambdaLR` evaluates its lambda at the same count. So with warmup the
//! first step's rate is 0, exactly as there.
//!
//! ```text
//! warmup (step < W):  lr * step / max(1, W)
//! constant:           lr
//! linear:             lr * max(0, (S - step) / max(1, S - W))
//! cosine:             lr * max(0, 0.5 * (1 + cos(pi * p))),  p = (step - W) / max(1, S - W)
//! ```
//! with W = `warmup_steps` and S = `total_steps`.

use crate::config::{ScheduleKind, TrainConfig};
use serde::{Deserialize, Serialize};

/// A learning-rate schedule: the peak rate, warmup and total length.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LrSchedule {
    /// Shape after warmup.
    pub kind: ScheduleKind,
    /// Peak learning rate.
    pub peak_lr: f64,
    /// Steps of linear warmup from 0.
    pub warmup_steps: u64,
    /// Steps in the whole run (decay reaches 0 there).
    pub total_steps: u64,
}

impl LrSchedule {
    /// The schedule of a `[train]` section for a run of `total_steps` optimizer steps.
    pub fn from_config(train: &TrainConfig, total_steps: u64) -> Self {
        LrSchedule {
            kind: train.schedule,
            peak_lr: train.lr,
            warmup_steps: train.warmup_steps,
            total_steps,
        }
    }

    /// The learning rate of the optimizer step with 0-based index `step`.
    pub fn lr(&self, step: u64) -> f64 {
        self.peak_lr * self.factor(step)
    }

    /// The multiplier of the peak rate at `step` (transformers' `lr_lambda`).
    pub fn factor(&self, step: u64) -> f64 {
        let (s, w, total) = (
            step as f64,
            self.warmup_steps as f64,
            self.total_steps as f64,
        );
        if step < self.warmup_steps {
            return s / w.max(1.0);
        }
        let span = (total - w).max(1.0);
        match self.kind {
            ScheduleKind::Constant => 1.0,
            ScheduleKind::Linear => ((total - s) / span).max(0.0),
            ScheduleKind::Cosine => {
                let progress = (s - w) / span;
                (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(kind: ScheduleKind, warmup: u64, total: u64) -> LrSchedule {
        LrSchedule {
            kind,
            peak_lr: 2e-4,
            warmup_steps: warmup,
            total_steps: total,
        }
    }

    fn close(a: f64, b: f64) {
        assert!((a - b).abs() <= 1e-15 * b.abs().max(1e-12), "{a} vs {b}");
    }

    /// Warmup 10, 100 steps: lr(0) = 0, lr(5) = 0.5 * peak, lr(10) = peak.
    #[test]
    fn warmup_is_linear_from_zero() {
        for kind in [
            ScheduleKind::Constant,
            ScheduleKind::Linear,
            ScheduleKind::Cosine,
        ] {
            let s = sched(kind, 10, 100);
            assert_eq!(s.lr(0), 0.0);
            close(s.lr(5), 1e-4);
            close(s.lr(9), 1.8e-4);
            close(s.lr(10), 2e-4);
        }
    }

    /// Constant: peak after warmup, forever.
    #[test]
    fn constant_holds_the_peak() {
        let s = sched(ScheduleKind::Constant, 0, 100);
        assert_eq!(s.lr(0), 2e-4);
        assert_eq!(s.lr(99), 2e-4);
        assert_eq!(s.lr(500), 2e-4);
    }

    /// Linear, warmup 10, 100 steps: factor (100 - step) / 90.
    /// step 55 -> 45/90 = 0.5; step 91 -> 9/90 = 0.1; step 100 -> 0; past the end -> 0.
    #[test]
    fn linear_decays_to_zero_at_the_end() {
        let s = sched(ScheduleKind::Linear, 10, 100);
        close(s.lr(55), 1e-4);
        close(s.lr(91), 2e-5);
        assert_eq!(s.lr(100), 0.0);
        assert_eq!(s.lr(150), 0.0);
        // No warmup: factor (S - step) / S.
        let s = sched(ScheduleKind::Linear, 0, 4);
        let f: Vec<f64> = (0..5).map(|i| s.factor(i)).collect();
        assert_eq!(f, vec![1.0, 0.75, 0.5, 0.25, 0.0]);
    }

    /// Cosine, warmup 10, 110 steps (decay span 100):
    /// step 10 -> 1; step 60 (p = 0.5) -> 0.5; step 35 (p = 0.25) -> 0.5 * (1 + cos(pi/4))
    /// = 0.8535533905932737; step 85 (p = 0.75) -> 0.14644660940672627; step 110 -> 0.
    #[test]
    fn cosine_follows_the_half_cosine() {
        let s = sched(ScheduleKind::Cosine, 10, 110);
        close(s.factor(10), 1.0);
        close(s.factor(60), 0.5);
        close(s.factor(35), 0.853_553_390_593_273_7);
        close(s.factor(85), 0.146_446_609_406_726_27);
        assert!(s.factor(110).abs() < 1e-16);
        // Past the end transformers' formula rises again along the cosine; the max(0, .)
        // keeps it non-negative: p = 1.5 gives 0.5 * (1 + cos(1.5 pi)) = 0.5.
        close(s.factor(160), 0.5);
    }

    #[test]
    fn zero_warmup_and_degenerate_totals_do_not_divide_by_zero() {
        let s = sched(ScheduleKind::Cosine, 0, 0);
        assert_eq!(s.factor(0), 1.0);
        let s = sched(ScheduleKind::Linear, 5, 5);
        assert_eq!(s.factor(5), 0.0);
        assert!(s.lr(3).is_finite());
    }
}
