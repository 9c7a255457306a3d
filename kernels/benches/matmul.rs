//! Throughput of the quantized products at the shapes of the default model (SmolLM2-135M:
//! hidden 576, MLP 1536, vocabulary 49,152) and of Qwen3-0.6B (1024, 3072), for one row
//! (decode), four (batched decode) and 64 (a prefill chunk), each against candle's
//! `QMatMul` on the same weights in the same run.
//!
//!     cargo bench -p wasmlm-kernels [-- FILTER]
//!
//! Prints `format shape m=.. ours_us=.. candle_us=.. speedup=.. ours_gb_s=..` per case
//! (median of repeated runs; GB/s counts weight bytes read once per product), and for every
//! other instruction set past scalar that the CPU runs, `<level>_us=.. over_<level>=..`: our
//! own kernels held to that level, in the same run.

mod common;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use common::median_us;
use wasmlm_kernels::{Isa, QFormat, QMatrix};

fn main() {
    let filter = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .unwrap_or_default();
    let cases = [
        (QFormat::Q4_1, GgmlDType::Q4_1, 1536, 576),
        (QFormat::Q4_1, GgmlDType::Q4_1, 576, 1536),
        (QFormat::Q8_0, GgmlDType::Q8_0, 49152, 576),
        (QFormat::Q8_0, GgmlDType::Q8_0, 3072, 1024),
        (QFormat::Q4_0, GgmlDType::Q4_0, 1536, 576),
        (QFormat::Q4K, GgmlDType::Q4K, 3072, 1024),
        (QFormat::Q6K, GgmlDType::Q6K, 1024, 3072),
        // Qwen3's output matrix (tied embeddings) as Q4_K_M stores it: the largest product.
        (QFormat::Q6K, GgmlDType::Q6K, 151936, 1024),
    ];
    println!("threads={}", wasmlm_kernels::pool::threads());
    for (format, dtype, rows, cols) in cases {
        let name = format!("{} {rows}x{cols}", format.name());
        if !name.contains(&filter) {
            continue;
        }
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0)
            .collect();
        let w = Tensor::from_vec(w, (rows, cols), &Device::Cpu).expect("tensor");
        let q = QTensor::quantize(&w, dtype).expect("quantize");
        let ours =
            QMatrix::new(format, rows, cols, q.data().expect("data").into_owned()).expect("matrix");
        let theirs = QMatMul::from_qtensor(q).expect("qmatmul");
        for m in [1usize, 4, 64] {
            let x: Vec<f32> = (0..m * cols)
                .map(|i| ((i * 31 % 97) as f32 / 48.0) - 1.0)
                .collect();
            let xt = Tensor::from_vec(x.clone(), (m, cols), &Device::Cpu).expect("x");
            let mut out = vec![0f32; m * rows];
            let budget = 1.0;
            let ours_us = median_us(|| ours.matmul(&x, m, &mut out).expect("matmul"), budget);
            let candle_us = median_us(|| drop(theirs.forward(&xt).expect("forward")), budget);
            let mut levels = String::new();
            for isa in Isa::supported() {
                if isa == Isa::Scalar || isa == Isa::detect() {
                    continue;
                }
                let us = median_us(
                    || ours.matmul_with(isa, &x, m, &mut out).expect("matmul"),
                    budget,
                );
                let name = isa.name();
                levels += &format!(" {name}_us={us:.1} over_{name}={:.2}", us / ours_us);
            }
            println!(
                "{name} m={m} ours_us={ours_us:.1} candle_us={candle_us:.1} speedup={:.2} ours_gb_s={:.2}{levels}",
                candle_us / ours_us,
                ours.size_bytes() as f64 / ours_us / 1e3
            );
        }
    }
}
