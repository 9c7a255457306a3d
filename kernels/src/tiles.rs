//! The tiled layout: rows of a weight matrix interleaved by eight, so that one 32-byte load
//! holds four weights of each of eight rows and a kernel multiplies it by four broadcast
//! activations: every lane works for its own row, with no shuffle per block and no
//! horizontal sum per row (llama.cpp's `8x8` repacking). Matrices whose row count is a
//! multiple of [`TILE_ROWS`] are stored so; the portable kernels here compute what the row
//! kernels of `formats` do, row by row of a tile.

use crate::act::{Acts256, Acts32};
use crate::formats::{
    add_block32_dot, dequantize32, dequantize_q4k, dequantize_q6k, f16_at, planar, q4k_block_dot,
    q4k_unpack, q6k_block_dot, q6k_unpack, value, Block32,
};
use crate::{Isa, QFormat};

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
pub const Q4K_TILE_BYTES: usize = 1248;

/// Where a Q4_K tile block's scales, minimums and values start (see [`Q4K_TILE_BYTES`]).
pub(crate) const Q4K_SCALES: usize = 32;
pub(crate) const Q4K_MINS: usize = 160;
pub(crate) const Q4K_VALUES: usize = 224;

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

/// Where a Q6_K tile block's scales, low bits and high bits start (see [`Q6K_TILE_BYTES`]).
pub(crate) const Q6K_SCALES: usize = 16;
pub(crate) const Q6K_LOW: usize = 272;
pub(crate) const Q6K_HIGH: usize = 1296;

/// Bytes of one Q4_0 tile block, [`TILE_ROWS`] rows × 32 weights (as many as 8 blocks):
/// `d` of each row (f16), then per run `k` of 8 weights 32 bytes: row `r`'s weights `8k + j`
/// (low nibble) and `8k + j + 4` (high) at `4r + j`.
pub const Q4_0_TILE_BYTES: usize = 144;

/// Bytes of one Q4_1 tile block: as Q4_0's, with each row's minimum (f16) after the scales.
pub const Q4_1_TILE_BYTES: usize = 160;

/// Bytes of one Q8_0 tile block: `d` of each row (f16), then per run `k` of 4 weights 32
/// bytes: row `r`'s weights `4k + j` at `4r + j`.
pub const Q8_0_TILE_BYTES: usize = 272;

/// Where a 32-wide tile block's values start.
pub(crate) const fn values32(format: QFormat) -> usize {
    match format {
        QFormat::Q4_1 => 32,
        _ => 16,
    }
}

/// Whether a matrix of `rows` rows is stored in tiles of [`TILE_ROWS`] rows (every format
/// has a tiled layout).
pub(crate) fn tiled(rows: usize) -> bool {
    rows.is_multiple_of(TILE_ROWS)
}

/// Bytes of one tile block of `format`.
pub(crate) const fn tile_bytes(format: QFormat) -> usize {
    match format {
        QFormat::Q4K => Q4K_TILE_BYTES,
        QFormat::Q6K => Q6K_TILE_BYTES,
        QFormat::Q4_0 => Q4_0_TILE_BYTES,
        QFormat::Q4_1 => Q4_1_TILE_BYTES,
        QFormat::Q8_0 => Q8_0_TILE_BYTES,
    }
}

/// `data` (ggml blocks of `format`, `blocks` per row, rows a multiple of [`TILE_ROWS`]) as
/// tiles: tile after tile, each its blocks in order.
pub(crate) fn tile(format: QFormat, data: &[u8], blocks: usize) -> Vec<u8> {
    let bb = format.block_bytes();
    let tb_len = tile_bytes(format);
    let tiles = data.len() / (bb * blocks * TILE_ROWS);
    let mut out = vec![0u8; tiles * blocks * tb_len];
    for (t, dst) in out.chunks_exact_mut(blocks * tb_len).enumerate() {
        for (b, tb) in dst.chunks_exact_mut(tb_len).enumerate() {
            for r in 0..TILE_ROWS {
                let at = ((t * TILE_ROWS + r) * blocks + b) * bb;
                let blk = &data[at..at + bb];
                match format {
                    QFormat::Q4K => tile_q4k_row(blk, tb, r),
                    QFormat::Q6K => tile_q6k_row(blk, tb, r),
                    _ => tile32_row(format, blk, tb, r),
                }
            }
        }
    }
    out
}

/// Writes a block of a 32-wide format (ggml's layout) as row `r` of tile block `tb`.
fn tile32_row(format: QFormat, blk: &[u8], tb: &mut [u8], r: usize) {
    let bb = format.block_bytes();
    let (qs_bytes, mins) = planar(format);
    tb[2 * r..2 * r + 2].copy_from_slice(&blk[0..2]);
    if mins {
        tb[16 + 2 * r..16 + 2 * r + 2].copy_from_slice(&blk[2..4]);
    }
    let qs = &blk[bb - qs_bytes..];
    let v = values32(format);
    if format == QFormat::Q8_0 {
        for k in 0..8 {
            tb[v + 32 * k + 4 * r..v + 32 * k + 4 * r + 4].copy_from_slice(&qs[4 * k..4 * k + 4]);
        }
    } else {
        let q = |i: usize| value(format, qs, i) as u8;
        for k in 0..4 {
            for j in 0..4 {
                tb[v + 32 * k + 4 * r + j] = q(8 * k + j) | (q(8 * k + j + 4) << 4);
            }
        }
    }
}

/// Row `r` of a 32-wide tile block, unpacked.
fn tile32_values(format: QFormat, tb: &[u8], r: usize) -> Block32 {
    let v = values32(format);
    let mut q = [0i32; 32];
    for (i, q) in q.iter_mut().enumerate() {
        *q = if format == QFormat::Q8_0 {
            i32::from(tb[v + 32 * (i / 4) + 4 * r + i % 4] as i8)
        } else {
            let byte = tb[v + 32 * (i / 8) + 4 * r + i % 4];
            i32::from((byte >> (4 * (i % 8 / 4))) & 15)
        };
    }
    let m = if format == QFormat::Q4_1 {
        f16_at(tb, 16 + 2 * r)
    } else {
        0.0
    };
    (q, f16_at(tb, 2 * r), m)
}

/// The portable tile kernel: each row of the tile unpacked by `unpack` (tile block, row) once,
/// then accumulated block by block with `add_dot` (unpacked block, index of the activation
/// block), as the row kernels of `formats` do.
///
/// # Safety
/// See [`TileFn`].
#[allow(clippy::too_many_arguments)]
unsafe fn portable_tiles<T>(
    unpack: impl Fn(&[u8], usize) -> T,
    add_dot: impl Fn(&mut f32, &T, usize),
    tb_len: usize,
    blocks: usize,
    w: &[u8],
    first: usize,
    count: usize,
    out: *mut f32,
    stride: usize,
) {
    for r in 0..TILE_ROWS {
        let rows: Vec<T> = (0..blocks).map(|b| unpack(&w[b * tb_len..], r)).collect();
        for i in 0..count {
            let at = (first + i) * blocks;
            let mut acc = 0f32;
            for (b, row) in rows.iter().enumerate() {
                add_dot(&mut acc, row, at + b);
            }
            // SAFETY: the caller's contract.
            unsafe { *out.add(i * stride + r) = acc };
        }
    }
}

/// The portable kernel of 32-wide tiles.
///
/// # Safety
/// See [`TileFn`].
#[allow(clippy::too_many_arguments)]
unsafe fn tiles32(
    format: QFormat,
    w: &[u8],
    a: &Acts32,
    first: usize,
    count: usize,
    out: *mut f32,
    stride: usize,
) {
    let unpack = |tb: &[u8], r: usize| tile32_values(format, tb, r);
    let add_dot =
        |acc: &mut f32, block: &Block32, at: usize| add_block32_dot(acc, format, block, a, at);
    let tb_len = tile_bytes(format);
    unsafe {
        portable_tiles(
            unpack, add_dot, tb_len, a.blocks, w, first, count, out, stride,
        )
    }
}

/// The kernels for tiles of a 32-wide format on `isa`.
pub fn tile_dot32(format: QFormat, isa: Isa) -> Option<TileKernels<Acts32>> {
    #[cfg(target_arch = "x86_64")]
    if isa >= Isa::Avx2 {
        return crate::x86::tiles32(format, isa);
    }
    let _ = isa;
    let one: TileFn<Acts32> = match format {
        QFormat::Q4_0 => q4_0_tiles,
        QFormat::Q4_1 => q4_1_tiles,
        QFormat::Q8_0 => q8_0_tiles,
        QFormat::Q4K | QFormat::Q6K => return None,
    };
    Some(TileKernels { one, two: None })
}

unsafe fn q4_0_tiles(w: &[u8], a: &Acts32, first: usize, n: usize, out: *mut f32, stride: usize) {
    unsafe { tiles32(QFormat::Q4_0, w, a, first, n, out, stride) }
}

unsafe fn q4_1_tiles(w: &[u8], a: &Acts32, first: usize, n: usize, out: *mut f32, stride: usize) {
    unsafe { tiles32(QFormat::Q4_1, w, a, first, n, out, stride) }
}

unsafe fn q8_0_tiles(w: &[u8], a: &Acts32, first: usize, n: usize, out: *mut f32, stride: usize) {
    unsafe { tiles32(QFormat::Q8_0, w, a, first, n, out, stride) }
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

/// A Q6_K row's block unpacked: values (-32..32), group scales and `d`.
type Q6kRow = ([i8; 256], [i8; 16], f32);

/// Row `r` of a Q6_K tile block.
fn q6k_tile_row(tb: &[u8], r: usize) -> Q6kRow {
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

/// A Q4_K row's block unpacked: values, group scales and minimums, `d` and `dmin`.
type Q4kRow = ([u8; 256], [u8; 8], [u8; 8], f32, f32);

/// Row `r` of a Q4_K tile block.
fn q4k_tile_row(tb: &[u8], r: usize) -> Q4kRow {
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
/// As [`crate::formats::DotFn`], and `out` must be valid for those writes.
pub type TileFn<A> =
    unsafe fn(w: &[u8], a: &A, first: usize, count: usize, out: *mut f32, stride: usize);

/// A format's tile kernels on one instruction set.
pub struct TileKernels<A> {
    /// The kernel of one tile.
    pub one: TileFn<A>,
    /// Where vectors are wide enough, the kernel of two adjacent tiles at once: given both
    /// tiles' bytes, it writes `2 · TILE_ROWS` outputs per activation row.
    pub two: Option<TileFn<A>>,
}

// Function pointers copy whatever `A` is; a derive would ask `A: Copy`.
impl<A> Clone for TileKernels<A> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<A> Copy for TileKernels<A> {}

/// The kernels for tiles of a 256-wide format on `isa`.
pub fn tile_dot256(format: QFormat, isa: Isa) -> Option<TileKernels<Acts256>> {
    #[cfg(target_arch = "x86_64")]
    if isa >= Isa::Avx2 {
        return crate::x86::tiles256(format, isa);
    }
    let _ = isa;
    let one: TileFn<Acts256> = match format {
        QFormat::Q4K => q4k_tiles,
        QFormat::Q6K => q6k_tiles,
        QFormat::Q4_0 | QFormat::Q4_1 | QFormat::Q8_0 => return None,
    };
    Some(TileKernels { one, two: None })
}

/// The portable Q6_K tile kernel.
///
/// # Safety
/// See [`TileFn`].
unsafe fn q6k_tiles(w: &[u8], a: &Acts256, first: usize, n: usize, out: *mut f32, stride: usize) {
    let add_dot = |acc: &mut f32, (q, sc, d): &Q6kRow, at: usize| {
        *acc += q6k_block_dot(q, sc, *d, &a.data[at]);
    };
    let (tb, blocks) = (Q6K_TILE_BYTES, a.blocks);
    unsafe { portable_tiles(q6k_tile_row, add_dot, tb, blocks, w, first, n, out, stride) }
}

/// The portable Q4_K tile kernel.
///
/// # Safety
/// See [`TileFn`].
unsafe fn q4k_tiles(w: &[u8], a: &Acts256, first: usize, n: usize, out: *mut f32, stride: usize) {
    let add_dot = |acc: &mut f32, (q, sc, mn, d, dmin): &Q4kRow, at: usize| {
        *acc += q4k_block_dot(q, sc, mn, *d, *dmin, &a.data[at]);
    };
    let (tb, blocks) = (Q4K_TILE_BYTES, a.blocks);
    unsafe { portable_tiles(q4k_tile_row, add_dot, tb, blocks, w, first, n, out, stride) }
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
    let r = r % TILE_ROWS;
    for (b, y) in out.chunks_exact_mut(format.block_len()).enumerate() {
        let tb = &tile[b * tb_len..];
        match format {
            QFormat::Q4K => {
                let (q, sc, mn, d, dmin) = q4k_tile_row(tb, r);
                dequantize_q4k((&q, &sc, &mn), d, dmin, y);
            }
            QFormat::Q6K => {
                let (q, sc, d) = q6k_tile_row(tb, r);
                dequantize_q6k(&q, &sc, d, y);
            }
            _ => dequantize32(format, &tile32_values(format, tb, r), y),
        }
    }
}
