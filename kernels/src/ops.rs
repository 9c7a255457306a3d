//! The decoder's other operations over plain f32 rows: norms, rotary embedding, gated
//! activations and attention over an f16 or f32 KV cache laid out
//! `[position][kv_head][head_dim]`.
//!
//! A decode step of a small model is ~25 such operations per layer between the products;
//! through a tensor library each costs an allocation, a layout check and a dispatch (about
//! a third of a SmolLM2 decode step). Here each is one loop over the row, in place.

pub use half::f16;
use half::slice::HalfFloatSliceExt;

use crate::{pool, Isa, KernelError, SendPtr};

/// Σ a·b with eight independent partial sums (vectorizes without fast-math); `b` f32 or f16.
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
/// reads) or f32 (exact, like llama.cpp's `--cache-type-k f32`).
pub trait KvValue: Copy + Default + Send + Sync + sealed::Sealed + 'static {
    /// The value as f32, exactly.
    fn widen(self) -> f32;
    /// Rounds `src` into `dst` (same length).
    fn narrow_slice(src: &[f32], dst: &mut [Self]);
    /// Rounds attention probabilities to what the values are multiplied by: f16 for an f16
    /// cache, as llama.cpp's CPU attention does (its product with f16 values takes f16
    /// operands), so our near-ties break as the reference's do; unchanged for f32.
    fn round_probabilities(p: &mut [f32], scratch: &mut Vec<Self>);
    /// Eight values from `p`, widened to f32.
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
}

impl KvValue for f32 {
    #[inline]
    fn widen(self) -> f32 {
        self
    }
    fn narrow_slice(src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
    fn round_probabilities(_: &mut [f32], _: &mut Vec<f32>) {}
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
    fn narrow_slice(src: &[f32], dst: &mut [f16]) {
        dst.convert_from_f32_slice(src);
    }
    fn round_probabilities(p: &mut [f32], scratch: &mut Vec<f16>) {
        scratch.resize(p.len(), f16::ZERO);
        scratch.convert_from_f32_slice(p);
        scratch.convert_to_f32_slice(p);
    }
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(p: *const f16) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::{_mm256_cvtph_ps, _mm_loadu_si128};
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p.cast())) }
    }
}

/// `out[t] = scale · q·k_t` for the keys `k_t = k[t·stride..][..q.len()]`.
fn key_scores<T: KvValue>(
    simd: bool,
    q: &[f32],
    k: &[T],
    stride: usize,
    scale: f32,
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: `simd` is only set where `Isa::best` found AVX2, FMA and F16C.
        return unsafe { crate::x86::key_scores(q, k, stride, scale, out) };
    }
    let _ = simd;
    for (t, o) in out.iter_mut().enumerate() {
        *o = dot(q, &k[t * stride..][..q.len()]) * scale;
    }
}

/// `acc += Σ_t p[t] · v_t` for the values `v_t = v[t·stride..][..acc.len()]`.
fn mix_values<T: KvValue>(simd: bool, p: &[f32], v: &[T], stride: usize, acc: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: as in `key_scores`.
        return unsafe { crate::x86::mix_values(p, v, stride, acc) };
    }
    let _ = simd;
    let d = acc.len();
    for (t, &pt) in p.iter().enumerate() {
        for (a, x) in acc.iter_mut().zip(&v[t * stride..][..d]) {
            *a += pt * x.widen();
        }
    }
}

/// Causal attention of `rows` queries (`q`, `rows × n_head·head_dim`) at positions
/// `pos..pos + rows` over the keys and values of positions `0..pos + rows` (`k`, `v`:
/// `[position][n_kv_head·head_dim]`, f16 or f32), scores multiplied by `scale`; a query at
/// `p` sees keys `t ≤ p` with `p - t < window`. Writes `out` (like `q`). Heads run across the
/// pool, with the kernels of [`Isa::detect`].
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
    let qw = h.n_head * h.head_dim;
    let kw = h.n_kv_head * h.head_dim;
    if qw == 0 || kw == 0 || !h.n_head.is_multiple_of(h.n_kv_head) || !q.len().is_multiple_of(qw) {
        return Err(KernelError::Shape(format!(
            "attention heads {h:?} for {} query values",
            q.len()
        )));
    }
    let rows = q.len() / qw;
    if out.len() != q.len() || k.len() < (pos + rows) * kw || v.len() < (pos + rows) * kw {
        return Err(KernelError::Shape(format!(
            "attention of {rows} rows at {pos}: {} keys, {} values, {} outputs",
            k.len() / kw,
            v.len() / kw,
            out.len() / qw
        )));
    }
    let group = h.n_head / h.n_kv_head;
    let simd = isa >= Isa::Avx2 && isa.runs_here() && h.head_dim.is_multiple_of(8);
    let out_ptr = SendPtr(out.as_mut_ptr());
    let head_task = |head: usize| {
        let out_ptr = &out_ptr;
        let g = head / group;
        let mut scores = vec![0f32; pos + rows];
        let mut acc = vec![0f32; h.head_dim];
        let mut rounded = Vec::new();
        for i in 0..rows {
            let p = pos + i;
            let first = window.map_or(0, |w| (p + 1).saturating_sub(w));
            let qh = &q[i * qw + head * h.head_dim..][..h.head_dim];
            let scores = &mut scores[..p + 1 - first];
            let at = first * kw + g * h.head_dim;
            key_scores(simd, qh, &k[at..], kw, scale, scores);
            let max = scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
            let mut sum = 0f32;
            for s in scores.iter_mut() {
                *s = (*s - max).exp();
                sum += *s;
            }
            let inv = 1.0 / sum;
            scores.iter_mut().for_each(|s| *s *= inv);
            T::round_probabilities(scores, &mut rounded);
            acc.fill(0.0);
            mix_values(simd, scores, &v[at..], kw, &mut acc);
            // SAFETY: `out` is `rows × qw` (the caller's slice); this task alone writes head
            // `head` of each row.
            let dst = unsafe {
                std::slice::from_raw_parts_mut(
                    out_ptr.0.add(i * qw + head * h.head_dim),
                    h.head_dim,
                )
            };
            dst.copy_from_slice(&acc);
        }
    };
    // Small attention (short contexts, one row) is not worth the hand-off.
    if rows * (pos + rows) * h.n_head * h.head_dim < 32 * 1024 {
        (0..h.n_head).for_each(head_task);
    } else {
        pool::parallel_for(h.n_head, &head_task);
    }
    Ok(())
}
