//! Splits a chat answer as it streams into its parts: a thinking model's reasoning
//! (`<think>...</think>`, as Qwen3 and DeepSeek-R1 write it), the answer, and Hermes-style tool
//! calls (`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, as Qwen2.5 and Qwen3 write
//! them). Text that may be the start of a tag is held back until it is known not to be.

use crate::bindings::exports::wasmlm::llm::types::ToolCall;

const THINK_OPEN: &str = "<think>";
const THINK_CLOSE: &str = "</think>";
const CALL_OPEN: &str = "<tool_call>";
const CALL_CLOSE: &str = "</tool_call>";

#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    /// Nothing emitted yet: a `<think>` here opens reasoning.
    Start,
    Reasoning,
    Content,
    ToolCall,
}

/// What one piece of text turned out to be.
#[derive(Debug, Default)]
pub struct Parsed {
    pub content: String,
    pub reasoning: String,
    pub tool_calls: Vec<ToolCall>,
}

/// The streaming splitter of one answer.
pub struct ResponseParser {
    mode: Mode,
    parse_tools: bool,
    held: String,
    calls: usize,
    /// Strip newlines at the start of the next reasoning or content text.
    skip_newlines: bool,
    /// The answer (after any reasoning) is one call's `{"name": ..., "arguments": {...}}`
    /// or an array of them (a required tool call): held to the end, then tool calls (or, cut
    /// short, content).
    forced_call: bool,
}

impl ResponseParser {
    /// A parser; `thinking` when the prompt already opened `<think>` or the model may open it,
    /// `parse_tools` when the request offered tools.
    pub fn new(thinking: bool, prompt_opened_think: bool, parse_tools: bool) -> Self {
        let mode = match (thinking, prompt_opened_think) {
            (true, true) => Mode::Reasoning,
            (true, false) => Mode::Start,
            (false, _) => Mode::Content,
        };
        Self {
            mode,
            parse_tools,
            held: String::new(),
            calls: 0,
            skip_newlines: mode == Mode::Reasoning,
            forced_call: false,
        }
    }

    /// A parser for an answer that is one tool call's JSON object, or an array of them, and
    /// nothing else, after the reasoning of a `thinking` model.
    pub fn forced_call(thinking: bool, prompt_opened_think: bool) -> Self {
        Self {
            forced_call: true,
            ..Self::new(thinking, prompt_opened_think, false)
        }
    }

    /// Whether any tool call was parsed.
    pub fn made_calls(&self) -> bool {
        self.calls > 0
    }

    /// Takes the next piece of generated text.
    pub fn push(&mut self, text: &str) -> Parsed {
        self.held.push_str(text);
        let mut out = Parsed::default();
        self.drain(&mut out, false);
        out
    }

    /// Ends the answer: held text goes where it was heading; an unclosed tool call is text.
    pub fn finish(&mut self) -> Parsed {
        let mut out = Parsed::default();
        self.drain(&mut out, true);
        if self.forced_call && self.mode == Mode::Content {
            match forced_calls(&self.held) {
                Some(calls) => {
                    self.calls = calls.len();
                    out.tool_calls = calls;
                }
                None => out.content = std::mem::take(&mut self.held),
            }
            return out;
        }
        let rest = std::mem::take(&mut self.held);
        match self.mode {
            Mode::Reasoning => out.reasoning.push_str(rest.trim_end_matches('\n')),
            Mode::ToolCall => {
                out.content.push_str(CALL_OPEN);
                out.content.push_str(&rest);
            }
            Mode::Start | Mode::Content => out.content.push_str(&rest),
        }
        out
    }

    fn drain(&mut self, out: &mut Parsed, last: bool) {
        loop {
            if self.skip_newlines {
                let trimmed = self.held.trim_start_matches('\n');
                if trimmed.is_empty() && !last {
                    self.held.clear();
                    return;
                }
                self.held = trimmed.to_string();
                self.skip_newlines = false;
            }
            match self.mode {
                Mode::Start => {
                    let t = self.held.trim_start();
                    if let Some(rest) = t.strip_prefix(THINK_OPEN) {
                        self.held = rest.to_string();
                        self.mode = Mode::Reasoning;
                        self.skip_newlines = true;
                        continue;
                    }
                    if !last && THINK_OPEN.starts_with(t) {
                        return; // maybe the start of `<think>`
                    }
                    self.mode = Mode::Content;
                }
                Mode::Reasoning => {
                    if let Some(i) = self.held.find(THINK_CLOSE) {
                        out.reasoning
                            .push_str(self.held[..i].trim_end_matches('\n'));
                        self.held = self.held[i + THINK_CLOSE.len()..].to_string();
                        self.mode = Mode::Content;
                        self.skip_newlines = true;
                        continue;
                    }
                    let keep = self.keep_back(THINK_CLOSE, true);
                    out.reasoning.push_str(&self.held[..keep]);
                    self.held.drain(..keep);
                    return;
                }
                // A required call's text is held whole.
                Mode::Content if self.forced_call => return,
                Mode::Content => {
                    if self.parse_tools {
                        if let Some(i) = self.held.find(CALL_OPEN) {
                            out.content.push_str(&self.held[..i]);
                            self.held = self.held[i + CALL_OPEN.len()..].to_string();
                            self.mode = Mode::ToolCall;
                            continue;
                        }
                        let keep = self.keep_back(CALL_OPEN, false);
                        out.content.push_str(&self.held[..keep]);
                        self.held.drain(..keep);
                    } else {
                        out.content.push_str(&self.held);
                        self.held.clear();
                    }
                    return;
                }
                Mode::ToolCall => {
                    let Some(i) = self.held.find(CALL_CLOSE) else {
                        return;
                    };
                    let body = self.held[..i].to_string();
                    self.held = self.held[i + CALL_CLOSE.len()..].to_string();
                    self.mode = Mode::Content;
                    match parse_call(&body, self.calls) {
                        Some(call) => {
                            self.calls += 1;
                            out.tool_calls.push(call);
                            // Newlines between calls and after the last are layout.
                            self.skip_newlines = true;
                        }
                        None => {
                            out.content.push_str(CALL_OPEN);
                            out.content.push_str(&body);
                            out.content.push_str(CALL_CLOSE);
                        }
                    }
                }
            }
        }
    }

    /// How much of `held` can be emitted: all but a tail that may begin `tag` (and, in
    /// reasoning, the newlines that would precede it).
    fn keep_back(&self, tag: &str, newlines: bool) -> usize {
        let h = &self.held;
        let mut cut = h.len();
        for (i, _) in h.char_indices().rev().take(tag.len()) {
            if tag.starts_with(&h[i..]) {
                cut = i;
            }
        }
        if newlines {
            cut = h[..cut].trim_end_matches('\n').len();
        }
        cut
    }
}

/// `{"name": ..., "arguments": {...}}` as a tool call, or `None` when it is not one.
fn parse_call(body: &str, index: usize) -> Option<ToolCall> {
    call_of(&serde_json::from_str(body.trim()).ok()?, index)
}

/// A required answer's calls: one call's object, or a non-empty array of them.
fn forced_calls(body: &str) -> Option<Vec<ToolCall>> {
    match serde_json::from_str(body.trim()).ok()? {
        serde_json::Value::Array(calls) if !calls.is_empty() => calls
            .iter()
            .enumerate()
            .map(|(i, v)| call_of(v, i))
            .collect(),
        v => Some(vec![call_of(&v, 0)?]),
    }
}

fn call_of(v: &serde_json::Value, index: usize) -> Option<ToolCall> {
    let name = v.get("name")?.as_str()?.to_string();
    let arguments = match v.get("arguments").or_else(|| v.get("parameters")) {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
        None => "{}".into(),
    };
    Some(ToolCall {
        id: format!("call_{index}"),
        name,
        arguments,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `pieces` one by one and gathers everything.
    fn run(p: &mut ResponseParser, pieces: &[&str]) -> Parsed {
        let mut all = Parsed::default();
        let mut add = |x: Parsed| {
            all.content.push_str(&x.content);
            all.reasoning.push_str(&x.reasoning);
            all.tool_calls.extend(x.tool_calls);
        };
        for piece in pieces {
            add(p.push(piece));
        }
        add(p.finish());
        all
    }

    #[test]
    fn a_forced_call_may_follow_reasoning() {
        let pieces = [
            "<think>",
            "\nParis, so get_weather.\n",
            "</think>",
            "{\"name\": \"get_weather\", \"arguments\": {}}",
        ];
        let mut p = ResponseParser::forced_call(true, false);
        // The reasoning streams as it comes; the call is held to the end.
        let early: Vec<Parsed> = pieces.iter().map(|x| p.push(x)).collect();
        assert_eq!(early[1].reasoning, "Paris, so get_weather.");
        assert!(early
            .iter()
            .all(|x| x.content.is_empty() && x.tool_calls.is_empty()));
        let end = p.finish();
        assert_eq!(end.tool_calls[0].name, "get_weather");
        assert_eq!(end.content, "");
        // Or the model calls at once, or the prompt opened the block; cut short in the
        // reasoning, there is no call and no content.
        let out = run(&mut ResponseParser::forced_call(true, false), &pieces[3..]);
        assert_eq!((out.tool_calls.len(), out.reasoning.as_str()), (1, ""));
        let out = run(&mut ResponseParser::forced_call(true, true), &pieces[1..]);
        assert_eq!(out.tool_calls.len(), 1);
        assert_eq!(out.reasoning, "Paris, so get_weather.");
        let mut p = ResponseParser::forced_call(true, false);
        let out = run(&mut p, &pieces[..2]);
        assert_eq!((out.content.as_str(), p.made_calls()), ("", false));
        assert_eq!(out.reasoning, "Paris, so get_weather.");
    }

    #[test]
    fn a_forced_call_is_held_to_the_end_and_becomes_a_call() {
        let mut p = ResponseParser::forced_call(false, false);
        let out = run(
            &mut p,
            &[
                "{\"name\": \"get_",
                "weather\", \"arguments\": {\"city\"",
                ": \"Paris\"}}",
            ],
        );
        assert_eq!(out.content, "");
        assert!(p.made_calls());
        let call = &out.tool_calls[0];
        assert_eq!(
            (call.name.as_str(), call.arguments.as_str()),
            ("get_weather", r#"{"city":"Paris"}"#)
        );
        // Cut short (max_tokens), the text is content and no call was made.
        let mut p = ResponseParser::forced_call(false, false);
        let out = run(&mut p, &["{\"name\": \"get_", "weather\", \"argu"]);
        assert_eq!(out.content, "{\"name\": \"get_weather\", \"argu");
        assert!(out.tool_calls.is_empty() && !p.made_calls());
        // Parallel calls come as an array; each becomes a call.
        let mut p = ResponseParser::forced_call(false, false);
        let out = run(
            &mut p,
            &[
                "[{\"name\": \"a\", \"arguments\": {}}, ",
                "{\"name\": \"b\", \"arguments\": {\"x\": 1}}]",
            ],
        );
        let names: Vec<_> = out.tool_calls.iter().map(|c| c.name.as_str()).collect();
        assert_eq!((names, out.content.as_str()), (vec!["a", "b"], ""));
        assert_eq!(out.tool_calls[1].id, "call_1");
        let mut p = ResponseParser::forced_call(false, false);
        let out = run(&mut p, &["[{\"name\": \"a\", \"arguments\": {}}, {\"na"]);
        assert!(out.tool_calls.is_empty() && out.content.starts_with('['));
    }

    #[test]
    fn splits_reasoning_from_the_answer() {
        let mut p = ResponseParser::new(true, false, false);
        let out = run(
            &mut p,
            &[
                "<think>",
                "\n",
                "Paris is",
                " the capital",
                ".\n",
                "</think>",
                "\n\n",
                "Paris.",
            ],
        );
        assert_eq!(out.reasoning, "Paris is the capital.");
        assert_eq!(out.content, "Paris.");
    }

    #[test]
    fn a_prompt_that_opened_think_starts_in_reasoning() {
        let mut p = ResponseParser::new(true, true, false);
        let out = run(&mut p, &["\nhm", "m</th", "ink>\n\nok"]);
        assert_eq!(
            (out.reasoning.as_str(), out.content.as_str()),
            ("hmm", "ok")
        );
    }

    #[test]
    fn no_think_means_all_content() {
        let mut p = ResponseParser::new(true, false, false);
        let out = run(&mut p, &["<", "b>hi</b> <think> stays"]);
        assert_eq!(out.content, "<b>hi</b> <think> stays");
        assert_eq!(out.reasoning, "");
    }

    #[test]
    fn parses_tool_calls_split_across_pieces() {
        let mut p = ResponseParser::new(false, false, true);
        let out = run(
            &mut p,
            &[
                "Let me check.\n<tool",
                "_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": ",
                "\"Paris\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"now\", \"arguments\": {}}\n</tool_call>",
            ],
        );
        assert_eq!(out.content, "Let me check.\n");
        assert_eq!(out.tool_calls.len(), 2);
        assert_eq!(out.tool_calls[0].name, "get_weather");
        assert_eq!(out.tool_calls[0].arguments, r#"{"city":"Paris"}"#);
        assert_eq!(out.tool_calls[1].id, "call_1");
        assert!(p.made_calls());
    }

    #[test]
    fn broken_or_unclosed_calls_stay_text() {
        let mut p = ResponseParser::new(false, false, true);
        let out = run(
            &mut p,
            &["<tool_call>not json</tool_call> and <tool_call>{\"name\""],
        );
        assert_eq!(
            out.content,
            "<tool_call>not json</tool_call> and <tool_call>{\"name\""
        );
        assert!(out.tool_calls.is_empty());
        let mut p = ResponseParser::new(false, false, false);
        let out = run(&mut p, &["<tool_call>{\"name\": \"x\"}</tool_call>"]);
        assert!(out.tool_calls.is_empty(), "no tools offered: no parsing");
    }
}
