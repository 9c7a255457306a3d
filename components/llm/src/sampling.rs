//! Token selection: penalties, temperature, top-k, top-p, min-p, seeded sampling, log-probs.
//!
//! The order follows llama.cpp's default chain (penalties → top-k → top-p → min-p → temperature →
//! draw), so the same settings mean the same thing here as there.

use std::collections::HashMap;

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
}

impl Sampler {
    /// A sampler; without a seed it draws one from the WASI random source.
    pub fn new(params: SamplingParams) -> Self {
        let seed = params.seed.unwrap_or_else(entropy);
        Self {
            params,
            rng: Rng(seed),
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
        let mut cand: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .filter(|(_, l)| l.is_finite())
            .map(|(i, &l)| (i as u32, l))
            .collect();
        if cand.is_empty() {
            return argmax(logits);
        }
        let by_logit = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if p.top_k > 0 && p.top_k < cand.len() {
            cand.select_nth_unstable_by(p.top_k - 1, by_logit);
            cand.truncate(p.top_k);
        }
        cand.sort_unstable_by(by_logit);
        // Probabilities at temperature 1 decide the top-p and min-p cuts, as in llama.cpp.
        let probs = softmax(cand.iter().map(|c| c.1), 1.0);
        let mut keep = cand.len();
        if p.top_p < 1.0 {
            let mut cum = 0.0;
            for (i, pr) in probs.iter().enumerate() {
                cum += pr;
                if cum >= p.top_p {
                    keep = i + 1;
                    break;
                }
            }
        }
        if p.min_p > 0.0 {
            let floor = probs[0] * p.min_p;
            keep = keep.min(probs.iter().take_while(|&&pr| pr >= floor).count().max(1));
        }
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

fn softmax(logits: impl Iterator<Item = f32> + Clone, temperature: f32) -> Vec<f32> {
    let max = logits.clone().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = logits.map(|l| ((l - max) / temperature).exp()).collect();
    let sum: f32 = exps.iter().sum();
    exps.into_iter().map(|e| e / sum).collect()
}

/// Index of the largest logit; the first one on ties (as llama.cpp's greedy sampler).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Log-sum-exp of the logits and the `n` best tokens with their log-probabilities.
fn log_softmax_top(logits: &[f32], n: usize) -> (Option<f32>, Vec<(u32, f32)>) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = max + logits.iter().map(|l| (l - max).exp()).sum::<f32>().ln();
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    let by = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]);
    if n > 0 && n < idx.len() {
        idx.select_nth_unstable_by(n - 1, by);
    }
    idx.truncate(n);
    idx.sort_unstable_by(by);
    (
        Some(lse),
        idx.into_iter()
            .map(|i| (i, logits[i as usize] - lse))
            .collect(),
    )
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
