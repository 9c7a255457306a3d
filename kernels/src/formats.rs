//! The block layouts of each format (as ggml writes them), their dequantization, the portable
//! dot kernels, and which kernel serves a format on an instruction set.

use half::f16;

use crate::act::{Act256, Act32};
use crate::{Isa, QFormat};

/// Dots one weight row (`blocks` blocks) with `out.len()` activation rows (`a`, `blocks` each,
/// one after the other) into `out`.
///
/// # Safety
/// The kernel's instruction set must be present, `w` must hold `blocks` blocks and `a`
/// `out.len() × blocks` activations.
pub type DotFn<A> = unsafe fn(w: &[u8], a: &[A], blocks: usize, out: &mut [f32]);

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
}

/// The kernel for a 32-wide format on `isa`.
pub fn dot32(format: QFormat, isa: Isa) -> Option<DotFn<Act32>> {
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx2 {
        return Some(match format {
            QFormat::Q4_0 => crate::x86::q4_0,
            QFormat::Q4_1 => crate::x86::q4_1,
            QFormat::Q8_0 => crate::x86::q8_0,
            QFormat::Q4K | QFormat::Q6K => return None,
        });
    }
    let _ = isa;
    Some(match format {
        QFormat::Q4_0 => q4_0,
        QFormat::Q4_1 => q4_1,
        QFormat::Q8_0 => q8_0,
        QFormat::Q4K | QFormat::Q6K => return None,
    })
}

/// The kernel for a 256-wide format on `isa`.
pub fn dot256(format: QFormat, isa: Isa) -> Option<DotFn<Act256>> {
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx2 {
        return Some(match format {
            QFormat::Q4K => crate::x86::q4k,
            QFormat::Q6K => crate::x86::q6k,
            QFormat::Q4_0 | QFormat::Q4_1 | QFormat::Q8_0 => return None,
        });
    }
    let _ = isa;
    Some(match format {
        QFormat::Q4K => q4k,
        QFormat::Q6K => q6k,
        QFormat::Q4_0 | QFormat::Q4_1 | QFormat::Q8_0 => return None,
    })
}

/// Integer dot of a 32-block's weights (given as `w(i)`) with one activation block.
fn idot32(a: &Act32, w: impl Fn(usize) -> i32) -> i32 {
    (0..32).map(|i| w(i) * i32::from(a.qs[i])).sum()
}

fn nibble(qs: &[u8], i: usize) -> i32 {
    i32::from(if i < 16 { qs[i] & 15 } else { qs[i - 16] >> 4 })
}

fn rows32(
    w: &[u8],
    a: &[Act32],
    blocks: usize,
    out: &mut [f32],
    bytes: usize,
    block: impl Fn(&[u8], &Act32) -> f32,
) {
    for (r, o) in out.iter_mut().enumerate() {
        let acts = &a[r * blocks..(r + 1) * blocks];
        *o = w
            .chunks_exact(bytes)
            .zip(acts)
            .map(|(b, act)| block(b, act))
            .sum();
    }
}

fn q4_0(w: &[u8], a: &[Act32], blocks: usize, out: &mut [f32]) {
    rows32(w, a, blocks, out, 18, |b, act| {
        let d = f16_at(b, 0);
        d * act.d * idot32(act, |i| nibble(&b[2..], i) - 8) as f32
    })
}

fn q4_1(w: &[u8], a: &[Act32], blocks: usize, out: &mut [f32]) {
    rows32(w, a, blocks, out, 20, |b, act| {
        let (d, m) = (f16_at(b, 0), f16_at(b, 2));
        d * act.d * idot32(act, |i| nibble(&b[4..], i)) as f32 + m * act.s
    })
}

fn q8_0(w: &[u8], a: &[Act32], blocks: usize, out: &mut [f32]) {
    rows32(w, a, blocks, out, 34, |b, act| {
        let d = f16_at(b, 0);
        d * act.d * idot32(act, |i| i32::from(b[2 + i] as i8)) as f32
    })
}

/// A Q4_K block's 256 4-bit values, its 8 group scales and minimums.
fn q4k_unpack(b: &[u8]) -> ([u8; 256], [u8; 8], [u8; 8]) {
    let (sc, mn) = q4k_scales_mins(&b[4..16]);
    let mut q = [0u8; 256];
    let qs = &b[16..144];
    for j in 0..4 {
        for l in 0..32 {
            q[64 * j + l] = qs[32 * j + l] & 15;
            q[64 * j + 32 + l] = qs[32 * j + l] >> 4;
        }
    }
    (q, sc, mn)
}

/// The 6-bit scales and minimums of a Q4_K block's 8 groups (ggml's `get_scale_min_k4`).
pub fn q4k_scales_mins(s: &[u8]) -> ([u8; 8], [u8; 8]) {
    let mut sc = [0u8; 8];
    let mut mn = [0u8; 8];
    for j in 0..8 {
        if j < 4 {
            sc[j] = s[j] & 63;
            mn[j] = s[j + 4] & 63;
        } else {
            sc[j] = (s[j + 4] & 0xf) | ((s[j - 4] >> 6) << 4);
            mn[j] = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
        }
    }
    (sc, mn)
}

/// A Q6_K block's 256 values (-32..32) and its 16 group scales.
fn q6k_unpack(b: &[u8]) -> ([i8; 256], [i8; 16]) {
    let mut q = [0i8; 256];
    for half in 0..2 {
        let ql = &b[64 * half..];
        let qh = &b[128 + 32 * half..];
        let y = &mut q[128 * half..];
        for l in 0..32 {
            let h = qh[l];
            y[l] = ((ql[l] & 15) | ((h & 3) << 4)) as i8 - 32;
            y[l + 32] = ((ql[l + 32] & 15) | (((h >> 2) & 3) << 4)) as i8 - 32;
            y[l + 64] = ((ql[l] >> 4) | (((h >> 4) & 3) << 4)) as i8 - 32;
            y[l + 96] = ((ql[l + 32] >> 4) | (((h >> 6) & 3) << 4)) as i8 - 32;
        }
    }
    let mut sc = [0i8; 16];
    for (s, &v) in sc.iter_mut().zip(&b[192..208]) {
        *s = v as i8;
    }
    (q, sc)
}

fn q4k(w: &[u8], a: &[Act256], blocks: usize, out: &mut [f32]) {
    for (r, o) in out.iter_mut().enumerate() {
        let mut acc = 0f32;
        for (b, act) in w.chunks_exact(144).zip(&a[r * blocks..(r + 1) * blocks]) {
            let (q, sc, mn) = q4k_unpack(b);
            let (mut sumi, mut summ) = (0i32, 0i32);
            for g in 0..8 {
                let dot: i32 = (0..32)
                    .map(|i| i32::from(q[32 * g + i]) * i32::from(act.qs[32 * g + i]))
                    .sum();
                sumi += i32::from(sc[g]) * dot;
                let s = i32::from(act.bsums[2 * g]) + i32::from(act.bsums[2 * g + 1]);
                summ += i32::from(mn[g]) * s;
            }
            acc += f16_at(b, 0) * act.d * sumi as f32 - f16_at(b, 2) * act.d * summ as f32;
        }
        *o = acc;
    }
}

fn q6k(w: &[u8], a: &[Act256], blocks: usize, out: &mut [f32]) {
    for (r, o) in out.iter_mut().enumerate() {
        let mut acc = 0f32;
        for (b, act) in w.chunks_exact(210).zip(&a[r * blocks..(r + 1) * blocks]) {
            let (q, sc) = q6k_unpack(b);
            let mut sumi = 0i32;
            for g in 0..16 {
                let dot: i32 = (0..16)
                    .map(|i| i32::from(q[16 * g + i]) * i32::from(act.qs[16 * g + i]))
                    .sum();
                sumi += i32::from(sc[g]) * dot;
            }
            acc += f16_at(b, 208) * act.d * sumi as f32;
        }
        *o = acc;
    }
}

/// One row of `format` blocks (`row`) as f32 into `out`.
pub fn dequantize(format: QFormat, row: &[u8], out: &mut [f32]) {
    let n = format.block_len();
    for (b, y) in row
        .chunks_exact(format.block_bytes())
        .zip(out.chunks_exact_mut(n))
    {
        match format {
            QFormat::Q4_0 => {
                let d = f16_at(b, 0);
                for (i, v) in y.iter_mut().enumerate() {
                    *v = (nibble(&b[2..], i) - 8) as f32 * d;
                }
            }
            QFormat::Q4_1 => {
                let (d, m) = (f16_at(b, 0), f16_at(b, 2));
                for (i, v) in y.iter_mut().enumerate() {
                    *v = nibble(&b[4..], i) as f32 * d + m;
                }
            }
            QFormat::Q8_0 => {
                let d = f16_at(b, 0);
                for (i, v) in y.iter_mut().enumerate() {
                    *v = f32::from(b[2 + i] as i8) * d;
                }
            }
            QFormat::Q4K => {
                let (q, sc, mn) = q4k_unpack(b);
                let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
                for (i, v) in y.iter_mut().enumerate() {
                    let g = i / 32;
                    *v = d * f32::from(sc[g]) * f32::from(q[i]) - dmin * f32::from(mn[g]);
                }
            }
            QFormat::Q6K => {
                let (q, sc) = q6k_unpack(b);
                let d = f16_at(b, 208);
                for (i, v) in y.iter_mut().enumerate() {
                    *v = d * f32::from(sc[i / 16]) * f32::from(q[i]);
                }
            }
        }
    }
}
