//! Learning-rate schedules: pure functions of the optimiser step.

use crate::config::{Schedule, TrainConfig};

/// Learning rate at optimiser step `step` (0-based) of `total`.
pub fn lr_at(t: &TrainConfig, step: usize, total: usize) -> f64 {
    let peak = t.learning_rate;
    let total = total.max(1) as f64;
    let s = step as f64;
    match t.schedule {
        Schedule::Constant => peak,
        // MiniMind: lr * (0.1 + 0.45 * (1 + cos(pi * t / T))): from lr down to 0.1 lr.
        Schedule::Minimind => peak * (0.1 + 0.45 * (1.0 + (std::f64::consts::PI * s / total).cos())),
        Schedule::WarmupCosine => {
            let w = t.warmup_steps as f64;
            if s < w {
                return peak * (s + 1.0) / w;
            }
            let span = (total - w).max(1.0);
            let progress = ((s - w) / span).min(1.0);
            let floor = t.min_lr_ratio * peak;
            floor + (peak - floor) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(schedule: Schedule, warmup: usize) -> TrainConfig {
        TrainConfig {
            schedule,
            warmup_steps: warmup,
            learning_rate: 1.0,
            min_lr_ratio: 0.1,
            ..TrainConfig::default()
        }
    }

    #[test]
    fn schedule_table() {
        let table: &[(Schedule, usize, usize, usize, f64)] = &[
            (Schedule::Constant, 0, 5, 10, 1.0),
            (Schedule::Minimind, 0, 0, 10, 1.0),
            (Schedule::Minimind, 0, 5, 10, 0.55),
            (Schedule::Minimind, 0, 10, 10, 0.1),
            (Schedule::WarmupCosine, 4, 0, 14, 0.25),
            (Schedule::WarmupCosine, 4, 3, 14, 1.0),
            (Schedule::WarmupCosine, 4, 4, 14, 1.0),
            (Schedule::WarmupCosine, 4, 9, 14, 0.55),
            (Schedule::WarmupCosine, 4, 14, 14, 0.1),
        ];
        for &(s, w, step, total, want) in table {
            let got = lr_at(&cfg(s, w), step, total);
            assert!((got - want).abs() < 1e-12, "{s:?} w={w} step={step}: {got} vs {want}");
        }
    }
}
