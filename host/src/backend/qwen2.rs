//! The qwen2 architecture (Qwen2, Qwen2.5): llama with biases on the q, k and v projections.
//! GGUF files keep Hugging Face's row order (NEOX rotation), unlike llama's.

use super::decoder::{Decoder, Family};
use super::weights::WeightSource;
use super::BackendModelError;

/// Qwen2 adds q/k/v biases.
pub const FAMILY: Family = Family {
    qkv_bias: true,
    qk_norm: false,
};

/// Loads a qwen2 model for a context of `context` positions.
pub fn load(
    src: &mut WeightSource,
    context: Option<usize>,
    device: &candle_core::Device,
) -> Result<(Decoder, usize), BackendModelError> {
    super::decoder::load_family(src, "qwen2", FAMILY, context, device)
}
