//! One request's generation, run on a blocking thread with the slot it leased, sending its
//! chunks to the HTTP side as they come. A closed channel means the client went away: the
//! generation is cancelled at the next token and the slot goes back to the pool.

use std::time::Instant;

use serde::Serialize;
use tokio::sync::mpsc;

use super::error::ApiError;
use super::metrics::Metrics;
use super::slots::SlotLease;
use super::wire::Prompt;
use crate::bindings::exports::wasmlm::llm::generation::Chunk;
use crate::bindings::exports::wasmlm::llm::types::{SamplingOptions, Usage};
use crate::runtime::{Runtime, RuntimeError, Stream};

/// What a generation job asks for.
pub struct Job {
    /// The model's name in the runtime.
    pub model: String,
    /// The prompts this slot runs, one after another, with their choice indices.
    pub prompts: Vec<(usize, Prompt)>,
    pub options: SamplingOptions,
    /// The conversation text, for slot affinity.
    pub key: String,
    /// Choices per prompt: index `i` is choice `i % n` of its prompt.
    pub n: usize,
}

/// llama.cpp's `timings` object. The first token belongs to the prompt phase: its time is
/// the prefill's.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Timings {
    pub prompt_n: u32,
    pub prompt_ms: f64,
    pub prompt_per_second: f64,
    pub predicted_n: u32,
    pub predicted_ms: f64,
    pub predicted_per_second: f64,
}

/// What the worker tells the HTTP side.
pub enum Event {
    Chunk {
        index: usize,
        chunk: Chunk,
        /// On a generation's first chunk: the token counts once its prompt is computed
        /// (Anthropic's `message_start` reports the input tokens before any output).
        prompt: Option<Usage>,
    },
    Done {
        index: usize,
        usage: Usage,
        timings: Timings,
    },
    Error(ApiError),
}

/// Runs `job` on the leased slot, sending events to `tx` until done or the receiver is gone.
pub fn run(
    runtime: &Runtime,
    mut lease: SlotLease,
    job: Job,
    tx: mpsc::Sender<Event>,
    metrics: &Metrics,
) {
    let slot = &mut *lease;
    // What the slot's caches will hold; the answer is appended once known.
    slot.affinity.clone_from(&job.key);
    let inst = match super::slots::ready_instance(&mut slot.instance, runtime, &job.model) {
        Ok(i) => i,
        Err(e) => {
            let _ = tx.blocking_send(Event::Error(e.into()));
            return;
        }
    };
    let mut options = job.options.clone();
    for (index, prompt) in &job.prompts {
        let index = *index;
        let t0 = Instant::now();
        // With a seed, the choices of one prompt differ from each other yet reproduce.
        let choice = (index % job.n.max(1)) as u64;
        options.seed = job.options.seed.map(|s| s.wrapping_add(choice));
        let started = match prompt {
            Prompt::Chat(m, context) => inst.chat(&job.model, m, context, &options),
            Prompt::Text(t) => inst.complete(&job.model, t, &options),
            Prompt::Tokens(t) => inst.complete_tokens(&job.model, t, &options),
        };
        let outcome = started.and_then(|mut stream| {
            let r = drive(
                &mut stream,
                index,
                t0,
                &job.model,
                &tx,
                metrics,
                &mut slot.affinity,
            );
            r.and_then(|done| match done {
                Some((first, last)) => stream.usage().map(|u| Some((u, first, last))),
                None => Ok(None),
            })
        });
        let (usage, first, last) = match outcome {
            Ok(Some(x)) => x,
            // The client went away.
            Ok(None) => return,
            Err(e) => {
                let _ = tx.blocking_send(Event::Error(e.into()));
                return;
            }
        };
        metrics.tokens(
            &job.model,
            usage.prompt_tokens,
            usage.cached_tokens,
            usage.completion_tokens,
        );
        let timings = timings(&usage, t0, first, last);
        if tx
            .blocking_send(Event::Done {
                index,
                usage,
                timings,
            })
            .is_err()
        {
            return;
        }
    }
}

/// Streams one generation's chunks; `Ok(None)` when the client went away (the generation is
/// then cancelled), else the times of the first and last generated tokens.
fn drive(
    stream: &mut Stream<'_>,
    index: usize,
    t0: Instant,
    model: &str,
    tx: &mpsc::Sender<Event>,
    metrics: &Metrics,
    affinity: &mut String,
) -> Result<Option<(Instant, Instant)>, RuntimeError> {
    let (mut first, mut last): (Option<Instant>, Option<Instant>) = (None, None);
    let mut prompt_told = false;
    while let Some(chunk) = stream.next_chunk()? {
        let prompt = match prompt_told {
            false => Some(stream.usage()?),
            true => None,
        };
        prompt_told = true;
        if !chunk.tokens.is_empty() {
            let now = Instant::now();
            match last {
                None => metrics.time_to_first_token(model, (now - t0).as_secs_f64()),
                Some(l) => metrics.inter_token(model, (now - l).as_secs_f64()),
            }
            first.get_or_insert(now);
            last = Some(now);
        }
        if index == 0 {
            affinity.push_str(&chunk.text);
        }
        let event = Event::Chunk {
            index,
            chunk,
            prompt,
        };
        if tx.blocking_send(event).is_err() {
            stream.cancel()?;
            return Ok(None);
        }
    }
    let now = Instant::now();
    Ok(Some((first.unwrap_or(now), last.unwrap_or(now))))
}

fn timings(usage: &Usage, t0: Instant, first: Instant, last: Instant) -> Timings {
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
    let prompt_n = usage.prompt_tokens - usage.cached_tokens;
    let prompt_ms = ms(first - t0);
    let predicted_n = usage.completion_tokens;
    let predicted_ms = ms(last - first);
    let rate = |n: f64, ms: f64| if ms > 0.0 { n * 1e3 / ms } else { 0.0 };
    Timings {
        prompt_n,
        prompt_ms,
        prompt_per_second: rate(prompt_n as f64, prompt_ms),
        predicted_n,
        predicted_ms,
        predicted_per_second: rate(predicted_n.saturating_sub(1) as f64, predicted_ms),
    }
}
