//! The qwen2 architecture (Qwen2, Qwen2.5): llama with biases on the q, k and v projections.
//! GGUF files keep Hugging Face's row order (NEOX rotation), unlike llama's.

use super::decoder::Family;

/// Qwen2 adds q/k/v biases.
pub const FAMILY: Family = Family {
    qkv_bias: true,
    ..Family::LLAMA
};
