//! wasmlm's LLM component: the inference logic of a model family (tokenizer, chat template,
//! sampling, stop rules, the generation loop) over `wasi:nn`, which runs the forward pass.
//!
//! It exports `wasmlm:llm` and `fermyon:spin/llm@2.0.0` and imports only `wasi:nn` and WASI.

pub mod bindings {
    //! Generated from `wit/`.
    wit_bindgen::generate!({
        world: "llm-component",
        path: "../../wit",
        generate_all,
    });
}

pub mod embedding;
mod generation;
pub mod json;
mod lanes;
mod metadata;
mod model;
mod nn;
pub mod pattern;
pub mod response;
pub mod sampling;
pub mod spm;
pub mod stop;
pub mod template;
pub mod tokenizer;
pub mod utf8;

use std::cell::RefCell;

use bindings::exports::fermyon::spin::llm as spin;
use bindings::exports::wasmlm::llm::types::{
    ChatContext, Error, Message, OutputFormat, SamplingOptions, ToolChoice, Usage,
};
use bindings::exports::wasmlm::llm::{embeddings, generation as gen, models, tokenization};
use generation::Generation;
use json::Grammar;

// Exported only on wasm: natively the crate is built for its unit tests, and the export
// symbols' names (`wasmlm:llm/...#chat`) are not valid in a native linker's version script.
#[cfg_attr(not(target_arch = "wasm32"), allow(dead_code))]
struct Component;

/// The stream resource handed to the host.
pub struct CompletionStream(RefCell<Generation>);

impl gen::GuestCompletionStream for CompletionStream {
    fn next(&self) -> Result<Option<gen::Chunk>, Error> {
        self.0.borrow_mut().next()
    }

    fn cancel(&self) {
        self.0.borrow_mut().cancel()
    }

    fn usage(&self) -> Usage {
        self.0.borrow().usage()
    }
}

fn stream(g: Generation) -> gen::CompletionStream {
    gen::CompletionStream::new(CompletionStream(RefCell::new(g)))
}

impl gen::Guest for Component {
    type CompletionStream = CompletionStream;

    fn chat(
        model: String,
        messages: Vec<Message>,
        context: ChatContext,
        options: SamplingOptions,
    ) -> Result<gen::CompletionStream, Error> {
        let m = model::get(&model)?;
        m.check_generator()?;
        let prompt = m.render(&messages, &context, true)?;
        // The template writes special tokens (and BOS where the model wants it) as text.
        let ids = m.tokenize(&prompt, true)?;
        let tools = model::extras(&context)?.tools;
        let parse_tools = tools.is_some();
        let parallel = context.parallel_tool_calls.unwrap_or(true);
        let opened = prompt.trim_end().ends_with("<think>");
        // A thinking model reasons before a JSON answer, a regex's or a required call too (as
        // vLLM's reasoning parsers let it): the constraint holds from `</think>`. Not when the
        // template closed the block itself (Qwen3 with thinking off writes an empty one).
        let think_tags = {
            let tok = m.tokenizer.borrow();
            tok.token_id("<think>").zip(tok.token_id("</think>"))
        }
        .filter(|_| m.thinks && !prompt.trim_end().ends_with("</think>"));
        let thinks = think_tags.is_some();
        // JSON mode constrains the answer to the object, so it is all content: no tool call
        // can be written.
        let json = matches!(
            options.format,
            Some(OutputFormat::JsonObject | OutputFormat::JsonSchema(_))
        );
        let regex = matches!(options.format, Some(OutputFormat::Regex(_)));
        if let Some(choice) = &context.tool_choice {
            if json || regex || !options.choices.is_empty() {
                return Err(Error::InvalidInput(
                    "a required tool call cannot be combined with an output format or choices"
                        .into(),
                ));
            }
            let grammar = tool_call_grammar(tools.as_ref(), choice, parallel)?;
            return Ok(stream(
                Generation::new(m, ids, &options)?
                    .with_grammar(grammar)
                    .thinking_first(think_tags, opened)
                    .with_parser(response::ResponseParser::forced_call(thinks, opened)),
            ));
        }
        if json || regex {
            let parser = response::ResponseParser::new(thinks, opened && thinks, false);
            return Ok(stream(
                Generation::new(m, ids, &options)?
                    .thinking_first(think_tags, opened)
                    .with_parser(parser),
            ));
        }
        let parser = response::ResponseParser::new(m.thinks, opened, parse_tools);
        Ok(stream(
            Generation::new(m, ids, &options)?
                .thinking_first(think_tags, opened)
                .with_parser(parser)
                .one_call(parse_tools && !parallel),
        ))
    }

    fn complete(
        model: String,
        prompt: String,
        options: SamplingOptions,
    ) -> Result<gen::CompletionStream, Error> {
        let m = model::get(&model)?;
        m.check_generator()?;
        let mut ids = Vec::new();
        if m.add_bos {
            ids.extend(m.bos);
        }
        ids.extend(m.tokenize(&prompt, false)?);
        if m.add_eos {
            ids.extend(m.eos);
        }
        Ok(stream(Generation::new(m, ids, &options)?))
    }

    fn complete_tokens(
        model: String,
        prompt: Vec<u32>,
        options: SamplingOptions,
    ) -> Result<gen::CompletionStream, Error> {
        let m = model::get(&model)?;
        m.check_generator()?;
        Ok(stream(Generation::new(m, prompt, &options)?))
    }
}

/// The grammar of the call `choice` asks for among `tools` (OpenAI's `tools` array): for
/// `required` with `parallel` calls, an array of calls.
fn tool_call_grammar(
    tools: Option<&serde_json::Value>,
    choice: &ToolChoice,
    parallel: bool,
) -> Result<Grammar, Error> {
    let bad = |m: String| Error::InvalidInput(m);
    let list = tools
        .and_then(serde_json::Value::as_array)
        .ok_or_else(|| bad("a required tool call needs tools".into()))?;
    let mut calls = Vec::with_capacity(list.len());
    for t in list {
        let f = t.get("function");
        let name = f
            .and_then(|f| f.get("name"))
            .and_then(serde_json::Value::as_str)
            .ok_or_else(|| bad("each tool needs a 'function' with a 'name'".into()))?;
        calls.push((name, f.and_then(|f| f.get("parameters"))));
    }
    if let ToolChoice::Function(name) = choice {
        let names: Vec<&str> = calls.iter().map(|c| c.0).collect();
        calls.retain(|c| c.0 == name);
        if calls.is_empty() {
            return Err(bad(format!(
                "the tool '{name}' is not among the tools ({})",
                names.join(", ")
            )));
        }
        // Two tools of one name: the first, as the template lists it first.
        calls.truncate(1);
    }
    let many = parallel && matches!(choice, ToolChoice::Required);
    Grammar::tool_call(&calls, many).map_err(|e| bad(format!("the tool call: {e}")))
}

impl tokenization::Guest for Component {
    fn tokenize(model: String, text: String, parse_special: bool) -> Result<Vec<u32>, Error> {
        model::get(&model)?.tokenize(&text, parse_special)
    }

    fn detokenize(model: String, tokens: Vec<u32>) -> Result<String, Error> {
        let m = model::get(&model)?;
        let text = m.tokenizer.borrow().decode(&tokens).map_err(|bad| {
            Error::InvalidInput(format!("token id {bad} is outside the vocabulary"))
        });
        text
    }

    fn apply_template(
        model: String,
        messages: Vec<Message>,
        context: ChatContext,
        add_generation_prompt: bool,
    ) -> Result<String, Error> {
        model::get(&model)?.render(&messages, &context, add_generation_prompt)
    }
}

impl embeddings::Guest for Component {
    fn embed(model: String, inputs: Vec<String>) -> Result<embeddings::EmbeddingResult, Error> {
        let (embeddings, prompt_tokens) = model::get(&model)?.embed(&inputs)?;
        Ok(embeddings::EmbeddingResult {
            embeddings,
            prompt_tokens,
        })
    }
}

impl models::Guest for Component {
    fn describe(model: String) -> Result<models::ModelInfo, Error> {
        let m = model::get(&model)?;
        Ok(models::ModelInfo {
            name: m.name.clone(),
            architecture: m.architecture.clone(),
            context_length: m.context_length,
            vocab_size: m.vocab_size,
            has_chat_template: m.has_template(),
            bos_token: m.bos,
            eos_tokens: m.eog.clone(),
        })
    }
}

impl spin::Guest for Component {
    fn infer(
        model: String,
        prompt: String,
        params: Option<spin::InferencingParams>,
    ) -> Result<spin::InferencingResult, spin::Error> {
        // Spin's documented defaults when no parameters are given.
        let p = params.unwrap_or(spin::InferencingParams {
            max_tokens: 100,
            repeat_penalty: 1.1,
            repeat_penalty_last_n_token_count: 64,
            temperature: 0.8,
            top_k: 40,
            top_p: 0.9,
        });
        let options = SamplingOptions {
            max_tokens: Some(p.max_tokens),
            temperature: Some(p.temperature),
            top_k: Some(p.top_k),
            top_p: Some(p.top_p),
            min_p: None,
            repeat_penalty: Some(p.repeat_penalty),
            repeat_last_n: Some(p.repeat_penalty_last_n_token_count),
            presence_penalty: None,
            frequency_penalty: None,
            seed: None,
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            include_stop: None,
            top_logprobs: None,
            ignore_eos: None,
            choices: Vec::new(),
            logit_bias: Vec::new(),
            format: None,
            reasoning_budget: None,
        };
        let s = <Component as gen::Guest>::complete(model, prompt, options).map_err(spin_error)?;
        let g = s.get::<CompletionStream>();
        let mut text = String::new();
        while let Some(chunk) = g.0.borrow_mut().next().map_err(spin_error)? {
            text.push_str(&chunk.text);
        }
        let usage = g.0.borrow().usage();
        Ok(spin::InferencingResult {
            text,
            usage: spin::InferencingUsage {
                prompt_token_count: usage.prompt_tokens,
                generated_token_count: usage.completion_tokens,
            },
        })
    }

    fn generate_embeddings(
        model: String,
        text: Vec<String>,
    ) -> Result<spin::EmbeddingsResult, spin::Error> {
        let (embeddings, prompt_token_count) = model::get(&model)
            .and_then(|m| m.embed(&text))
            .map_err(spin_error)?;
        Ok(spin::EmbeddingsResult {
            embeddings,
            usage: spin::EmbeddingsUsage { prompt_token_count },
        })
    }
}

fn spin_error(e: Error) -> spin::Error {
    match e {
        Error::ModelNotFound(_) | Error::UnsupportedModel(_) => spin::Error::ModelNotSupported,
        Error::InvalidInput(m) => spin::Error::InvalidInput(m),
        Error::ContextOverflow(c) => spin::Error::InvalidInput(format!(
            "the prompt has {} tokens; the context holds {}",
            c.prompt_tokens, c.context_length
        )),
        Error::Backend(m) => spin::Error::RuntimeError(m),
    }
}

#[cfg(target_arch = "wasm32")]
bindings::export!(Component with_types_in bindings);
