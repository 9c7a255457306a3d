//! The decoder's other operations over plain f32 rows: norms, rotary embedding, gated
//! activations and attention over an f16, f32 or q8_0 KV cache laid out
//! `[position][kv_head][head_dim]`.
//!
//! A decode step of a small model is ~25 such operations per layer between the products;
//! through a tensor library each costs an allocation, a layout check and a dispatch (about
//! a third of a SmolLM2 decode step). Here each is one loop over the row, in place.

pub use half::f16;
use half::slice::HalfFloatSliceExt;

use crate::{pool, Isa, KernelError, SendPtr};

/// Σ a·b with eight independent partial sums (vectorizes without fast-math); `b` f32, f16
/// or i8 (widened as is).
#[inline]
pub fn dot<T: KvValue>(a: &[f32], b: &[T]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i].widen();
        }
    }
    let mut s = ra.iter().zip(rb).map(|(x, y)| x * y.widen()).sum::<f32>();
    for v in acc {
        s += v;
    }
    s
}

/// Each `w.len()`-wide row of `x` scaled to unit RMS (with `eps`) and multiplied by `w`.
pub fn rms_norm(x: &mut [f32], w: &[f32], eps: f32) {
    let d = w.len();
    for row in x.chunks_exact_mut(d) {
        let ss = dot(row, row) / d as f32;
        let r = 1.0 / (ss + eps).sqrt();
        for (v, w) in row.iter_mut().zip(w) {
            *v = *v * r * w;
        }
    }
}

/// [`rms_norm`] into `out`, `x` left as it is.
pub fn rms_norm_into(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    out.copy_from_slice(x);
    rms_norm(out, w, eps);
}

/// Rotates each `head_dim`-wide head of `x` (one row per position `pos + i`) by the angles
/// of `cos`/`sin` (`head_dim / 2` per position). `interleaved`: pairs `(2j, 2j + 1)` (GPT-J,
/// llama GGUFs); otherwise `(j, j + head_dim / 2)` (NeoX).
pub fn rope(
    x: &mut [f32],
    row_width: usize,
    head_dim: usize,
    pos: usize,
    cos: &[f32],
    sin: &[f32],
    interleaved: bool,
) {
    let half = head_dim / 2;
    for (i, row) in x.chunks_exact_mut(row_width).enumerate() {
        let at = (pos + i) * half;
        let (c, s) = (&cos[at..at + half], &sin[at..at + half]);
        for head in row.chunks_exact_mut(head_dim) {
            if interleaved {
                for j in 0..half {
                    let (a, b) = (head[2 * j], head[2 * j + 1]);
                    head[2 * j] = a * c[j] - b * s[j];
                    head[2 * j + 1] = a * s[j] + b * c[j];
                }
            } else {
                let (lo, hi) = head.split_at_mut(half);
                for j in 0..half {
                    let (a, b) = (lo[j], hi[j]);
                    lo[j] = a * c[j] - b * s[j];
                    hi[j] = a * s[j] + b * c[j];
                }
            }
        }
    }
}

/// `gate = silu(gate) · up`.
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    for (g, u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + (-*g).exp()) * u;
    }
}

/// `gate = gelu(gate) · up`, GELU's tanh approximation.
pub fn gelu_mul(gate: &mut [f32], up: &[f32]) {
    const C: f32 = 0.797_884_6; // √(2/π)
    for (g, u) in gate.iter_mut().zip(up) {
        let x = *g;
        *g = 0.5 * x * (1.0 + (C * (x + 0.044_715 * x * x * x)).tanh()) * u;
    }
}

/// `y += x`.
pub fn add(y: &mut [f32], x: &[f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += x;
    }
}

/// The shape of multi-head attention with grouped KV heads.
#[derive(Debug, Clone, Copy)]
pub struct Heads {
    /// Query heads.
    pub n_head: usize,
    /// Key/value heads (each serves `n_head / n_kv_head` query heads).
    pub n_kv_head: usize,
    /// Width of one head.
    pub head_dim: usize,
}

/// An element type of the KV cache: f16 (llama.cpp's default, half the bytes a decode step
/// reads), f32 (exact, like llama.cpp's `--cache-type-k f32`) or the integers of q8_0
/// (`i8`, a scale per 32 values beside them, like `--cache-type-k q8_0`: 0.56 of f16's
/// bytes).
pub trait KvValue: Copy + Default + Send + Sync + sealed::Sealed + 'static {
    /// Whether each 32 values carry a scale (kept apart from them, one f32 per block): the
    /// value is `widen() · scale`.
    const BLOCK_SCALED: bool = false;
    /// The value as f32, exactly (before its block's scale).
    fn widen(self) -> f32;
    /// Rounds `src` into `dst` (same length), writing the scale of every 32 values into
    /// `scales` where [`KvValue::BLOCK_SCALED`] (`src.len() / 32` of them; empty otherwise).
    fn narrow_slice(src: &[f32], dst: &mut [Self], scales: &mut [f32]);
    /// Rounds queries as llama.cpp's CPU attention does before it dots them with keys of
    /// this type (ggml converts the f32 side of a product to the type's `vec_dot_type`):
    /// to f16 for an f16 cache, to q8_0 for a q8_0 one, unchanged for f32. Our scores, and
    /// the near-ties among them, stay close to the reference's.
    fn round_queries(q: &mut [f32], scratch: &mut Vec<Self>);
    /// Rounds the probabilities that weigh values of this type as llama.cpp does: to f16 for
    /// an f16 cache; q8_0 values are widened to f32 there, so f32 and q8_0 keep them.
    fn round_probs(p: &mut [f32], scratch: &mut Vec<Self>);
    /// Eight values from `p`, widened to f32 (before their block's scale).
    ///
    /// # Safety
    /// `p` must point to eight values; the CPU must have AVX2, FMA and F16C.
    #[cfg(target_arch = "x86_64")]
    #[doc(hidden)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::f16 {}
    impl Sealed for i8 {}
}

impl KvValue for f32 {
    #[inline]
    fn widen(self) -> f32 {
        self
    }
    fn narrow_slice(src: &[f32], dst: &mut [f32], _: &mut [f32]) {
        dst.copy_from_slice(src);
    }
    fn round_queries(_: &mut [f32], _: &mut Vec<f32>) {}
    fn round_probs(_: &mut [f32], _: &mut Vec<f32>) {}
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(p: *const f32) -> std::arch::x86_64::__m256 {
        unsafe { std::arch::x86_64::_mm256_loadu_ps(p) }
    }
}

impl KvValue for f16 {
    #[inline]
    fn widen(self) -> f32 {
        self.to_f32()
    }
    fn narrow_slice(src: &[f32], dst: &mut [f16], _: &mut [f32]) {
        dst.convert_from_f32_slice(src);
    }
    fn round_queries(q: &mut [f32], scratch: &mut Vec<f16>) {
        round_to_f16(q, scratch);
    }
    fn round_probs(p: &mut [f32], scratch: &mut Vec<f16>) {
        round_to_f16(p, scratch);
    }
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(p: *const f16) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::{_mm256_cvtph_ps, _mm_loadu_si128};
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p.cast())) }
    }
}

fn round_to_f16(x: &mut [f32], scratch: &mut Vec<f16>) {
    scratch.resize(x.len(), f16::ZERO);
    scratch.convert_from_f32_slice(x);
    scratch.convert_to_f32_slice(x);
}

impl KvValue for i8 {
    const BLOCK_SCALED: bool = true;
    #[inline]
    fn widen(self) -> f32 {
        f32::from(self)
    }
    fn narrow_slice(src: &[f32], dst: &mut [i8], scales: &mut [f32]) {
        crate::act::quantize_q8_0_into(src, dst, scales);
    }
    fn round_queries(q: &mut [f32], _: &mut Vec<i8>) {
        // ggml dots q8_0 keys with queries quantized to q8_0 (its `vec_dot_type`).
        let (mut ints, mut d) = ([0i8; 32], [0f32]);
        for x in q.chunks_exact_mut(32) {
            crate::act::quantize_q8_0_into(x, &mut ints, &mut d);
            crate::act::dequantize_q8_0_into(&ints, &d, x);
        }
    }
    fn round_probs(_: &mut [f32], _: &mut Vec<i8>) {}
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(p: *const i8) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::{_mm256_cvtepi32_ps, _mm256_cvtepi8_epi32, _mm_loadl_epi64};
        unsafe { _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(p.cast()))) }
    }
}

/// The scale of value `e` of a block-scaled slice (1 for the other types).
#[inline(always)]
fn scale_of<T: KvValue>(scales: &[f32], e: usize) -> f32 {
    if T::BLOCK_SCALED {
        scales[e / 32]
    } else {
        1.0
    }
}

/// `out[j·n + t] = scale · q_j·k_t` for the query heads `q_j = q[j·d..][..d]` (`heads` of
/// them, 1 to 3, sharing one KV head) and the keys `k_t = k[t·stride..][..d]`,
/// `t < n = out.len() / heads`; `ks`: the keys' block scales, from the same start
/// (`T::BLOCK_SCALED`; empty otherwise).
#[allow(clippy::too_many_arguments)]
fn group_scores<T: KvValue>(
    simd: bool,
    heads: usize,
    q: &[f32],
    k: &[T],
    ks: &[f32],
    stride: usize,
    scale: f32,
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: `simd` is only set where `Isa::best` found AVX2, FMA and F16C.
        return unsafe { crate::x86::group_scores(heads, q, k, ks, stride, scale, out) };
    }
    let _ = simd;
    let (d, n) = (q.len() / heads, out.len() / heads);
    for (qj, out) in q.chunks_exact(d).zip(out.chunks_exact_mut(n.max(1))) {
        for (t, o) in out.iter_mut().enumerate() {
            *o = if T::BLOCK_SCALED {
                let at = t * stride;
                qj.chunks_exact(32)
                    .enumerate()
                    .map(|(b, qb)| dot(qb, &k[at + 32 * b..][..32]) * ks[at / 32 + b])
                    .sum::<f32>()
            } else {
                dot(qj, &k[t * stride..][..d])
            } * scale;
        }
    }
}

/// `acc[j·d..][..d] += Σ_t p[j·n + t] · v_t` for `heads` heads' probabilities
/// (`n = p.len() / heads`) and the values `v_t = v[t·stride..][..d]`; `vs`: their block
/// scales, as in [`group_scores`].
fn group_mix<T: KvValue>(
    simd: bool,
    heads: usize,
    p: &[f32],
    v: &[T],
    vs: &[f32],
    stride: usize,
    acc: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: as in `group_scores`.
        return unsafe { crate::x86::group_mix(heads, p, v, vs, stride, acc) };
    }
    let _ = simd;
    let (d, n) = (acc.len() / heads, p.len() / heads);
    for (pj, acc) in p.chunks_exact(n.max(1)).zip(acc.chunks_exact_mut(d)) {
        for (t, &pt) in pj.iter().enumerate() {
            let at = t * stride;
            for (c, (a, x)) in acc.iter_mut().zip(&v[at..][..d]).enumerate() {
                *a += pt * scale_of::<T>(vs, at + c) * x.widen();
            }
        }
    }
}

/// `s` as probabilities: `e^(s_t − max) / Σ_u e^(s_u − max)`.
fn softmax(simd: bool, s: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: as in `group_scores`.
        return unsafe { crate::x86::softmax(s) };
    }
    let _ = simd;
    let max = s.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    let mut sum = 0f32;
    for x in s.iter_mut() {
        *x = (*x - max).exp();
        sum += *x;
    }
    let inv = 1.0 / sum;
    s.iter_mut().for_each(|x| *x *= inv);
}

/// One sequence's part of an [`attention_batch`]: `rows` queries at positions
/// `pos..pos + rows` over the keys and values of its own positions `0..pos + rows`.
pub struct AttentionSeq<'a, T> {
    /// The queries, `rows × n_head·head_dim`.
    pub q: &'a [f32],
    /// Keys, `[position][n_kv_head·head_dim]`.
    pub k: &'a [T],
    /// Values, as `k`.
    pub v: &'a [T],
    /// The keys' block scales where `T` has them ([`KvValue::BLOCK_SCALED`]): one per 32
    /// values of `k`; empty otherwise.
    pub k_scales: &'a [f32],
    /// The values' block scales, as `k_scales`.
    pub v_scales: &'a [f32],
    /// The position of the first query.
    pub pos: usize,
    /// Where the result goes, like `q`.
    pub out: &'a mut [f32],
}

/// Causal attention of `rows` queries (`q`, `rows × n_head·head_dim`) at positions
/// `pos..pos + rows` over the keys and values of positions `0..pos + rows` (`k`, `v`:
/// `[position][n_kv_head·head_dim]`, f16 or f32; a q8_0 cache's scales go in an
/// [`AttentionSeq`] to [`attention_batch`]), scores multiplied by `scale`; a query at `p` sees
/// keys `t ≤ p` with `p - t < window`. Writes `out` (like `q`). Runs across the pool, with the
/// kernels of [`Isa::detect`].
#[allow(clippy::too_many_arguments)]
pub fn attention<T: KvValue>(
    q: &[f32],
    k: &[T],
    v: &[T],
    h: Heads,
    pos: usize,
    window: Option<usize>,
    scale: f32,
    out: &mut [f32],
) -> Result<(), KernelError> {
    attention_with(Isa::detect(), q, k, v, h, pos, window, scale, out)
}

/// [`attention`] with the kernels of `isa` (one this CPU runs: a better one than
/// [`Isa::best`] falls back to it).
#[allow(clippy::too_many_arguments)]
pub fn attention_with<T: KvValue>(
    isa: Isa,
    q: &[f32],
    k: &[T],
    v: &[T],
    h: Heads,
    pos: usize,
    window: Option<usize>,
    scale: f32,
    out: &mut [f32],
) -> Result<(), KernelError> {
    let seq = AttentionSeq {
        q,
        k,
        v,
        k_scales: &[],
        v_scales: &[],
        pos,
        out,
    };
    attention_batch_with(isa, &mut [seq], h, window, scale)
}

/// [`attention`] of several sequences, each over its own cache, in one hand-off to the pool
/// (a batched decode step's sequences, which each have too little work to share alone).
pub fn attention_batch<T: KvValue>(
    seqs: &mut [AttentionSeq<'_, T>],
    h: Heads,
    window: Option<usize>,
    scale: f32,
) -> Result<(), KernelError> {
    attention_batch_with(Isa::detect(), seqs, h, window, scale)
}

/// An [`AttentionSeq`] as the tasks share it.
struct SeqView<'a, T> {
    q: &'a [f32],
    k: &'a [T],
    v: &'a [T],
    k_scales: &'a [f32],
    v_scales: &'a [f32],
    pos: usize,
    out: SendPtr,
}

/// Query rows of one sequence in one attention task (a prompt's rows split so that a long
/// prompt's attention spreads over the pool).
const ROW_BLOCK: usize = 16;
/// Most query heads that one pass over a KV head's keys and values serves (the kernels'
/// registers).
const HEADS_PER_PASS: usize = 3;

/// [`attention_batch`] with the kernels of `isa`.
pub fn attention_batch_with<T: KvValue>(
    isa: Isa,
    seqs: &mut [AttentionSeq<'_, T>],
    h: Heads,
    window: Option<usize>,
    scale: f32,
) -> Result<(), KernelError> {
    let qw = h.n_head * h.head_dim;
    let kw = h.n_kv_head * h.head_dim;
    if qw == 0 || kw == 0 || !h.n_head.is_multiple_of(h.n_kv_head) {
        return Err(KernelError::Shape(format!("attention heads {h:?}")));
    }
    for s in seqs.iter() {
        if !s.q.len().is_multiple_of(qw) {
            return Err(KernelError::Shape(format!(
                "attention heads {h:?} for {} query values",
                s.q.len()
            )));
        }
        let rows = s.q.len() / qw;
        if s.out.len() != s.q.len()
            || s.k.len() < (s.pos + rows) * kw
            || s.v.len() < (s.pos + rows) * kw
        {
            return Err(KernelError::Shape(format!(
                "attention of {rows} rows at {}: {} keys, {} values, {} outputs",
                s.pos,
                s.k.len() / kw,
                s.v.len() / kw,
                s.out.len() / qw
            )));
        }
    }
    if T::BLOCK_SCALED && !seqs.is_empty() {
        if !h.head_dim.is_multiple_of(32) {
            return Err(KernelError::Shape(format!(
                "a block-scaled KV cache needs heads of a multiple of 32 values, not {}",
                h.head_dim
            )));
        }
        for s in seqs.iter() {
            let need = (s.pos + s.q.len() / qw) * kw / 32;
            if s.k_scales.len() < need || s.v_scales.len() < need {
                return Err(KernelError::Shape(format!(
                    "{} key and {} value scales for {need} blocks",
                    s.k_scales.len(),
                    s.v_scales.len()
                )));
            }
        }
    }
    let d = h.head_dim;
    let group = h.n_head / h.n_kv_head;
    let simd = isa >= Isa::Avx2 && isa.runs_here() && d.is_multiple_of(8);
    // The sequences' inputs, and their outputs as pointers that the tasks write disjoint
    // parts of.
    let seqs: Vec<SeqView<'_, T>> = seqs
        .iter_mut()
        .map(|s| SeqView {
            q: s.q,
            k: s.k,
            v: s.v,
            k_scales: s.k_scales,
            v_scales: s.v_scales,
            pos: s.pos,
            out: SendPtr(s.out.as_mut_ptr()),
        })
        .collect();
    // A task: a block of one sequence's rows against one KV head, for the query heads
    // `heads` of that KV head's group, which read the same keys and values. Whole groups
    // (up to HEADS_PER_PASS at a time) when there are enough tasks to go round the pool;
    // otherwise a task per query head.
    let blocks: Vec<(usize, usize, usize)> = seqs
        .iter()
        .enumerate()
        .flat_map(|(s, seq)| {
            let rows = seq.q.len() / qw;
            (0..rows)
                .step_by(ROW_BLOCK)
                .map(move |r| (s, r, (r + ROW_BLOCK).min(rows)))
        })
        .collect();
    let per_pass = if blocks.len() * h.n_kv_head >= 4 * pool::threads() {
        let passes = group.div_ceil(HEADS_PER_PASS);
        group.div_ceil(passes)
    } else {
        1
    };
    let mut tasks = Vec::new();
    for &(s, first_row, end_row) in &blocks {
        for head in (0..h.n_head).step_by(group) {
            let mut at = head;
            while at < head + group {
                let n = per_pass.min(head + group - at);
                tasks.push((s, first_row, end_row, at, n));
                at += n;
            }
        }
    }
    let task = |i: usize| {
        let (s, first_row, end_row, head, heads) = tasks[i];
        let SeqView {
            q,
            k,
            v,
            k_scales,
            v_scales,
            pos,
            ref out,
        } = seqs[s];
        let g = head / group;
        let mut scores = vec![0f32; heads * (pos + end_row)];
        let mut acc = vec![0f32; heads * d];
        let mut qh = vec![0f32; heads * d];
        let mut rounded = Vec::new();
        for i in first_row..end_row {
            let p = pos + i;
            let first = window.map_or(0, |w| (p + 1).saturating_sub(w));
            let n = p + 1 - first;
            let scores = &mut scores[..heads * n];
            let at = first * kw + g * d;
            // Block scales from the same start (`at` is a multiple of 32 where they exist).
            let sat = if T::BLOCK_SCALED { at / 32 } else { 0 };
            qh.copy_from_slice(&q[i * qw + head * d..][..heads * d]);
            T::round_queries(&mut qh, &mut rounded);
            let ks = &k_scales[sat.min(k_scales.len())..];
            group_scores(simd, heads, &qh, &k[at..], ks, kw, scale, scores);
            for s in scores.chunks_exact_mut(n) {
                softmax(simd, s);
                T::round_probs(s, &mut rounded);
            }
            acc.fill(0.0);
            let vs = &v_scales[sat.min(v_scales.len())..];
            group_mix(simd, heads, scores, &v[at..], vs, kw, &mut acc);
            // SAFETY: `out` is the sequence's `rows × qw` slice; this task alone writes
            // heads `head..head + heads` of its rows.
            let dst =
                unsafe { std::slice::from_raw_parts_mut(out.0.add(i * qw + head * d), heads * d) };
            dst.copy_from_slice(&acc);
        }
    };
    // Small attention (short contexts, one row) is not worth the hand-off.
    let work: usize = seqs
        .iter()
        .map(|s| {
            let rows = s.q.len() / qw;
            rows * (s.pos + rows)
        })
        .sum();
    if work * qw < 32 * 1024 {
        (0..tasks.len()).for_each(task);
    } else {
        pool::parallel_for(tasks.len(), &task);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn simd_here() -> bool {
        Isa::Avx2.runs_here()
    }

    /// Reproducible values in [−1, 1).
    fn values(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (s >> 8) as f32 / (1 << 23) as f32 - 1.0
            })
            .collect()
    }

    #[test]
    fn grouped_kernels_match_the_portable_loops() {
        if !simd_here() {
            return;
        }
        // Key counts around the four-key step, head widths around the column steps.
        for heads in 1..=3 {
            for d in [8, 16, 24, 40, 64, 128] {
                for n in 0..=9 {
                    let stride = 3 * d;
                    let q = values(heads * d, 1);
                    let kv = values(n.max(1) * stride, 2);
                    let mut want = vec![0f32; heads * n];
                    let mut got = want.clone();
                    group_scores(false, heads, &q, &kv, &[], stride, 0.3, &mut want);
                    group_scores(true, heads, &q, &kv, &[], stride, 0.3, &mut got);
                    for (a, b) in got.iter().zip(&want) {
                        assert!(
                            (a - b).abs() < 1e-5,
                            "scores h{heads} d{d} n{n}: {a} vs {b}"
                        );
                    }
                    let p = values(heads * n, 3);
                    let mut want = values(heads * d, 4);
                    let mut got = want.clone();
                    group_mix(false, heads, &p, &kv, &[], stride, &mut want);
                    group_mix(true, heads, &p, &kv, &[], stride, &mut got);
                    for (a, b) in got.iter().zip(&want) {
                        assert!((a - b).abs() < 1e-5, "mix h{heads} d{d} n{n}: {a} vs {b}");
                    }
                }
            }
        }
    }

    #[test]
    fn q8_0_kernels_match_the_portable_loops_and_the_dequantized_values() {
        if !simd_here() {
            return;
        }
        for heads in 1..=3 {
            // 544: three heads past what the integer kernel keeps on the stack.
            for d in [32, 64, 128, 544] {
                for n in 0..=9 {
                    let stride = 2 * d;
                    // Queries as the attention hands them over: rounded to q8_0 (which the
                    // integer kernel takes apart into blocks again, exactly).
                    let mut q = values(heads * d, 1);
                    i8::round_queries(&mut q, &mut Vec::new());
                    let f = values(n.max(1) * stride, 2);
                    let mut kv = vec![0i8; f.len()];
                    let mut scales = vec![0f32; f.len() / 32];
                    i8::narrow_slice(&f, &mut kv, &mut scales);
                    // What the blocks stand for, through the f32 kernels.
                    let mut deq = vec![0f32; kv.len()];
                    crate::act::dequantize_q8_0_into(&kv, &scales, &mut deq);
                    for x in (0..f.len()).step_by(37) {
                        assert!((deq[x] - f[x]).abs() <= 0.5 / 127.0 + 1e-6, "q8_0 rounding");
                    }
                    let mut want = vec![0f32; heads * n];
                    let mut portable = want.clone();
                    let mut got = want.clone();
                    group_scores(false, heads, &q, &deq, &[], stride, 0.3, &mut want);
                    group_scores(false, heads, &q, &kv, &scales, stride, 0.3, &mut portable);
                    group_scores(true, heads, &q, &kv, &scales, stride, 0.3, &mut got);
                    for ((a, b), c) in got.iter().zip(&want).zip(&portable) {
                        assert!((a - b).abs() < 1e-5 && (c - b).abs() < 1e-5, "scores");
                    }
                    let p = values(heads * n, 3);
                    let mut want = values(heads * d, 4);
                    let (mut portable, mut got) = (want.clone(), want.clone());
                    group_mix(false, heads, &p, &deq, &[], stride, &mut want);
                    group_mix(false, heads, &p, &kv, &scales, stride, &mut portable);
                    group_mix(true, heads, &p, &kv, &scales, stride, &mut got);
                    for ((a, b), c) in got.iter().zip(&want).zip(&portable) {
                        assert!((a - b).abs() < 1e-5 && (c - b).abs() < 1e-5, "mix");
                    }
                }
            }
        }
    }

    #[test]
    fn vector_softmax_matches_the_scalar_one() {
        if !simd_here() {
            return;
        }
        for n in 1..40 {
            let mut x: Vec<f32> = values(n, n as u32).iter().map(|v| v * 30.0).collect();
            if n > 5 {
                x[3] = f32::NEG_INFINITY;
            }
            let mut want = x.clone();
            softmax(false, &mut want);
            softmax(true, &mut x);
            for (a, b) in x.iter().zip(&want) {
                assert!(
                    (a - b).abs() <= 4.0 * f32::EPSILON * b.max(1e-30),
                    "n {n}: {a} vs {b}"
                );
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vector_exp_is_within_two_ulp() {
        use std::arch::x86_64::{_mm256_loadu_ps, _mm256_storeu_ps};
        if !simd_here() {
            return;
        }
        let exp8 = |x: [f32; 8]| {
            let mut out = [0f32; 8];
            // SAFETY: AVX2 and FMA checked above; eight values each way.
            unsafe {
                _mm256_storeu_ps(
                    out.as_mut_ptr(),
                    crate::x86::exp8(_mm256_loadu_ps(x.as_ptr())),
                )
            };
            out
        };
        let mut x = -100.0f32;
        while x < 88.0 {
            let got = exp8([x; 8])[0];
            let want = f64::from(x).exp();
            if x < -87.3 {
                assert_eq!(got, 0.0, "e^{x}");
            } else {
                let ulp = f64::from(f32::EPSILON) * want;
                assert!(
                    (f64::from(got) - want).abs() <= 2.0 * ulp,
                    "e^{x}: {got} vs {want}"
                );
            }
            x += 0.0037;
        }
        let special = exp8([
            f32::NEG_INFINITY,
            f32::NAN,
            0.0,
            -0.0,
            -87.5,
            1.0,
            88.0,
            -1.0,
        ]);
        assert_eq!(special[0], 0.0);
        assert!(special[1].is_nan());
        assert_eq!((special[2], special[3], special[4]), (1.0, 1.0, 0.0));
    }
}
