//! Dynamic loss scaling for float16 training, with PyTorch's `GradScaler` semantics: the loss
//! (so every gradient) is multiplied by `scale`; a step whose gradients hold an inf or a NaN is
//! skipped and the scale halved; after `GROWTH_INTERVAL` clean steps in a row it doubles. Pure
//! state; the engine applies it. The state goes into checkpoints, so a resume is exact.

use serde::{Deserialize, Serialize};

pub const INITIAL_SCALE: f32 = 65536.0;
pub const GROWTH_FACTOR: f32 = 2.0;
pub const BACKOFF_FACTOR: f32 = 0.5;
pub const GROWTH_INTERVAL: u32 = 2000;

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LossScaler {
    pub scale: f32,
    /// Clean steps since the scale last changed.
    pub growth_tracker: u32,
}

impl Default for LossScaler {
    fn default() -> Self {
        LossScaler { scale: INITIAL_SCALE, growth_tracker: 0 }
    }
}

impl LossScaler {
    /// After a step: `found_inf` says whether its gradients were not finite (the step was
    /// skipped). Returns whether the optimiser step is to be applied.
    pub fn update(&mut self, found_inf: bool) -> bool {
        if found_inf {
            self.scale *= BACKOFF_FACTOR;
            self.growth_tracker = 0;
            return false;
        }
        self.growth_tracker += 1;
        if self.growth_tracker == GROWTH_INTERVAL {
            self.scale *= GROWTH_FACTOR;
            self.growth_tracker = 0;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grad_scaler_table() {
        // (steps of `found_inf`, scale after, tracker after, steps applied)
        let table: &[(&[bool], f32, u32, usize)] = &[
            (&[], 65536.0, 0, 0),
            (&[false], 65536.0, 1, 1),
            (&[true], 32768.0, 0, 0),
            (&[false, false, true, false], 32768.0, 1, 3),
            (&[true, true, true], 8192.0, 0, 0),
        ];
        for (steps, scale, tracker, applied) in table {
            let mut s = LossScaler::default();
            let n = steps.iter().filter(|&&inf| s.update(inf)).count();
            assert_eq!((s.scale, s.growth_tracker, n), (*scale, *tracker, *applied), "{steps:?}");
        }
        let mut s = LossScaler::default();
        for _ in 0..GROWTH_INTERVAL - 1 {
            assert!(s.update(false));
        }
        assert_eq!(s.scale, 65536.0);
        s.update(false);
        assert_eq!((s.scale, s.growth_tracker), (131072.0, 0), "doubles after 2000 clean steps");
    }
}
