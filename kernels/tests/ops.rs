//! The row operations against their plain forms.

use wasmlm_kernels::act::dequantize_q8_0_into;
use wasmlm_kernels::ops::{
    attention_batch_with, attention_with, f16, AttentionSeq, Heads, KvValue,
};
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

/// Attention in f64, the plain way; with `f16_operands`, the queries and the probabilities
/// rounded to f16 as an f16 cache's attention rounds them.
#[allow(clippy::too_many_arguments)]
fn reference(
    f16_operands: bool,
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
    let q: Vec<f32> = match f16_operands {
        true => round_f16(q),
        false => q.to_vec(),
    };
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
                .map(|e| match f16_operands {
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
            // values.
            let (k16, v16) = (round_f16(&k), round_f16(&v));
            let want = reference(true, &q, &k16, &v16, h, pos, window, 0.3);
            check::<f16>(&case, &q, &k16, &v16, h, pos, window, &want, F16_TOLERANCE);
        }
    }
}

#[test]
fn batched_attention_matches_each_sequence_alone() {
    let mut rng = Rng(23);
    // Groups of 1 to 7 query heads per KV head (passes of up to three heads: 3 + 2, 3 + 3 +
    // 1), and enough sequences that whole groups share a pass; a prompt of several row
    // blocks among the decode steps; an f16 cache.
    for (n_head, n_kv_head, head_dim) in [(9, 3, 64), (8, 2, 16), (5, 1, 24), (7, 1, 8), (4, 4, 40)]
    {
        let h = Heads {
            n_head,
            n_kv_head,
            head_dim,
        };
        let (qw, kw) = (n_head * head_dim, n_kv_head * head_dim);
        let shapes = [
            (0, 1),
            (7, 1),
            (12, 1),
            (33, 1),
            (3, 40),
            (64, 1),
            (1, 1),
            (20, 2),
            (90, 1),
            (5, 1),
        ];
        for window in [None, Some(9)] {
            let data = sequences(&mut rng, &shapes, qw, kw, round_f16);
            let caches: Vec<(Vec<f16>, Vec<f16>)> = data
                .iter()
                .map(|(_, _, k, v)| {
                    let to16 = |x: &[f32]| x.iter().map(|&v| f16::from_f32(v)).collect();
                    (to16(k), to16(v))
                })
                .collect();
            for isa in Isa::supported() {
                let mut outs: Vec<Vec<f32>> = data.iter().map(|d| vec![0f32; d.1.len()]).collect();
                let mut seqs: Vec<AttentionSeq<'_, f16>> = data
                    .iter()
                    .zip(&caches)
                    .zip(outs.iter_mut())
                    .map(|(((pos, q, _, _), (k, v)), out)| AttentionSeq {
                        q,
                        k,
                        v,
                        k_scales: &[],
                        v_scales: &[],
                        pos: *pos,
                        out,
                    })
                    .collect();
                attention_batch_with(isa, &mut seqs, h, window, 0.3).expect("attention");
                for ((pos, q, k, v), out) in data.iter().zip(&outs) {
                    let want = reference(true, q, k, v, h, *pos, window, 0.3);
                    for (i, (a, b)) in out.iter().zip(&want).enumerate() {
                        assert!(
                            (a - b).abs() < F16_TOLERANCE,
                            "{isa:?} {h:?} pos {pos} {window:?} at {i}: {a} vs {b}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn q8_0_attention_matches_the_plain_computation_on_its_values() {
    let mut rng = Rng(31);
    // The shapes of SmolLM2 (64-wide heads, 3 query heads per KV head), Qwen3 (128, 2) and
    // one KV head per query head; one sequence decoding, a prompt of several row blocks, a
    // window; every sequence in one batch, as a decode step runs them.
    for (n_head, n_kv_head, head_dim) in [(9, 3, 64), (16, 8, 128), (4, 4, 32)] {
        let h = Heads {
            n_head,
            n_kv_head,
            head_dim,
        };
        let (qw, kw) = (n_head * head_dim, n_kv_head * head_dim);
        for window in [None, Some(11)] {
            let shapes = [(0, 1), (40, 1), (7, 20), (130, 1), (3, 2)];
            let quantize = |x: &[f32]| {
                let mut q = vec![0i8; x.len()];
                let mut d = vec![0f32; x.len() / 32];
                i8::narrow_slice(x, &mut q, &mut d);
                let mut deq = vec![0f32; x.len()];
                dequantize_q8_0_into(&q, &d, &mut deq);
                (q, d, deq)
            };
            let data = sequences(&mut rng, &shapes, qw, kw, quantize);
            for isa in Isa::supported() {
                let mut outs: Vec<Vec<f32>> = data.iter().map(|d| vec![0f32; d.1.len()]).collect();
                let mut seqs: Vec<AttentionSeq<'_, i8>> = data
                    .iter()
                    .zip(outs.iter_mut())
                    .map(|((pos, q, k, v), out)| AttentionSeq {
                        q,
                        k: &k.0,
                        v: &v.0,
                        k_scales: &k.1,
                        v_scales: &v.1,
                        pos: *pos,
                        out,
                    })
                    .collect();
                attention_batch_with(isa, &mut seqs, h, window, 0.3).expect("attention");
                for ((pos, q, k, v), out) in data.iter().zip(&outs) {
                    // The queries as the kernels see them: each head's 32-blocks in q8_0.
                    let mut q8 = q.clone();
                    i8::round_queries(&mut q8, &mut Vec::new());
                    let want = reference(false, &q8, &k.2, &v.2, h, *pos, window, 0.3);
                    for (i, (a, b)) in out.iter().zip(&want).enumerate() {
                        assert!(
                            (a - b).abs() < 1e-4,
                            "{isa:?} {h:?} pos {pos} {window:?} at {i}: {a} vs {b}"
                        );
                    }
                }
            }
        }
        // Scales missing, or heads the blocks do not divide, are errors, not a read past.
        let (q, k) = (rng.vec(qw), vec![0i8; kw]);
        let mut out = vec![0f32; qw];
        let mut seqs = [AttentionSeq {
            q: &q,
            k: &k,
            v: &k,
            k_scales: &[],
            v_scales: &[],
            pos: 0,
            out: &mut out,
        }];
        assert!(attention_batch_with(Isa::detect(), &mut seqs, h, None, 0.3).is_err());
    }
    // No q8_0 sequences (a layer step of a model whose caches are another type) is no work,
    // whatever the heads.
    let h = Heads {
        n_head: 2,
        n_kv_head: 1,
        head_dim: 16,
    };
    let none: &mut [AttentionSeq<'_, i8>] = &mut [];
    assert!(attention_batch_with(Isa::detect(), none, h, None, 0.3).is_ok());
}

/// A batch's sequences, one per `(pos, rows)` shape: `pos` and random queries (`rows × qw`),
/// keys and values (`(pos + rows) × kw` each, through `cache`).
fn sequences<C>(
    rng: &mut Rng,
    shapes: &[(usize, usize)],
    qw: usize,
    kw: usize,
    cache: impl Fn(&[f32]) -> C,
) -> Vec<(usize, Vec<f32>, C, C)> {
    shapes
        .iter()
        .map(|&(pos, rows)| {
            let q = rng.vec(rows * qw);
            let k = cache(&rng.vec((pos + rows) * kw));
            let v = cache(&rng.vec((pos + rows) * kw));
            (pos, q, k, v)
        })
        .collect()
}

/// How far an f16 cache's attention may be from the plain computation: a probability whose
/// f32 and f64 forms round to neighbouring f16 values moves an output by one f16 step of that
/// probability (≤ 2⁻¹⁰ · p) times a value (|v| < 1), and the probabilities sum to 1.
const F16_TOLERANCE: f32 = 1e-3;

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
        T::narrow_slice(x, &mut c, &mut []);
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
