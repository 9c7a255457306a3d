//! Prompt-prefix affinity: which node last served a prompt starting like this one.
//!
//! The gateway cannot render templates or tokenize (it knows no model), so it hashes a canonical
//! text of the request (each message's role and content, or the raw prompt) in fixed-size
//! chunks: the hash after chunk k covers the first k chunks. A served request records all its
//! chunk hashes with the node; a later request looks for its longest recorded prefix. A
//! conversation re-sent with one more turn, or a tenant's long shared system prompt, thereby
//! finds the node whose slots hold its KV cache.

use std::collections::{HashMap, VecDeque};
use std::hash::Hasher;

use serde_json::{json, Value};

/// Cumulative chunk hashes of a prompt, each with the prefix length it covers.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PrefixHashes(pub Vec<(u64, usize)>);

/// FNV-1a: stable across runs and processes (std's hasher is randomly keyed).
struct Fnv(u64);

impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

impl PrefixHashes {
    /// Hashes of `text`'s full chunks of `chunk` bytes, keyed by `model`.
    pub fn of(model: &str, text: &str, chunk: usize) -> Self {
        let mut h = Fnv(0xcbf2_9ce4_8422_2325);
        h.write(model.as_bytes());
        h.write(&[0xff]);
        let bytes = text.as_bytes();
        let mut out = Vec::with_capacity(bytes.len() / chunk.max(1));
        for (i, c) in bytes.chunks_exact(chunk.max(1)).enumerate() {
            h.write(c);
            out.push((h.finish(), (i + 1) * chunk));
        }
        PrefixHashes(out)
    }

    /// The canonical prompt text of a request body (chat or Anthropic `messages`, completion
    /// `prompt`, or a Responses `input`), or `None` when it has none.
    pub fn prompt_text(body: &Value) -> Option<String> {
        if let Some(input) = body.get("input").filter(|_| body.get("messages").is_none()) {
            return Some(Self::responses_text(body, input));
        }
        if let Some(messages) = body.get("messages").and_then(Value::as_array) {
            let mut s = String::new();
            // Anthropic's Messages API has its system prompt beside the messages.
            if let Some(system) = body.get("system") {
                Self::push_message(&mut s, &json!({"role": "system", "content": system}));
            }
            messages.iter().for_each(|m| Self::push_message(&mut s, m));
            return Some(s);
        }
        match body.get("prompt")? {
            Value::String(t) => Some(t.clone()),
            Value::Array(items) => Some(
                items
                    .iter()
                    .next()
                    .map(|first| match first {
                        Value::String(t) => t.clone(),
                        other => other.to_string(),
                    })
                    .unwrap_or_default(),
            ),
            _ => None,
        }
    }

    /// One chat message (or Responses or Anthropic message) as text: role, content (a
    /// string, or the text of its parts), tool calls.
    fn push_message(s: &mut String, m: &Value) {
        s.push_str(m.get("role").and_then(Value::as_str).unwrap_or(""));
        s.push('\n');
        match m.get("content") {
            Some(Value::String(t)) => s.push_str(t),
            Some(Value::Array(parts)) => parts
                .iter()
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .for_each(|t| s.push_str(t)),
            _ => {}
        }
        if let Some(calls) = m.get("tool_calls") {
            s.push_str(&calls.to_string());
        }
        s.push('\u{1e}');
    }

    /// A Responses API body's conversation as text: `instructions` and the `input` string or
    /// items, each message as a chat message is, other items (function calls and their
    /// outputs) as their JSON, which a client re-sends unchanged each turn.
    fn responses_text(body: &Value, input: &Value) -> String {
        let mut s = String::new();
        if let Some(t) = body.get("instructions").and_then(Value::as_str) {
            s.push_str("system\n");
            s.push_str(t);
            s.push('\u{1e}');
        }
        match input {
            Value::String(t) => {
                s.push_str("user\n");
                s.push_str(t);
            }
            Value::Array(items) => {
                for item in items {
                    if item.get("role").is_some() {
                        Self::push_message(&mut s, item);
                    } else {
                        s.push_str(&item.to_string());
                        s.push('\u{1e}');
                    }
                }
            }
            other => s.push_str(&other.to_string()),
        }
        s
    }
}

/// Chunk hash → the node that last served it, bounded (oldest entries go first).
#[derive(Debug)]
pub struct AffinityIndex {
    capacity: usize,
    map: HashMap<u64, (String, u64)>,
    order: VecDeque<(u64, u64)>,
    seq: u64,
}

impl AffinityIndex {
    /// An index keeping at most `capacity` chunk hashes.
    pub fn new(capacity: usize) -> Self {
        AffinityIndex {
            capacity: capacity.max(1),
            map: HashMap::new(),
            order: VecDeque::new(),
            seq: 0,
        }
    }

    /// The node that served the longest recorded prefix, and that prefix's length in bytes.
    pub fn lookup(&self, hashes: &PrefixHashes) -> Option<(&str, usize)> {
        hashes
            .0
            .iter()
            .rev()
            .find_map(|(h, len)| self.map.get(h).map(|(node, _)| (node.as_str(), *len)))
    }

    /// Remembers that `node` served every prefix in `hashes`.
    pub fn record(&mut self, hashes: &PrefixHashes, node: &str) {
        for (h, _) in &hashes.0 {
            self.seq += 1;
            self.map.insert(*h, (node.to_string(), self.seq));
            self.order.push_back((*h, self.seq));
        }
        while self.map.len() > self.capacity || self.order.len() > 2 * self.capacity {
            let Some((h, seq)) = self.order.pop_front() else {
                break;
            };
            if self.map.get(&h).is_some_and(|(_, s)| *s == seq) {
                self.map.remove(&h);
            }
        }
    }

    /// Forgets a node (it left the inventory).
    pub fn forget(&mut self, node: &str) {
        self.map.retain(|_, (n, _)| n != node);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_conversation_finds_the_node_of_its_earlier_turn() {
        let turn1 = json!({"messages": [
            {"role": "system", "content": "You are a terse assistant for a shipping company."},
            {"role": "user", "content": "Where is parcel 1234? Please answer in one line."},
        ]});
        let mut turn2 = turn1.clone();
        let msgs = turn2["messages"].as_array_mut().unwrap();
        msgs.push(json!({"role": "assistant", "content": "In Lyon."}));
        msgs.push(json!({"role": "user", "content": "And when does it arrive?"}));
        let h1 = PrefixHashes::of("m", &PrefixHashes::prompt_text(&turn1).unwrap(), 32);
        let h2 = PrefixHashes::of("m", &PrefixHashes::prompt_text(&turn2).unwrap(), 32);
        assert!(h1.0.len() >= 3 && h2.0.len() > h1.0.len());
        let mut idx = AffinityIndex::new(1000);
        idx.record(&h1, "node-a");
        let (node, len) = idx.lookup(&h2).expect("a match");
        assert_eq!(node, "node-a");
        assert_eq!(len, h1.0.last().unwrap().1);
        // Another model never matches, nor a different prompt.
        let other = PrefixHashes::of("m2", &PrefixHashes::prompt_text(&turn2).unwrap(), 32);
        assert_eq!(idx.lookup(&other), None);
        let unrelated = PrefixHashes::of("m", &"x".repeat(200), 32);
        assert_eq!(idx.lookup(&unrelated), None);
        idx.forget("node-a");
        assert_eq!(idx.lookup(&h2), None);
    }

    #[test]
    fn a_responses_turn_extends_the_text_of_the_turn_before() {
        let turn1 = json!({"instructions": "Be terse.", "input": "Where is parcel 1234?"});
        let turn2 = json!({"instructions": "Be terse.", "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "Where is parcel 1234?"}]},
            {"type": "function_call", "call_id": "c1", "name": "track", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": "Lyon"},
        ]});
        let t1 = PrefixHashes::prompt_text(&turn1).unwrap();
        let t2 = PrefixHashes::prompt_text(&turn2).unwrap();
        assert!(
            t2.starts_with(&t1) && t2.len() > t1.len() + 40,
            "{t1:?} {t2:?}"
        );
        // A body with both is a chat: its `messages` are the prompt.
        let chat = json!({"messages": [{"role": "user", "content": "x"}], "input": "y"});
        assert_eq!(
            PrefixHashes::prompt_text(&chat).as_deref(),
            Some("user\nx\u{1e}")
        );
    }

    #[test]
    fn the_index_stays_bounded_and_newest_wins() {
        let mut idx = AffinityIndex::new(10);
        for i in 0..100 {
            let h = PrefixHashes::of("m", &format!("{i:064}"), 16);
            idx.record(&h, &format!("n{i}"));
        }
        assert!(idx.map.len() <= 10);
        let last = PrefixHashes::of("m", &format!("{:064}", 99), 16);
        assert_eq!(idx.lookup(&last).map(|m| m.0), Some("n99"));
        idx.record(&last, "other");
        assert_eq!(idx.lookup(&last).map(|m| m.0), Some("other"));
    }
}
