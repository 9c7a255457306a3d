//! The llama architecture (SmolLM2, Llama 2/3, Mistral, ...): the plain [`Decoder`].

use super::decoder::{Decoder, Family};
use super::weights::WeightSource;
use super::BackendModelError;

/// Llama has no projection biases and no q/k norms.
pub const FAMILY: Family = Family {
    qkv_bias: false,
    qk_norm: false,
};

/// Loads a llama model for a context of `context` positions.
pub fn load(
    src: &mut WeightSource,
    context: Option<usize>,
    device: &candle_core::Device,
) -> Result<(Decoder, usize), BackendModelError> {
    super::decoder::load_family(src, "llama", FAMILY, context, device)
}
