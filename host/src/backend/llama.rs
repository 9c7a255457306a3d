//! The llama architecture (SmolLM2, Llama 2/3, Mistral, ...): the plain [`Decoder`].
//!
//! [`Decoder`]: super::decoder::Decoder

use super::decoder::Family;

/// Llama has no projection biases and no q/k norms.
pub const FAMILY: Family = Family::LLAMA;
