//! Matrix products of f32 activations with GGUF-quantized weights, on the CPU.
//!
//! The decoder's time goes almost entirely into `x · Wᵀ` with quantized `W` (a profile of
//! SmolLM2 Q4_1 decode put 84% of it in candle's scalar Q4_1 dot product). This crate does
//! that product the way llama.cpp does: the activations are quantized to 8 bits once per
//! product ([`act`]), the weights are repacked at load so one SIMD lane works for one row of
//! `W` (tiles of eight rows), each weight block is unpacked once and dotted against every
//! activation row of the batch with integer SIMD, and the rows of `W` are split across the
//! threads of [`pool`].
//!
//! Kernels exist per weight format ([`QFormat`]) and per instruction set, picked at run time
//! ([`Isa::detect`]), so one binary runs on any x86-64 and uses AVX2 where the CPU has it (and
//! VNNI's one-instruction byte dot product, AVX-VNNI or AVX-512 VNNI, in the tile kernels
//! where it has that too).
//! Every kernel is tested against candle's reference (dequantize, then multiply).

pub mod act;
mod formats;
pub mod ops;
pub mod pool;
mod tiles;
#[cfg(target_arch = "x86_64")]
mod x86;

use std::sync::OnceLock;

pub use act::{Act256, Acts256, Acts32};

/// A GGUF weight format this crate multiplies natively.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QFormat {
    /// 32 weights: f16 scale, 4-bit values offset by 8.
    Q4_0,
    /// 32 weights: f16 scale and minimum, 4-bit values.
    Q4_1,
    /// 32 weights: f16 scale, 8-bit values.
    Q8_0,
    /// 256 weights in 8 groups of 32: 6-bit scales and minimums, 4-bit values.
    Q4K,
    /// 256 weights in 16 groups of 16: 8-bit scales, 6-bit values.
    Q6K,
}

impl QFormat {
    /// Weights per block.
    pub const fn block_len(self) -> usize {
        match self {
            QFormat::Q4_0 | QFormat::Q4_1 | QFormat::Q8_0 => 32,
            QFormat::Q4K | QFormat::Q6K => 256,
        }
    }

    /// Bytes per block, as stored in a GGUF file.
    pub const fn block_bytes(self) -> usize {
        match self {
            QFormat::Q4_0 => 18,
            QFormat::Q4_1 => 20,
            QFormat::Q8_0 => 34,
            QFormat::Q4K => 144,
            QFormat::Q6K => 210,
        }
    }

    /// The format's GGUF name (`Q4_1`, `Q4_K`, ...).
    pub const fn name(self) -> &'static str {
        match self {
            QFormat::Q4_0 => "Q4_0",
            QFormat::Q4_1 => "Q4_1",
            QFormat::Q8_0 => "Q8_0",
            QFormat::Q4K => "Q4_K",
            QFormat::Q6K => "Q6_K",
        }
    }
}

/// Why a quantized matrix cannot be built or multiplied.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KernelError {
    /// The row length is not a whole number of blocks.
    #[error("{format:?} rows of {cols} weights are not a whole number of {block}-weight blocks")]
    RaggedRow {
        /// The format.
        format: QFormat,
        /// Weights per row.
        cols: usize,
        /// Weights per block.
        block: usize,
    },
    /// The data is not `rows × cols` weights of the format.
    #[error("{format:?} data of {got} bytes for {rows}x{cols} weights (expected {expected})")]
    Size {
        /// The format.
        format: QFormat,
        /// Rows.
        rows: usize,
        /// Weights per row.
        cols: usize,
        /// Bytes given.
        got: usize,
        /// Bytes expected.
        expected: usize,
    },
    /// Input or output buffers of the wrong length.
    #[error("matmul shape mismatch: {0}")]
    Shape(String),
}

/// The instruction set the kernels use, in order of preference. Every level past `Scalar`
/// includes AVX2; the two VNNI levels add the same 256-bit `vpdpbusd` (one instruction for
/// the quantized products' `vpmaddubsw` + `vpmaddwd` + add) in its two encodings, which
/// different CPUs have: neither includes the other. `Avx512` widens the tile kernels to
/// 512 bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    /// Portable Rust.
    Scalar,
    /// AVX2 with FMA and F16C (x86-64-v3).
    Avx2,
    /// AVX2 with AVX-512 VNNI and VL, for `vpdpbusd` on 256 bits (Ice Lake, Zen 4 on).
    Avx512Vnni,
    /// AVX2 with AVX-VNNI, the same instruction VEX-encoded (Alder Lake, Sapphire Rapids,
    /// Zen 5 on).
    AvxVnni,
    /// AVX-512 F, BW, VL and VNNI on 512 bits: the tile kernels take two tiles (sixteen
    /// weight rows) per instruction; the rest is `Avx512Vnni`'s (Ice Lake, Zen 4 on).
    Avx512,
}

impl Isa {
    /// Every level, in order of preference.
    pub const ALL: [Isa; 5] = [
        Isa::Scalar,
        Isa::Avx2,
        Isa::Avx512Vnni,
        Isa::AvxVnni,
        Isa::Avx512,
    ];

    /// The best instruction set this CPU runs. `WASMLM_KERNELS` set to a level's
    /// [`Isa::name`] holds the kernels at or below it (to compare, or to rule the others
    /// out): at the best level this CPU runs that is not preferred to it.
    pub fn detect() -> Isa {
        static ISA: OnceLock<Isa> = OnceLock::new();
        *ISA.get_or_init(|| {
            let cap = std::env::var("WASMLM_KERNELS")
                .ok()
                .and_then(|name| Isa::ALL.into_iter().find(|i| i.name() == name));
            match cap {
                Some(cap) => Isa::supported()
                    .into_iter()
                    .rfind(|i| *i <= cap)
                    .unwrap_or(Isa::Scalar),
                None => Isa::best(),
            }
        })
    }

    /// The level's name, as `WASMLM_KERNELS` takes it.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512Vnni => "avx512vnni",
            Isa::AvxVnni => "avxvnni",
            Isa::Avx512 => "avx512",
        }
    }

    /// The best instruction set of this CPU, whatever the environment says.
    pub fn best() -> Isa {
        Isa::supported().pop().unwrap_or(Isa::Scalar)
    }

    /// Every instruction set this CPU runs, in order of preference.
    pub fn supported() -> Vec<Isa> {
        Isa::ALL.into_iter().filter(|i| i.runs_here()).collect()
    }

    /// Whether this CPU runs `self`.
    pub fn runs_here(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c");
            match self {
                Isa::Scalar => true,
                Isa::Avx2 => avx2,
                Isa::Avx512Vnni => {
                    avx2 && is_x86_feature_detected!("avx512vnni")
                        && is_x86_feature_detected!("avx512vl")
                }
                Isa::AvxVnni => avx2 && is_x86_feature_detected!("avxvnni"),
                Isa::Avx512 => {
                    Isa::Avx512Vnni.runs_here()
                        && is_x86_feature_detected!("avx512f")
                        && is_x86_feature_detected!("avx512bw")
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == Isa::Scalar
        }
    }
}

/// A `rows × cols` matrix of quantized weights, each row `cols / block_len` blocks, stored
/// in tiles of eight interleaved rows when the row count allows (`tiles`), row by row
/// otherwise (`formats`). Multiplying `x` (`m × cols`) gives `x · selfᵀ` (`m × rows`).
pub struct QMatrix {
    format: QFormat,
    rows: usize,
    cols: usize,
    /// Rows are interleaved in tiles of `tiles::TILE_ROWS` (layouts in `tiles`).
    tiled: bool,
    data: Vec<u8>,
}

impl std::fmt::Debug for QMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "QMatrix({:?}, {}x{})", self.format, self.rows, self.cols)
    }
}

/// Activation rows dotted together against one weight row (kept in registers).
const ROW_TILE: usize = 4;

impl QMatrix {
    /// Wraps `data`, checked to hold `rows × cols` weights of `format`.
    pub fn new(
        format: QFormat,
        rows: usize,
        cols: usize,
        data: Vec<u8>,
    ) -> Result<Self, KernelError> {
        let block = format.block_len();
        if !cols.is_multiple_of(block) || cols == 0 {
            return Err(KernelError::RaggedRow {
                format,
                cols,
                block,
            });
        }
        let expected = rows * (cols / block) * format.block_bytes();
        if data.len() != expected {
            return Err(KernelError::Size {
                format,
                rows,
                cols,
                got: data.len(),
                expected,
            });
        }
        let tiled = tiles::tiled(rows);
        let data = if tiled {
            tiles::tile(format, &data, cols / block)
        } else {
            formats::repack(format, data, cols / block)
        };
        Ok(Self {
            format,
            rows,
            cols,
            tiled,
            data,
        })
    }

    /// The weight format.
    pub fn format(&self) -> QFormat {
        self.format
    }

    /// Rows (output features).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Weights per row (input features).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes of weight data.
    pub fn size_bytes(&self) -> usize {
        self.data.len()
    }

    fn row_bytes(&self) -> usize {
        self.cols / self.format.block_len() * self.format.block_bytes()
    }

    /// Row `row` as f32, written to `out` (`cols` long).
    pub fn dequantize_row(&self, row: usize, out: &mut [f32]) -> Result<(), KernelError> {
        if row >= self.rows || out.len() != self.cols {
            return Err(KernelError::Shape(format!(
                "row {row} of {} into {} values (need {})",
                self.rows,
                out.len(),
                self.cols
            )));
        }
        let blocks = self.cols / self.format.block_len();
        if self.tiled {
            tiles::dequantize_tiled(self.format, &self.data, blocks, row, out);
            return Ok(());
        }
        let rb = self.row_bytes();
        formats::dequantize(self.format, &self.data[row * rb..(row + 1) * rb], out);
        Ok(())
    }

    /// `out = x · selfᵀ` for `m` rows of `x` (`m × cols`, row-major) into `out` (`m × rows`),
    /// with the kernels of [`Isa::detect`], on the threads of [`pool`].
    pub fn matmul(&self, x: &[f32], m: usize, out: &mut [f32]) -> Result<(), KernelError> {
        self.matmul_with(Isa::detect(), x, m, out)
    }

    /// [`QMatrix::matmul`] with the kernels of `isa` (one this CPU does not run falls back
    /// to [`Isa::best`]).
    pub fn matmul_with(
        &self,
        isa: Isa,
        x: &[f32],
        m: usize,
        out: &mut [f32],
    ) -> Result<(), KernelError> {
        if x.len() != m * self.cols || out.len() != m * self.rows {
            return Err(KernelError::Shape(format!(
                "{m}x{} input ({} values) and {m}x{} output ({} values) for a {}x{} matrix",
                self.cols,
                x.len(),
                self.rows,
                out.len(),
                self.rows,
                self.cols
            )));
        }
        let isa = if isa.runs_here() { isa } else { Isa::best() };
        if self.tiled {
            if let Some(dot) = tiles::tile_dot32(self.format, isa) {
                self.run_tiles(dot, &act::quantize_32(x, self.cols), m, out);
            } else if let Some(dot) = tiles::tile_dot256(self.format, isa) {
                self.run_tiles(dot, &act::quantize_256(x, self.cols), m, out);
            }
        } else if let Some(dot) = formats::dot32(self.format, isa) {
            self.run(dot, &act::quantize_32(x, self.cols), m, out);
        } else if let Some(dot) = formats::dot256(self.format, isa) {
            self.run(dot, &act::quantize_256(x, self.cols), m, out);
        }
        Ok(())
    }

    /// Splits the weight rows across the pool; each task dots its rows with every activation
    /// row, [`ROW_TILE`] at a time, so a weight block is read from memory once per product.
    fn run<A: Sync>(&self, dot: formats::DotFn<A>, acts: &A, m: usize, out: &mut [f32]) {
        let n = self.rows;
        let rb = self.row_bytes();
        let out_ptr = SendPtr(out.as_mut_ptr());
        let work = |rows: std::ops::Range<usize>| {
            let out_ptr = &out_ptr;
            let mut tile = [0f32; ROW_TILE];
            for r in rows {
                let w = &self.data[r * rb..(r + 1) * rb];
                let mut j = 0;
                while j < m {
                    let t = (m - j).min(ROW_TILE);
                    // SAFETY: `dot` was picked for a CPU that has its instruction set; `w` is
                    // one row and `acts` holds `m` rows of as many blocks.
                    unsafe { dot(w, acts, j, &mut tile[..t]) };
                    for (i, v) in tile[..t].iter().enumerate() {
                        // SAFETY: `out` has `m × n` values (checked by the caller); each
                        // (row j + i, column r) is written by the one task that owns row r.
                        unsafe { *out_ptr.0.add((j + i) * n + r) = *v };
                    }
                    j += t;
                }
            }
        };
        split(n, rb, 1, &work);
    }

    /// [`QMatrix::run`] for the tiled layout: tasks own whole tiles (pairs of them, where
    /// the kernels take two at once), and each tile's eight outputs of an activation row
    /// are adjacent.
    fn run_tiles<A: Sync>(
        &self,
        kernels: tiles::TileKernels<A>,
        acts: &A,
        m: usize,
        out: &mut [f32],
    ) {
        let n = self.rows;
        let tb = self.cols / self.format.block_len() * tiles::tile_bytes(self.format);
        // One activation row waits on memory, not on arithmetic; there the two-tile kernels
        // (two streams at once where one tile is one) made whole-model decode 5-18% slower,
        // measured before the kernels prefetched (docs/perf.md). From two rows on they win.
        let two = kernels.two.filter(|_| m > 1);
        let out_ptr = SendPtr(out.as_mut_ptr());
        let work = |tiles: std::ops::Range<usize>| {
            let out_ptr = &out_ptr;
            let mut t = tiles.start;
            while t < tiles.end {
                let (dot, count) = match two {
                    Some(two) if t + 1 < tiles.end => (two, 2),
                    _ => (kernels.one, 1),
                };
                // SAFETY: `dot` was picked for a CPU that has its instruction set; the tiles
                // hold `TILE_ROWS` rows each of as many blocks as the activations' rows;
                // `out` has `m × n` values and this task alone writes the tiles' columns.
                unsafe {
                    dot(
                        &self.data[t * tb..(t + count) * tb],
                        acts,
                        0,
                        m,
                        out_ptr.0.add(t * tiles::TILE_ROWS),
                        n,
                    )
                };
                t += count;
            }
        };
        let align = if two.is_some() { 2 } else { 1 };
        split(n / tiles::TILE_ROWS, tb, align, &work);
    }
}

/// Runs `work` over `0..units` (units of `unit_bytes` of weights) on the pool, in tasks of a
/// multiple of `align` units but for the last.
fn split(
    units: usize,
    unit_bytes: usize,
    align: usize,
    work: &(dyn Fn(std::ops::Range<usize>) + Sync),
) {
    let threads = pool::threads();
    // Tasks of at least ~64 KiB of weights, several per thread so a thread slowed by the
    // other tenants of a shared machine does not hold the product back.
    let min_units = (65536 / unit_bytes.max(1)).max(1);
    let per_task = units
        .div_ceil(threads * 4)
        .max(min_units)
        .next_multiple_of(align);
    if threads == 1 || per_task >= units {
        work(0..units);
    } else {
        pool::parallel_for(units.div_ceil(per_task), &|t| {
            work(t * per_task..((t + 1) * per_task).min(units))
        });
    }
}

/// The output pointer shared by the tasks of one product (each writes its own columns).
pub(crate) struct SendPtr(pub(crate) *mut f32);
// SAFETY: tasks write disjoint elements (see `QMatrix::run`), and the product waits for all.
unsafe impl Sync for SendPtr {}
unsafe impl Send for SendPtr {}
