//! AVX2 kernels (x86-64-v3: AVX2, FMA, F16C). Each is compiled for those features whatever the
//! build's baseline and is only called after [`crate::Isa::best`] found them.
//!
//! The integer core is llama.cpp's: unsigned 4-bit (or absolute 8-bit) weights times signed
//! 8-bit activations with `vpmaddubsw`, pairs summed to i32 with `vpmaddwd`, scaled to f32
//! once per block. No sum can saturate: |w| ≤ 128 and |a| ≤ 127 give pairs ≤ 32,512.

use std::arch::x86_64::*;

use crate::act::{Act256, Act32};

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f16_at(p: *const u8) -> f32 {
    let bits = unsafe { std::ptr::read_unaligned(p as *const u16) };
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(bits))))
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn hsum(x: __m256) -> f32 {
    let r = _mm_add_ps(_mm256_extractf128_ps(x, 1), _mm256_castps256_ps128(x));
    let r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    let r = _mm_add_ss(r, _mm_movehdup_ps(r));
    _mm_cvtss_f32(r)
}

/// 16 bytes of nibbles as 32 bytes: low nibbles (weights 0..16), then high (16..32).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn nibbles(p: *const u8) -> __m256i {
    let q = unsafe { _mm_loadu_si128(p as *const __m128i) };
    let mask = _mm_set1_epi8(0x0f);
    let lo = _mm_and_si128(q, mask);
    let hi = _mm_and_si128(_mm_srli_epi16(q, 4), mask);
    _mm256_set_m128i(hi, lo)
}

/// Σ w·a of 32 unsigned weights and 32 signed activations, as 8 f32 partial sums.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn dot_u8_i8(w: __m256i, a: __m256i) -> __m256 {
    let p = _mm256_madd_epi16(_mm256_maddubs_epi16(w, a), _mm256_set1_epi16(1));
    _mm256_cvtepi32_ps(p)
}

/// A 32-weight block format: how to unpack one block.
trait Block32 {
    const BYTES: usize;
    /// Whether the unpacked weights are signed (then dotted as |w| · sign(a, w)).
    const SIGNED: bool;
    /// The 32 weights as bytes, the scale, and what multiplies the activations' `s`.
    unsafe fn unpack(p: *const u8) -> (__m256i, f32, f32);
}

struct Q4_0;
struct Q4_1;
struct Q8_0;

impl Block32 for Q4_0 {
    const BYTES: usize = 18;
    const SIGNED: bool = false;
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn unpack(p: *const u8) -> (__m256i, f32, f32) {
        // (q - 8)·d·a summed = d·Σq·a - 8·d·Σa: the offset rides on the activations' sum.
        let d = unsafe { f16_at(p) };
        (unsafe { nibbles(p.add(2)) }, d, -8.0 * d)
    }
}

impl Block32 for Q4_1 {
    const BYTES: usize = 20;
    const SIGNED: bool = false;
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn unpack(p: *const u8) -> (__m256i, f32, f32) {
        unsafe { (nibbles(p.add(4)), f16_at(p), f16_at(p.add(2))) }
    }
}

impl Block32 for Q8_0 {
    const BYTES: usize = 34;
    const SIGNED: bool = true;
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn unpack(p: *const u8) -> (__m256i, f32, f32) {
        unsafe {
            (
                _mm256_loadu_si256(p.add(2) as *const __m256i),
                f16_at(p),
                0.0,
            )
        }
    }
}

/// One weight row (`blocks` blocks at `w`) against `R` activation rows.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile32<B: Block32, const R: usize>(
    w: &[u8],
    a: &[Act32],
    blocks: usize,
    out: &mut [f32],
) {
    let mut acc = [_mm256_setzero_ps(); R];
    let mut offs = [0f32; R];
    let wp = w.as_ptr();
    let ap = a.as_ptr();
    for b in 0..blocks {
        let (wv, d, m) = unsafe { B::unpack(wp.add(b * B::BYTES)) };
        let wabs = if B::SIGNED {
            _mm256_sign_epi8(wv, wv)
        } else {
            wv
        };
        for r in 0..R {
            let act = unsafe { &*ap.add(r * blocks + b) };
            let mut av = unsafe { _mm256_loadu_si256(act.qs.as_ptr() as *const __m256i) };
            if B::SIGNED {
                av = _mm256_sign_epi8(av, wv);
            }
            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * act.d), dot_u8_i8(wabs, av), acc[r]);
            offs[r] += m * act.s;
        }
    }
    for r in 0..R {
        out[r] = hsum(acc[r]) + offs[r];
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn rows32<B: Block32>(w: &[u8], a: &[Act32], blocks: usize, out: &mut [f32]) {
    debug_assert!(w.len() >= blocks * B::BYTES && a.len() >= out.len() * blocks);
    unsafe {
        match out.len() {
            4 => tile32::<B, 4>(w, a, blocks, out),
            3 => tile32::<B, 3>(w, a, blocks, out),
            2 => tile32::<B, 2>(w, a, blocks, out),
            1 => tile32::<B, 1>(w, a, blocks, out),
            n => {
                for r in 0..n {
                    tile32::<B, 1>(w, &a[r * blocks..], blocks, &mut out[r..r + 1]);
                }
            }
        }
    }
}

/// Q4_0 rows; see [`crate::formats::DotFn`].
pub unsafe fn q4_0(w: &[u8], a: &[Act32], blocks: usize, out: &mut [f32]) {
    unsafe { rows32::<Q4_0>(w, a, blocks, out) }
}

/// Q4_1 rows; see [`crate::formats::DotFn`].
pub unsafe fn q4_1(w: &[u8], a: &[Act32], blocks: usize, out: &mut [f32]) {
    unsafe { rows32::<Q4_1>(w, a, blocks, out) }
}

/// Q8_0 rows; see [`crate::formats::DotFn`].
pub unsafe fn q8_0(w: &[u8], a: &[Act32], blocks: usize, out: &mut [f32]) {
    unsafe { rows32::<Q8_0>(w, a, blocks, out) }
}

const SCALE_PAIRS: [[u8; 32]; 8] = {
    let mut t = [[0u8; 32]; 8];
    let mut i = 0;
    while i < 8 {
        let mut j = 0;
        while j < 32 {
            t[i][j] = (2 * i + j % 2) as u8;
            j += 1;
        }
        i += 1;
    }
    t
};

/// Q4_K rows (after llama.cpp's `ggml_vec_dot_q4_K_q8_K`); see [`crate::formats::DotFn`].
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn q4k(w: &[u8], a: &[Act256], blocks: usize, out: &mut [f32]) {
    let m4 = _mm256_set1_epi8(0x0f);
    for (r, o) in out.iter_mut().enumerate() {
        let mut acc = _mm256_setzero_ps();
        let mut acc_m = 0f32;
        for b in 0..blocks {
            let blk = &w[b * 144..(b + 1) * 144];
            let act = &a[r * blocks + b];
            let p = blk.as_ptr();
            let d = unsafe { f16_at(p) } * act.d;
            let dmin = unsafe { f16_at(p.add(2)) } * act.d;
            let (sc, mn) = crate::formats::q4k_scales_mins(&blk[4..16]);
            // Minimums: Σ over groups of min · (sum of that group's 32 activations).
            let mut msum = 0i32;
            for g in 0..8 {
                let s = i32::from(act.bsums[2 * g]) + i32::from(act.bsums[2 * g + 1]);
                msum += i32::from(mn[g]) * s;
            }
            acc_m -= dmin * msum as f32;
            let sc16 = unsafe { _mm_loadl_epi64(sc.as_ptr() as *const __m128i) };
            let sc16 = _mm256_cvtepu8_epi16(sc16);
            let scales = _mm256_permute2x128_si256(sc16, sc16, 0);
            let mut sumi = _mm256_setzero_si256();
            let q4 = unsafe { p.add(16) };
            let q8 = act.qs.as_ptr();
            for j in 0..4 {
                let shuf_l =
                    unsafe { _mm256_loadu_si256(SCALE_PAIRS[2 * j].as_ptr() as *const __m256i) };
                let shuf_h = unsafe {
                    _mm256_loadu_si256(SCALE_PAIRS[2 * j + 1].as_ptr() as *const __m256i)
                };
                let scale_l = _mm256_shuffle_epi8(scales, shuf_l);
                let scale_h = _mm256_shuffle_epi8(scales, shuf_h);
                let bits = unsafe { _mm256_loadu_si256(q4.add(32 * j) as *const __m256i) };
                let lo = _mm256_and_si256(bits, m4);
                let hi = _mm256_and_si256(_mm256_srli_epi16(bits, 4), m4);
                let al = unsafe { _mm256_loadu_si256(q8.add(64 * j) as *const __m256i) };
                let ah = unsafe { _mm256_loadu_si256(q8.add(64 * j + 32) as *const __m256i) };
                let pl = _mm256_madd_epi16(scale_l, _mm256_maddubs_epi16(lo, al));
                let ph = _mm256_madd_epi16(scale_h, _mm256_maddubs_epi16(hi, ah));
                sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(pl, ph));
            }
            acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
        }
        *o = hsum(acc) + acc_m;
    }
}

/// Q6_K rows (after llama.cpp's `ggml_vec_dot_q6_K_q8_K`); see [`crate::formats::DotFn`].
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn q6k(w: &[u8], a: &[Act256], blocks: usize, out: &mut [f32]) {
    let m4 = _mm256_set1_epi8(0x0f);
    let m2 = _mm256_set1_epi8(3);
    let m32 = _mm256_set1_epi8(32);
    for (r, o) in out.iter_mut().enumerate() {
        let mut acc = _mm256_setzero_ps();
        for b in 0..blocks {
            let p = unsafe { w.as_ptr().add(b * 210) };
            let act = &a[r * blocks + b];
            let d = unsafe { f16_at(p.add(208)) } * act.d;
            let scales = unsafe { p.add(192) } as *const i8;
            let mut sumi = _mm256_setzero_si256();
            for half in 0..2 {
                let ql = unsafe { p.add(64 * half) };
                let qh = unsafe { p.add(128 + 32 * half) };
                let q8 = unsafe { act.qs.as_ptr().add(128 * half) };
                let bits1 = unsafe { _mm256_loadu_si256(ql as *const __m256i) };
                let bits2 = unsafe { _mm256_loadu_si256(ql.add(32) as *const __m256i) };
                let bh = unsafe { _mm256_loadu_si256(qh as *const __m256i) };
                let h0 = _mm256_slli_epi16(_mm256_and_si256(bh, m2), 4);
                let h1 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(bh, 2), m2), 4);
                let h2 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(bh, 4), m2), 4);
                let h3 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(bh, 6), m2), 4);
                let q = [
                    _mm256_or_si256(_mm256_and_si256(bits1, m4), h0),
                    _mm256_or_si256(_mm256_and_si256(bits2, m4), h1),
                    _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(bits1, 4), m4), h2),
                    _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(bits2, 4), m4), h3),
                ];
                for (k, qk) in q.iter().enumerate() {
                    let av = unsafe { _mm256_loadu_si256(q8.add(32 * k) as *const __m256i) };
                    // (q - 32)·a = q·a - 32·a, both through vpmaddubsw.
                    let p16 = _mm256_sub_epi16(
                        _mm256_maddubs_epi16(*qk, av),
                        _mm256_maddubs_epi16(m32, av),
                    );
                    // Weights 0..16 of these 32 use one scale, 16..32 the next.
                    let s0 = i16::from(unsafe { *scales.add(8 * half + 2 * k) });
                    let s1 = i16::from(unsafe { *scales.add(8 * half + 2 * k + 1) });
                    let sc = _mm256_setr_m128i(_mm_set1_epi16(s0), _mm_set1_epi16(s1));
                    sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(sc, p16));
                }
            }
            acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
        }
        *o = hsum(acc);
    }
}
