//! A model as this component instance knows it: its graph, tokenizer, chat template and the
//! sequences (KV caches) it keeps between requests.

use std::cell::{OnceCell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;

use crate::bindings::exports::wasmlm::llm::types::{ChatContext, Error, Message, Role};
use crate::bindings::wasi::nn::graph::Graph;
use crate::embedding::EmbeddingSpec;
use crate::json::TokenTable;
use crate::metadata::ModelMetadata;
use crate::nn::{self, Sequence};
use crate::pattern::TextTokens;
use crate::template::{ChatTemplate, TemplateExtras};
use crate::tokenizer::TextTokenizer;

/// Texts llama.cpp also treats as end-of-generation when they are tokens of the vocabulary.
const EOG_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|eom_id|>",
    "<EOT>",
    "<|end_of_text|>",
];

/// Idle sequences kept per model and instance; each holds a KV cache for prefix reuse.
const MAX_IDLE_SEQUENCES: usize = 2;

/// A loaded model.
pub struct Model {
    pub name: String,
    graph: Graph,
    pub architecture: String,
    pub context_length: u32,
    pub vocab_size: u32,
    pub tokenizer: RefCell<TextTokenizer>,
    template: Option<ChatTemplate>,
    pub bos: Option<u32>,
    pub add_bos: bool,
    pub eos: Option<u32>,
    /// Append EOS to raw prompts (some embedding and encoder models want it).
    pub add_eos: bool,
    /// The template opens a `<think>` block that the model closes (Qwen3, DeepSeek-R1).
    pub thinks: bool,
    /// Set for embedding models, which do nothing else.
    pub embedding: Option<EmbeddingSpec>,
    pub eog: Vec<u32>,
    idle: RefCell<Vec<Sequence>>,
    /// The vocabulary sorted for JSON mode, made on its first use.
    json_tokens: OnceCell<TokenTable>,
    /// The vocabulary sorted for a whole-output pattern, at its first use.
    text_tokens: OnceCell<TextTokens>,
}

thread_local! {
    static MODELS: RefCell<HashMap<String, Rc<Model>>> = RefCell::new(HashMap::new());
}

/// The model served under `name`, set up on first use (once per instance).
pub fn get(name: &str) -> Result<Rc<Model>, Error> {
    if let Some(m) = MODELS.with(|m| m.borrow().get(name).cloned()) {
        return Ok(m);
    }
    let model = Rc::new(Model::load(name)?);
    MODELS.with(|m| m.borrow_mut().insert(name.to_string(), model.clone()));
    Ok(model)
}

fn backend(e: nn::ProtocolError) -> Error {
    Error::Backend(e.0)
}

impl Model {
    fn load(name: &str) -> Result<Self, Error> {
        let graph = nn::load_graph(name)
            .map_err(backend)?
            .ok_or_else(|| Error::ModelNotFound(name.to_string()))?;
        let seq = Sequence::new(&graph).map_err(backend)?;
        let meta = seq.metadata().map_err(backend)?;
        let tokenizer = TextTokenizer::from_metadata(&meta)
            .map_err(|e| Error::UnsupportedModel(format!("{name}: {e}")))?;
        let config = meta.tokenizer_config();
        // tokenizer_config.json names special tokens by text, or as `{"content": text}`.
        let named = |key: &str| {
            let v = config.get(key)?;
            let text = v.as_str().or_else(|| v.get("content")?.as_str())?;
            tokenizer.token_id(text)
        };
        let bos = meta
            .gguf_u32("tokenizer.ggml.bos_token_id")
            .or_else(|| named("bos_token"));
        let eos = meta
            .gguf_u32("tokenizer.ggml.eos_token_id")
            .or_else(|| named("eos_token"));
        let flag = |gguf: &str, hf: &str, default: bool| {
            meta.gguf_bool(gguf)
                .or_else(|| config.get(hf).and_then(|v| v.as_bool()))
                .unwrap_or(default)
        };
        // llama.cpp adds BOS by default for SentencePiece vocabularies, not for BPE ones.
        let spm_vocab = meta.gguf_str("tokenizer.ggml.model") == Some("llama");
        let mut eog: Vec<u32> = [
            eos,
            meta.gguf_u32("tokenizer.ggml.eot_token_id"),
            meta.gguf_u32("tokenizer.ggml.eom_token_id"),
        ]
        .into_iter()
        .flatten()
        .chain(EOG_TEXTS.iter().filter_map(|t| tokenizer.token_id(t)))
        .collect();
        eog.sort_unstable();
        eog.dedup();
        let template_src = chat_template_source(&meta, &config);
        // A thinking template writes `<think>` itself; its model then answers with
        // `...</think>` and both tags are tokens of the vocabulary.
        let template_src_thinks = template_src
            .as_deref()
            .is_some_and(|t| t.contains("<think>") && t.contains("</think>"))
            && tokenizer.token_id("<think>").is_some()
            && tokenizer.token_id("</think>").is_some();
        let template = template_src
            .map(|src| {
                let text = |t: Option<u32>| t.map(|t| tokenizer.token_text(t)).unwrap_or_default();
                ChatTemplate::new(&src, text(bos), text(eos))
                    .map_err(|e| Error::UnsupportedModel(format!("{name}: chat template: {e}")))
            })
            .transpose()?;
        Ok(Self {
            name: name.to_string(),
            graph,
            architecture: meta.architecture.clone(),
            context_length: meta.context_length,
            vocab_size: meta.vocab_size,
            add_bos: flag("tokenizer.ggml.add_bos_token", "add_bos_token", spm_vocab)
                && bos.is_some(),
            add_eos: flag("tokenizer.ggml.add_eos_token", "add_eos_token", false) && eos.is_some(),
            eos,
            thinks: template_src_thinks,
            embedding: (meta.kind == "embedding").then(|| EmbeddingSpec::from_metadata(&meta)),
            tokenizer: RefCell::new(tokenizer),
            template,
            bos,
            eog,
            idle: RefCell::new(vec![seq]),
            json_tokens: OnceCell::new(),
            text_tokens: OnceCell::new(),
        })
    }

    /// Fails for an embedding model: it cannot generate text.
    pub fn check_generator(&self) -> Result<(), Error> {
        match self.embedding {
            Some(_) => Err(Error::UnsupportedModel(format!(
                "{} is an embedding model: it cannot generate text (use embeddings)",
                self.name
            ))),
            None => Ok(()),
        }
    }

    /// One vector per input and the tokens read.
    pub fn embed(&self, inputs: &[String]) -> Result<(Vec<Vec<f32>>, u32), Error> {
        let spec = self.embedding.as_ref().ok_or_else(|| {
            Error::UnsupportedModel(format!(
                "{} ({}) is not an embedding model",
                self.name, self.architecture
            ))
        })?;
        let mut ids = Vec::with_capacity(inputs.len());
        for text in inputs {
            let t = self
                .tokenizer
                .borrow_mut()
                .encode_truncated(text, spec.max_tokens)
                .map_err(|e| Error::InvalidInput(e.to_string()))?;
            if t.is_empty() {
                return Err(Error::InvalidInput("an input is empty".into()));
            }
            ids.push(t);
        }
        let tokens = ids.iter().map(|t| t.len() as u32).sum();
        let mut out = vec![Vec::new(); inputs.len()];
        let mut seq = self.take_sequence(&[])?;
        // Inputs of similar length share a padded pass: sorted by length, cut into batches
        // whose padded size stays within a budget.
        let mut order: Vec<usize> = (0..ids.len()).collect();
        order.sort_by_key(|&i| ids[i].len());
        for batch in embedding_batches(&order, |i| ids[i].len()) {
            let flat: Vec<u32> = batch.iter().flat_map(|&i| ids[i].iter().copied()).collect();
            let lengths: Vec<u32> = batch.iter().map(|&i| ids[i].len() as u32).collect();
            let (states, hidden) = seq.encode(&flat, &lengths).map_err(backend)?;
            let mut at = 0;
            for &i in batch {
                let n = ids[i].len() * hidden;
                let rows = states.get(at..at + n).ok_or_else(|| {
                    Error::Backend("the backend returned fewer hidden states than asked".into())
                })?;
                out[i] = spec.pool(rows, hidden);
                at += n;
            }
        }
        self.return_sequence(seq);
        Ok((out, tokens))
    }

    /// The vocabulary sorted for a whole-output pattern (`guided_regex`).
    pub fn text_tokens(&self) -> &TextTokens {
        self.text_tokens.get_or_init(|| {
            let tok = self.tokenizer.borrow();
            TextTokens::new((0..tok.vocab_size() as u32).map(|t| self.json_piece(&tok, t)))
        })
    }

    /// The vocabulary sorted for JSON mode.
    pub fn json_tokens(&self) -> &TokenTable {
        self.json_tokens.get_or_init(|| {
            let tok = self.tokenizer.borrow();
            TokenTable::new((0..tok.vocab_size() as u32).map(|t| self.json_piece(&tok, t)))
        })
    }

    /// The bytes a token adds to a constrained output (JSON, or a regex's): none for control
    /// and end-of-generation tokens (some of which are text tokens, `<|im_end|>` in some
    /// vocabularies), which the constraints never take as text.
    pub fn json_piece<'t>(&self, tok: &'t TextTokenizer, token: u32) -> &'t [u8] {
        if self.eog.contains(&token) {
            &[]
        } else {
            tok.piece(token)
        }
    }

    /// Whether the model has a chat template.
    pub fn has_template(&self) -> bool {
        self.template.is_some()
    }

    /// `messages` and `context` through the chat template.
    pub fn render(
        &self,
        messages: &[Message],
        context: &ChatContext,
        add_generation_prompt: bool,
    ) -> Result<String, Error> {
        let template = self.template.as_ref().ok_or_else(|| {
            Error::UnsupportedModel(format!(
                "{} has no chat template: send the prompt as a raw completion, or give the \
                 model a template (--chat-template FILE)",
                self.name
            ))
        })?;
        let msgs: Vec<serde_json::Value> = messages.iter().map(message_json).collect();
        template
            .render(&msgs, &extras(context)?, add_generation_prompt)
            .map_err(|e| Error::InvalidInput(format!("chat template: {e}")))
    }

    /// Token ids of `text`.
    pub fn tokenize(&self, text: &str, parse_special: bool) -> Result<Vec<u32>, Error> {
        self.tokenizer
            .borrow_mut()
            .encode(text, parse_special)
            .map_err(|e| Error::InvalidInput(e.to_string()))
    }

    /// The idle sequence whose cache shares the longest prefix with `prompt`, or a new one.
    pub fn take_sequence(&self, prompt: &[u32]) -> Result<Sequence, Error> {
        let mut idle = self.idle.borrow_mut();
        let best = idle
            .iter()
            .enumerate()
            .max_by_key(|(_, s)| common_prefix(&s.cached, prompt))
            .map(|(i, _)| i);
        match best {
            Some(i) => Ok(idle.swap_remove(i)),
            None => Sequence::new(&self.graph).map_err(backend),
        }
    }

    /// Keeps a sequence for later requests.
    pub fn return_sequence(&self, seq: Sequence) {
        let mut idle = self.idle.borrow_mut();
        if idle.len() < MAX_IDLE_SEQUENCES {
            idle.push(seq);
        }
    }
}

/// Length of the common prefix of two token lists.
pub fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// A message as transformers hands it to templates: OpenAI's shape, with a tool call's
/// arguments parsed into an object when they are JSON (as vLLM does).
fn message_json(m: &Message) -> serde_json::Value {
    let mut out = serde_json::json!({"role": role_name(m.role), "content": m.content});
    if let Some(r) = &m.reasoning {
        out["reasoning_content"] = r.clone().into();
    }
    if !m.tool_calls.is_empty() {
        let calls: Vec<serde_json::Value> = m
            .tool_calls
            .iter()
            .map(|c| {
                let args = serde_json::from_str::<serde_json::Value>(&c.arguments)
                    .unwrap_or_else(|_| c.arguments.clone().into());
                serde_json::json!({
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.name, "arguments": args},
                })
            })
            .collect();
        out["tool_calls"] = calls.into();
    }
    if let Some(id) = &m.tool_call_id {
        out["tool_call_id"] = id.clone().into();
    }
    out
}

/// The template's extra variables from the request's context.
pub fn extras(context: &ChatContext) -> Result<TemplateExtras, Error> {
    let bad = |what: &str, e: serde_json::Error| Error::InvalidInput(format!("{what}: {e}"));
    let tools = match &context.tools_json {
        Some(text) => match serde_json::from_str(text).map_err(|e| bad("tools", e))? {
            serde_json::Value::Array(list) if list.is_empty() => None,
            v @ serde_json::Value::Array(_) => Some(v),
            _ => return Err(Error::InvalidInput("tools must be an array".into())),
        },
        None => None,
    };
    let kwargs = match &context.template_kwargs_json {
        Some(text) => {
            match serde_json::from_str(text).map_err(|e| bad("chat_template_kwargs", e))? {
                serde_json::Value::Object(map) => map,
                _ => {
                    return Err(Error::InvalidInput(
                        "chat_template_kwargs must be an object".into(),
                    ))
                }
            }
        }
        None => serde_json::Map::new(),
    };
    Ok(TemplateExtras { tools, kwargs })
}

fn role_name(role: Role) -> &'static str {
    match role {
        Role::System => "system",
        Role::User => "user",
        Role::Assistant => "assistant",
        Role::Tool => "tool",
    }
}

/// Most padded tokens (batch × longest) and sequences in one embedding pass: attention
/// scratch grows with batch × length², and past a few thousand tokens a pass is already
/// large enough to keep every core busy.
const EMBED_BATCH_TOKENS: usize = 4096;
const EMBED_BATCH_SEQUENCES: usize = 64;

/// Cuts `order` (indices sorted by ascending length) into batches within the budget.
fn embedding_batches(order: &[usize], len: impl Fn(usize) -> usize) -> Vec<&[usize]> {
    let mut batches = Vec::new();
    let mut start = 0;
    for end in 1..=order.len() {
        // Sorted ascending, so the newest member is the longest.
        let padded = (end - start) * len(order[end - 1]);
        if end - start > 1 && (padded > EMBED_BATCH_TOKENS || end - start > EMBED_BATCH_SEQUENCES) {
            batches.push(&order[start..end - 1]);
            start = end - 1;
        }
    }
    if start < order.len() {
        batches.push(&order[start..]);
    }
    batches
}

/// The chat template: GGUF `tokenizer.chat_template`, else the folder's
/// `chat_template.jinja`, else `tokenizer_config.json`'s `chat_template` (a string, or a list
/// of named templates of which "default" is used).
fn chat_template_source(
    meta: &ModelMetadata,
    config: &serde_json::Map<String, serde_json::Value>,
) -> Option<String> {
    if let Some(t) = &meta.chat_template_override {
        return Some(t.clone());
    }
    if let Some(t) = meta.gguf_str("tokenizer.chat_template") {
        return Some(t.to_string());
    }
    if let Some(t) = &meta.chat_template_jinja {
        return Some(t.clone());
    }
    match config.get("chat_template")? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Array(list) => list
            .iter()
            .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
            .and_then(|t| t.get("template"))
            .and_then(|t| t.as_str())
            .map(str::to_string),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedding_batches_keep_the_budget_and_every_input() {
        let lens = [3usize, 5, 5, 8, 100, 2000, 3000];
        let order: Vec<usize> = (0..lens.len()).collect();
        let batches = embedding_batches(&order, |i| lens[i]);
        let flat: Vec<usize> = batches.iter().flat_map(|b| b.iter().copied()).collect();
        assert_eq!(flat, order);
        for b in &batches {
            let padded = b.len() * b.iter().map(|&i| lens[i]).max().unwrap();
            assert!(b.len() == 1 || padded <= EMBED_BATCH_TOKENS, "{b:?}");
        }
        // The long ones go alone, the short ones together.
        assert_eq!(batches.last().unwrap(), &[6]);
        assert_eq!(batches[0], &[0, 1, 2, 3, 4]);
        let many: Vec<usize> = (0..200).collect();
        assert!(embedding_batches(&many, |_| 4)
            .iter()
            .all(|b| b.len() <= EMBED_BATCH_SEQUENCES));
    }
}
