//! Values that are legal but almost certainly not what the user meant: one line each, shown in
//! the run header and recorded in meta.json. Pure.

use crate::config::{Schedule, TrainConfig};

/// What the warnings are judged against: the machine and the run as opened.
pub struct Facts {
    /// CPU cores of this machine.
    pub cores: usize,
    /// Optimiser steps the run takes in all.
    pub total_steps: usize,
    /// Tokens in the training data (documents' text only, no bos/eos).
    pub tokens: u64,
}

pub fn warnings(t: &TrainConfig, f: &Facts) -> Vec<String> {
    let mut out = Vec::new();
    if t.threads > f.cores {
        out.push(format!(
            "train.threads = {} is more than this machine's {} core(s): the threads take turns on the cores, which is often many times slower (0 uses every core)",
            t.threads, f.cores
        ));
    }
    if t.warmup_steps > 0 && t.schedule != Schedule::WarmupCosine {
        out.push(format!(
            "train.warmup_steps = {} has no effect: train.schedule = \"{}\" does not warm up (\"warmup_cosine\" does)",
            t.warmup_steps,
            match t.schedule {
                Schedule::Minimind => "minimind",
                Schedule::Constant => "constant",
                Schedule::WarmupCosine => "warmup_cosine",
            }
        ));
    } else if t.schedule == Schedule::WarmupCosine && t.warmup_steps >= f.total_steps {
        out.push(format!(
            "train.warmup_steps = {} is not below the run's {} step(s): the learning rate never reaches train.learning_rate",
            t.warmup_steps, f.total_steps
        ));
    }
    if f.tokens == 0 {
        out.push("the training data has no tokens: every document's text is empty, so the model learns only to end rows".into());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warnings_table() {
        let t = |schedule, warmup, threads| TrainConfig {
            schedule,
            warmup_steps: warmup,
            threads,
            ..TrainConfig::default()
        };
        let facts = |total_steps, tokens| Facts { cores: 2, total_steps, tokens };
        // (config, facts, the start of each warning expected)
        let table: Vec<(TrainConfig, Facts, Vec<&str>)> = vec![
            (t(Schedule::Minimind, 0, 0), facts(100, 10), vec![]),
            (t(Schedule::Minimind, 0, 2), facts(100, 10), vec![]),
            (
                t(Schedule::Minimind, 0, 1000),
                facts(100, 10),
                vec!["train.threads = 1000 is more than this machine's 2"],
            ),
            (
                t(Schedule::Minimind, 10, 0),
                facts(100, 10),
                vec!["train.warmup_steps = 10 has no effect: train.schedule = \"minimind\""],
            ),
            (t(Schedule::Constant, 10, 0), facts(5, 10), vec!["train.warmup_steps = 10 has no effect"]),
            (t(Schedule::WarmupCosine, 10, 0), facts(100, 10), vec![]),
            (
                t(Schedule::WarmupCosine, 100, 0),
                facts(100, 10),
                vec!["train.warmup_steps = 100 is not below the run's 100"],
            ),
            (t(Schedule::WarmupCosine, 0, 0), facts(100, 0), vec!["the training data has no tokens"]),
        ];
        for (config, facts, want) in table {
            let got = warnings(&config, &facts);
            assert_eq!(got.len(), want.len(), "{got:?}");
            for (g, w) in got.iter().zip(&want) {
                assert!(g.starts_with(w), "{g:?} should start with {w:?}");
            }
        }
    }
}
