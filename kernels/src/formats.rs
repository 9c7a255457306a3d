//! The block layouts of each format, their dequantization, the portable dot kernels, and
//! which kernel serves a format on an instruction set.
//!
//! Matrices of a multiple of eight rows are stored in tiles (`tiles`); this module's layouts
//! and kernels serve the others. There, K-formats keep ggml's block layout, and the 32-wide
//! formats are repacked per row into planes (same bytes, other order): the f16 scales of the
//! row's blocks, then (Q4_1) their minimums, then the quantized values of each block as ggml
//! stores them. Kernels then load eight scales with one instruction instead of converting one
//! per block.

use half::f16;

use crate::act::{Act256, Acts256, Acts32};
use crate::{Isa, QFormat};

/// Dots one weight row with `out.len()` activation rows from `first` on into `out`.
///
/// # Safety
/// The kernel's instruction set must be present, `w` must be one row of the format with as
/// many blocks as the activations' rows, and `a` must hold rows `first..first + out.len()`.
pub type DotFn<A> = unsafe fn(w: &[u8], a: &A, first: usize, out: &mut [f32]);

pub(crate) fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
}

/// Bytes of one block's quantized values in a 32-wide format, and whether it has minimums.
pub(crate) const fn planar(format: QFormat) -> (usize, bool) {
    match format {
        QFormat::Q4_0 => (16, false),
        QFormat::Q4_1 => (16, true),
        QFormat::Q8_0 => (32, false),
        QFormat::Q4K | QFormat::Q6K => (0, false),
    }
}

/// `data` (ggml blocks, `blocks` per row) in this crate's row layout for `format`.
pub fn repack(format: QFormat, data: Vec<u8>, blocks: usize) -> Vec<u8> {
    let (qs, mins) = planar(format);
    if qs == 0 {
        return data;
    }
    let bb = format.block_bytes();
    let mut out = vec![0u8; data.len()];
    for (src, dst) in data
        .chunks_exact(blocks * bb)
        .zip(out.chunks_exact_mut(blocks * bb))
    {
        let (scales, rest) = dst.split_at_mut(2 * blocks);
        let (min_plane, values) = rest.split_at_mut(if mins { 2 * blocks } else { 0 });
        for (b, blk) in src.chunks_exact(bb).enumerate() {
            scales[2 * b..2 * b + 2].copy_from_slice(&blk[0..2]);
            if mins {
                min_plane[2 * b..2 * b + 2].copy_from_slice(&blk[2..4]);
            }
            values[qs * b..qs * (b + 1)].copy_from_slice(&blk[bb - qs..]);
        }
    }
    out
}

/// One unpacked Q4_K block dotted with 256 activations.
pub(crate) fn q4k_block_dot(
    q: &[u8; 256],
    sc: &[u8; 8],
    mn: &[u8; 8],
    d: f32,
    dmin: f32,
    act: &Act256,
) -> f32 {
    let (mut sumi, mut summ) = (0i32, 0i32);
    for g in 0..8 {
        let dot: i32 = (0..32)
            .map(|i| i32::from(q[32 * g + i]) * i32::from(act.qs[32 * g + i]))
            .sum();
        sumi += i32::from(sc[g]) * dot;
        let s = i32::from(act.bsums[2 * g]) + i32::from(act.bsums[2 * g + 1]);
        summ += i32::from(mn[g]) * s;
    }
    d * act.d * sumi as f32 - dmin * act.d * summ as f32
}

/// A repacked row's planes: scales, minimums (empty without), values.
pub(crate) type Planes<'a> = (&'a [u8], &'a [u8], &'a [u8]);

/// The [`Planes`] of a repacked row of `blocks` blocks.
pub(crate) fn planes(format: QFormat, row: &[u8], blocks: usize) -> Planes<'_> {
    let (_, mins) = planar(format);
    let (scales, rest) = row.split_at(2 * blocks);
    let (m, values) = rest.split_at(if mins { 2 * blocks } else { 0 });
    (scales, m, values)
}

/// The kernel for a 32-wide format on `isa`.
pub fn dot32(format: QFormat, isa: Isa) -> Option<DotFn<Acts32>> {
    #[cfg(target_arch = "x86_64")]
    if isa >= Isa::Avx2 {
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
pub fn dot256(format: QFormat, isa: Isa) -> Option<DotFn<Acts256>> {
    #[cfg(target_arch = "x86_64")]
    if isa >= Isa::Avx2 {
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

/// The integer value of weight `i` of a block's values in `format`.
pub(crate) fn value(format: QFormat, qs: &[u8], i: usize) -> i32 {
    match format {
        QFormat::Q8_0 => i32::from(qs[i] as i8),
        _ => i32::from(if i < 16 { qs[i] & 15 } else { qs[i - 16] >> 4 }),
    }
}

fn rows32(format: QFormat, w: &[u8], a: &Acts32, first: usize, out: &mut [f32]) {
    let nb = a.blocks;
    let planes = planes(format, w, nb);
    for (r, o) in out.iter_mut().enumerate() {
        let row = first + r;
        let mut acc = 0f32;
        for b in 0..nb {
            let block = planar_block(format, planes, b);
            add_block32_dot(&mut acc, format, &block, a, row * nb + b);
        }
        *o = acc;
    }
}

/// A block of a 32-wide format, unpacked: its integer values, scale and minimum (0 without).
pub(crate) type Block32 = ([i32; 32], f32, f32);

/// Block `b` of a 32-wide row in this crate's row layout (its [`planes`]), unpacked.
fn planar_block(format: QFormat, (scales, mins, values): Planes<'_>, b: usize) -> Block32 {
    let qs = &values[planar(format).0 * b..];
    let m = if mins.is_empty() {
        0.0
    } else {
        f16_at(mins, 2 * b)
    };
    let q = std::array::from_fn(|i| value(format, qs, i));
    (q, f16_at(scales, 2 * b), m)
}

/// `acc +=` an unpacked 32-wide block dotted with activation block `at` of `a`.
pub(crate) fn add_block32_dot(
    acc: &mut f32,
    format: QFormat,
    block: &Block32,
    a: &Acts32,
    at: usize,
) {
    let (q, d, m) = block;
    let aq = &a.qs[at * 32..][..32];
    let dot: i32 = q.iter().zip(aq).map(|(&q, &x)| q * i32::from(x)).sum();
    let (ad, s) = (a.d[at], a.s[at]);
    *acc += d * ad * dot as f32;
    *acc += match format {
        QFormat::Q4_0 => -8.0 * d * s,
        QFormat::Q4_1 => m * s,
        _ => 0.0,
    };
}

/// An unpacked 32-wide block's weights as f32 into `y`.
pub(crate) fn dequantize32(format: QFormat, (q, d, m): &Block32, y: &mut [f32]) {
    for (v, &q) in y.iter_mut().zip(q) {
        *v = match format {
            QFormat::Q4_0 => (q - 8) as f32 * d,
            QFormat::Q4_1 => q as f32 * d + m,
            _ => q as f32 * d,
        };
    }
}

/// An unpacked Q4_K block's weights as f32 into `y`.
pub(crate) fn dequantize_q4k(
    (q, sc, mn): (&[u8; 256], &[u8; 8], &[u8; 8]),
    d: f32,
    dmin: f32,
    y: &mut [f32],
) {
    for (i, v) in y.iter_mut().enumerate() {
        let g = i / 32;
        *v = d * f32::from(sc[g]) * f32::from(q[i]) - dmin * f32::from(mn[g]);
    }
}

/// An unpacked Q6_K block's weights as f32 into `y`.
pub(crate) fn dequantize_q6k(q: &[i8; 256], sc: &[i8; 16], d: f32, y: &mut [f32]) {
    for (i, v) in y.iter_mut().enumerate() {
        *v = d * f32::from(sc[i / 16]) * f32::from(q[i]);
    }
}

fn q4_0(w: &[u8], a: &Acts32, first: usize, out: &mut [f32]) {
    rows32(QFormat::Q4_0, w, a, first, out)
}

fn q4_1(w: &[u8], a: &Acts32, first: usize, out: &mut [f32]) {
    rows32(QFormat::Q4_1, w, a, first, out)
}

fn q8_0(w: &[u8], a: &Acts32, first: usize, out: &mut [f32]) {
    rows32(QFormat::Q8_0, w, a, first, out)
}

/// A Q4_K block's 256 4-bit values, its 8 group scales and minimums.
pub(crate) fn q4k_unpack(b: &[u8]) -> ([u8; 256], [u8; 8], [u8; 8]) {
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
pub(crate) fn q6k_unpack(b: &[u8]) -> ([i8; 256], [i8; 16]) {
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

fn q4k(w: &[u8], a: &Acts256, first: usize, out: &mut [f32]) {
    let blocks = a.blocks;
    for (r, o) in out.iter_mut().enumerate() {
        let mut acc = 0f32;
        let acts = &a.data[(first + r) * blocks..(first + r + 1) * blocks];
        for (b, act) in w.chunks_exact(144).zip(acts) {
            let (q, sc, mn) = q4k_unpack(b);
            acc += q4k_block_dot(&q, &sc, &mn, f16_at(b, 0), f16_at(b, 2), act);
        }
        *o = acc;
    }
}

fn q6k(w: &[u8], a: &Acts256, first: usize, out: &mut [f32]) {
    let blocks = a.blocks;
    for (r, o) in out.iter_mut().enumerate() {
        let mut acc = 0f32;
        let acts = &a.data[(first + r) * blocks..(first + r + 1) * blocks];
        for (b, act) in w.chunks_exact(210).zip(acts) {
            let (q, sc) = q6k_unpack(b);
            acc += q6k_block_dot(&q, &sc, f16_at(b, 208), act);
        }
        *o = acc;
    }
}

/// One unpacked Q6_K block dotted with 256 activations.
pub(crate) fn q6k_block_dot(q: &[i8; 256], sc: &[i8; 16], d: f32, act: &Act256) -> f32 {
    let mut sumi = 0i32;
    for g in 0..16 {
        let dot: i32 = (0..16)
            .map(|i| i32::from(q[16 * g + i]) * i32::from(act.qs[16 * g + i]))
            .sum();
        sumi += i32::from(sc[g]) * dot;
    }
    d * act.d * sumi as f32
}

/// One row of `format` (in this crate's layout) as f32 into `out`.
pub fn dequantize(format: QFormat, row: &[u8], out: &mut [f32]) {
    let n = format.block_len();
    let (qs_bytes, _) = planar(format);
    if qs_bytes > 0 {
        let planes = planes(format, row, out.len() / 32);
        for (b, y) in out.chunks_exact_mut(32).enumerate() {
            dequantize32(format, &planar_block(format, planes, b), y);
        }
        return;
    }
    for (b, y) in row
        .chunks_exact(format.block_bytes())
        .zip(out.chunks_exact_mut(n))
    {
        if format == QFormat::Q4K {
            let (q, sc, mn) = q4k_unpack(b);
            dequantize_q4k((&q, &sc, &mn), f16_at(b, 0), f16_at(b, 2), y);
        } else {
            let (q, sc) = q6k_unpack(b);
            dequantize_q6k(&q, &sc, f16_at(b, 208), y);
        }
    }
}
