//! The block layouts of each format, their dequantization, the portable dot kernels, and
//! which kernel serves a format on an instruction set.
//!
//! K-formats keep ggml's block layout. The 32-wide formats are repacked per row into planes
//! (same bytes, other order): the f16 scales of the row's blocks, then (Q4_1) their
//! minimums, then the quantized values of each block as ggml stores them. Kernels then load
//! eight scales with one instruction instead of converting one per block.

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
    let rows = data.len() / (blocks * format.block_bytes()).max(1);
    if tiled(format, rows) {
        return tile(format, &data, blocks);
    }
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

/// Weight rows interleaved in one tile of the tiled layout.
pub const TILE_ROWS: usize = 8;

/// Bytes of one Q4_K tile block: [`TILE_ROWS`] rows × 256 weights.
///
/// | bytes | what |
/// |---|---|
/// | 0..16 | `d` of each row, f16 |
/// | 16..32 | `dmin` of each row, f16 |
/// | 32..160 | per group `g` of 32 weights, 16 bytes: row `r`'s 6-bit scale at `2r` and `2r + 1` |
/// | 160..224 | per pair `p` of groups, 16 bytes: row `r`'s minimums of groups `2p`, `2p + 1` at `2r`, `2r + 1` |
/// | 224..1248 | per run `k` of 8 weights, 32 bytes: row `r`'s weights `8k + j` (low nibble) and `8k + j + 4` (high) at `4r + j` |
///
/// One 32-byte load then holds four weights of each of the eight rows, and a kernel
/// multiplies it by four broadcast activations: every lane works for its own row, with no
/// shuffle per block and no horizontal sum per row (llama.cpp's `q4_K_8x8` repacking).
pub const Q4K_TILE_BYTES: usize = 1248;

const Q4K_SCALES: usize = 32;
const Q4K_MINS: usize = 160;
const Q4K_VALUES: usize = 224;

/// Bytes of one Q6_K tile block: [`TILE_ROWS`] rows × 256 weights, the values' low four
/// bits and high two bits in separate planes as ggml keeps them, interleaved as in
/// [`Q4K_TILE_BYTES`].
///
/// | bytes | what |
/// |---|---|
/// | 0..16 | `d` of each row, f16 |
/// | 16..272 | per group `g` of 16 weights, 16 bytes: row `r`'s i8 scale at `2r` and `2r + 1` |
/// | 272..1296 | per run `k` of 8 weights, 32 bytes: low 4 bits of row `r`'s weights `8k + j` (low nibble) and `8k + j + 4` (high) at `4r + j` |
/// | 1296..1808 | per group `g`, 32 bytes: high 2 bits of row `r`'s weights `16g + j`, `+ 4`, `+ 8`, `+ 12` (bits 0-1, 2-3, 4-5, 6-7) at `4r + j` |
pub const Q6K_TILE_BYTES: usize = 1808;

const Q6K_SCALES: usize = 16;
const Q6K_LOW: usize = 272;
const Q6K_HIGH: usize = 1296;

/// Whether `rows` of `format` are stored in tiles of [`TILE_ROWS`] rows.
pub(crate) fn tiled(format: QFormat, rows: usize) -> bool {
    tile_bytes(format) > 0 && rows.is_multiple_of(TILE_ROWS)
}

/// Bytes of one tile block of `format`; 0: the format is not tiled.
pub(crate) const fn tile_bytes(format: QFormat) -> usize {
    match format {
        QFormat::Q4K => Q4K_TILE_BYTES,
        QFormat::Q6K => Q6K_TILE_BYTES,
        QFormat::Q4_0 | QFormat::Q4_1 | QFormat::Q8_0 => 0,
    }
}

/// `data` (ggml blocks of `format`, `blocks` per row, rows a multiple of [`TILE_ROWS`]) as
/// tiles: tile after tile, each its blocks in order.
fn tile(format: QFormat, data: &[u8], blocks: usize) -> Vec<u8> {
    let bb = format.block_bytes();
    let tb_len = tile_bytes(format);
    let tiles = data.len() / (bb * blocks * TILE_ROWS);
    let mut out = vec![0u8; tiles * blocks * tb_len];
    for (t, dst) in out.chunks_exact_mut(blocks * tb_len).enumerate() {
        for (b, tb) in dst.chunks_exact_mut(tb_len).enumerate() {
            for r in 0..TILE_ROWS {
                let at = ((t * TILE_ROWS + r) * blocks + b) * bb;
                let blk = &data[at..at + bb];
                if format == QFormat::Q4K {
                    tile_q4k_row(blk, tb, r);
                } else {
                    tile_q6k_row(blk, tb, r);
                }
            }
        }
    }
    out
}

/// Writes a Q4_K block as row `r` of tile block `tb`.
fn tile_q4k_row(blk: &[u8], tb: &mut [u8], r: usize) {
    tb[2 * r..2 * r + 2].copy_from_slice(&blk[0..2]);
    tb[16 + 2 * r..16 + 2 * r + 2].copy_from_slice(&blk[2..4]);
    let (q, sc, mn) = q4k_unpack(blk);
    for g in 0..8 {
        let s = Q4K_SCALES + 16 * g + 2 * r;
        tb[s] = sc[g];
        tb[s + 1] = sc[g];
        tb[Q4K_MINS + 16 * (g / 2) + 2 * r + g % 2] = mn[g];
    }
    for k in 0..32 {
        for j in 0..4 {
            tb[Q4K_VALUES + 32 * k + 4 * r + j] = q[8 * k + j] | (q[8 * k + j + 4] << 4);
        }
    }
}

/// Writes a Q6_K block as row `r` of tile block `tb`.
fn tile_q6k_row(blk: &[u8], tb: &mut [u8], r: usize) {
    tb[2 * r..2 * r + 2].copy_from_slice(&blk[208..210]);
    let (q, sc) = q6k_unpack(blk);
    // Back to 0..64, as stored.
    let u = |i: usize| (q[i] + 32) as u8;
    for g in 0..16 {
        let s = Q6K_SCALES + 16 * g + 2 * r;
        tb[s] = sc[g] as u8;
        tb[s + 1] = sc[g] as u8;
        for j in 0..4 {
            let w = 16 * g + j;
            tb[Q6K_HIGH + 32 * g + 4 * r + j] = (u(w) >> 4)
                | ((u(w + 4) >> 4) << 2)
                | ((u(w + 8) >> 4) << 4)
                | ((u(w + 12) >> 4) << 6);
        }
    }
    for k in 0..32 {
        for j in 0..4 {
            tb[Q6K_LOW + 32 * k + 4 * r + j] = (u(8 * k + j) & 15) | ((u(8 * k + j + 4) & 15) << 4);
        }
    }
}

/// Row `r` of a Q6_K tile block: its values (-32..32), group scales and `d`.
fn q6k_tile_row(tb: &[u8], r: usize) -> ([i8; 256], [i8; 16], f32) {
    let mut q = [0i8; 256];
    let mut sc = [0i8; 16];
    for g in 0..16 {
        sc[g] = tb[Q6K_SCALES + 16 * g + 2 * r] as i8;
        for j in 0..4 {
            let h = tb[Q6K_HIGH + 32 * g + 4 * r + j];
            for (i, off) in [0, 4, 8, 12].into_iter().enumerate() {
                let w = 16 * g + j + off;
                // Weight w's low bits: run w / 8, lane 4r + w % 4, high nibble if w % 8 >= 4.
                let byte = tb[Q6K_LOW + 32 * (w / 8) + 4 * r + w % 4];
                let low = (byte >> (4 * (w % 8 / 4))) & 15;
                q[w] = (low | (((h >> (2 * i)) & 3) << 4)) as i8 - 32;
            }
        }
    }
    (q, sc, f16_at(tb, 2 * r))
}

/// Row `r` of a Q4_K tile block: its values, group scales and minimums, `d` and `dmin`.
fn q4k_tile_row(tb: &[u8], r: usize) -> ([u8; 256], [u8; 8], [u8; 8], f32, f32) {
    let mut q = [0u8; 256];
    let mut sc = [0u8; 8];
    let mut mn = [0u8; 8];
    for g in 0..8 {
        sc[g] = tb[Q4K_SCALES + 16 * g + 2 * r];
        mn[g] = tb[Q4K_MINS + 16 * (g / 2) + 2 * r + g % 2];
    }
    for k in 0..32 {
        for j in 0..4 {
            let v = tb[Q4K_VALUES + 32 * k + 4 * r + j];
            q[8 * k + j] = v & 15;
            q[8 * k + j + 4] = v >> 4;
        }
    }
    (q, sc, mn, f16_at(tb, 2 * r), f16_at(tb, 16 + 2 * r))
}

/// Dots one tile row of blocks with `count` activation rows from `first` on, writing row
/// `first + i`'s [`TILE_ROWS`] outputs at `out + i · stride`.
///
/// # Safety
/// As [`DotFn`], and `out` must be valid for those writes.
pub type TileFn<A> =
    unsafe fn(w: &[u8], a: &A, first: usize, count: usize, out: *mut f32, stride: usize);

/// The kernel for tiles of `format` on `isa`.
pub fn tile_dot(format: QFormat, isa: Isa) -> Option<TileFn<Acts256>> {
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx2 {
        return match format {
            QFormat::Q4K => Some(crate::x86::q4k_tiles),
            QFormat::Q6K => Some(crate::x86::q6k_tiles),
            QFormat::Q4_0 | QFormat::Q4_1 | QFormat::Q8_0 => None,
        };
    }
    let _ = isa;
    match format {
        QFormat::Q4K => Some(q4k_tiles),
        QFormat::Q6K => Some(q6k_tiles),
        QFormat::Q4_0 | QFormat::Q4_1 | QFormat::Q8_0 => None,
    }
}

/// The portable Q6_K tile kernel: the row kernel's arithmetic, row by row of the tile.
///
/// # Safety
/// See [`TileFn`].
unsafe fn q6k_tiles(
    w: &[u8],
    a: &Acts256,
    first: usize,
    count: usize,
    out: *mut f32,
    stride: usize,
) {
    let blocks = a.blocks;
    for r in 0..TILE_ROWS {
        let rows: Vec<_> = (0..blocks)
            .map(|b| q6k_tile_row(&w[b * Q6K_TILE_BYTES..], r))
            .collect();
        for i in 0..count {
            let acts = &a.data[(first + i) * blocks..(first + i + 1) * blocks];
            let mut acc = 0f32;
            for ((q, sc, d), act) in rows.iter().zip(acts) {
                acc += q6k_block_dot(q, sc, *d, act);
            }
            // SAFETY: the caller's contract.
            unsafe { *out.add(i * stride + r) = acc };
        }
    }
}

/// The portable Q4_K tile kernel: the row kernel's arithmetic, row by row of the tile.
///
/// # Safety
/// See [`TileFn`].
unsafe fn q4k_tiles(
    w: &[u8],
    a: &Acts256,
    first: usize,
    count: usize,
    out: *mut f32,
    stride: usize,
) {
    let blocks = a.blocks;
    for r in 0..TILE_ROWS {
        let rows: Vec<_> = (0..blocks)
            .map(|b| q4k_tile_row(&w[b * Q4K_TILE_BYTES..], r))
            .collect();
        for i in 0..count {
            let acts = &a.data[(first + i) * blocks..(first + i + 1) * blocks];
            let mut acc = 0f32;
            for ((q, sc, mn, d, dmin), act) in rows.iter().zip(acts) {
                acc += q4k_block_dot(q, sc, mn, *d, *dmin, act);
            }
            // SAFETY: the caller's contract.
            unsafe { *out.add(i * stride + r) = acc };
        }
    }
}

/// One unpacked Q4_K block dotted with 256 activations.
fn q4k_block_dot(
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
pub(crate) fn planes(format: QFormat, row: &[u8], blocks: usize) -> (&[u8], &[u8], &[u8]) {
    let (_, mins) = planar(format);
    let (scales, rest) = row.split_at(2 * blocks);
    let (m, values) = rest.split_at(if mins { 2 * blocks } else { 0 });
    (scales, m, values)
}

/// The kernel for a 32-wide format on `isa`.
pub fn dot32(format: QFormat, isa: Isa) -> Option<DotFn<Acts32>> {
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
pub fn dot256(format: QFormat, isa: Isa) -> Option<DotFn<Acts256>> {
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

/// The integer value of weight `i` of a block's values in `format`.
fn value(format: QFormat, qs: &[u8], i: usize) -> i32 {
    match format {
        QFormat::Q8_0 => i32::from(qs[i] as i8),
        _ => i32::from(if i < 16 { qs[i] & 15 } else { qs[i - 16] >> 4 }),
    }
}

fn rows32(format: QFormat, w: &[u8], a: &Acts32, first: usize, out: &mut [f32]) {
    let nb = a.blocks;
    let (qs_bytes, _) = planar(format);
    let (scales, mins, values) = planes(format, w, nb);
    for (r, o) in out.iter_mut().enumerate() {
        let row = first + r;
        let mut acc = 0f32;
        for b in 0..nb {
            let qs = &values[qs_bytes * b..];
            let aq = &a.qs[(row * nb + b) * 32..][..32];
            let dot: i32 = (0..32)
                .map(|i| value(format, qs, i) * i32::from(aq[i]))
                .sum();
            let (d, ad, s) = (f16_at(scales, 2 * b), a.d[row * nb + b], a.s[row * nb + b]);
            acc += d * ad * dot as f32;
            acc += match format {
                QFormat::Q4_0 => -8.0 * d * s,
                QFormat::Q4_1 => f16_at(mins, 2 * b) * s,
                _ => 0.0,
            };
        }
        *o = acc;
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
fn q6k_block_dot(q: &[i8; 256], sc: &[i8; 16], d: f32, act: &Act256) -> f32 {
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
        let nb = out.len() / 32;
        let (scales, mins, values) = planes(format, row, nb);
        for (b, y) in out.chunks_exact_mut(32).enumerate() {
            let d = f16_at(scales, 2 * b);
            let qs = &values[qs_bytes * b..];
            for (i, v) in y.iter_mut().enumerate() {
                let q = value(format, qs, i);
                *v = match format {
                    QFormat::Q4_0 => (q - 8) as f32 * d,
                    QFormat::Q4_1 => q as f32 * d + f16_at(mins, 2 * b),
                    _ => q as f32 * d,
                };
            }
        }
        return;
    }
    for (b, y) in row
        .chunks_exact(format.block_bytes())
        .zip(out.chunks_exact_mut(n))
    {
        if format == QFormat::Q4K {
            let (q, sc, mn) = q4k_unpack(b);
            let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
            for (i, v) in y.iter_mut().enumerate() {
                let g = i / 32;
                *v = d * f32::from(sc[g]) * f32::from(q[i]) - dmin * f32::from(mn[g]);
            }
        } else {
            let (q, sc) = q6k_unpack(b);
            let d = f16_at(b, 208);
            for (i, v) in y.iter_mut().enumerate() {
                *v = d * f32::from(sc[i / 16]) * f32::from(q[i]);
            }
        }
    }
}

/// Row `r` of a tiled matrix of `format` (`blocks` per row) as f32 into `out`.
pub(crate) fn dequantize_tiled(
    format: QFormat,
    data: &[u8],
    blocks: usize,
    r: usize,
    out: &mut [f32],
) {
    let tb_len = tile_bytes(format);
    let tile = &data[r / TILE_ROWS * blocks * tb_len..];
    for (b, y) in out.chunks_exact_mut(256).enumerate() {
        let tb = &tile[b * tb_len..];
        if format == QFormat::Q4K {
            let (q, sc, mn, d, dmin) = q4k_tile_row(tb, r % TILE_ROWS);
            for (i, v) in y.iter_mut().enumerate() {
                let g = i / 32;
                *v = d * f32::from(sc[g]) * f32::from(q[i]) - dmin * f32::from(mn[g]);
            }
        } else {
            let (q, sc, d) = q6k_tile_row(tb, r % TILE_ROWS);
            for (i, v) in y.iter_mut().enumerate() {
                *v = d * f32::from(sc[i / 16]) * f32::from(q[i]);
            }
        }
    }
}
