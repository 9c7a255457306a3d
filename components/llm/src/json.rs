//! JSON mode (`response_format: {"type": "json_object"}`): a byte-level checker that says
//! whether a text can still grow into one JSON object, so the sampler can drop every token
//! that would leave the grammar.
//!
//! The whole state is a few bytes and `Copy` (the open containers are a bit stack), so
//! trying a token is copying the state and feeding it the token's bytes: no allocation per
//! candidate across a 150k vocabulary.

/// Deepest nesting of objects and arrays (one bit of [`JsonPrefix::stack`] each).
const MAX_DEPTH: u8 = 64;

/// Longest run of whitespace between tokens. Small models in JSON mode can fall into
/// emitting newlines forever, which the grammar allows; llama.cpp's JSON grammars cap the
/// run in the same way.
const MAX_WHITESPACE: u8 = 20;

/// The literals `true`, `false` and `null`.
const LITERALS: [&[u8]; 3] = [b"true", b"false", b"null"];

/// Where in a number the text is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Num {
    Minus,
    Zero,
    Int,
    Dot,
    Frac,
    Exp,
    ExpSign,
    ExpDigits,
}

impl Num {
    fn next(self, b: u8) -> Option<Num> {
        let digit = b.is_ascii_digit();
        Some(match (self, b) {
            (Num::Minus, b'0') => Num::Zero,
            (Num::Minus, _) if digit => Num::Int,
            (Num::Int, _) if digit => Num::Int,
            (Num::Zero | Num::Int, b'.') => Num::Dot,
            (Num::Dot | Num::Frac, _) if digit => Num::Frac,
            (Num::Zero | Num::Int | Num::Frac, b'e' | b'E') => Num::Exp,
            (Num::Exp, b'+' | b'-') => Num::ExpSign,
            (Num::Exp | Num::ExpSign | Num::ExpDigits, _) if digit => Num::ExpDigits,
            _ => return None,
        })
    }

    /// Whether the number is complete here (the next byte may end it).
    fn complete(self) -> bool {
        matches!(self, Num::Zero | Num::Int | Num::Frac | Num::ExpDigits)
    }
}

/// What the next byte may be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Lex {
    /// Nothing yet: the `{` of the top-level object.
    Start,
    /// A value (after `:`, or after `,` in an array).
    Value,
    /// Just after `[`: a value or `]`.
    ValueOrClose,
    /// After `,` in an object: a key's `"`.
    Key,
    /// Just after `{`: a key's `"` or `}`.
    KeyOrClose,
    /// After a key.
    Colon,
    /// After a value: `,` or the closer of the innermost container.
    After,
    /// Inside a string; `escape` is 0 outside an escape, 1 after `\`, and 2..=5 inside
    /// `\u` with `escape - 1` hex digits to go.
    Str {
        key: bool,
        escape: u8,
    },
    Number(Num),
    /// Inside literal `LITERALS[word]`, `at` bytes of it written.
    Literal {
        word: u8,
        at: u8,
    },
    /// The top-level object is closed: nothing more.
    Done,
}

/// How far a text is into one JSON object, as the state after its bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JsonPrefix {
    lex: Lex,
    /// Bit `i` set: the container at depth `i` is an array (else an object).
    stack: u64,
    depth: u8,
    /// Whitespace bytes since the last other byte outside strings.
    whitespace: u8,
}

impl Default for JsonPrefix {
    fn default() -> Self {
        Self::new()
    }
}

impl JsonPrefix {
    /// The state before any byte.
    pub fn new() -> Self {
        Self {
            lex: Lex::Start,
            stack: 0,
            depth: 0,
            whitespace: 0,
        }
    }

    /// Whether the top-level object is complete.
    pub fn is_done(&self) -> bool {
        self.lex == Lex::Done
    }

    /// Feeds `bytes`; false (and the state is then meaningless) if they leave the grammar.
    pub fn push_all(&mut self, bytes: &[u8]) -> bool {
        bytes.iter().all(|&b| self.push(b))
    }

    /// Whether the text followed by `bytes` can still become one JSON object.
    pub fn accepts(&self, bytes: &[u8]) -> bool {
        let mut s = *self;
        s.push_all(bytes)
    }

    /// Whether the text is inside a string and outside an escape, where every byte but `"`,
    /// `\` and control characters is text that leaves the state as it is.
    fn in_plain_string(&self) -> bool {
        matches!(self.lex, Lex::Str { escape: 0, .. })
    }

    /// Feeds one byte; false if it leaves the grammar.
    pub fn push(&mut self, b: u8) -> bool {
        match self.lex {
            Lex::Done => false,
            Lex::Str { key, escape } => self.string_byte(key, escape, b),
            Lex::Number(n) => match n.next(b) {
                Some(n) => {
                    self.lex = Lex::Number(n);
                    true
                }
                // The byte that ends a number belongs to what follows it.
                None if n.complete() => {
                    self.lex = Lex::After;
                    self.push(b)
                }
                None => false,
            },
            Lex::Literal { word, at } => {
                let lit = LITERALS[word as usize];
                if lit[at as usize] != b {
                    return false;
                }
                self.lex = if at as usize + 1 == lit.len() {
                    Lex::After
                } else {
                    Lex::Literal { word, at: at + 1 }
                };
                true
            }
            Lex::Start => b == b'{' && self.open(false),
            lex => {
                if is_blank(b) {
                    self.whitespace += 1;
                    return self.whitespace <= MAX_WHITESPACE;
                }
                self.whitespace = 0;
                self.structural(lex, b)
            }
        }
    }

    /// A byte other than whitespace between tokens.
    fn structural(&mut self, lex: Lex, b: u8) -> bool {
        match (lex, b) {
            (Lex::ValueOrClose, b']') => self.close(true),
            (Lex::Value | Lex::ValueOrClose, _) => self.value_start(b),
            (Lex::Key | Lex::KeyOrClose, b'"') => {
                self.lex = Lex::Str {
                    key: true,
                    escape: 0,
                };
                true
            }
            (Lex::KeyOrClose, b'}') => self.close(false),
            (Lex::Colon, b':') => {
                self.lex = Lex::Value;
                true
            }
            (Lex::After, b',') => {
                self.lex = if self.in_array() {
                    Lex::Value
                } else {
                    Lex::Key
                };
                true
            }
            (Lex::After, b']') => self.close(true),
            (Lex::After, b'}') => self.close(false),
            _ => false,
        }
    }

    fn value_start(&mut self, b: u8) -> bool {
        self.lex = match b {
            b'{' => return self.open(false),
            b'[' => return self.open(true),
            b'"' => Lex::Str {
                key: false,
                escape: 0,
            },
            b'-' => Lex::Number(Num::Minus),
            b'0' => Lex::Number(Num::Zero),
            b'1'..=b'9' => Lex::Number(Num::Int),
            b't' => Lex::Literal { word: 0, at: 1 },
            b'f' => Lex::Literal { word: 1, at: 1 },
            b'n' => Lex::Literal { word: 2, at: 1 },
            _ => return false,
        };
        true
    }

    fn string_byte(&mut self, key: bool, escape: u8, b: u8) -> bool {
        let escape = match (escape, b) {
            (0, b'"') => {
                self.lex = if key { Lex::Colon } else { Lex::After };
                return true;
            }
            (0, b'\\') => 1,
            // Control characters must be escaped; any other byte is text (UTF-8 included).
            (0, 0..=0x1f) => return false,
            (0, _) => 0,
            (1, b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => 0,
            (1, b'u') => 5,
            (2..=5, _) if b.is_ascii_hexdigit() => {
                if escape == 2 {
                    0
                } else {
                    escape - 1
                }
            }
            _ => return false,
        };
        self.lex = Lex::Str { key, escape };
        true
    }

    fn in_array(&self) -> bool {
        self.depth > 0 && self.stack & (1 << (self.depth - 1)) != 0
    }

    fn open(&mut self, array: bool) -> bool {
        if self.depth == MAX_DEPTH {
            return false;
        }
        if array {
            self.stack |= 1 << self.depth;
        } else {
            self.stack &= !(1 << self.depth);
        }
        self.depth += 1;
        self.lex = if array {
            Lex::ValueOrClose
        } else {
            Lex::KeyOrClose
        };
        true
    }

    fn close(&mut self, array: bool) -> bool {
        if self.depth == 0 || self.in_array() != array {
            return false;
        }
        self.depth -= 1;
        self.lex = if self.depth == 0 {
            Lex::Done
        } else {
            Lex::After
        };
        true
    }
}

/// A vocabulary sorted for [`JsonPrefix`]: which tokens can follow a state, found without
/// trying every token on it.
pub struct TokenTable {
    /// Tokens in the vocabulary.
    tokens: usize,
    /// Tokens that start with a byte other than whitespace, by that byte (tokens without
    /// bytes, control tokens among them, are in no list).
    by_first: Vec<Vec<u32>>,
    /// Tokens that start with whitespace, by their first other byte: about half of a
    /// vocabulary (` the`), which a state that takes whitespace need not try one by one.
    after_blank: Vec<Vec<u32>>,
    /// Tokens of whitespace alone.
    blank: Vec<u32>,
    /// Tokens that are not plain string text: empty, or holding `"`, `\` or a control
    /// character.
    not_plain: Vec<u32>,
}

/// JSON's whitespace.
fn is_blank(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

/// Whether a string's text may hold `b` without it changing the string's state.
fn plain_byte(b: u8) -> bool {
    b >= 0x20 && b != b'"' && b != b'\\'
}

impl TokenTable {
    /// Sorts the tokens whose bytes `pieces` yields, in id order.
    pub fn new<'a>(pieces: impl IntoIterator<Item = &'a [u8]>) -> Self {
        let mut by_first = vec![Vec::new(); 256];
        let mut after_blank = vec![Vec::new(); 256];
        let mut blank = Vec::new();
        let mut not_plain = Vec::new();
        let mut tokens = 0;
        for (t, piece) in pieces.into_iter().enumerate() {
            let t = t as u32;
            match (piece.first(), piece.iter().find(|&&b| !is_blank(b))) {
                (None, _) => {}
                (Some(&first), _) if !is_blank(first) => by_first[first as usize].push(t),
                (_, Some(&solid)) => after_blank[solid as usize].push(t),
                (_, None) => blank.push(t),
            }
            if piece.is_empty() || !piece.iter().all(|&b| plain_byte(b)) {
                not_plain.push(t);
            }
            tokens += 1;
        }
        Self {
            tokens,
            by_first,
            after_blank,
            blank,
            not_plain,
        }
    }

    /// Sets the logit of every token that `state` does not accept to −∞, `piece` giving
    /// each token's bytes; logits past the vocabulary (padding) are set too. Returns whether
    /// any finite logit is left.
    pub fn mask<'p>(
        &self,
        state: &JsonPrefix,
        piece: impl Fn(u32) -> &'p [u8],
        logits: &mut [f32],
    ) -> bool {
        if state.in_plain_string() {
            // Inside a string nearly every token is text that changes nothing: only the
            // others need trying.
            for &t in &self.not_plain {
                if let Some(l) = logits.get_mut(t as usize) {
                    let p = piece(t);
                    if p.is_empty() || !state.accepts(p) {
                        *l = f32::NEG_INFINITY;
                    }
                }
            }
            if let Some(padding) = logits.get_mut(self.tokens..) {
                padding.fill(f32::NEG_INFINITY);
            }
            return logits.iter().any(|&l| l > f32::NEG_INFINITY);
        }
        // Elsewhere few bytes can come next: only tokens that start with one are tried.
        // Outside strings every whitespace byte does the same, and the state after it is
        // the same whatever the run's length (but for its cap, which trying the token
        // checks), so one blank decides for all tokens that start blank.
        let mut kept = Vec::new();
        let mut try_all = |tokens: &[u32]| {
            for &t in tokens {
                if let Some(&l) = logits.get(t as usize) {
                    if state.accepts(piece(t)) {
                        kept.push((t, l));
                    }
                }
            }
        };
        let mut after_blank = *state;
        let blank_ok = after_blank.push(b' ');
        if blank_ok {
            try_all(&self.blank);
        }
        for b in 0..=255u8 {
            if state.accepts(&[b]) {
                try_all(&self.by_first[b as usize]);
            }
            if blank_ok && after_blank.accepts(&[b]) {
                try_all(&self.after_blank[b as usize]);
            }
        }
        logits.fill(f32::NEG_INFINITY);
        let mut any = false;
        for (t, l) in kept {
            logits[t as usize] = l;
            any |= l > f32::NEG_INFINITY;
        }
        any
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fed(text: &str) -> Option<JsonPrefix> {
        let mut s = JsonPrefix::new();
        s.push_all(text.as_bytes()).then_some(s)
    }

    const VALID: &[&str] = &[
        "{}",
        r#"{"a":1}"#,
        r#"{ "name" : "Tom", "age": 3, "tags": ["cat", "grey"], "x": null }"#,
        r#"{"n":[0,-0,12,-3.25,1e5,1E+5,2.5e-3,0.0]}"#,
        r#"{"t":true,"f":false,"o":{"p":{"q":[[],[{}],{"r":[1,2]}]}}}"#,
        r#"{"esc":"a\"b\\c\/d\b\f\n\r\t\u00e9\uD83D\uDE00"}"#,
        "{\"utf8\":\"caf\u{e9} \u{1f600}\"}",
        "{\n  \"a\": [\n    1,\n    2\n  ]\n}",
    ];

    #[test]
    fn valid_objects_are_accepted_byte_by_byte_and_end_done() {
        for doc in VALID {
            // The checker agrees with a real parser on what it accepts.
            let parsed: serde_json::Value = serde_json::from_str(doc).unwrap();
            assert!(parsed.is_object(), "{doc}");
            let mut s = JsonPrefix::new();
            for (i, &b) in doc.as_bytes().iter().enumerate() {
                assert!(!s.is_done(), "{doc}: done before byte {i}");
                assert!(s.push(b), "{doc}: byte {i} ({:?}) refused", b as char);
            }
            assert!(s.is_done(), "{doc}");
            assert!(!s.accepts(b" "), "nothing may follow the object");
        }
    }

    #[test]
    fn invalid_texts_are_refused_where_they_go_wrong() {
        // (text, how many bytes are accepted before the refused one)
        let cases: &[(&str, usize)] = &[
            ("[1]", 0),
            ("```json", 0),
            (r#"{"a" 1}"#, 5),
            (r#"{a:1}"#, 1),
            (r#"{"a":01}"#, 6),
            (r#"{"a":1.}"#, 7),
            (r#"{"a":1e}"#, 7),
            (r#"{"a":-}"#, 6),
            (r#"{"a":tru}"#, 8),
            (r#"{"a":nulL}"#, 8),
            (r#"{"a":[1,]}"#, 8),
            (r#"{"a":1,}"#, 7),
            (r#"{"a":[}"#, 6),
            (r#"{"a":{]"#, 6),
            (r#"{"a":"\x"}"#, 7),
            (r#"{"a":"\u12g"}"#, 10),
            ("{\"a\":\"line\nbreak\"}", 10),
            (r#"{"a":'x'}"#, 5),
            (r#"{"a":1}}"#, 7),
        ];
        for &(text, ok) in cases {
            let mut s = JsonPrefix::new();
            let bytes = text.as_bytes();
            for (i, &b) in bytes[..ok].iter().enumerate() {
                assert!(s.push(b), "{text}: byte {i} refused");
            }
            assert!(!s.push(bytes[ok]), "{text}: byte {ok} accepted");
            assert!(
                !serde_json::from_str::<serde_json::Value>(text).is_ok_and(|v| v.is_object()),
                "{text} is a JSON object"
            );
        }
    }

    #[test]
    fn the_object_opens_at_the_first_byte() {
        // JSON allows whitespace before it, but a model given room for it can spend its
        // tokens there (and a leading newline is what a fenced block starts with).
        assert!(!JsonPrefix::new().accepts(b" {}"));
        assert!(!JsonPrefix::new().accepts(b"\n{}"));
        assert!(JsonPrefix::new().accepts(b"{}"));
    }

    #[test]
    fn accepts_leaves_the_state_alone() {
        let s = fed(r#"{"a":"#).unwrap();
        assert!(s.accepts(b" \"x\"}"));
        assert!(!s.accepts(b"}"));
        assert_eq!(s, fed(r#"{"a":"#).unwrap());
    }

    #[test]
    fn a_number_ends_at_the_byte_after_it() {
        // "1}" in one token: the brace ends the number and closes the object.
        let s = fed(r#"{"a":"#).unwrap();
        assert!(s.accepts(b"1}"));
        assert!(s.accepts(b"10.5e3, \"b\": 2}"));
        let done = fed(r#"{"a":12}"#).unwrap();
        assert!(done.is_done());
    }

    #[test]
    fn whitespace_runs_are_capped() {
        let s = fed("{").unwrap();
        let run = vec![b'\n'; MAX_WHITESPACE as usize];
        assert!(s.accepts(&run));
        let mut longer = run.clone();
        longer.push(b' ');
        assert!(!s.accepts(&longer));
        // Any other byte starts a new run; whitespace inside strings does not count.
        let mut broken = run.clone();
        broken.extend_from_slice(b"\"k\":");
        broken.extend_from_slice(&run);
        assert!(s.accepts(&broken));
        assert!(fed("{\"a\":\"").unwrap().accepts(&[b' '; 100]));
    }

    #[test]
    fn nesting_is_capped() {
        let mut text = String::from("{\"a\":");
        text.push_str(&"[".repeat(MAX_DEPTH as usize - 1));
        let s = fed(&text).unwrap();
        assert!(!s.accepts(b"["));
        assert!(!s.accepts(b"{"));
        assert!(s.accepts(b"1"));
        let mut closed = "]".repeat(MAX_DEPTH as usize - 1);
        closed.push('}');
        let mut end = s;
        assert!(end.push_all(closed.as_bytes()) && end.is_done());
    }

    /// A vocabulary with every byte alone, JSON-ish pieces and an empty (control) token.
    fn vocab() -> Vec<Vec<u8>> {
        let mut v: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
        for p in [
            "",
            "{\"",
            "\":",
            "\": \"",
            "\",",
            "\"}",
            "\n}",
            " the",
            "true",
            "tr",
            "ue}",
            "null",
            "12",
            "3.5",
            "e-3",
            "\\n",
            "\\u00",
            "e9",
            "],",
            "[{",
            "}}",
            " ",
            "\n  ",
            "cat",
            "\"cat\"",
            "caf\u{e9}",
            "{}",
            ", \"",
            "0,",
            "-1",
            "```json",
            " }",
            "\n\n",
            " \"",
            "  \"a\":",
            "\t1",
            " \\n",
            " true",
            " t",
            "\n ]",
            "\r\n",
            " 7",
        ] {
            v.push(p.as_bytes().to_vec());
        }
        v
    }

    #[test]
    fn the_table_masks_exactly_the_tokens_the_state_refuses() {
        let vocab = vocab();
        let table = TokenTable::new(vocab.iter().map(Vec::as_slice));
        // States along several documents, and at the whitespace cap, each compared with
        // trying every token on it.
        let near_cap = format!("{{{}", "\n".repeat(MAX_WHITESPACE as usize - 1));
        let at_cap = format!("{{\"a\":1{}", " ".repeat(MAX_WHITESPACE as usize));
        let prefixes = VALID
            .iter()
            .flat_map(|doc| (0..doc.len()).map(|cut| &doc.as_bytes()[..cut]))
            .chain([near_cap.as_bytes(), at_cap.as_bytes()]);
        for bytes in prefixes {
            let doc = String::from_utf8_lossy(bytes);
            let mut s = JsonPrefix::new();
            assert!(s.push_all(bytes));
            // Two padding logits past the vocabulary, which must be masked too.
            let mut logits: Vec<f32> = (0..vocab.len() + 2).map(|i| i as f32).collect();
            let any = table.mask(&s, |t| &vocab[t as usize], &mut logits);
            for (t, &l) in logits.iter().enumerate() {
                let want = vocab.get(t).is_some_and(|p| !p.is_empty() && s.accepts(p));
                assert_eq!(l > f32::NEG_INFINITY, want, "after {doc:?}, token {t}");
                if want {
                    assert_eq!(l, t as f32, "a kept logit moved");
                }
            }
            assert!(any, "after {doc:?}: the next byte alone is a token");
        }
        let mut done = JsonPrefix::new();
        assert!(done.push_all(b"{}"));
        let mut logits = vec![0.0; vocab.len()];
        assert!(!table.mask(&done, |t| &vocab[t as usize], &mut logits));
    }

    #[test]
    fn every_prefix_of_a_valid_object_is_accepted() {
        // Splitting a document anywhere (as tokens do) never refuses a piece.
        for doc in VALID {
            let bytes = doc.as_bytes();
            for cut in 0..=bytes.len() {
                let mut s = JsonPrefix::new();
                assert!(s.push_all(&bytes[..cut]), "{doc} cut at {cut}");
                assert!(s.accepts(&bytes[cut..]), "{doc} cut at {cut}");
            }
        }
    }
}
