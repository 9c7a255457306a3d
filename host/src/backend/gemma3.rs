//! The gemma3 architecture (Gemma 3 text models, GGUF): the decoder with embeddings scaled by
//! √hidden, q/k norms, norms after attention and MLP as well as before, a GELU-gated MLP, and
//! five sliding-window layers (rotary base 10 000) to each global one (the file's
//! `rope.freq_base`, linear scaling on the larger models). Norm weights are read as stored:
//! llama.cpp's converter has already added Gemma's `1 +` to them.

use super::decoder::{Activation, Family, Sliding};

/// Gemma 3 as llama.cpp runs it.
pub const FAMILY: Family = Family {
    qk_norm: true,
    embed_scale: true,
    post_norms: true,
    activation: Activation::GeluTanh,
    sliding: Some(Sliding {
        every: 6,
        rope_base: 10_000.0,
    }),
    ..Family::LLAMA
};
