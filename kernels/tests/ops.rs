//! The row operations against their plain forms.

use wasmlm_kernels::ops::{attention_with, f16, Heads, KvValue};
use wasmlm_kernels::Isa;

/// xorshift64*: reproducible random numbers without a dependency.
struct Rng(u64);

impl Rng {
    fn unit(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.unit()).collect()
    }
}

/// Attention in f64, the plain way; with `f16_probabilities`, the probabilities rounded to f16
/// as an f16 cache's attention rounds them.
#[allow(clippy::too_many_arguments)]
fn reference(
    f16_probabilities: bool,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    h: Heads,
    pos: usize,
    window: Option<usize>,
    scale: f32,
) -> Vec<f32> {
    let (qw, kw, d) = (h.n_head * h.head_dim, h.n_kv_head * h.head_dim, h.head_dim);
    let rows = q.len() / qw;
    let mut out = vec![0f32; q.len()];
    for i in 0..rows {
        let p = pos + i;
        for head in 0..h.n_head {
            let g = head / (h.n_head / h.n_kv_head);
            let keys: Vec<usize> = (0..=p)
                .filter(|&t| window.is_none_or(|w| p - t < w))
                .collect();
            let s: Vec<f64> = keys
                .iter()
                .map(|&t| {
                    (0..d)
                        .map(|x| {
                            f64::from(q[i * qw + head * d + x]) * f64::from(k[t * kw + g * d + x])
                        })
                        .sum::<f64>()
                        * f64::from(scale)
                })
                .collect();
            let max = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = s.iter().map(|s| (s - max).exp()).collect();
            let sum: f64 = e.iter().sum();
            let probabilities: Vec<f64> = e
                .iter()
                .map(|e| match f16_probabilities {
                    true => f64::from(f16::from_f64(e / sum)),
                    false => e / sum,
                })
                .collect();
            for x in 0..d {
                let y: f64 = keys
                    .iter()
                    .zip(&probabilities)
                    .map(|(&t, p)| p * f64::from(v[t * kw + g * d + x]))
                    .sum();
                out[i * qw + head * d + x] = y as f32;
            }
        }
    }
    out
}

#[test]
fn attention_matches_the_plain_computation() {
    let mut rng = Rng(11);
    // Query heads alone, in pairs and in fours or sixes per KV head; head widths in whole and
    // partial 32-column blocks and one no SIMD kernel takes (12); with and without a
    // window; small enough to run on the caller and large enough to run across the pool.
    for (n_head, n_kv_head, head_dim) in [
        (4, 2, 24),
        (4, 4, 8),
        (8, 2, 64),
        (6, 1, 16),
        (4, 2, 40),
        (2, 1, 12),
    ] {
        let h = Heads {
            n_head,
            n_kv_head,
            head_dim,
        };
        for (pos, rows, window) in [
            (0, 1, None),
            (5, 3, None),
            (9, 4, Some(6)),
            (30, 2, Some(3)),
            (70, 1, None),
            (40, 9, Some(37)),
        ] {
            let q = rng.vec(rows * h.n_head * h.head_dim);
            let k = rng.vec((pos + rows) * h.n_kv_head * h.head_dim);
            let v = rng.vec((pos + rows) * h.n_kv_head * h.head_dim);
            let case = format!("{h:?} pos {pos} rows {rows} {window:?}");
            let want = reference(false, &q, &k, &v, h, pos, window, 0.3);
            check::<f32>(&case, &q, &k, &v, h, pos, window, &want, 1e-5);
            // The f16 cache against the same plain computation on its (exactly widened)
            // values. A probability whose f32 and f64 forms round to neighbouring f16 values
            // moves an output by up to 2⁻¹¹ of that probability's share: hence 1e-4.
            let (k16, v16) = (round_f16(&k), round_f16(&v));
            let want = reference(true, &q, &k16, &v16, h, pos, window, 0.3);
            check::<f16>(&case, &q, &k16, &v16, h, pos, window, &want, 1e-4);
        }
    }
}

/// The values rounded to f16 and widened back.
fn round_f16(x: &[f32]) -> Vec<f32> {
    x.iter().map(|v| f16::from_f32(*v).to_f32()).collect()
}

/// Attention over a `T` cache holding `k` and `v` (exact in `T`) against `want`, on every
/// instruction set this CPU runs.
#[allow(clippy::too_many_arguments)]
fn check<T: KvValue>(
    case: &str,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    h: Heads,
    pos: usize,
    window: Option<usize>,
    want: &[f32],
    tolerance: f32,
) {
    let cache = |x: &[f32]| {
        let mut c = vec![T::default(); x.len()];
        T::narrow_slice(x, &mut c);
        c
    };
    let (k, v) = (cache(k), cache(v));
    for isa in Isa::supported() {
        let mut out = vec![0f32; q.len()];
        attention_with(isa, q, &k, &v, h, pos, window, 0.3, &mut out).expect("attention");
        for (i, (a, b)) in out.iter().zip(want).enumerate() {
            assert!(
                (a - b).abs() < tolerance,
                "{} {isa:?} {case} at {i}: {a} vs {b}",
                std::any::type_name::<T>()
            );
        }
    }
}
