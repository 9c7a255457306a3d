//! Regular expressions as DFAs that follow a text a byte at a time, so the sampler can drop
//! every token that would leave them: a JSON string's `pattern`, found anywhere in the
//! string's text (JSON Schema's and pydantic's search), or a whole output (vLLM's
//! `guided_regex`, matched from its first byte to its last).
//!
//! Each DFA state knows the fewest characters that take it to a match through text the
//! output can hold, so an output never walks into a state from which it cannot end.

use std::collections::VecDeque;

use regex_automata::dfa::{dense, Automaton, StartKind};
use regex_automata::nfa::thompson;
use regex_automata::util::primitives::StateID;
use regex_automata::util::start;
use regex_automata::{Anchored, MatchKind};
use regex_syntax::hir::Hir;

/// Most bytes a pattern's NFA and DFA (and its building) may take: a request's patterns
/// stay within a few MiB.
pub const MAX_PATTERN_BYTES: usize = 256 << 10;

/// Most bytes of a regular expression's text.
pub const MAX_REGEX_TEXT: usize = 1020;

/// Where a pattern must match its text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Anywhere in a JSON string's text (escapes decoded), which holds control characters
    /// only as the short escapes (`\n`): once found, nothing after it undoes it.
    Search,
    /// The whole text, any UTF-8.
    Whole,
}

impl Mode {
    /// Whether the text can hold byte `b`.
    fn holds(self, b: u8) -> bool {
        match self {
            Mode::Search => matches!(b, 8..=10 | 12 | 13 | 0x20..=0xbf | 0xc2..=0xf4),
            Mode::Whole => matches!(b, 0..=0xbf | 0xc2..=0xf4),
        }
    }
}

/// The syntax tree of `regex` (the syntax of Rust's `regex` crate), or why it has none.
pub fn parse(regex: &str) -> Result<Hir, String> {
    if regex.len() > MAX_REGEX_TEXT {
        return Err(format!("a pattern longer than {MAX_REGEX_TEXT} bytes"));
    }
    regex_automata::util::syntax::parse(regex).map_err(|e| {
        let why = match &e {
            regex_syntax::Error::Parse(e) => {
                format!("{} at byte {}", e.kind(), e.span().start.offset)
            }
            regex_syntax::Error::Translate(e) => {
                format!("{} at byte {}", e.kind(), e.span().start.offset)
            }
            e => e.to_string(),
        };
        format!("the pattern {regex:?} is not supported: {why}")
    })
}

/// The syntax tree of `regex` read without Unicode: `\w`, `\d`, `\s` and case folding
/// cover ASCII only. That is a narrower language than `regex`'s, so any text it matches
/// `regex` matches too, and its DFA is far smaller where a Unicode class is counted
/// (`^\w{1,40}( \w{1,40})*$`). `None` where the pattern cannot be read so (`.`, a negated
/// class or `\p{..}` would need Unicode, or match bytes that are not UTF-8) or where the
/// reading would change its meaning instead of narrowing it (word boundaries).
fn parse_ascii(regex: &str) -> Option<Hir> {
    let config = regex_automata::util::syntax::Config::new()
        .unicode(false)
        .utf8(true);
    let hir = regex_automata::util::syntax::parse_with(regex, &config).ok()?;
    (!hir.properties().look_set().contains_word()).then_some(hir)
}

/// `build` of `regex`'s syntax tree; where that fails (most often a DFA over
/// [`MAX_PATTERN_BYTES`]: a Unicode class counted), `build` of its ASCII reading
/// ([`parse_ascii`]), which follows a part of what `regex` matches; else the first error.
pub fn build_narrowing<T>(
    regex: &str,
    build: impl Fn(Hir) -> Result<T, String>,
) -> Result<T, String> {
    build(parse(regex)?).or_else(|e| parse_ascii(regex).and_then(|h| build(h).ok()).ok_or(e))
}

/// A regular expression as a DFA over a text's bytes.
#[derive(Debug)]
pub struct Pattern {
    dfa: dense::DFA<Vec<u32>>,
    mode: Mode,
    /// The state before any text.
    pub start: u32,
    /// The fewest characters that take each state (by index) to a match through text the
    /// output can hold ([`Pattern::NEVER`] where none does): a state that is not dead may
    /// still need a character the text cannot hold, or more than a length limit leaves.
    need: Vec<u32>,
}

impl Pattern {
    /// The state of a searched text that holds a match already.
    pub const MATCHED: u32 = u32::MAX;
    /// The need of a state from which no match can be reached.
    pub const NEVER: u32 = u32::MAX;

    /// The pattern of `hir`, parsed from `regex` (named in errors).
    pub fn new(hir: &Hir, regex: &str, mode: Mode) -> Result<Self, String> {
        let bad = |e: String| format!("the pattern {regex:?} is not supported: {e}");
        let nfa = thompson::Compiler::new()
            .configure(
                thompson::Config::new()
                    // A hostile `(a{1000}){1000}` stops here, before it takes the memory.
                    .nfa_size_limit(Some(MAX_PATTERN_BYTES))
                    .which_captures(thompson::WhichCaptures::None),
            )
            .build_from_hir(hir)
            .map_err(|e| bad(e.to_string()))?;
        let (kind, anchored) = match mode {
            Mode::Search => (StartKind::Unanchored, Anchored::No),
            Mode::Whole => (StartKind::Anchored, Anchored::Yes),
        };
        let dfa = dense::Builder::new()
            .configure(
                dense::DFA::config()
                    .start_kind(kind)
                    .match_kind(MatchKind::All)
                    .dfa_size_limit(Some(MAX_PATTERN_BYTES))
                    .determinize_size_limit(Some(MAX_PATTERN_BYTES)),
            )
            .build_from_nfa(&nfa)
            .map_err(|e| bad(e.to_string()))?;
        let start = dfa
            .start_state(&start::Config::new().anchored(anchored))
            .map_err(|e| bad(e.to_string()))?;
        let mut p = Self {
            dfa,
            mode,
            start: start.as_u32(),
            need: Vec::new(),
        };
        p.need = p.needs(start);
        if p.need_of(p.start) == Self::NEVER {
            return Err(match mode {
                Mode::Search => format!(
                    "no text a JSON string can hold matches the pattern {regex:?} (control \
                     characters other than \\b \\f \\n \\r \\t cannot be written under a \
                     pattern)"
                ),
                Mode::Whole => format!("no text matches the pattern {regex:?}"),
            });
        }
        Ok(p)
    }

    /// The fewest characters from each state to a match (see [`Pattern::need`]): a walk of
    /// the DFA from `start` over the bytes the text can hold, then a 0-1 breadth-first
    /// search back from the states that match (a UTF-8 continuation byte adds no character).
    fn needs(&self, start: StateID) -> Vec<u32> {
        let dfa = &self.dfa;
        let index = |id: StateID| id.as_usize() >> dfa.stride2();
        // The DFA's transitions are the same for all bytes of a class: one byte of each
        // class that the text can hold, and whether some byte of it adds no character.
        let classes = dfa.byte_classes();
        let mut class_byte: Vec<Option<(u8, u32)>> = vec![None; classes.alphabet_len()];
        for b in (0..=u8::MAX).filter(|&b| self.mode.holds(b)) {
            let chars = u32::from(!(0x80..=0xbf).contains(&b));
            let c = &mut class_byte[classes.get(b) as usize];
            *c = Some(c.map_or((b, chars), |(r, n)| (r, n.min(chars))));
        }
        // Reversed edges (to, from, characters); a searched text's match is the sink
        // `usize::MAX`.
        let matched = usize::MAX;
        let mut back: Vec<(usize, usize, u32)> = Vec::new();
        let mut seen = vec![false; index(start) + 1];
        seen[index(start)] = true;
        let mut found = vec![start];
        let mut ends = Vec::new();
        while let Some(s) = found.pop() {
            if dfa.is_match_state(dfa.next_eoi_state(s)) {
                ends.push(index(s));
            }
            for &(b, chars) in class_byte.iter().flatten() {
                let t = dfa.next_state(s, b);
                if dfa.is_dead_state(t) || dfa.is_quit_state(t) {
                    continue;
                }
                if self.mode == Mode::Search && dfa.is_match_state(t) {
                    back.push((matched, index(s), chars));
                    continue;
                }
                back.push((index(t), index(s), chars));
                if seen.len() <= index(t) {
                    seen.resize(index(t) + 1, false);
                }
                if !seen[index(t)] {
                    seen[index(t)] = true;
                    found.push(t);
                }
            }
        }
        back.sort_unstable();
        let edges_to = |to: usize| {
            let at = back.partition_point(|e| e.0 < to);
            back[at..].iter().take_while(move |e| e.0 == to)
        };
        let mut need = vec![Self::NEVER; seen.len()];
        let mut queue: VecDeque<(usize, u32)> = ends.iter().map(|&s| (s, 0)).collect();
        queue.push_front((matched, 0));
        while let Some((s, n)) = queue.pop_front() {
            if s != matched {
                if need[s] <= n {
                    continue;
                }
                need[s] = n;
            }
            for &(_, from, chars) in edges_to(s) {
                if need[from] > n + chars {
                    if chars == 0 {
                        queue.push_front((from, n));
                    } else {
                        queue.push_back((from, n + chars));
                    }
                }
            }
        }
        need
    }

    /// The fewest characters that take `state` to a match ([`Pattern::NEVER`] if none).
    pub fn need_of(&self, state: u32) -> u32 {
        if state == Self::MATCHED {
            return 0;
        }
        let index = state as usize >> self.dfa.stride2();
        self.need.get(index).copied().unwrap_or(Self::NEVER)
    }

    /// Whether a match can follow `state` in at most `room` more characters.
    pub fn reaches(&self, state: u32, room: u32) -> bool {
        let need = self.need_of(state);
        need != Self::NEVER && need <= room
    }

    /// The state after the text's byte `b`, whatever follows.
    pub fn next(&self, state: u32, b: u8) -> Option<u32> {
        if state == Self::MATCHED {
            return Some(state);
        }
        let next = self
            .dfa
            .next_state(StateID::new_unchecked(state as usize), b);
        // A DFA's match shows one byte late: the searched text before `b` held it.
        if self.mode == Mode::Search && self.dfa.is_match_state(next) {
            return Some(Self::MATCHED);
        }
        (!self.dfa.is_dead_state(next) && !self.dfa.is_quit_state(next)).then(|| next.as_u32())
    }

    /// The state after the text's byte `b`, if a match can still follow it in at most
    /// `room` more characters.
    pub fn step(&self, state: u32, b: u8, room: u32) -> Option<u32> {
        self.next(state, b).filter(|&s| self.reaches(s, room))
    }

    /// The state after `text`, if a match can still follow it.
    pub fn after(&self, state: u32, text: &[u8]) -> Option<u32> {
        text.iter()
            .try_fold(state, |s, &b| self.next(s, b))
            .filter(|&s| self.reaches(s, u32::MAX))
    }

    /// Whether a text that ends in `state` matches.
    pub fn matched(&self, state: u32) -> bool {
        state == Self::MATCHED || {
            let end = self
                .dfa
                .next_eoi_state(StateID::new_unchecked(state as usize));
            self.dfa.is_match_state(end)
        }
    }

    /// Whether some byte the text can hold may follow `state` (a match still in reach).
    pub fn grows(&self, state: u32) -> bool {
        (0..=u8::MAX).any(|b| self.mode.holds(b) && self.step(state, b, u32::MAX).is_some())
    }
}

/// Tokens as a trie of their bytes, its nodes in depth-first order, so that a walk that
/// runs a pattern's DFA along it steps once per shared prefix, not once per token byte,
/// and drops a whole subtree where the DFA dies.
#[derive(Default)]
pub struct Trie {
    /// Each node's last byte (its path from the root spells its text).
    byte: Vec<u8>,
    /// Each node's depth (0 for the root's children).
    depth: Vec<u16>,
    /// The characters each node's text starts (bytes but UTF-8 continuation bytes).
    chars: Vec<u16>,
    /// The node after each node's subtree.
    skip: Vec<u32>,
    /// The tokens, in the order of their nodes; node `i`'s subtree holds
    /// `tokens[first[i]..first[skip[i]]]`, its own text `tokens[first[i]..first[i + 1]]`.
    tokens: Vec<u32>,
    first: Vec<u32>,
}

impl Trie {
    /// The trie of `(text, token)` (texts not empty).
    pub fn new(mut texts: Vec<(&[u8], u32)>) -> Self {
        texts.sort_unstable();
        let mut t = Trie::default();
        // The nodes of the last text's path, by depth.
        let mut path: Vec<usize> = Vec::new();
        let mut last: &[u8] = &[];
        for (text, token) in texts {
            let shared = last.iter().zip(text).take_while(|(a, b)| a == b).count();
            for i in path.drain(shared..) {
                t.skip[i] = t.byte.len() as u32;
            }
            for (d, &b) in text.iter().enumerate().skip(shared) {
                let parent_chars = d.checked_sub(1).map_or(0, |_| t.chars[path[d - 1]]);
                path.push(t.byte.len());
                t.byte.push(b);
                t.depth.push(d as u16);
                t.chars
                    .push(parent_chars + u16::from(!(0x80..=0xbf).contains(&b)));
                t.skip.push(0);
                t.first.push(t.tokens.len() as u32);
            }
            t.tokens.push(token);
            last = text;
        }
        for i in path {
            t.skip[i] = t.byte.len() as u32;
        }
        t.first.push(t.tokens.len() as u32);
        t
    }

    /// The tokens of node `i`'s subtree.
    fn subtree(&self, i: usize) -> &[u32] {
        let end = self.first[self.skip[i] as usize];
        &self.tokens[self.first[i] as usize..end as usize]
    }

    /// The tokens whose text `p` takes from `state`, a match still in reach of `room`
    /// characters after it: calls `refuse` with each of the others.
    pub fn walk(&self, p: &Pattern, state: u32, room: u32, mut refuse: impl FnMut(u32)) {
        let mut states = vec![state; 1];
        let mut i = 0;
        while i < self.byte.len() {
            let d = self.depth[i] as usize;
            let chars = u32::from(self.chars[i]);
            // Past the room, or the pattern dead, or its match out of reach: and so for all
            // longer texts below it (each character more uses as much room as it can bring
            // the match nearer).
            let next = p
                .next(states[d], self.byte[i])
                .filter(|&s| chars <= room && p.reaches(s, room - chars));
            match next {
                Some(s) => {
                    states.truncate(d + 1);
                    states.push(s);
                    i += 1;
                }
                None => {
                    self.subtree(i).iter().for_each(|&t| refuse(t));
                    i = self.skip[i] as usize;
                }
            }
        }
    }
}

/// A vocabulary for a whole-text pattern: the tokens with bytes as a trie, and those
/// without (control and end-of-generation tokens).
pub struct TextTokens {
    trie: Trie,
    bare: Vec<u32>,
    tokens: usize,
}

impl TextTokens {
    /// Sorts the tokens whose bytes `pieces` yields, in id order.
    pub fn new<'a>(pieces: impl IntoIterator<Item = &'a [u8]>) -> Self {
        let mut texts = Vec::new();
        let mut bare = Vec::new();
        let mut tokens = 0;
        for (t, piece) in pieces.into_iter().enumerate() {
            if piece.is_empty() {
                bare.push(t as u32);
            } else {
                texts.push((piece, t as u32));
            }
            tokens += 1;
        }
        Self {
            trie: Trie::new(texts),
            bare,
            tokens,
        }
    }

    /// Sets the logit of every token whose bytes `p` does not take from `state` to −∞; of
    /// the tokens without bytes, only those in `ends` are left, and only where the text
    /// matches. Logits past the vocabulary (padding) are set too. Returns whether any
    /// finite logit is left.
    pub fn mask(&self, p: &Pattern, state: u32, ends: &[u32], logits: &mut [f32]) -> bool {
        let mut refuse = |t: u32| {
            if let Some(l) = logits.get_mut(t as usize) {
                *l = f32::NEG_INFINITY;
            }
        };
        self.trie.walk(p, state, u32::MAX, &mut refuse);
        let may_end = p.matched(state);
        for &t in &self.bare {
            if !(may_end && ends.contains(&t)) {
                refuse(t);
            }
        }
        if let Some(padding) = logits.get_mut(self.tokens..) {
            padding.fill(f32::NEG_INFINITY);
        }
        logits.iter().any(|&l| l > f32::NEG_INFINITY)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn whole(regex: &str) -> Pattern {
        Pattern::new(&parse(regex).unwrap(), regex, Mode::Whole).unwrap()
    }

    fn after(p: &Pattern, text: &str) -> Option<u32> {
        p.after(p.start, text.as_bytes())
    }

    #[test]
    fn a_whole_pattern_matches_from_the_first_byte_to_the_last() {
        let p = whole(r"(yes|no)\.?");
        assert!(after(&p, "ye").is_some_and(|s| !p.matched(s) && p.grows(s)));
        assert!(after(&p, "yes").is_some_and(|s| p.matched(s) && p.grows(s)));
        assert!(after(&p, "yes.").is_some_and(|s| p.matched(s) && !p.grows(s)));
        // Not searched: a match inside the text is not one of the text.
        assert!(after(&p, " yes").is_none() && after(&p, "yes!").is_none());
        // Control characters and any UTF-8 are text here.
        let p = whole("a\tb\u{e9}");
        assert!(after(&p, "a\tb\u{e9}").is_some_and(|s| p.matched(s)));
        let half = p.after(p.start, b"a\tb\xc3");
        assert!(half.is_some_and(|s| !p.matched(s)));
    }

    #[test]
    fn a_state_that_cannot_reach_a_match_is_never_entered() {
        // `\x01` cannot be written in a JSON string under a pattern, but can be a whole
        // output's.
        let hir = parse(r"^(ab\x01|cd)$").unwrap();
        let searched = Pattern::new(&hir, "", Mode::Search).unwrap();
        assert!(searched.after(searched.start, b"a").is_none());
        let whole = Pattern::new(&hir, "", Mode::Whole).unwrap();
        assert!(whole
            .after(whole.start, b"ab\x01")
            .is_some_and(|s| whole.matched(s)));
        for mode in [Mode::Search, Mode::Whole] {
            let e = Pattern::new(&parse("[^\\x00-\\x{10FFFF}]").unwrap(), "x", mode);
            assert!(e.unwrap_err().contains("no text"));
        }
    }

    #[test]
    fn a_counted_unicode_class_too_big_for_a_dfa_is_followed_in_ascii() {
        let regex = r"^\w{1,40}( \w{1,40})*$";
        let whole = |hir: Hir| Pattern::new(&hir, regex, Mode::Whole);
        let e = whole(parse(regex).unwrap()).unwrap_err();
        assert!(e.contains("limit"), "{e}");
        let p = build_narrowing(regex, whole).unwrap();
        assert!(after(&p, "snake_case and_more 42").is_some_and(|s| p.matched(s)));
        // Narrower, not other: a Unicode word character is refused, not misread.
        assert!(after(&p, "caf\u{e9}").is_none() && after(&p, "a  b").is_none());
        // What cannot be read without Unicode keeps the first error.
        for regex in [r"^.{1,40}( .{1,40})*$", r"^\p{L}{1,40}( \p{L}{1,40})*$"] {
            let e = build_narrowing(regex, |h| Pattern::new(&h, regex, Mode::Whole));
            assert!(e.unwrap_err().contains("limit"), "{regex}");
        }
        // A pattern that compiles is left as it is.
        let p = build_narrowing(r"\w+", |h| Pattern::new(&h, "", Mode::Whole)).unwrap();
        assert!(after(&p, "caf\u{e9}").is_some_and(|s| p.matched(s)));
    }

    #[test]
    fn a_trie_node_holds_the_tokens_of_its_text_and_its_subtree_those_below() {
        let texts: [&[u8]; 8] = [b"ab", b"a", b"abc", b"b", b"ab", b"\xc3\xa9", b"abd", b"c"];
        let trie = Trie::new(texts.iter().copied().zip(0..).collect());
        let mut path: Vec<u8> = Vec::new();
        for i in 0..trie.byte.len() {
            path.truncate(trie.depth[i] as usize);
            path.push(trie.byte[i]);
            let own = &trie.tokens[trie.first[i] as usize..trie.first[i + 1] as usize];
            let mut want: Vec<u32> = (0..8).filter(|&t| texts[t as usize] == path).collect();
            assert_eq!(own, want.as_slice(), "{path:?}");
            let mut below = trie.subtree(i).to_vec();
            below.sort();
            want = (0..8)
                .filter(|&t| texts[t as usize].starts_with(&path))
                .collect();
            assert_eq!(below, want, "{path:?}");
            let chars = std::str::from_utf8(&path).map_or(1, |t| t.chars().count());
            assert_eq!(trie.chars[i] as usize, chars, "{path:?}");
        }
        assert_eq!(trie.tokens.len(), 8);
    }

    #[test]
    fn text_tokens_end_the_output_only_where_it_matches() {
        let pieces: [&[u8]; 5] = [b"", b"1", b"12", b"x", b""];
        let table = TextTokens::new(pieces);
        let p = whole("[0-9]+");
        let allowed = |text: &str| {
            let mut logits = vec![0.0; 6];
            let any = table.mask(&p, after(&p, text).unwrap(), &[4], &mut logits);
            let kept: Vec<usize> = (0..6).filter(|&t| logits[t] == 0.0).collect();
            (any, kept)
        };
        // Token 0 is a control token, 4 the end of generation, 5 padding.
        assert_eq!(allowed(""), (true, vec![1, 2]));
        assert_eq!(allowed("1"), (true, vec![1, 2, 4]));
    }

    #[test]
    fn the_walk_refuses_exactly_the_tokens_the_pattern_does_not_take() {
        let texts: Vec<&[u8]> = vec![
            b"1", b"12", b"123", b"1234", b"a", b"1a", b"-", b"-1", b"12-", b" ", b"\xc3", b"9",
        ];
        let trie = Trie::new(texts.iter().copied().zip(0..).collect());
        let p = whole(r"[0-9]{1,3}(-[0-9])?");
        for prefix in ["", "1", "12", "123", "12-"] {
            let at = after(&p, prefix).unwrap();
            let mut refused = Vec::new();
            trie.walk(&p, at, u32::MAX, |t| refused.push(t));
            refused.sort();
            let want: Vec<u32> = (0..texts.len() as u32)
                .filter(|&t| p.after(at, texts[t as usize]).is_none())
                .collect();
            assert_eq!(refused, want, "after {prefix:?}");
        }
    }
}
