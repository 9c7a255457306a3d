//! SentencePiece-style tokenization from GGUF metadata (`tokenizer.ggml.model = "llama"`, used
//! by Gemma and Llama 2), done the way llama.cpp's `llm_tokenizer_spm` does it: special and
//! user-defined tokens are cut out first, the rest has its spaces written as `▁` and is merged
//! pairwise, always the pair whose merged piece scores highest, down to vocabulary pieces;
//! characters no piece covers fall back to `<0xNN>` byte tokens.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap, HashSet};

/// GGUF token types (llama.cpp's `llama_token_type`).
pub const TYPE_NORMAL: i32 = 1;
pub const TYPE_UNKNOWN: i32 = 2;
pub const TYPE_CONTROL: i32 = 3;
pub const TYPE_USER_DEFINED: i32 = 4;
pub const TYPE_UNUSED: i32 = 5;
pub const TYPE_BYTE: i32 = 6;

/// A SentencePiece vocabulary with scores.
pub struct SpmTokenizer {
    ids: HashMap<String, u32>,
    scores: Vec<f32>,
    byte_ids: [Option<u32>; 256],
    unk: Option<u32>,
    /// Tokens cut out of text before merging: text, id, and whether it is a control token
    /// (those only when special text is parsed; user-defined ones always).
    specials: HashMap<String, (u32, bool)>,
    /// Distinct byte lengths of `specials`, longest first.
    special_lens: Vec<usize>,
    add_space_prefix: bool,
}

/// One piece of text while specials are cut out.
enum Fragment<'a> {
    Text(&'a str),
    Token(u32),
}

impl SpmTokenizer {
    /// Builds the tokenizer from the vocabulary, its scores and token types.
    pub fn new(
        tokens: &[String],
        scores: &[f32],
        types: &[i32],
        unk: Option<u32>,
        add_space_prefix: bool,
    ) -> Self {
        let mut ids = HashMap::with_capacity(tokens.len());
        let mut byte_ids = [None; 256];
        let mut specials = HashMap::new();
        for (id, t) in tokens.iter().enumerate() {
            let id = id as u32;
            ids.entry(t.clone()).or_insert(id);
            let ty = types.get(id as usize).copied().unwrap_or(TYPE_NORMAL);
            match ty {
                TYPE_BYTE => {
                    if let Some(b) = byte_of(t) {
                        byte_ids[b as usize].get_or_insert(id);
                    }
                }
                TYPE_CONTROL | TYPE_USER_DEFINED | TYPE_UNKNOWN if !t.is_empty() => {
                    specials
                        .entry(t.clone())
                        .or_insert((id, ty != TYPE_USER_DEFINED));
                }
                _ => {}
            }
        }
        let mut special_lens: Vec<usize> = specials
            .keys()
            .map(String::len)
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        special_lens.sort_unstable_by(|a, b| b.cmp(a));
        Self {
            ids,
            scores: scores.to_vec(),
            byte_ids,
            unk,
            specials,
            special_lens,
            add_space_prefix,
        }
    }

    /// The id of a token given its exact vocabulary text.
    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.ids.get(text).copied()
    }

    /// Token ids of `text` (no BOS). With `parse_special`, control-token text maps to its
    /// token; user-defined tokens always do.
    pub fn encode(&self, text: &str, parse_special: bool) -> Vec<u32> {
        let mut out = Vec::new();
        // As llama.cpp: a space prefix goes before text that starts the input or follows a
        // special token.
        let mut after_special = true;
        for fragment in self.partition(text, parse_special) {
            match fragment {
                Fragment::Token(id) => {
                    out.push(id);
                    after_special = true;
                }
                Fragment::Text(t) => {
                    let mut s = String::with_capacity(t.len() + 3);
                    if self.add_space_prefix && after_special {
                        s.push(' ');
                    }
                    s.push_str(t);
                    self.merge(&s.replace(' ', "\u{2581}"), &mut out);
                    after_special = false;
                }
            }
        }
        out
    }

    /// Cuts special tokens out of `text`, longest first, as llama.cpp's
    /// `tokenizer_st_partition` does.
    fn partition<'a>(&self, text: &'a str, parse_special: bool) -> Vec<Fragment<'a>> {
        let mut fragments = vec![Fragment::Text(text)];
        for special in self.occurring_specials(text, parse_special) {
            let id = self.specials[special].0;
            let mut next = Vec::with_capacity(fragments.len() + 2);
            for f in fragments {
                let Fragment::Text(mut rest) = f else {
                    next.push(f);
                    continue;
                };
                while let Some(at) = rest.find(special) {
                    if at > 0 {
                        next.push(Fragment::Text(&rest[..at]));
                    }
                    next.push(Fragment::Token(id));
                    rest = &rest[at + special.len()..];
                }
                if !rest.is_empty() {
                    next.push(Fragment::Text(rest));
                }
            }
            fragments = next;
        }
        fragments
    }

    /// The specials that occur in `text`, longest first (ties by text, so the order is the
    /// same on every run). Looking each candidate length up at each position costs far less
    /// than searching the text for each of the thousands of specials a vocabulary may have.
    fn occurring_specials<'s>(&'s self, text: &str, parse_special: bool) -> Vec<&'s str> {
        let mut found: HashSet<&'s str> = HashSet::new();
        for (i, _) in text.char_indices() {
            for &len in &self.special_lens {
                let Some(candidate) = text.get(i..i + len) else {
                    continue;
                };
                if let Some((key, &(_, control))) = self.specials.get_key_value(candidate) {
                    if parse_special || !control {
                        found.insert(key.as_str());
                    }
                }
            }
        }
        let mut found: Vec<&str> = found.into_iter().collect();
        found.sort_unstable_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        found
    }

    /// llama.cpp's `llm_tokenizer_spm_session::tokenize` on one escaped text fragment.
    fn merge(&self, text: &str, out: &mut Vec<u32>) {
        // Symbols: byte ranges of `text`, linked as a list; a merged-away symbol has len 0.
        struct Symbol {
            start: usize,
            len: usize,
            prev: Option<usize>,
            next: Option<usize>,
        }
        let mut symbols: Vec<Symbol> = Vec::new();
        for (i, (start, c)) in text.char_indices().enumerate() {
            let len = c.len_utf8();
            symbols.push(Symbol {
                start,
                len,
                prev: i.checked_sub(1),
                next: (start + len < text.len()).then_some(i + 1),
            });
        }
        let mut queue = BinaryHeap::new();
        let try_add = |queue: &mut BinaryHeap<Bigram>, symbols: &[Symbol], left, right| {
            let (Some(left), Some(right)) = (left, right) else {
                return;
            };
            let (l, r): (&Symbol, &Symbol) = (&symbols[left], &symbols[right]);
            let piece = &text[l.start..l.start + l.len + r.len];
            if let Some(&id) = self.ids.get(piece) {
                queue.push(Bigram {
                    score: self.scores.get(id as usize).copied().unwrap_or(0.0),
                    left,
                    right,
                    size: piece.len(),
                });
            }
        };
        for i in 1..symbols.len() {
            try_add(&mut queue, &symbols, Some(i - 1), Some(i));
        }
        while let Some(b) = queue.pop() {
            let (l, r) = (&symbols[b.left], &symbols[b.right]);
            // Stale: one side was merged into something else since.
            if l.len == 0 || r.len == 0 || l.len + r.len != b.size {
                continue;
            }
            let right_next = r.next;
            symbols[b.left].len += symbols[b.right].len;
            symbols[b.right].len = 0;
            symbols[b.left].next = right_next;
            if let Some(n) = right_next {
                symbols[n].prev = Some(b.left);
            }
            let prev = symbols[b.left].prev;
            try_add(&mut queue, &symbols, prev, Some(b.left));
            try_add(&mut queue, &symbols, Some(b.left), right_next);
        }
        let mut at = if symbols.is_empty() { None } else { Some(0) };
        while let Some(i) = at {
            let s = &symbols[i];
            let piece = &text[s.start..s.start + s.len];
            match self.ids.get(piece) {
                Some(&id) => out.push(id),
                None => {
                    for &byte in piece.as_bytes() {
                        if let Some(id) = self.byte_ids[byte as usize].or(self.unk) {
                            out.push(id);
                        }
                    }
                }
            }
            at = s.next;
        }
    }
}

/// A candidate merge of two adjacent symbols; the heap pops the highest score first, and of
/// equal scores the leftmost.
struct Bigram {
    score: f32,
    left: usize,
    right: usize,
    size: usize,
}

impl Ord for Bigram {
    fn cmp(&self, other: &Self) -> Ordering {
        self.score
            .total_cmp(&other.score)
            .then_with(|| other.left.cmp(&self.left))
    }
}

impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Bigram {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Bigram {}

/// The byte a `<0xNN>` token stands for.
pub fn byte_of(token: &str) -> Option<u8> {
    let hex = token.strip_prefix("<0x")?.strip_suffix('>')?;
    u8::from_str_radix(hex, 16).ok()
}

/// What a token of type `ty` adds to text: `▁` is a space, `<0xNN>` its byte, control and
/// user-defined tokens their own text.
pub fn piece_bytes(token: &str, ty: i32) -> Vec<u8> {
    match ty {
        TYPE_BYTE => byte_of(token).map_or_else(|| token.as_bytes().to_vec(), |b| vec![b]),
        TYPE_NORMAL => token.replace('\u{2581}', " ").into_bytes(),
        _ => token.as_bytes().to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vocab() -> SpmTokenizer {
        let tokens: Vec<String> = [
            "<unk>", "<s>", "<0x41>", "<0xC3>", "<0xA9>", "▁", "h", "e", "l", "o", "he", "ll",
            "hell", "hello", "▁hello", "\n", "  ",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let scores = [
            0.0, 0.0, 0.0, 0.0, 0.0, -1.0, -2.0, -2.0, -2.0, -2.0, -3.0, -1.5, -4.0, -5.0, -0.5,
            0.0, 0.0,
        ];
        let types = [2, 3, 6, 6, 6, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 4, 4];
        SpmTokenizer::new(&tokens, &scores, &types, Some(0), false)
    }

    #[test]
    fn merges_by_score_and_falls_back_to_bytes() {
        let v = vocab();
        // "▁hello" wins over its parts; "A" has no piece but a byte token; "é" two bytes.
        assert_eq!(v.encode(" hello", false), vec![14]);
        assert_eq!(v.encode("hello", false), vec![13]);
        assert_eq!(v.encode("A", false), vec![2]);
        assert_eq!(v.encode("é", false), vec![3, 4]);
    }

    #[test]
    fn user_defined_always_cut_control_only_when_parsing_special() {
        let v = vocab();
        assert_eq!(v.encode("he\nhe", false), vec![10, 15, 10]);
        assert_eq!(v.encode("he  he", false), vec![10, 16, 10]);
        assert_eq!(v.encode("<s>", true), vec![1]);
        assert_ne!(v.encode("<s>", false), vec![1]);
    }
}
