//! Token selection: penalties, temperature, top-k, top-p, min-p, seeded sampling, log-probs.
//!
//! The order follows llama.cpp's default chain (penalties → top-k → top-p → min-p → temperature →
//! draw), so the same settings mean the same thing here as there.

use std::collections::HashMap;

use crate::lanes;

/// Sampler settings with defaults already applied.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    pub temperature: f32,
    pub top_k: usize,
    pub top_p: f32,
    pub min_p: f32,
    pub repeat_penalty: f32,
    pub repeat_last_n: usize,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    pub seed: Option<u64>,
    pub top_logprobs: Option<usize>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
            top_logprobs: None,
        }
    }
}

impl SamplingParams {
    /// Rejects values that have no meaning, with a message naming the field.
    pub fn validate(&self) -> Result<(), String> {
        let check = |ok: bool, what: &str| if ok { Ok(()) } else { Err(what.to_string()) };
        check(
            self.temperature.is_finite() && self.temperature >= 0.0,
            "temperature must be a finite number >= 0",
        )?;
        check(
            self.top_p.is_finite() && self.top_p > 0.0 && self.top_p <= 1.0,
            "top_p must be in (0, 1]",
        )?;
        check(
            self.min_p.is_finite() && (0.0..=1.0).contains(&self.min_p),
            "min_p must be in [0, 1]",
        )?;
        check(
            self.repeat_penalty.is_finite() && self.repeat_penalty > 0.0,
            "repeat_penalty must be > 0",
        )?;
        check(
            self.presence_penalty.is_finite() && (-2.0..=2.0).contains(&self.presence_penalty),
            "presence_penalty must be in [-2, 2]",
        )?;
        check(
            self.frequency_penalty.is_finite() && (-2.0..=2.0).contains(&self.frequency_penalty),
            "frequency_penalty must be in [-2, 2]",
        )?;
        check(
            self.top_logprobs.is_none_or(|n| n <= 20),
            "top_logprobs must be at most 20",
        )
    }
}

/// A chosen token and, when asked for, its log-probability and the best alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct Choice {
    pub token: u32,
    pub logprob: Option<f32>,
    pub top: Vec<(u32, f32)>,
}

/// SplitMix64: small, fast, and the same on every platform, so a seed reproduces anywhere.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
}

/// Picks tokens from logits.
pub struct Sampler {
    params: SamplingParams,
    rng: Rng,
    /// Per-token weights of the uncut draw, kept so a token costs no allocation.
    weights: Vec<f32>,
}

impl Sampler {
    /// A sampler; without a seed it draws one from the WASI random source.
    pub fn new(params: SamplingParams) -> Self {
        let seed = params.seed.unwrap_or_else(entropy);
        Self {
            params,
            rng: Rng(seed),
            weights: Vec::new(),
        }
    }

    /// Chooses the next token. The repeat penalty looks at the last tokens of `prompt`
    /// followed by `generated`; presence and frequency penalties at `generated` alone.
    pub fn sample(&mut self, logits: &mut [f32], prompt: &[u32], generated: &[u32]) -> Choice {
        self.apply_penalties(logits, prompt, generated);
        let (logprob_of, top) = match self.params.top_logprobs {
            Some(n) => log_softmax_top(logits, n),
            None => (None, Vec::new()),
        };
        let token = if self.params.temperature <= 0.0 {
            argmax(logits)
        } else {
            self.draw(logits)
        };
        Choice {
            token,
            logprob: logprob_of.map(|lse| logits[token as usize] - lse),
            top,
        }
    }

    fn apply_penalties(&self, logits: &mut [f32], prompt: &[u32], generated: &[u32]) {
        let p = &self.params;
        if p.repeat_penalty != 1.0 && p.repeat_last_n > 0 {
            let mut seen: Vec<u32> = prompt
                .iter()
                .chain(generated)
                .rev()
                .take(p.repeat_last_n)
                .copied()
                .collect();
            seen.sort_unstable();
            seen.dedup();
            for t in seen {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = if *l > 0.0 {
                        *l / p.repeat_penalty
                    } else {
                        *l * p.repeat_penalty
                    };
                }
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            let mut counts: HashMap<u32, u32> = HashMap::new();
            for &t in generated {
                *counts.entry(t).or_default() += 1;
            }
            for (t, c) in counts {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l -= c as f32 * p.frequency_penalty + p.presence_penalty;
                }
            }
        }
    }

    fn draw(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        let max = lanes::max_finite(logits);
        if max == f32::NEG_INFINITY {
            return argmax(logits);
        }
        if p.top_k == 0 && p.top_p >= 1.0 && p.min_p <= 0.0 {
            // Nothing is cut, so no order is needed: draw over the vocabulary as it lies,
            // without sorting it (the default request's case). Each weight is computed once,
            // for the sum, and read back by the walk.
            let sum = lanes::exp_terms(logits, max, p.temperature, &mut self.weights);
            let target = self.rng.next_f32() * sum;
            // `r · sum` can round up to `sum` itself: then the last token with any weight.
            let last = || self.weights.iter().rposition(|&w| w > 0.0);
            return lanes::pick(&self.weights, target)
                .or_else(last)
                .unwrap_or(0) as u32;
        }
        let mut cand: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .filter(|(_, l)| l.is_finite())
            .map(|(i, &l)| (i as u32, l))
            .collect();
        if p.top_k > 0 && p.top_k < cand.len() {
            cand.select_nth_unstable_by(p.top_k - 1, by_logit);
            cand.truncate(p.top_k);
        }
        // Probabilities at temperature 1 decide the top-p and min-p cuts, as in llama.cpp:
        // p_i = e_i / z with e_i = exp(l_i - max). Min-p keeps p_i >= p_max · min_p, that is
        // e_i >= min_p, whatever the order.
        let z: f32 = cand.iter().map(|c| lanes::exp(c.1 - max)).sum();
        if p.min_p > 0.0 {
            cand.retain(|c| lanes::exp(c.1 - max) >= p.min_p);
        }
        let keep = if p.top_p < 1.0 {
            nucleus(&mut cand, max, z, p.top_p)
        } else {
            cand.sort_unstable_by(by_logit);
            cand.len()
        };
        cand.truncate(keep);
        let probs = softmax(cand.iter().map(|c| c.1), p.temperature);
        let r = self.rng.next_f32();
        let mut cum = 0.0;
        for (c, pr) in cand.iter().zip(&probs) {
            cum += pr;
            if r < cum {
                return c.0;
            }
        }
        cand[cand.len() - 1].0
    }
}

/// Best logit first; the lower token id first among equals.
fn by_logit(a: &(u32, f32), b: &(u32, f32)) -> std::cmp::Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

/// Top-p: orders the best candidates first and returns how many of them it takes for their
/// probabilities (`exp(l - max) / z`) to reach `top_p` (all, if they never do). Only as many
/// candidates are sorted as it takes, found by selecting 64, then 4× more while short: a
/// vocabulary of 150k is rarely sorted whole.
fn nucleus(cand: &mut [(u32, f32)], max: f32, z: f32, top_p: f32) -> usize {
    let mut k = cand.len().min(64);
    loop {
        if k < cand.len() {
            cand.select_nth_unstable_by(k - 1, by_logit);
        }
        cand[..k].sort_unstable_by(by_logit);
        let mut cum = 0.0;
        for (i, c) in cand[..k].iter().enumerate() {
            cum += lanes::exp(c.1 - max) / z;
            if cum >= top_p {
                return i + 1;
            }
        }
        if k == cand.len() {
            return k;
        }
        k = cand.len().min(4 * k);
    }
}

fn softmax(logits: impl Iterator<Item = f32> + Clone, temperature: f32) -> Vec<f32> {
    let max = logits.clone().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = logits
        .map(|l| lanes::exp((l - max) / temperature))
        .collect();
    let sum: f32 = exps.iter().sum();
    exps.into_iter().map(|e| e / sum).collect()
}

/// Index of the largest logit; the first one on ties (as llama.cpp's greedy sampler).
pub fn argmax(logits: &[f32]) -> u32 {
    lanes::argmax(logits)
}

/// Log-sum-exp of the logits and the `n` best tokens with their log-probabilities (best
/// first, the lower id first among equals), in one pass that keeps only those `n`.
fn log_softmax_top(logits: &[f32], n: usize) -> (Option<f32>, Vec<(u32, f32)>) {
    let max = lanes::max(logits);
    let lse = max + lanes::exp_sum(logits, max).ln();
    let mut top: Vec<(u32, f32)> = Vec::with_capacity(n + 1);
    if n > 0 {
        for (i, &l) in logits.iter().enumerate() {
            let c = (i as u32, l);
            // Ids come in order, so a candidate equal to the last kept one is worse.
            if top.len() == n && by_logit(&c, &top[n - 1]).is_ge() {
                continue;
            }
            let at = top.partition_point(|t| by_logit(t, &c).is_lt());
            top.insert(at, c);
            top.truncate(n);
        }
    }
    for t in &mut top {
        t.1 -= lse;
    }
    (Some(lse), top)
}

/// A seed from the platform's random source (WASI `random` inside the component).
fn entropy() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, seed: u64) -> SamplingParams {
        SamplingParams {
            temperature,
            seed: Some(seed),
            ..Default::default()
        }
    }

    #[test]
    fn greedy_takes_first_max() {
        let mut s = Sampler::new(params(0.0, 1));
        assert_eq!(s.sample(&mut [0.1, 3.0, 3.0, -1.0], &[], &[]).token, 1);
    }

    #[test]
    fn same_seed_same_tokens_other_seed_differs() {
        let logits: Vec<f32> = (0..100).map(|i| (i % 7) as f32 * 0.1).collect();
        let run = |seed| {
            let mut s = Sampler::new(params(1.0, seed));
            (0..50)
                .map(|_| s.sample(&mut logits.clone(), &[], &[]).token)
                .collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn top_k_one_is_greedy() {
        let mut p = params(1.5, 3);
        p.top_k = 1;
        let mut s = Sampler::new(p);
        for _ in 0..20 {
            assert_eq!(s.sample(&mut [1.0, 2.0, 1.9], &[], &[]).token, 1);
        }
    }

    #[test]
    fn min_p_and_top_p_cut_the_tail() {
        let mut p = params(1.0, 5);
        p.min_p = 0.5;
        let mut s = Sampler::new(p);
        for _ in 0..50 {
            // exp(-3) is far below half the top probability.
            assert_ne!(s.sample(&mut [3.0, 3.0, 0.0], &[], &[]).token, 2);
        }
        let mut p = params(1.0, 5);
        p.top_p = 0.5;
        let mut s = Sampler::new(p);
        for _ in 0..50 {
            assert_eq!(s.sample(&mut [5.0, 1.0, 1.0], &[], &[]).token, 0);
        }
    }

    #[test]
    fn penalties_follow_llama_cpp_and_openai() {
        let mut p = params(0.0, 1);
        p.repeat_penalty = 2.0;
        let s = Sampler::new(p);
        let mut logits = [4.0, 3.0, -1.0];
        s.apply_penalties(&mut logits, &[0], &[2]);
        assert_eq!(logits, [2.0, 3.0, -2.0]);
        let mut p = params(0.0, 1);
        p.repeat_penalty = 2.0;
        p.repeat_last_n = 1;
        let s = Sampler::new(p);
        let mut logits = [4.0, 3.0, -1.0];
        s.apply_penalties(&mut logits, &[0], &[2]);
        assert_eq!(
            logits,
            [4.0, 3.0, -2.0],
            "only the last token is in the window"
        );
        let mut p = params(0.0, 1);
        p.presence_penalty = 0.5;
        p.frequency_penalty = 1.0;
        let s = Sampler::new(p);
        let mut logits = [4.0, 3.0];
        s.apply_penalties(&mut logits, &[], &[0, 0]);
        assert_eq!(logits, [1.5, 3.0]);
    }

    #[test]
    fn logprobs_are_normalised() {
        let mut p = params(0.0, 1);
        p.top_logprobs = Some(2);
        let mut s = Sampler::new(p);
        let c = s.sample(&mut [0.0, 1.0, 2.0], &[], &[]);
        assert_eq!(c.token, 2);
        let total: f32 = [0.0f32, 1.0, 2.0].iter().map(|l| (l - 2.0f32).exp()).sum();
        assert!((c.logprob.unwrap() + total.ln()).abs() < 1e-5);
        assert_eq!(c.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![2, 1]);
    }

    /// Reproducible pseudo-random logits, some repeated (ties) and some not finite.
    fn random_logits(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = Rng(seed);
        (0..n)
            .map(|i| match i % 97 {
                0 => f32::NEG_INFINITY,
                1 => 2.5,
                _ => rng.next_f32() * 12.0 - 6.0,
            })
            .collect()
    }

    fn fully_sorted(logits: &[f32]) -> Vec<(u32, f32)> {
        let mut all: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .filter(|(_, l)| l.is_finite())
            .map(|(i, &l)| (i as u32, l))
            .collect();
        all.sort_by(by_logit);
        all
    }

    #[test]
    fn nucleus_takes_the_prefix_a_full_sort_would() {
        for (seed, top_p) in [(1, 0.05), (2, 0.5), (3, 0.9), (4, 0.999), (5, 0.99999)] {
            let logits = random_logits(20_000, seed);
            let sorted = fully_sorted(&logits);
            let max = sorted[0].1;
            let z: f32 = sorted.iter().map(|c| (c.1 - max).exp()).sum();
            let (mut cum, mut want) = (0.0, sorted.len());
            for (i, c) in sorted.iter().enumerate() {
                cum += (c.1 - max).exp() / z;
                if cum >= top_p {
                    want = i + 1;
                    break;
                }
            }
            let mut cand: Vec<(u32, f32)> = fully_sorted(&logits);
            cand.reverse();
            let keep = nucleus(&mut cand, max, z, top_p);
            assert_eq!(keep, want, "top_p {top_p}");
            assert_eq!(&cand[..keep], &sorted[..want], "top_p {top_p}");
        }
    }

    #[test]
    fn top_logprobs_are_the_best_of_a_full_sort() {
        let logits = random_logits(50_000, 9);
        let sorted = fully_sorted(&logits);
        for n in [0, 1, 2, 5, 20] {
            let (lse, top) = log_softmax_top(&logits, n);
            let lse = lse.unwrap();
            let want: Vec<(u32, f32)> = sorted[..n].iter().map(|c| (c.0, c.1 - lse)).collect();
            assert_eq!(top, want, "n {n}");
        }
        // The repeated logit 2.5 ties: lower ids first.
        let ties = [1.0, 2.5, 0.0, 2.5, 2.5];
        let (_, top) = log_softmax_top(&ties, 2);
        assert_eq!(top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 3]);
    }

    #[test]
    fn uncut_sampling_follows_the_distribution() {
        // p(1) = 3/4 at temperature 1; -inf is never drawn; NaN is never drawn.
        let logits = [0.0, 3f32.ln(), f32::NEG_INFINITY, f32::NAN];
        let mut s = Sampler::new(params(1.0, 11));
        let mut counts = [0usize; 4];
        for _ in 0..4000 {
            counts[s.sample(&mut logits.clone(), &[], &[]).token as usize] += 1;
        }
        assert_eq!(counts[2] + counts[3], 0);
        assert!((2850..3150).contains(&counts[1]), "{counts:?}");
        // Temperature 0.5 squares the odds: p(1) = 9/10.
        let mut s = Sampler::new(params(0.5, 12));
        let ones = (0..4000)
            .filter(|_| s.sample(&mut logits.clone(), &[], &[]).token == 1)
            .count();
        assert!((3500..3700).contains(&ones), "{ones}");
    }

    #[test]
    fn rejects_meaningless_values() {
        let mut p = SamplingParams {
            top_p: 0.0,
            ..Default::default()
        };
        assert!(p.validate().is_err());
        p.top_p = 1.0;
        p.temperature = f32::NAN;
        assert!(p.validate().is_err());
    }
}
