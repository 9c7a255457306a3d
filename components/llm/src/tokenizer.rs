//! The model's own tokenizer, built from its metadata: GGUF `tokenizer.ggml.*` (byte-level BPE
//! with the pre-tokenizer that `tokenizer.ggml.pre` names, or SentencePiece-style pieces with
//! scores, as llama.cpp does), or the model folder's `tokenizer.json`.

use std::collections::HashMap;

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use crate::metadata::ModelMetadata;
use crate::spm::{self, SpmTokenizer};

/// GGUF token types (llama.cpp's `llama_token_type`).
const TOKEN_TYPE_CONTROL: i64 = spm::TYPE_CONTROL as i64;
const TOKEN_TYPE_USER_DEFINED: i64 = spm::TYPE_USER_DEFINED as i64;

// llama.cpp's pre-tokenizer regexes, by `tokenizer.ggml.pre` name.
const LLAMA3_REGEX: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_REGEX: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Why a tokenizer could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("the model has no tokenizer (no tokenizer.ggml.tokens and no tokenizer.json)")]
    Missing,
    #[error(
        "tokenizer model '{0}' is not supported yet (supported: gpt2 byte-level BPE, llama \
         SentencePiece)"
    )]
    UnsupportedModel(String),
    #[error("pre-tokenizer '{0}' is not supported yet")]
    UnsupportedPre(String),
    #[error("malformed tokenizer metadata: {0}")]
    Malformed(String),
    #[error("tokenizer: {0}")]
    Library(String),
}

fn lib_err(e: impl std::fmt::Display) -> TokenizerError {
    TokenizerError::Library(e.to_string())
}

/// Text ↔ token ids for one model.
pub struct TextTokenizer {
    engine: Engine,
    /// Bytes of each token: what it adds to text (control tokens: their own text).
    bytes: Vec<Box<[u8]>>,
    /// Control tokens add nothing to generated text, but detokenize shows their text.
    control: Vec<bool>,
}

impl TextTokenizer {
    /// Builds the tokenizer the metadata describes.
    pub fn from_metadata(meta: &ModelMetadata) -> Result<Self, TokenizerError> {
        if let Some(json) = &meta.tokenizer_json {
            return Self::from_tokenizer_json(json);
        }
        let model = meta
            .gguf_str("tokenizer.ggml.model")
            .ok_or(TokenizerError::Missing)?;
        let missing = |what: &str| TokenizerError::Malformed(format!("no tokenizer.ggml.{what}"));
        let tokens = meta
            .gguf
            .tokens
            .as_deref()
            .ok_or_else(|| missing("tokens"))?;
        match model {
            "gpt2" => {}
            "llama" => return Self::from_gguf_spm(meta, tokens),
            other => return Err(TokenizerError::UnsupportedModel(other.to_string())),
        }
        let merges = meta
            .gguf
            .merges
            .as_deref()
            .ok_or_else(|| missing("merges"))?;
        let types = meta.gguf.token_type.as_deref().unwrap_or_default();

        let mut vocab = HashMap::with_capacity(tokens.len());
        for (id, t) in tokens.iter().enumerate() {
            vocab.entry(t.clone()).or_insert(id as u32);
        }
        let merges = merges
            .iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| {
                        TokenizerError::Malformed(format!("merge without a space: {m:?}"))
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let bpe = BPE::builder()
            .vocab_and_merges(
                vocab
                    .into_iter()
                    .collect::<tokenizers::models::bpe::Vocab>(),
                merges,
            )
            .build()
            .map_err(lib_err)?;
        let pre = meta.gguf_str("tokenizer.ggml.pre").unwrap_or("default");
        let mut inner = Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(pre_tokenizer(pre)?));
        inner.with_decoder(Some(ByteLevelDecoder::default()));

        let mut specials = Vec::new();
        let mut user_defined = Vec::new();
        for (id, t) in tokens.iter().enumerate() {
            match types.get(id).map(|&t| i64::from(t)) {
                Some(TOKEN_TYPE_CONTROL) => specials.push(AddedToken::from(t.clone(), true)),
                Some(TOKEN_TYPE_USER_DEFINED) => {
                    user_defined.push(AddedToken::from(t.clone(), false).normalized(false))
                }
                _ => {}
            }
        }
        inner.add_special_tokens(&specials);
        inner.add_tokens(&user_defined);

        let unbyte = byte_decoder();
        let mut bytes = Vec::with_capacity(tokens.len());
        let mut control = Vec::with_capacity(tokens.len());
        for (id, t) in tokens.iter().enumerate() {
            let kind = types.get(id).map(|&t| i64::from(t));
            control.push(kind == Some(TOKEN_TYPE_CONTROL));
            let b: Vec<u8> = match kind {
                Some(TOKEN_TYPE_CONTROL | TOKEN_TYPE_USER_DEFINED) => t.as_bytes().to_vec(),
                _ => t
                    .chars()
                    .map(|c| unbyte.get(&c).copied())
                    .collect::<Option<_>>()
                    .unwrap_or_else(|| t.as_bytes().to_vec()),
            };
            bytes.push(b.into_boxed_slice());
        }
        Ok(Self {
            engine: Engine::Hf(Box::new(inner)),
            bytes,
            control,
        })
    }

    /// A GGUF SentencePiece-style vocabulary (`tokenizer.ggml.model = "llama"`).
    fn from_gguf_spm(meta: &ModelMetadata, tokens: &[String]) -> Result<Self, TokenizerError> {
        let scores = meta.gguf.scores.as_deref().unwrap_or_default();
        let types = meta.gguf.token_type.as_deref().unwrap_or_default();
        if (!scores.is_empty() && scores.len() != tokens.len())
            || (!types.is_empty() && types.len() != tokens.len())
        {
            return Err(TokenizerError::Malformed(format!(
                "{} tokens but {} scores and {} token types",
                tokens.len(),
                scores.len(),
                types.len()
            )));
        }
        let ty = |id: usize| types.get(id).copied().unwrap_or(spm::TYPE_NORMAL);
        let engine = SpmTokenizer::new(
            tokens,
            scores,
            types,
            meta.gguf_u32("tokenizer.ggml.unknown_token_id"),
            // llama.cpp's default for SentencePiece vocabularies.
            meta.gguf_bool("tokenizer.ggml.add_space_prefix")
                .unwrap_or(true),
        );
        let bytes = tokens
            .iter()
            .enumerate()
            .map(|(id, t)| spm::piece_bytes(t, ty(id)).into_boxed_slice())
            .collect();
        let control = (0..tokens.len())
            .map(|id| matches!(ty(id), spm::TYPE_CONTROL | spm::TYPE_UNUSED))
            .collect();
        Ok(Self {
            engine: Engine::Spm(Box::new(engine)),
            bytes,
            control,
        })
    }

    /// Builds from a Hugging Face `tokenizer.json`.
    pub fn from_tokenizer_json(json: &str) -> Result<Self, TokenizerError> {
        let mut inner: Tokenizer = json.parse().map_err(lib_err)?;
        // Truncation and padding settings in the file are for training batches; requests
        // decide their own lengths.
        inner.with_truncation(None).map_err(lib_err)?;
        inner.with_padding(None);
        let n = inner.get_vocab_size(true);
        let added = inner.get_added_tokens_decoder();
        // A token's own bytes, which may be part of a UTF-8 character: decoding it alone
        // would replace those with U+FFFD.
        let kind = decoder_kind(json);
        let unbyte = byte_decoder();
        let own_bytes = |t: &str| match kind {
            DecoderKind::ByteLevel => t.chars().map(|c| unbyte.get(&c).copied()).collect(),
            DecoderKind::SentencePiece => Some(sentencepiece_bytes(t)),
            DecoderKind::Other => None,
        };
        let mut bytes = Vec::with_capacity(n);
        let mut control = Vec::with_capacity(n);
        for id in 0..n as u32 {
            let added_token = added.get(&id);
            control.push(added_token.is_some_and(|t| t.special));
            let own: Option<Vec<u8>> = match added_token {
                Some(t) => Some(t.content.as_bytes().to_vec()),
                None => inner.id_to_token(id).and_then(|t| own_bytes(&t)),
            };
            let text =
                own.unwrap_or_else(|| inner.decode(&[id], false).unwrap_or_default().into_bytes());
            bytes.push(text.into_boxed_slice());
        }
        Ok(Self {
            engine: Engine::Hf(Box::new(inner)),
            bytes,
            control,
        })
    }

    /// Token ids of `text`, without BOS. With `parse_special`, special-token text maps to its
    /// token; otherwise it is plain text.
    pub fn encode(&mut self, text: &str, parse_special: bool) -> Result<Vec<u32>, TokenizerError> {
        match &mut self.engine {
            Engine::Hf(inner) => {
                inner.set_encode_special_tokens(!parse_special);
                let enc = inner.encode_fast(text, false).map_err(lib_err)?;
                Ok(enc.get_ids().to_vec())
            }
            Engine::Spm(spm) => Ok(spm.encode(text, parse_special)),
        }
    }

    /// Token ids of `text` as the model's own pipeline makes them for encoding: special tokens
    /// added by its post-processor (`[CLS] ... [SEP]`), at most `max` in all.
    pub fn encode_truncated(&mut self, text: &str, max: usize) -> Result<Vec<u32>, TokenizerError> {
        let inner = match &mut self.engine {
            Engine::Hf(inner) => inner,
            Engine::Spm(spm) => {
                let mut ids = spm.encode(text, false);
                ids.truncate(max);
                return Ok(ids);
            }
        };
        inner.set_encode_special_tokens(false);
        inner
            .with_truncation(Some(tokenizers::TruncationParams {
                max_length: max,
                ..Default::default()
            }))
            .map_err(lib_err)?;
        let enc = inner.encode_fast(text, true);
        let _ = inner.with_truncation(None);
        Ok(enc.map_err(lib_err)?.get_ids().to_vec())
    }

    /// The bytes `token` adds to generated text (nothing for control tokens).
    pub fn piece(&self, token: u32) -> &[u8] {
        match self.control.get(token as usize) {
            Some(false) => &self.bytes[token as usize],
            _ => &[],
        }
    }

    /// Text of `tokens`, special tokens included. Fails on an id outside the vocabulary.
    pub fn decode(&self, tokens: &[u32]) -> Result<String, u32> {
        let mut out = Vec::new();
        for &t in tokens {
            out.extend_from_slice(self.bytes.get(t as usize).ok_or(t)?);
        }
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    /// Text of one token, special or not.
    pub fn token_text(&self, token: u32) -> String {
        self.decode(&[token]).unwrap_or_default()
    }

    /// The id of a token given its exact text.
    pub fn token_id(&self, text: &str) -> Option<u32> {
        match &self.engine {
            Engine::Hf(inner) => inner.token_to_id(text),
            Engine::Spm(spm) => spm.token_id(text),
        }
    }

    /// Number of token ids.
    pub fn vocab_size(&self) -> usize {
        self.bytes.len()
    }
}

/// What turns text into ids.
enum Engine {
    /// Hugging Face `tokenizers` (tokenizer.json, GGUF byte-level BPE).
    Hf(Box<Tokenizer>),
    /// GGUF SentencePiece-style vocabularies.
    Spm(Box<SpmTokenizer>),
}

/// How a `tokenizer.json` maps vocabulary strings back to bytes.
enum DecoderKind {
    /// GPT-2's byte-to-character table (Qwen, Llama 3, SmolLM).
    ByteLevel,
    /// `▁` for spaces and `<0xNN>` byte tokens (Llama 2, Gemma, Mistral).
    SentencePiece,
    Other,
}

fn decoder_kind(json: &str) -> DecoderKind {
    #[derive(serde::Deserialize)]
    struct Head {
        #[serde(default)]
        decoder: serde_json::Value,
    }
    let decoder = serde_json::from_str::<Head>(json)
        .map(|h| h.decoder.to_string())
        .unwrap_or_default();
    if decoder.contains("\"ByteLevel\"") {
        DecoderKind::ByteLevel
    } else if decoder.contains("ByteFallback") || decoder.contains('▁') {
        DecoderKind::SentencePiece
    } else {
        DecoderKind::Other
    }
}

/// The bytes of a SentencePiece vocabulary string: `<0xNN>` is that byte, `▁` a space.
fn sentencepiece_bytes(t: &str) -> Vec<u8> {
    match spm::byte_of(t) {
        Some(b) => vec![b],
        None => t.replace('▁', " ").into_bytes(),
    }
}

/// The pre-tokenizer llama.cpp uses for a `tokenizer.ggml.pre` value.
fn pre_tokenizer(pre: &str) -> Result<PreTokenizerWrapper, TokenizerError> {
    let byte_level =
        |use_regex| PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, use_regex));
    let split = |regex: &str| -> Result<PreTokenizerWrapper, TokenizerError> {
        Ok(PreTokenizerWrapper::Split(
            Split::new(
                SplitPattern::Regex(regex.into()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(lib_err)?,
        ))
    };
    Ok(match pre {
        // GPT-2's own regex, inside ByteLevel.
        "default" | "gpt2" => byte_level(true),
        // Digits one by one, then GPT-2's regex.
        "smollm" => PreTokenizerWrapper::Sequence(Sequence::new(vec![
            PreTokenizerWrapper::Digits(Digits::new(true)),
            byte_level(true),
        ])),
        "llama3" | "llama-bpe" | "llama-v3" => PreTokenizerWrapper::Sequence(Sequence::new(vec![
            split(LLAMA3_REGEX)?,
            byte_level(false),
        ])),
        "qwen2" | "deepseek-r1-qwen" => PreTokenizerWrapper::Sequence(Sequence::new(vec![
            split(QWEN2_REGEX)?,
            byte_level(false),
        ])),
        other => return Err(TokenizerError::UnsupportedPre(other.to_string())),
    })
}

/// GPT-2's byte ↔ unicode table, inverted: the character a byte was printed as → the byte.
fn byte_decoder() -> HashMap<char, u8> {
    let mut printable: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut chars = printable.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !printable.contains(&b) {
            printable.push(b);
            chars.push(256 + n);
            n += 1;
        }
    }
    printable
        .into_iter()
        .zip(chars)
        .filter_map(|(b, c)| Some((char::from_u32(c)?, b as u8)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_table_covers_every_byte() {
        let t = byte_decoder();
        assert_eq!(t.len(), 256);
        assert_eq!(t[&'Ġ'], b' ');
        assert_eq!(t[&'Ċ'], b'\n');
        assert_eq!(t[&'a'], b'a');
    }
}
