//! Decode-step and prefill-chunk attention over an f16 KV cache (and a q8_0 one) at the head shapes of the
//! default model (SmolLM2-135M: 9 query heads, 3 KV heads, width 64) and of Qwen3-0.6B (16, 8,
//! 128), for one sequence and for the four of a batched decode step.
//!
//!     cargo bench -p wasmlm-kernels --bench attention [-- FILTER]
//!
//! Prints `shape seqs=.. pos=.. rows=.. batched_us=.. each_us=.. over_each=.. scalar_us=..
//! over_scalar=.. kv_gb_s=..` per case (medians of repeated runs): `batched_us` is every
//! sequence in one `attention_batch_with` (one hand-off to the pool), `each_us` the same
//! sequences one `attention_with` after another, `scalar_us` the batch on the portable loops,
//! `q8_us` the batch over a q8_0 cache of the same values (`f16_over_q8`: the f16 batch's
//! time over it); GB/s counts the f16 keys and values read once per step.

mod common;

use common::median_us;
use wasmlm_kernels::ops::{
    attention_batch_with, attention_with, f16, AttentionSeq, Heads, KvValue,
};
use wasmlm_kernels::Isa;

/// Reproducible values in [−1, 1).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

/// One sequence's inputs: queries, cached keys and values, and its output.
struct Seq {
    q: Vec<f32>,
    k: Vec<f16>,
    v: Vec<f16>,
    /// The keys and values as q8_0: integers and block scales.
    k8: (Vec<i8>, Vec<f32>),
    v8: (Vec<i8>, Vec<f32>),
    out: Vec<f32>,
}

/// `x` as q8_0 integers and their scales.
fn q8(x: &[f32]) -> (Vec<i8>, Vec<f32>) {
    let (mut q, mut d) = (vec![0i8; x.len()], vec![0f32; x.len() / 32]);
    i8::narrow_slice(x, &mut q, &mut d);
    (q, d)
}

fn main() {
    let filter = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .unwrap_or_default();
    let shapes = [("smollm2", 9, 3, 64), ("qwen3", 16, 8, 128)];
    // (sequences, position of the first query, query rows): decode steps at short and long
    // contexts, one and four sequences; a prefill chunk.
    let cases = [
        (1, 128, 1),
        (4, 128, 1),
        (1, 1024, 1),
        (4, 1024, 1),
        (1, 448, 64),
    ];
    println!("threads={}", wasmlm_kernels::pool::threads());
    let best = Isa::detect();
    for (name, n_head, n_kv_head, head_dim) in shapes {
        let h = Heads {
            n_head,
            n_kv_head,
            head_dim,
        };
        let (qw, kw) = (n_head * head_dim, n_kv_head * head_dim);
        let scale = 1.0 / (head_dim as f32).sqrt();
        for (n_seqs, pos, rows) in cases {
            let label = format!("{name} seqs={n_seqs} pos={pos} rows={rows}");
            if !label.contains(&filter) {
                continue;
            }
            let to16 = |x: Vec<f32>| x.into_iter().map(f16::from_f32).collect::<Vec<_>>();
            let mut seqs: Vec<Seq> = (0..n_seqs as u64)
                .map(|s| {
                    let (k, v) = (
                        values((pos + rows) * kw, 4 * s + 2),
                        values((pos + rows) * kw, 4 * s + 3),
                    );
                    Seq {
                        q: values(rows * qw, 4 * s + 1),
                        k8: q8(&k),
                        v8: q8(&v),
                        k: to16(k),
                        v: to16(v),
                        out: vec![0f32; rows * qw],
                    }
                })
                .collect();
            let batch = |isa: Isa, seqs: &mut [Seq]| {
                let mut views: Vec<AttentionSeq<'_, f16>> = seqs
                    .iter_mut()
                    .map(|s| AttentionSeq {
                        q: &s.q,
                        k: &s.k,
                        v: &s.v,
                        k_scales: &[],
                        v_scales: &[],
                        pos,
                        out: &mut s.out,
                    })
                    .collect();
                attention_batch_with(isa, &mut views, h, None, scale).expect("attention");
            };
            let batch_q8 = |seqs: &mut [Seq]| {
                let mut views: Vec<AttentionSeq<'_, i8>> = seqs
                    .iter_mut()
                    .map(|s| AttentionSeq {
                        q: &s.q,
                        k: &s.k8.0,
                        v: &s.v8.0,
                        k_scales: &s.k8.1,
                        v_scales: &s.v8.1,
                        pos,
                        out: &mut s.out,
                    })
                    .collect();
                attention_batch_with(best, &mut views, h, None, scale).expect("attention");
            };
            let batched = median_us(|| batch(best, &mut seqs), 1.0);
            let each = median_us(
                || {
                    for s in seqs.iter_mut() {
                        attention_with(best, &s.q, &s.k, &s.v, h, pos, None, scale, &mut s.out)
                            .expect("attention");
                    }
                },
                1.0,
            );
            let scalar = median_us(|| batch(Isa::Scalar, &mut seqs), 0.5);
            let q8_us = median_us(|| batch_q8(&mut seqs), 1.0);
            let kv_bytes = n_seqs * 2 * (pos + rows) * kw * std::mem::size_of::<f16>();
            println!(
                "{label} batched_us={batched:.1} each_us={each:.1} over_each={:.2} \
                 scalar_us={scalar:.1} over_scalar={:.2} q8_us={q8_us:.1} f16_over_q8={:.2} \
                 kv_gb_s={:.1}",
                each / batched,
                scalar / batched,
                batched / q8_us,
                kv_bytes as f64 / batched / 1e3
            );
        }
    }
}
