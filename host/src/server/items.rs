//! A chat generation laid out as the output items of the Responses and Messages APIs:
//! reasoning, answer text and tool calls, each an item opened, added to and closed in the
//! order the chunks bring them. Each API renders the same steps as its own events.

use serde_json::Value;

use tokio::sync::mpsc;

use super::api::unique;
use super::error::ApiError;
use super::wire::chat_logprob;
use super::worker::{Event, Timings};
use crate::bindings::exports::wasmlm::llm::generation::Chunk;
use crate::bindings::exports::wasmlm::llm::types::{FinishReason, StopMatch, Usage};

/// What an output item holds.
#[derive(Clone, Debug, PartialEq)]
pub enum Item {
    /// A thinking model's `<think>` text.
    Reasoning(String),
    /// Answer text, and the logprobs of its tokens when asked for.
    Text { text: String, logprobs: Vec<Value> },
    /// A tool call, whole (the component parses a call once it is complete).
    Call {
        call_id: String,
        name: String,
        arguments: String,
    },
}

/// One output item: its id (`prefix` of its kind and a unique suffix), content, and whether
/// it is closed.
#[derive(Debug)]
pub struct Output {
    pub id: String,
    pub item: Item,
    pub done: bool,
}

/// What changed, for an API's stream events.
#[derive(Debug, PartialEq)]
pub enum Step {
    /// Item `k` opened (empty).
    Added(usize),
    /// Item `k` grew by this text (reasoning, answer or arguments), and these logprobs.
    Delta(usize, String, Vec<Value>),
    /// Item `k` closed.
    Done(usize),
}

/// The output items of one generation.
pub struct Items {
    /// Prefixes of ids of reasoning, text and call items, as the API names them.
    prefixes: [&'static str; 3],
    logprobs: bool,
    pub output: Vec<Output>,
    /// Answer text of only whitespace, not yet an item: beside a tool call it is no text at
    /// all (chat says `content: null` there).
    blank: String,
    /// Logprobs of answer tokens whose text has not come out yet (held back while a stop
    /// string or a UTF-8 character may be incomplete, or blank); an end-of-generation
    /// token's stay here.
    pending_logprobs: Vec<Value>,
    pub finish: Option<FinishReason>,
    /// The stop string or token that ended the generation, if one did.
    pub stop_match: Option<StopMatch>,
    pub usage: Option<Usage>,
    /// llama.cpp's timings, which the edge gateway learns a node's speed from.
    pub timings: Option<Timings>,
    /// Tokens of chunks that wrote reasoning text.
    pub reasoning_tokens: u32,
}

impl Items {
    /// No items yet; ids of reasoning, text and call items start with `prefixes`.
    pub fn new(prefixes: [&'static str; 3], logprobs: bool) -> Self {
        Self {
            prefixes,
            logprobs,
            output: Vec::new(),
            blank: String::new(),
            pending_logprobs: Vec::new(),
            finish: None,
            stop_match: None,
            usage: None,
            timings: None,
            reasoning_tokens: 0,
        }
    }

    /// The open item of the same kind as `want` at the end, else a new one (the one before
    /// closed).
    fn open(&mut self, want: Item, steps: &mut Vec<Step>) -> usize {
        let same = self.output.last().is_some_and(|o| {
            !o.done
                && matches!(
                    (&o.item, &want),
                    (Item::Reasoning(_), Item::Reasoning(_))
                        | (Item::Text { .. }, Item::Text { .. })
                )
        });
        if same {
            return self.output.len() - 1;
        }
        self.close_last(steps);
        let prefix = match want {
            Item::Reasoning(_) => self.prefixes[0],
            Item::Text { .. } => self.prefixes[1],
            Item::Call { .. } => self.prefixes[2],
        };
        self.output.push(Output {
            id: format!("{prefix}_{}", unique()),
            item: want,
            done: false,
        });
        let k = self.output.len() - 1;
        steps.push(Step::Added(k));
        k
    }

    fn close_last(&mut self, steps: &mut Vec<Step>) {
        if let Some(o) = self.output.last_mut().filter(|o| !o.done) {
            o.done = true;
            steps.push(Step::Done(self.output.len() - 1));
        }
    }

    /// Takes one chunk in.
    pub fn record(&mut self, chunk: &Chunk) -> Vec<Step> {
        let mut steps = Vec::new();
        if !chunk.reasoning.is_empty() {
            self.reasoning_tokens += chunk.tokens.len() as u32;
            let k = self.open(Item::Reasoning(String::new()), &mut steps);
            if let Item::Reasoning(r) = &mut self.output[k].item {
                r.push_str(&chunk.reasoning);
            }
            steps.push(Step::Delta(k, chunk.reasoning.clone(), Vec::new()));
        }
        if self.logprobs && chunk.reasoning.is_empty() {
            self.pending_logprobs
                .extend(chunk.logprobs.iter().map(chat_logprob));
        }
        let in_text = matches!(
            self.output.last(),
            Some(Output {
                item: Item::Text { .. },
                done: false,
                ..
            })
        );
        if !in_text && chunk.text.trim().is_empty() {
            self.blank.push_str(&chunk.text);
        } else if !chunk.text.is_empty() {
            let text = std::mem::take(&mut self.blank) + &chunk.text;
            self.add_text(text, &mut steps);
        }
        for call in &chunk.tool_calls {
            self.blank.clear();
            self.pending_logprobs.clear();
            let k = self.open(
                Item::Call {
                    call_id: format!("call_{}", unique()),
                    name: call.name.clone(),
                    arguments: call.arguments.clone(),
                },
                &mut steps,
            );
            steps.push(Step::Delta(k, call.arguments.clone(), Vec::new()));
            self.close_last(&mut steps);
        }
        if chunk.finish.is_some() {
            self.finish = chunk.finish;
            self.stop_match = chunk.stop_match.clone();
        }
        steps
    }

    /// Adds answer text (and the pending logprobs) to the open text item, opening one.
    fn add_text(&mut self, text: String, steps: &mut Vec<Step>) {
        let k = self.open(
            Item::Text {
                text: String::new(),
                logprobs: Vec::new(),
            },
            steps,
        );
        let lps = std::mem::take(&mut self.pending_logprobs);
        if let Item::Text {
            text: t,
            logprobs: l,
        } = &mut self.output[k].item
        {
            t.push_str(&text);
            l.extend(lps.iter().cloned());
        }
        steps.push(Step::Delta(k, text, lps));
    }

    /// The end of the generation: a whitespace answer with nothing else becomes the text,
    /// and the open item closes.
    pub fn finish(&mut self, usage: Usage, timings: Timings) -> Vec<Step> {
        let mut steps = Vec::new();
        self.usage = Some(usage);
        self.timings = Some(timings);
        // A blank answer is the text when nothing else was said (an empty one too, so
        // that there is an output at all).
        let said = self
            .output
            .iter()
            .any(|o| !matches!(o.item, Item::Reasoning(_)));
        if !said && (!self.blank.is_empty() || self.output.is_empty()) {
            let text = std::mem::take(&mut self.blank);
            self.add_text(text, &mut steps);
        }
        self.close_last(&mut steps);
        steps
    }

    /// Takes in a whole (non-streamed) generation: `first` and the events after it.
    pub async fn collect(
        &mut self,
        first: Event,
        mut rx: mpsc::Receiver<Event>,
    ) -> Result<(), ApiError> {
        let mut next = Some(first);
        while let Some(ev) = next {
            match ev {
                Event::Chunk { chunk, .. } => {
                    self.record(&chunk);
                }
                Event::Done { usage, timings, .. } => {
                    self.finish(usage, timings);
                }
                Event::Error(e) => return Err(e),
            }
            next = rx.recv().await;
        }
        match self.usage {
            Some(_) => Ok(()),
            None => Err(ApiError::internal("the generation ended unexpectedly")),
        }
    }

    /// Whether the generation was cut by its token limit or the context.
    pub fn cut(&self) -> bool {
        self.finish == Some(FinishReason::Length)
    }

    /// Whether item `k` is the one a cut generation left unfinished.
    pub fn incomplete(&self, k: usize) -> bool {
        self.cut() && k + 1 == self.output.len()
    }
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use crate::bindings::exports::wasmlm::llm::types::ToolCall;

    /// A chunk of one token.
    pub fn chunk(text: &str, reasoning: &str, calls: &[(&str, &str)]) -> Chunk {
        Chunk {
            text: text.into(),
            reasoning: reasoning.into(),
            tool_calls: calls
                .iter()
                .map(|(name, args)| ToolCall {
                    id: String::new(),
                    name: (*name).into(),
                    arguments: (*args).into(),
                })
                .collect(),
            tokens: vec![1],
            logprobs: Vec::new(),
            finish: None,
            stop_match: None,
        }
    }

    const USAGE: Usage = Usage {
        prompt_tokens: 5,
        completion_tokens: 4,
        cached_tokens: 0,
    };

    #[test]
    fn chunks_open_add_to_and_close_items_in_order() {
        let mut items = Items::new(["rs", "msg", "fc"], false);
        let mut steps = Vec::new();
        for c in [
            chunk("", "think", &[]),
            chunk("", "ing", &[]),
            chunk("\n\n", "", &[]),
            chunk("", "", &[("f", "{}")]),
            chunk("Done", "", &[]),
        ] {
            steps.extend(items.record(&c));
        }
        steps.extend(items.finish(USAGE, Timings::default()));
        let d = |k, t: &str| Step::Delta(k, t.into(), Vec::new());
        assert_eq!(
            steps,
            [
                Step::Added(0),
                d(0, "think"),
                d(0, "ing"),
                Step::Done(0),
                Step::Added(1),
                d(1, "{}"),
                Step::Done(1),
                Step::Added(2),
                d(2, "Done"),
                Step::Done(2),
            ]
        );
        // The blank text before the call is no item; ids say their kind.
        assert_eq!(items.output[0].item, Item::Reasoning("thinking".into()));
        assert!(items.output[1].id.starts_with("fc_") && items.output[2].id.starts_with("msg_"));
        assert_eq!(items.reasoning_tokens, 2);
    }

    #[test]
    fn a_blank_answer_alone_is_still_the_text() {
        let mut items = Items::new(["rs", "msg", "fc"], false);
        items.record(&chunk("", "hm", &[]));
        items.record(&chunk(" ", "", &[]));
        let mut last = chunk("", "", &[]);
        last.finish = Some(FinishReason::Length);
        items.record(&last);
        items.finish(USAGE, Timings::default());
        assert_eq!(items.output.len(), 2);
        assert!(matches!(&items.output[1].item, Item::Text { text, .. } if text == " "));
        assert!(items.incomplete(1) && !items.incomplete(0));
        // Cut while reasoning: the reasoning alone, no empty text after it.
        let mut items = Items::new(["rs", "msg", "fc"], false);
        items.record(&chunk("", "hm", &[]));
        items.record(&last);
        items.finish(USAGE, Timings::default());
        assert_eq!(items.output.len(), 1);
        assert!(items.incomplete(0));
        // Nothing at all: one empty text.
        let mut items = Items::new(["rs", "msg", "fc"], false);
        items.record(&last);
        items.finish(USAGE, Timings::default());
        assert!(matches!(&items.output[..],
            [Output { item: Item::Text { text, .. }, .. }] if text.is_empty()));
    }
}
