//! The generation loop: prompt prefill with prefix reuse, sampling, stop rules and streaming.

use std::rc::Rc;

use crate::bindings::exports::wasmlm::llm::generation::Chunk;
use crate::bindings::exports::wasmlm::llm::types::{
    ContextOverflow, Error, FinishReason, OutputFormat, SamplingOptions, StopMatch, TokenLogprob,
    TopLogprob, Usage,
};
use crate::json::{Grammar, JsonPrefix};
use crate::model::{common_prefix, Model};
use crate::nn::Sequence;
use crate::pattern::{self, Mode, Pattern};
use crate::response::ResponseParser;
use crate::sampling::{Sampler, SamplingParams};
use crate::stop::StopMatcher;
use crate::utf8::Utf8Stream;

/// Prompt tokens sent per `compute` call, which bounds the attention scratch memory.
const PREFILL_CHUNK: usize = 512;

/// One running generation.
pub struct Generation {
    model: Rc<Model>,
    seq: Option<Sequence>,
    prompt: Vec<u32>,
    cached_tokens: usize,
    logits: Option<Vec<f32>>,
    /// The last sampled token, not yet in the KV cache.
    pending: Option<u32>,
    generated: Vec<u32>,
    max_tokens: Option<u32>,
    ignore_eos: bool,
    sampler: Sampler,
    utf8: Utf8Stream,
    stop: StopMatcher,
    /// The request's own stop tokens (vLLM's `stop_token_ids`).
    stop_tokens: Vec<u32>,
    /// Whether a stop token's text ends the output.
    include_stop: bool,
    /// Token sequences the output must be one of (empty: unconstrained).
    choices: Vec<Vec<u32>>,
    /// Structured output: the grammar, and how far the output is into it.
    json: Option<(Grammar, JsonPrefix)>,
    /// A regular expression the whole output must match, and its state after the output.
    regex: Option<(Pattern, u32)>,
    /// A thinking model: its reasoning is free (under structured output the grammar holds
    /// from the end of it) and at most `reasoning_budget` tokens long.
    think: Option<ThinkFirst>,
    reasoning_budget: Option<u32>,
    /// Added to these tokens' logits (OpenAI's `logit_bias`).
    logit_bias: Vec<(u32, f32)>,
    /// Splits a chat answer into reasoning, text and tool calls.
    parser: Option<ResponseParser>,
    /// Generation ends with the first tool call (`parallel_tool_calls` false).
    one_call: bool,
    cancelled: bool,
    done: bool,
}

/// Where a thinking model's reasoning stands.
#[derive(Clone, Copy, Debug)]
struct ThinkFirst {
    /// The `<think>` and `</think>` tokens.
    open: u32,
    close: u32,
    state: Thinking,
    /// Tokens written inside the block so far.
    spent: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Thinking {
    /// The first token: `<think>`, or the answer's first.
    MayOpen,
    /// Reasoning: any token but an end of generation, until `</think>`.
    Inside,
    /// The answer, held to the grammar.
    Over,
}

/// Sampler settings from the WIT options, defaults filled in and checked.
pub fn sampling_params(o: &SamplingOptions) -> Result<SamplingParams, Error> {
    let d = SamplingParams::default();
    let p = SamplingParams {
        temperature: o.temperature.unwrap_or(d.temperature),
        top_k: o.top_k.map_or(d.top_k, |k| k as usize),
        top_p: o.top_p.unwrap_or(d.top_p),
        min_p: o.min_p.unwrap_or(d.min_p),
        repeat_penalty: o.repeat_penalty.unwrap_or(d.repeat_penalty),
        repeat_last_n: o.repeat_last_n.map_or(d.repeat_last_n, |n| n as usize),
        presence_penalty: o.presence_penalty.unwrap_or(d.presence_penalty),
        frequency_penalty: o.frequency_penalty.unwrap_or(d.frequency_penalty),
        seed: o.seed,
        top_logprobs: o.top_logprobs.map(|n| n as usize),
    };
    p.validate().map_err(Error::InvalidInput)?;
    Ok(p)
}

impl Generation {
    /// Checks the request and prepares it; the prompt is computed by the first `next`.
    pub fn new(
        model: Rc<Model>,
        prompt: Vec<u32>,
        options: &SamplingOptions,
    ) -> Result<Self, Error> {
        let params = sampling_params(options)?;
        if prompt.is_empty() {
            return Err(Error::InvalidInput("the prompt is empty".into()));
        }
        if let Some(&bad) = prompt.iter().find(|&&t| t >= model.vocab_size) {
            return Err(Error::InvalidInput(format!(
                "token id {bad} is outside the vocabulary (size {})",
                model.vocab_size
            )));
        }
        let choices = options
            .choices
            .iter()
            .map(|c| model.tokenize(c, true))
            .collect::<Result<Vec<_>, _>>()?;
        if choices.iter().any(Vec::is_empty) {
            return Err(Error::InvalidInput("a choice is empty".into()));
        }
        let (mut json, mut regex) = (None, None);
        match &options.format {
            None | Some(OutputFormat::Text) => {}
            Some(OutputFormat::JsonObject) => {
                json = Some((Grammar::any_object(), JsonPrefix::new()))
            }
            Some(OutputFormat::JsonSchema(schema)) => {
                let g = Grammar::from_schema(schema).map_err(|e| {
                    Error::InvalidInput(format!("the response format's schema: {e}"))
                })?;
                json = Some((g, JsonPrefix::new()));
            }
            Some(OutputFormat::Regex(r)) => {
                let p = pattern::build_narrowing(r, |hir| Pattern::new(&hir, r, Mode::Whole))
                    .map_err(|e| Error::InvalidInput(format!("the output regex: {e}")))?;
                let start = p.start;
                regex = Some((p, start));
            }
        }
        if let Some(&(bad, _)) = options
            .logit_bias
            .iter()
            .find(|&&(t, _)| t >= model.vocab_size)
        {
            return Err(Error::InvalidInput(format!(
                "logit_bias: token id {bad} is outside the vocabulary (size {})",
                model.vocab_size
            )));
        }
        if let Some(&bad) = options
            .stop_token_ids
            .iter()
            .find(|&&t| t >= model.vocab_size)
        {
            return Err(Error::InvalidInput(format!(
                "stop_token_ids: token id {bad} is outside the vocabulary (size {})",
                model.vocab_size
            )));
        }
        if (json.is_some() || regex.is_some()) && !choices.is_empty() {
            return Err(Error::InvalidInput(
                "choices and an output format cannot be combined".into(),
            ));
        }
        if prompt.len() >= model.context_length as usize {
            return Err(Error::ContextOverflow(ContextOverflow {
                prompt_tokens: prompt.len() as u32,
                context_length: model.context_length,
            }));
        }
        let include_stop = options.include_stop.unwrap_or(false);
        Ok(Self {
            seq: None,
            prompt,
            cached_tokens: 0,
            logits: None,
            pending: None,
            generated: Vec::new(),
            max_tokens: options.max_tokens,
            ignore_eos: options.ignore_eos.unwrap_or(false),
            sampler: Sampler::new(params),
            utf8: Utf8Stream::default(),
            stop: StopMatcher::new(&options.stop, include_stop),
            stop_tokens: options.stop_token_ids.clone(),
            include_stop,
            choices,
            json,
            regex,
            think: None,
            reasoning_budget: options.reasoning_budget,
            logit_bias: options.logit_bias.clone(),
            parser: None,
            one_call: false,
            cancelled: false,
            done: false,
            model,
        })
    }

    /// Token counts so far.
    pub fn usage(&self) -> Usage {
        Usage {
            prompt_tokens: self.prompt.len() as u32,
            completion_tokens: self.generated.len() as u32,
            cached_tokens: self.cached_tokens as u32,
        }
    }

    /// Keeps the output to `grammar` (a tool call the request requires).
    pub fn with_grammar(mut self, grammar: Grammar) -> Self {
        self.json = Some((grammar, JsonPrefix::new()));
        self
    }

    /// Follows a thinking model's reasoning, given its `<think>` and `</think>` tokens:
    /// `<think>` may be its first token (unless `opened`: the prompt wrote it); under
    /// structured output the grammar holds after `</think>`; the reasoning budget counts
    /// the tokens between.
    pub fn thinking_first(mut self, tags: Option<(u32, u32)>, opened: bool) -> Self {
        let state = if opened {
            Thinking::Inside
        } else {
            Thinking::MayOpen
        };
        self.think = tags.map(|(open, close)| ThinkFirst {
            open,
            close,
            state,
            spent: 0,
        });
        self
    }

    /// Splits the answer with `parser` from now on.
    pub fn with_parser(mut self, parser: ResponseParser) -> Self {
        self.parser = Some(parser);
        self
    }

    /// With `one`, ends generation as soon as the parser has a tool call.
    pub fn one_call(mut self, one: bool) -> Self {
        self.one_call = one;
        self
    }

    /// Asks the loop to end at the next step.
    pub fn cancel(&mut self) {
        self.cancelled = true;
    }

    /// The next chunk: one generated token, or the end.
    pub fn next(&mut self) -> Result<Option<Chunk>, Error> {
        if self.done {
            return Ok(None);
        }
        if self.cancelled {
            return Ok(Some(self.finish(
                String::new(),
                Vec::new(),
                Vec::new(),
                FinishReason::Cancelled,
            )));
        }
        if self.max_tokens == Some(0) {
            return Ok(Some(self.finish(
                String::new(),
                Vec::new(),
                Vec::new(),
                FinishReason::Length,
            )));
        }
        let result = self.step();
        if result.is_err() {
            self.done = true;
        }
        result.map(|c| Some(self.split(c)))
    }

    /// Applies the response parser to a chunk's text.
    fn split(&mut self, mut chunk: Chunk) -> Chunk {
        let Some(parser) = self.parser.as_mut() else {
            return chunk;
        };
        let mut parsed = parser.push(&chunk.text);
        if chunk.finish.is_some() {
            let rest = parser.finish();
            parsed.content.push_str(&rest.content);
            parsed.reasoning.push_str(&rest.reasoning);
            parsed.tool_calls.extend(rest.tool_calls);
            if chunk.finish == Some(FinishReason::Stop) && parser.made_calls() {
                chunk.finish = Some(FinishReason::ToolCalls);
            }
        } else if self.one_call && !parsed.tool_calls.is_empty() {
            // What the model writes after its one call is not read.
            parsed.tool_calls.truncate(1);
            chunk.finish = Some(FinishReason::ToolCalls);
            self.done = true;
        }
        chunk.text = parsed.content;
        chunk.reasoning = parsed.reasoning;
        chunk.tool_calls = parsed.tool_calls;
        chunk
    }

    /// Masks every token that would not keep the output a prefix of one of the choices, of
    /// a text the regex matches, or (structured output) of a JSON object of the grammar.
    /// Fails when no token is left.
    fn constrain(&self, logits: &mut [f32]) -> Result<(), Error> {
        if self.regex.is_some() || self.json.is_some() {
            let think = self.think.filter(|t| t.state != Thinking::Over);
            if let Some(ThinkFirst {
                state: Thinking::Inside,
                ..
            }) = think
            {
                // The answer must still come: the reasoning cannot end the generation.
                for &t in &self.model.eog {
                    if let Some(l) = logits.get_mut(t as usize) {
                        *l = f32::NEG_INFINITY;
                    }
                }
                return Ok(());
            }
            let open = think.and_then(|t| Some((t.open, *logits.get(t.open as usize)?)));
            let (any, what) = match (&self.regex, &self.json) {
                // An end of generation only where the text matches.
                (Some((p, state)), _) => (
                    self.model
                        .text_tokens()
                        .mask(p, *state, &self.model.eog, logits),
                    "the output the regex holds",
                ),
                (None, Some((grammar, json))) => {
                    let tok = self.model.tokenizer.borrow();
                    // Control and end-of-generation tokens are masked: the object must close
                    // first, and then generation ends by itself.
                    let piece = |t| self.model.json_piece(&tok, t);
                    let any = self.model.json_tokens().mask(grammar, json, piece, logits);
                    (any, "the JSON output")
                }
                (None, None) => (true, "the output"),
            };
            // Or the model opens its reasoning.
            if let Some((t, l)) = open {
                logits[t as usize] = l;
            }
            if !any && open.is_none() {
                return Err(Error::InvalidInput(format!(
                    "no token of the vocabulary continues {what}"
                )));
            }
            return Ok(());
        }
        if self.choices.is_empty() {
            return Ok(());
        }
        let n = self.generated.len();
        let mut allowed = vec![false; logits.len()];
        for c in &self.choices {
            if c.len() > n && c[..n] == self.generated[..] {
                if let Some(a) = allowed.get_mut(c[n] as usize) {
                    *a = true;
                }
            }
        }
        for (l, ok) in logits.iter_mut().zip(allowed) {
            if !ok {
                *l = f32::NEG_INFINITY;
            }
        }
        Ok(())
    }

    fn step(&mut self) -> Result<Chunk, Error> {
        // A constrained output ends as soon as it is one of the choices.
        if self.choices.contains(&self.generated) {
            return Ok(self.finish(String::new(), Vec::new(), Vec::new(), FinishReason::Stop));
        }
        let mut logits = match self.logits.take() {
            Some(l) => l,
            None => self.compute_next()?,
        };
        for &(t, bias) in &self.logit_bias {
            if let Some(l) = logits.get_mut(t as usize) {
                *l += bias;
            }
        }
        self.constrain(&mut logits)?;
        if let Some(t) = self.think.filter(|t| {
            t.state == Thinking::Inside
                && self.reasoning_budget.is_some_and(|b| t.spent >= b)
                // (Choices that spell the reasoning out decide where it ends.)
                && logits.get(t.close as usize).is_some_and(|l| l.is_finite())
        }) {
            // The budget is spent: the block closes now.
            for (i, l) in logits.iter_mut().enumerate() {
                if i != t.close as usize {
                    *l = f32::NEG_INFINITY;
                }
            }
        }
        let choice = self
            .sampler
            .sample(&mut logits, &self.prompt, &self.generated);
        let token = choice.token;
        self.generated.push(token);
        let logprobs = match choice.logprob {
            Some(lp) => {
                let tok = self.model.tokenizer.borrow();
                vec![TokenLogprob {
                    token,
                    text: tok.token_text(token),
                    bytes: tok.piece(token).to_vec(),
                    logprob: lp,
                    top: choice
                        .top
                        .iter()
                        .map(|&(t, l)| TopLogprob {
                            token: t,
                            text: tok.token_text(t),
                            bytes: tok.piece(t).to_vec(),
                            logprob: l,
                        })
                        .collect(),
                }]
            }
            None => Vec::new(),
        };
        if !self.ignore_eos && self.model.eog.contains(&token) {
            return Ok(self.finish(String::new(), vec![token], logprobs, FinishReason::Stop));
        }
        let stop_token = self.stop_tokens.contains(&token);
        if stop_token && !self.include_stop {
            let mut chunk = self.finish(String::new(), vec![token], logprobs, FinishReason::Stop);
            chunk.stop_match = Some(StopMatch::Token(token));
            return Ok(chunk);
        }
        let text = {
            let tok = self.model.tokenizer.borrow();
            let piece = tok.piece(token);
            // Reasoning, `<think>` and `</think>` included, is not part of the structured
            // output.
            let reasoning = match &mut self.think {
                Some(t) => {
                    let was = t.state;
                    t.state = match was {
                        Thinking::MayOpen if token == t.open => Thinking::Inside,
                        Thinking::Inside if token != t.close => Thinking::Inside,
                        _ => Thinking::Over,
                    };
                    if was == Thinking::Inside && t.state == Thinking::Inside {
                        t.spent += 1;
                    }
                    was == Thinking::Inside || t.state == Thinking::Inside
                }
                None => false,
            };
            if let Some((grammar, json)) = self.json.as_mut().filter(|_| !reasoning) {
                // The mask let only tokens through that the state accepts.
                json.push_all(grammar, piece);
            }
            if let Some((p, state)) = self.regex.as_mut().filter(|_| !reasoning) {
                if let Some(next) = p.after(*state, piece) {
                    *state = next;
                }
            }
            self.utf8.push(piece)
        };
        let outcome = self.stop.push(&text);
        if let Some(stop) = outcome.stopped {
            let mut chunk =
                self.finish_now(outcome.emit, vec![token], logprobs, FinishReason::Stop);
            chunk.stop_match = Some(StopMatch::Text(stop));
            return Ok(chunk);
        }
        if stop_token {
            // Its text went through like any token's; what is held back comes out with it.
            let mut chunk = self.finish(outcome.emit, vec![token], logprobs, FinishReason::Stop);
            chunk.stop_match.get_or_insert(StopMatch::Token(token));
            return Ok(chunk);
        }
        // Structured output ends where the object closes, a regex's where no more text can
        // follow.
        let answering = self.think.is_none_or(|t| t.state == Thinking::Over);
        let regex_done = self
            .regex
            .as_ref()
            .is_some_and(|(p, s)| answering && p.matched(*s) && !p.grows(*s));
        if regex_done || self.json.as_ref().is_some_and(|(_, s)| s.is_done()) {
            return Ok(self.finish(outcome.emit, vec![token], logprobs, FinishReason::Stop));
        }
        let full = self.prompt.len() + self.generated.len() >= self.model.context_length as usize;
        let at_max = self
            .max_tokens
            .is_some_and(|m| self.generated.len() >= m as usize);
        if full || at_max {
            return Ok(self.finish(outcome.emit, vec![token], logprobs, FinishReason::Length));
        }
        self.pending = Some(token);
        Ok(Chunk {
            text: outcome.emit,
            reasoning: String::new(),
            tool_calls: Vec::new(),
            tokens: vec![token],
            logprobs,
            finish: None,
            stop_match: None,
        })
    }

    /// Logits for the next position: prefill on the first step, then the pending token.
    fn compute_next(&mut self) -> Result<Vec<f32>, Error> {
        let backend = |e: crate::nn::ProtocolError| Error::Backend(e.0);
        if self.seq.is_none() {
            let mut seq = self.model.take_sequence(&self.prompt)?;
            // Reuse the cached prefix, but always compute the last prompt token for its logits.
            let reuse = common_prefix(&seq.cached, &self.prompt).min(self.prompt.len() - 1);
            self.cached_tokens = reuse;
            let mut keep = reuse;
            let mut logits = Vec::new();
            for chunk in self.prompt[reuse..].chunks(PREFILL_CHUNK) {
                logits = seq.extend(keep, chunk).map_err(backend)?;
                keep = seq.cached.len();
            }
            self.seq = Some(seq);
            return Ok(logits);
        }
        let token = self
            .pending
            .take()
            .ok_or_else(|| Error::Backend("generation state lost its pending token".into()))?;
        let seq = self
            .seq
            .as_mut()
            .ok_or_else(|| Error::Backend("generation state lost its sequence".into()))?;
        let keep = seq.cached.len();
        seq.extend(keep, &[token]).map_err(backend)
    }

    /// Ends the stream, releasing held-back text.
    fn finish(
        &mut self,
        text: String,
        tokens: Vec<u32>,
        logprobs: Vec<TokenLogprob>,
        reason: FinishReason,
    ) -> Chunk {
        let mut text = text;
        let tail = self.utf8.finish();
        let outcome = self.stop.push(&tail);
        text.push_str(&outcome.emit);
        let Some(stop) = outcome.stopped else {
            text.push_str(&self.stop.flush());
            return self.finish_now(text, tokens, logprobs, reason);
        };
        // The last bytes completed a stop string: that is what ended the text, unless the
        // caller cancelled.
        if reason == FinishReason::Cancelled {
            return self.finish_now(text, tokens, logprobs, reason);
        }
        let mut chunk = self.finish_now(text, tokens, logprobs, FinishReason::Stop);
        chunk.stop_match = Some(StopMatch::Text(stop));
        chunk
    }

    fn finish_now(
        &mut self,
        text: String,
        tokens: Vec<u32>,
        logprobs: Vec<TokenLogprob>,
        reason: FinishReason,
    ) -> Chunk {
        self.done = true;
        Chunk {
            text,
            reasoning: String::new(),
            tool_calls: Vec::new(),
            tokens,
            logprobs,
            finish: Some(reason),
            stop_match: None,
        }
    }
}

impl Drop for Generation {
    fn drop(&mut self) {
        if let Some(seq) = self.seq.take() {
            self.model.return_sequence(seq);
        }
    }
}
