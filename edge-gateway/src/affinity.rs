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

use serde_json::Value;

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

    /// The canonical prompt text of an OpenAI request body (chat `messages` or completion
    /// `prompt`), or `None` when it has neither.
    pub fn prompt_text(body: &Value) -> Option<String> {
        if let Some(messages) = body.get("messages").and_then(Value::as_array) {
            let mut s = String::new();
            for m in messages {
                s.push_str(m.get("role").and_then(Value::as_str).unwrap_or(""));
                s.push('\n');
                match m.get("content") {
                    Some(Value::String(t)) => s.push_str(t),
                    Some(Value::Array(parts)) => {
                        for p in parts {
                            if let Some(t) = p.get("text").and_then(Value::as_str) {
                                s.push_str(t);
                            }
                        }
                    }
                    _ => {}
                }
                if let Some(calls) = m.get("tool_calls") {
                    s.push_str(&calls.to_string());
                }
                s.push('\u{1e}');
            }
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
