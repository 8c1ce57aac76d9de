//! Mixture-of-experts routing, the CPU backend's: softmax router, top-k, weight
//! normalisation, counting-sort dispatch and the load-balancing aux loss, with their backward.
//! Pure functions over small arrays (`N x E` scores); the expert GEMMs run in `model.rs`.
//!
//! Shapes: N tokens (B sequences of T), E routed experts, K experts per token.

#![allow(clippy::needless_range_loop)] // index loops read like the maths

pub use super::kernels::RouterConfig;

/// Routing of one micro-batch through one MoE layer. Buffers keep their capacity between
/// steps (no allocation once warm).
#[derive(Default, Debug, Clone)]
pub struct Routing {
    /// Softmax router scores `[N, E]`.
    pub scores: Vec<f32>,
    /// Chosen expert per slot `[N, K]`, highest score first.
    pub expert: Vec<u32>,
    /// Combination weight per slot `[N, K]`.
    pub weight: Vec<f32>,
    /// Position of each slot in the expert-sorted order `[N, K]`.
    pub pos: Vec<u32>,
    /// Token of each position in expert-sorted order `[N*K]`.
    pub rows: Vec<u32>,
    /// Start of each expert's block in sorted order `[E + 1]`.
    pub offsets: Vec<usize>,
    /// Experts per token, K.
    pub k: usize,
    /// d(aux)/d(scores) for the whole micro-batch, before the loss scale: `[B, E]` with
    /// `seq_aux` (one per sequence), `[1, E]` without.
    pub aux_grad: Vec<f32>,
    pub aux_loss: f32,
    /// Scratch reused between steps.
    counts: Vec<f32>,
    fill: Vec<usize>,
    ds: Vec<f32>,
}

impl Routing {
    /// Routes `n = b*t` tokens from router logits `[N, E]`.
    pub fn route(&mut self, logits: &[f32], b: usize, t: usize, rc: RouterConfig) {
        let (e, k) = (rc.experts, rc.top_k);
        let n = b * t;
        self.k = k;
        self.scores.clear();
        self.scores.extend_from_slice(&logits[..n * e]);
        self.expert.resize(n * k, 0);
        self.weight.resize(n * k, 0.0);
        for tok in 0..n {
            let s = &mut self.scores[tok * e..(tok + 1) * e];
            let max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0.0f32;
            for v in s.iter_mut() {
                *v = (*v - max).exp();
                sum += *v;
            }
            s.iter_mut().for_each(|v| *v /= sum);
            // Top-k by selection: highest score first, ties to the lower index.
            let chosen = &mut self.expert[tok * k..(tok + 1) * k];
            for j in 0..k {
                let mut best = usize::MAX;
                for (x, &v) in s.iter().enumerate() {
                    if chosen[..j].contains(&(x as u32)) {
                        continue;
                    }
                    if best == usize::MAX || v > s[best] {
                        best = x;
                    }
                }
                chosen[j] = best as u32;
            }
            let w = &mut self.weight[tok * k..(tok + 1) * k];
            for j in 0..k {
                w[j] = s[chosen[j] as usize];
            }
            if k > 1 && rc.norm_topk_prob {
                let denom = w.iter().sum::<f32>() + 1e-20;
                w.iter_mut().for_each(|v| *v /= denom);
            }
        }
        self.dispatch(n, e, k);
        self.aux(b, t, rc);
    }

    /// Counting sort of the N*K slots by expert, stable in (token, slot) order.
    fn dispatch(&mut self, n: usize, e: usize, k: usize) {
        self.offsets.clear();
        self.offsets.resize(e + 1, 0);
        for &x in &self.expert {
            self.offsets[x as usize + 1] += 1;
        }
        for x in 0..e {
            self.offsets[x + 1] += self.offsets[x];
        }
        self.pos.resize(n * k, 0);
        self.rows.resize(n * k, 0);
        self.fill.clear();
        self.fill.extend_from_slice(&self.offsets[..e]);
        for slot in 0..n * k {
            let x = self.expert[slot] as usize;
            self.pos[slot] = self.fill[x] as u32;
            self.rows[self.fill[x]] = (slot / k) as u32;
            self.fill[x] += 1;
        }
    }

    /// The aux loss (over all tokens, pad included, as MiniMind) and its gradient wrt the
    /// scores, which is constant per (sequence, expert).
    fn aux(&mut self, b: usize, t: usize, rc: RouterConfig) {
        let (e, k) = (rc.experts, rc.top_k);
        self.aux_grad.clear();
        self.aux_loss = 0.0;
        if rc.alpha <= 0.0 {
            return;
        }
        if rc.seq_aux {
            // c[b, e] = count(e chosen in sequence b) * E / (T*K); aux = alpha * mean_b
            // sum_e c[b, e] * mean_t s[b, t, e]; d aux / d s[b, t, e] = alpha * c[b, e] / (B*T).
            self.aux_grad.resize(b * e, 0.0);
            let mut total = 0.0f64;
            for bi in 0..b {
                self.counts.clear();
                self.counts.resize(e, 0.0);
                for slot in bi * t * k..(bi + 1) * t * k {
                    self.counts[self.expert[slot] as usize] += 1.0;
                }
                for x in 0..e {
                    let c = self.counts[x] * e as f32 / (t * k) as f32;
                    let mean_s: f64 =
                        (0..t).map(|ti| self.scores[(bi * t + ti) * e + x] as f64).sum::<f64>() / t as f64;
                    total += c as f64 * mean_s;
                    self.aux_grad[bi * e + x] = rc.alpha * c / (b * t) as f32;
                }
            }
            self.aux_loss = (total / b as f64) as f32 * rc.alpha;
        } else {
            // f_e = count(e) / (N*K) * E; P_e = mean_n s[n, e]; aux = alpha * sum_e f_e P_e.
            let n = b * t;
            self.aux_grad.resize(e, 0.0);
            self.counts.clear();
            self.counts.resize(e, 0.0);
            for &x in &self.expert {
                self.counts[x as usize] += 1.0;
            }
            let mut total = 0.0f64;
            for x in 0..e {
                let f = self.counts[x] / (n * k) as f32 * e as f32;
                let p: f64 = (0..n).map(|tok| self.scores[tok * e + x] as f64).sum::<f64>() / n as f64;
                total += f as f64 * p;
                self.aux_grad[x] = rc.alpha * f / n as f32;
            }
            self.aux_loss = total as f32 * rc.alpha;
        }
    }

    /// Router-logit gradients `[N, E]` from the slot-weight gradients `dw` `[N, K]`, plus the
    /// aux loss term scaled by `aux_scale`.
    pub fn backward(
        &mut self,
        dw: &[f32],
        dlogits: &mut [f32],
        b: usize,
        t: usize,
        rc: RouterConfig,
        aux_scale: f32,
    ) {
        let (e, k) = (rc.experts, rc.top_k);
        let mut ds = std::mem::take(&mut self.ds);
        ds.resize(e, 0.0);
        for tok in 0..b * t {
            ds.fill(0.0);
            let s = &self.scores[tok * e..(tok + 1) * e];
            let chosen = &self.expert[tok * k..(tok + 1) * k];
            let dwt = &dw[tok * k..(tok + 1) * k];
            if k > 1 && rc.norm_topk_prob {
                // w_j = s_j / S: ds_j = (dw_j - sum_i dw_i w_i) / S.
                let sum: f32 = chosen.iter().map(|&x| s[x as usize]).sum::<f32>() + 1e-20;
                let w = &self.weight[tok * k..(tok + 1) * k];
                let dot: f32 = dwt.iter().zip(w).map(|(a, b)| a * b).sum();
                for j in 0..k {
                    ds[chosen[j] as usize] += (dwt[j] - dot) / sum;
                }
            } else {
                for j in 0..k {
                    ds[chosen[j] as usize] += dwt[j];
                }
            }
            if !self.aux_grad.is_empty() {
                let row = if rc.seq_aux { (tok / t) * e } else { 0 };
                for x in 0..e {
                    ds[x] += self.aux_grad[row + x] * aux_scale;
                }
            }
            let dot: f32 = ds.iter().zip(s).map(|(a, b)| a * b).sum();
            for x in 0..e {
                dlogits[tok * e + x] = s[x] * (ds[x] - dot);
            }
        }
        self.ds = ds;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rc(seq_aux: bool) -> RouterConfig {
        RouterConfig { experts: 4, top_k: 2, norm_topk_prob: true, alpha: 0.1, seq_aux }
    }

    #[test]
    fn dispatch_is_a_stable_counting_sort() {
        let mut r = Routing::default();
        // 3 tokens, logits favouring (0,1), (2,3), (0,3).
        let logits = [5.0, 4.0, 0.0, 0.0, 0.0, 0.0, 5.0, 4.0, 5.0, 0.0, 0.0, 4.0];
        r.route(&logits, 1, 3, rc(true));
        assert_eq!(r.expert, [0, 1, 2, 3, 0, 3]);
        assert_eq!(r.offsets, [0, 2, 3, 4, 6]);
        assert_eq!(r.rows, [0, 2, 0, 1, 1, 2]);
        assert_eq!(r.pos, [0, 2, 3, 4, 1, 5]);
        for tok in 0..3 {
            let w = &r.weight[tok * 2..tok * 2 + 2];
            assert!((w[0] + w[1] - 1.0).abs() < 1e-6 && w[0] > w[1]);
        }
    }

    #[test]
    fn aux_gradient_matches_finite_differences() {
        // aux depends on the scores linearly given the (fixed) routing counts.
        for seq_aux in [true, false] {
            let logits: Vec<f32> = (0..2 * 3 * 4).map(|i| ((i * 7 % 11) as f32) * 0.3).collect();
            let mut r = Routing::default();
            r.route(&logits, 2, 3, rc(seq_aux));
            let base = r.aux_loss as f64;
            let mut bumped = r.clone();
            bumped.scores[5] += 1e-3;
            // scores[5] is token 1 (sequence 0), expert 1: aux_grad[1] in both layouts.
            let grad = r.aux_grad[1];
            // recompute the loss with the bumped score, routing unchanged
            let (b, t, e, k) = (2usize, 3usize, 4usize, 2usize);
            let loss = |s: &[f32]| -> f64 {
                if seq_aux {
                    (0..b)
                        .map(|bi| {
                            (0..e)
                                .map(|x| {
                                    let cnt = (bi * t * k..(bi + 1) * t * k)
                                        .filter(|&q| r.expert[q] as usize == x)
                                        .count();
                                    let c = cnt as f64 * e as f64 / (t * k) as f64;
                                    c * (0..t).map(|ti| s[(bi * t + ti) * e + x] as f64).sum::<f64>()
                                        / t as f64
                                })
                                .sum::<f64>()
                        })
                        .sum::<f64>()
                        / b as f64
                        * 0.1
                } else {
                    (0..e)
                        .map(|x| {
                            let f = r.expert.iter().filter(|&&q| q as usize == x).count() as f64
                                / (b * t * k) as f64
                                * e as f64;
                            f * (0..b * t).map(|n| s[n * e + x] as f64).sum::<f64>() / (b * t) as f64
                        })
                        .sum::<f64>()
                        * 0.1
                }
            };
            assert!((loss(&r.scores) - base).abs() < 1e-6);
            let fd = (loss(&bumped.scores) - base) / 1e-3;
            assert!((fd - grad as f64).abs() < 1e-4, "seq_aux {seq_aux}: fd {fd} vs {grad}");
        }
    }
}
