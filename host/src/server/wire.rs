//! OpenAI request bodies read into the component's types, parameter by parameter, so a bad
//! value gets a 400 that names it. Unknown fields are ignored, as OpenAI does.

use serde_json::{json, Map, Value};

use super::error::ApiError;
use crate::bindings::exports::wasmlm::llm::generation::Chunk;
use crate::bindings::exports::wasmlm::llm::types::{
    ChatContext, FinishReason, Message, OutputFormat, Role, SamplingOptions, TokenLogprob,
    ToolCall, ToolChoice,
};

/// Most bytes of a request body.
pub const MAX_BODY_BYTES: usize = 16 << 20;

/// What to generate from.
#[derive(Debug, Clone)]
pub enum Prompt {
    Chat(Vec<Message>, ChatContext),
    Text(String),
    Tokens(Vec<u32>),
}

/// A generation request, read from a chat or completions body.
#[derive(Debug)]
pub struct GenRequest {
    pub model: String,
    pub prompts: Vec<Prompt>,
    pub options: SamplingOptions,
    pub stream: bool,
    pub include_usage: bool,
    /// Chat: `logprobs: true`; completions: `logprobs: N`.
    pub logprobs: bool,
    /// Completions: return the prompt before the completion.
    pub echo: bool,
    /// Device the client asked for (`gpu_preference`).
    pub gpu_preference: Option<String>,
    /// Choices per prompt (`n`); `prompts` holds each prompt this many times in a row.
    pub n: usize,
}

/// Most choices per prompt (`n`), and per request (prompts × `n`).
const MAX_N: i64 = 16;
const MAX_CHOICES: usize = 64;
/// OpenAI's `reasoning_effort` levels.
const REASONING_EFFORTS: [&str; 6] = ["none", "minimal", "low", "medium", "high", "xhigh"];
/// Most `stop_token_ids` in one request.
const MAX_STOP_TOKENS: usize = 256;

/// A JSON object body.
#[derive(Debug)]
pub struct Body(pub Map<String, Value>);

impl Body {
    /// Parses `bytes` as a JSON object.
    pub fn parse(bytes: &[u8]) -> Result<Self, ApiError> {
        match serde_json::from_slice::<Value>(bytes) {
            Ok(Value::Object(m)) => Ok(Self(m)),
            Ok(_) => Err(ApiError::bad_request(
                "The request body must be a JSON object.",
            )),
            Err(e) => Err(ApiError::bad_request(format!(
                "We could not parse the JSON body of your request ({e})."
            ))),
        }
    }

    /// The value of `key`, with JSON `null` read as absent.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.0.get(key).filter(|v| !v.is_null())
    }

    /// A required list that is not empty.
    pub fn list(&self, key: &str) -> Result<&Vec<Value>, ApiError> {
        match self.get(key) {
            Some(Value::Array(a)) if !a.is_empty() => Ok(a),
            Some(Value::Array(_)) => Err(ApiError::bad_param(
                key,
                format!("'{key}' must not be empty."),
            )),
            Some(_) => Err(ApiError::bad_param(key, format!("'{key}' must be a list."))),
            None => Err(ApiError::bad_param(
                key,
                format!("Missing required parameter: '{key}'."),
            )),
        }
    }

    /// A required string.
    pub fn string(&self, key: &str) -> Result<String, ApiError> {
        match self.get(key) {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(_) => Err(ApiError::bad_param(
                key,
                format!("'{key}' must be a string."),
            )),
            None => Err(ApiError::bad_param(
                key,
                format!("Missing required parameter: '{key}'."),
            )),
        }
    }

    /// An optional string.
    pub fn opt_string(&self, key: &str) -> Result<Option<String>, ApiError> {
        self.get(key).map(|_| self.string(key)).transpose()
    }

    /// An optional boolean.
    pub fn bool(&self, key: &str) -> Result<Option<bool>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(ApiError::bad_param(
                key,
                format!("'{key}' must be a boolean."),
            )),
        }
    }

    /// An optional number within `[lo, hi]`.
    pub fn f32_in(&self, key: &str, lo: f32, hi: f32) -> Result<Option<f32>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => match v.as_f64() {
                Some(x) if x.is_finite() && (lo as f64..=hi as f64).contains(&x) => {
                    Ok(Some(x as f32))
                }
                _ => Err(ApiError::bad_param(
                    key,
                    format!("'{key}' must be a number from {lo} to {hi}; got {v}."),
                )),
            },
        }
    }

    /// An optional integer within `[lo, hi]`.
    pub fn int_in(&self, key: &str, lo: i64, hi: i64) -> Result<Option<i64>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => match v.as_i64() {
                Some(x) if (lo..=hi).contains(&x) => Ok(Some(x)),
                _ => Err(ApiError::bad_param(
                    key,
                    format!("'{key}' must be an integer from {lo} to {hi}; got {v}."),
                )),
            },
        }
    }
}

/// Sampling options and stream settings shared by chat and completions.
fn common(b: &Body, chat: bool) -> Result<GenRequest, ApiError> {
    let model = b.string("model")?;
    let n = b.int_in("n", 1, MAX_N)?.unwrap_or(1) as usize;
    let max_tokens = match b.int_in("max_completion_tokens", 1, u32::MAX as i64)? {
        Some(n) => Some(n),
        None => b.int_in("max_tokens", 1, u32::MAX as i64)?,
    };
    let stop = match b.get("stop") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| v.as_str().map(String::from))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| {
                ApiError::bad_param("stop", "'stop' must be a string or a list of strings.")
            })?,
        Some(_) => {
            return Err(ApiError::bad_param(
                "stop",
                "'stop' must be a string or a list of strings.",
            ))
        }
    };
    if stop.len() > 16 || stop.iter().any(String::is_empty) {
        return Err(ApiError::bad_param(
            "stop",
            "'stop' takes at most 16 non-empty strings.",
        ));
    }
    // vLLM spells "top-k off" as -1.
    let top_k = b
        .int_in("top_k", -1, u32::MAX as i64)?
        .map(|k| k.max(0) as u32);
    let seed = match b.get("seed") {
        None => None,
        Some(v) => Some(match (v.as_u64(), v.as_i64()) {
            (Some(u), _) => u,
            // Negative seeds are valid for OpenAI: keep their bits.
            (None, Some(i)) => i as u64,
            _ => return Err(ApiError::bad_param("seed", "'seed' must be an integer.")),
        }),
    };
    let (logprobs, top_logprobs) = if chat {
        let on = b.bool("logprobs")?.unwrap_or(false);
        let top = b.int_in("top_logprobs", 0, 20)?;
        if top.is_some() && !on {
            return Err(ApiError::bad_param(
                "top_logprobs",
                "'top_logprobs' needs 'logprobs' set to true.",
            ));
        }
        (on, on.then(|| top.unwrap_or(0) as u32))
    } else {
        let n = b.int_in("logprobs", 0, 20)?;
        (n.is_some(), n.map(|n| n as u32))
    };
    let stream = b.bool("stream")?.unwrap_or(false);
    let include_usage = match b.get("stream_options") {
        None => false,
        Some(Value::Object(o)) => match o.get("include_usage") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(x)) => *x,
            Some(_) => {
                return Err(ApiError::bad_param(
                    "stream_options.include_usage",
                    "'stream_options.include_usage' must be a boolean.",
                ))
            }
        },
        Some(_) => {
            return Err(ApiError::bad_param(
                "stream_options",
                "'stream_options' must be an object.",
            ))
        }
    };
    let so = structured_outputs(b)?;
    let options = SamplingOptions {
        max_tokens: max_tokens.map(|n| n as u32),
        temperature: b.f32_in("temperature", 0.0, 100.0)?,
        top_k,
        top_p: b.f32_in("top_p", 0.0, 1.0)?,
        min_p: b.f32_in("min_p", 0.0, 1.0)?,
        repeat_penalty: b.f32_in("repeat_penalty", 0.0, 100.0)?,
        repeat_last_n: b
            .int_in("repeat_last_n", 0, u32::MAX as i64)?
            .map(|n| n as u32),
        presence_penalty: b.f32_in("presence_penalty", -2.0, 2.0)?,
        frequency_penalty: b.f32_in("frequency_penalty", -2.0, 2.0)?,
        seed,
        stop,
        stop_token_ids: stop_token_ids(b)?,
        include_stop: b.bool("include_stop_str_in_output")?,
        top_logprobs,
        ignore_eos: b.bool("ignore_eos")?,
        choices: choices(b, so)?,
        logit_bias: logit_bias(b)?,
        format: output_format(b, so)?,
        reasoning_budget: reasoning_budget(b)?,
    };
    if constrained_format(&options) && !options.choices.is_empty() {
        return Err(ApiError::bad_param(
            "response_format",
            "An output format ('response_format', 'guided_json', 'guided_regex') and \
             'guided_choice' cannot be combined.",
        ));
    }
    Ok(GenRequest {
        model,
        prompts: Vec::new(),
        options,
        stream,
        include_usage,
        logprobs,
        echo: false,
        gpu_preference: b.opt_string("gpu_preference")?,
        n,
    })
}

/// Repeats each prompt `n` times in a row: one choice each.
fn repeat_for_n(r: &mut GenRequest) -> Result<(), ApiError> {
    if r.prompts.len() * r.n > MAX_CHOICES {
        return Err(ApiError::bad_param(
            "n",
            format!("At most {MAX_CHOICES} choices per request (prompts × n)."),
        ));
    }
    r.prompts = r
        .prompts
        .iter()
        .flat_map(|p| std::iter::repeat_n(p, r.n).cloned())
        .collect();
    Ok(())
}

/// Reads a `/v1/chat/completions` body.
pub fn chat_request(b: &Body) -> Result<GenRequest, ApiError> {
    let mut r = common(b, true)?;
    let context = chat_context(b)?;
    let constrained = !r.options.choices.is_empty() || constrained_format(&r.options);
    if context.tool_choice.is_some() && constrained {
        return Err(ApiError::bad_param(
            "tool_choice",
            "A required tool call cannot be combined with 'response_format', 'guided_json', \
             'guided_regex' or 'guided_choice'.",
        ));
    }
    r.prompts = vec![Prompt::Chat(messages(b)?, context)];
    repeat_for_n(&mut r)?;
    Ok(r)
}

/// vLLM's `structured_outputs` constraints this node does not follow: refused rather than
/// ignored (it reads `json`, `regex`, `json_object` and `choice`; options that tune a
/// backend, `disable_fallback` and the like, are ignored).
const STRUCTURED_OUTPUTS_REFUSED: [&str; 2] = ["grammar", "structural_tag"];

/// vLLM's `structured_outputs` object, read once for both the output format and the
/// choices: `None` when unset or null. The constraints it does not follow are refused here.
fn structured_outputs(b: &Body) -> Result<Option<&Map<String, Value>>, ApiError> {
    let so = match b.get("structured_outputs") {
        None => return Ok(None),
        Some(Value::Object(o)) => o,
        Some(_) => {
            return Err(ApiError::bad_param(
                "structured_outputs",
                "'structured_outputs' must be an object.",
            ))
        }
    };
    if let Some(k) = so
        .iter()
        .find(|(k, v)| !v.is_null() && STRUCTURED_OUTPUTS_REFUSED.contains(&k.as_str()))
        .map(|(k, _)| k)
    {
        return Err(ApiError::bad_param(
            &format!("structured_outputs.{k}"),
            format!("'structured_outputs.{k}' is not supported: use json, regex or choice."),
        ));
    }
    Ok(Some(so))
}

/// A key of `structured_outputs`; a null is a key left unset, as Python clients send them.
fn so_get<'a>(so: Option<&'a Map<String, Value>>, key: &str) -> Option<&'a Value> {
    so.and_then(|o| o.get(key)).filter(|v| !v.is_null())
}

/// The output format a body asks for: OpenAI's `response_format`, or vLLM's `guided_json`,
/// `guided_regex` and `structured_outputs` (`json`, `regex`, `json_object`). At most one
/// of them constrains the output; the component compiles a schema or a regex, and says
/// what in it it cannot follow.
fn output_format(
    b: &Body,
    so: Option<&Map<String, Value>>,
) -> Result<Option<OutputFormat>, ApiError> {
    let mut formats = Vec::new();
    if let Some(f) = response_format(b)? {
        formats.push(("response_format", f));
    }
    let schema = |key: &'static str, v: &Value| match v {
        Value::Object(_) => Ok((key, OutputFormat::JsonSchema(v.to_string()))),
        Value::String(s) => Ok((key, OutputFormat::JsonSchema(s.clone()))),
        _ => Err(ApiError::bad_param(
            key,
            format!("'{key}' must be a JSON Schema."),
        )),
    };
    if let Some(v) = b.get("guided_json") {
        formats.push(schema("guided_json", v)?);
    }
    if let Some(v) = so_get(so, "json") {
        formats.push(schema("structured_outputs.json", v)?);
    }
    match so_get(so, "json_object") {
        None | Some(Value::Bool(false)) => {}
        Some(Value::Bool(true)) => {
            formats.push(("structured_outputs.json_object", OutputFormat::JsonObject))
        }
        Some(_) => {
            return Err(ApiError::bad_param(
                "structured_outputs.json_object",
                "'structured_outputs.json_object' must be a boolean.",
            ))
        }
    }
    for (key, v) in [
        ("guided_regex", b.get("guided_regex")),
        ("structured_outputs.regex", so_get(so, "regex")),
    ] {
        match v {
            None => {}
            Some(Value::String(r)) if !r.is_empty() => {
                formats.push((key, OutputFormat::Regex(r.clone())))
            }
            Some(_) => {
                return Err(ApiError::bad_param(
                    key,
                    format!("'{key}' must be a regular expression, a non-empty string."),
                ))
            }
        }
    }
    // `response_format` text is the default, not a constraint.
    formats.retain(|(_, f)| !matches!(f, OutputFormat::Text));
    match formats.as_slice() {
        [] => Ok(None),
        [(_, f)] => Ok(Some(f.clone())),
        [(a, _), (b, _), ..] => Err(ApiError::bad_param(
            b,
            format!("'{a}' and '{b}' cannot be combined: the output has one format."),
        )),
    }
}

/// OpenAI's `response_format`: `{"type": "text"}`, `{"type": "json_object"}` or
/// `{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}`.
fn response_format(b: &Body) -> Result<Option<OutputFormat>, ApiError> {
    let schema_text = |v: &Value| match v {
        Value::String(s) => s.clone(),
        v => v.to_string(),
    };
    let Some(v) = b.get("response_format") else {
        return Ok(None);
    };
    match v.get("type").and_then(Value::as_str) {
        Some("text") => Ok(Some(OutputFormat::Text)),
        Some("json_object") => Ok(Some(OutputFormat::JsonObject)),
        Some("json_schema") => match v.get("json_schema").and_then(|j| j.get("schema")) {
            Some(schema @ Value::Object(_)) => Ok(Some(OutputFormat::JsonSchema(schema_text(schema)))),
            _ => Err(ApiError::bad_param(
                "response_format",
                "'response_format' of type 'json_schema' needs 'json_schema.schema', a JSON Schema object.",
            )),
        },
        _ => Err(ApiError::bad_param(
            "response_format",
            "'response_format' must be {\"type\": \"text\"}, {\"type\": \"json_object\"} or {\"type\": \"json_schema\", ...}.",
        )),
    }
}

/// The most reasoning tokens: vLLM's `thinking_token_budget` or llama.cpp's
/// `reasoning_budget_tokens` (-1: no limit).
fn reasoning_budget(b: &Body) -> Result<Option<u32>, ApiError> {
    let vllm = b.int_in("thinking_token_budget", 0, u32::MAX as i64)?;
    let llama = b.int_in("reasoning_budget_tokens", -1, u32::MAX as i64)?;
    match (vllm, llama) {
        (Some(_), Some(_)) => Err(ApiError::bad_param(
            "reasoning_budget_tokens",
            "Give 'thinking_token_budget' or 'reasoning_budget_tokens', not both.",
        )),
        (Some(n), None) | (None, Some(n)) => Ok(u32::try_from(n).ok()),
        (None, None) => Ok(None),
    }
}

/// vLLM's `stop_token_ids`: token ids that end generation (the component checks the
/// vocabulary).
fn stop_token_ids(b: &Body) -> Result<Vec<u32>, ApiError> {
    let Some(v) = b.get("stop_token_ids") else {
        return Ok(Vec::new());
    };
    let bad = || {
        ApiError::bad_param(
            "stop_token_ids",
            format!("'stop_token_ids' must be a list of at most {MAX_STOP_TOKENS} token ids."),
        )
    };
    let list = v
        .as_array()
        .filter(|a| a.len() <= MAX_STOP_TOKENS)
        .ok_or_else(bad)?;
    list.iter()
        .map(|t| {
            t.as_u64()
                .and_then(|t| u32::try_from(t).ok())
                .ok_or_else(bad)
        })
        .collect()
}

/// OpenAI's `logit_bias`: token id (as a string) to a bias from -100 to 100.
fn logit_bias(b: &Body) -> Result<Vec<(u32, f32)>, ApiError> {
    let Some(v) = b.get("logit_bias") else {
        return Ok(Vec::new());
    };
    let bad = || {
        ApiError::bad_param(
            "logit_bias",
            "'logit_bias' must map token ids to numbers from -100 to 100.",
        )
    };
    let map = v.as_object().ok_or_else(bad)?;
    map.iter()
        .map(|(id, bias)| {
            let id = id.parse::<u32>().map_err(|_| bad())?;
            let bias = bias
                .as_f64()
                .filter(|x| (-100.0..=100.0).contains(x))
                .ok_or_else(bad)?;
            Ok((id, bias as f32))
        })
        .collect()
}

/// vLLM's `guided_choice` (or `structured_outputs.choice`): the output must be one of these.
fn choices(b: &Body, so: Option<&Map<String, Value>>) -> Result<Vec<String>, ApiError> {
    let (key, v) = match (b.get("guided_choice"), so_get(so, "choice")) {
        (None, None) => return Ok(Vec::new()),
        (Some(_), Some(_)) => {
            return Err(ApiError::bad_param(
                "structured_outputs.choice",
                "'guided_choice' and 'structured_outputs.choice' cannot be combined.",
            ))
        }
        (Some(v), None) => ("guided_choice", v),
        (None, Some(v)) => ("structured_outputs.choice", v),
    };
    let bad = || {
        ApiError::bad_param(
            key,
            format!("'{key}' must be a list of 1 to 256 non-empty strings."),
        )
    };
    let list = v.as_array().ok_or_else(bad)?;
    let out: Vec<String> = list
        .iter()
        .map(|c| c.as_str().filter(|s| !s.is_empty()).map(String::from))
        .collect::<Option<_>>()
        .ok_or_else(bad)?;
    if out.is_empty() || out.len() > 256 {
        return Err(bad());
    }
    Ok(out)
}

/// Whether the output is held to a format (JSON, or a regex).
fn constrained_format(options: &SamplingOptions) -> bool {
    !matches!(options.format, None | Some(OutputFormat::Text))
}

/// What a chat body gives the template besides messages: `tools` (unless `tool_choice` is
/// "none") and `chat_template_kwargs`.
pub fn chat_context(b: &Body) -> Result<ChatContext, ApiError> {
    let mut names = Vec::new();
    let tools = match b.get("tools") {
        None | Some(Value::Null) => None,
        Some(Value::Array(list)) => {
            for (i, t) in list.iter().enumerate() {
                let name = t
                    .get("function")
                    .and_then(|f| f.get("name"))
                    .and_then(Value::as_str)
                    .filter(|_| t.get("type").and_then(Value::as_str) == Some("function"));
                let Some(name) = name else {
                    return Err(ApiError::bad_param(
                        &format!("tools[{i}]"),
                        "each tool must be {\"type\": \"function\", \"function\": {\"name\": ...}}.",
                    ));
                };
                names.push(name);
            }
            (!list.is_empty()).then(|| Value::Array(list.clone()).to_string())
        }
        Some(_) => return Err(ApiError::bad_param("tools", "'tools' must be a list.")),
    };
    let needs_tools = |what: &str| {
        ApiError::bad_param(
            "tool_choice",
            format!("'tool_choice' {what} needs 'tools'."),
        )
    };
    let bad_choice = || {
        ApiError::bad_param(
            "tool_choice",
            "'tool_choice' must be 'auto', 'none', 'required' or {\"type\": \"function\", \"function\": {\"name\": ...}}.",
        )
    };
    let (tools, tool_choice) = match b.get("tool_choice") {
        None | Some(Value::Null) => (tools, None),
        Some(Value::String(c)) if c == "auto" => (tools, None),
        Some(Value::String(c)) if c == "none" => (None, None),
        Some(Value::String(c)) if c == "required" => match tools {
            Some(t) => (Some(t), Some(ToolChoice::Required)),
            None => return Err(needs_tools("'required'")),
        },
        Some(Value::Object(o)) => {
            let name = o
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .filter(|_| o.get("type").and_then(Value::as_str) == Some("function"));
            let Some(name) = name else {
                return Err(bad_choice());
            };
            let Some(t) = tools else {
                return Err(needs_tools("naming a function"));
            };
            if !names.contains(&name) {
                return Err(ApiError::bad_param(
                    "tool_choice",
                    format!("'tool_choice' names '{name}', which is not among the 'tools'."),
                ));
            }
            (Some(t), Some(ToolChoice::Function(name.to_string())))
        }
        Some(_) => return Err(bad_choice()),
    };
    let mut kwargs = match b.get("chat_template_kwargs") {
        None => None,
        Some(Value::Object(o)) => Some(o.clone()),
        Some(_) => {
            return Err(ApiError::bad_param(
                "chat_template_kwargs",
                "'chat_template_kwargs' must be an object.",
            ))
        }
    };
    if let Some(effort) = b.opt_string("reasoning_effort")? {
        if !REASONING_EFFORTS.contains(&effort.as_str()) {
            return Err(ApiError::bad_param(
                "reasoning_effort",
                format!(
                    "'reasoning_effort' must be one of {}.",
                    REASONING_EFFORTS.join(", ")
                ),
            ));
        }
        // As vLLM: the template reads it (gpt-oss's do); a hybrid thinking model (Qwen3)
        // has no levels, but `none` turns its thinking off. Explicit kwargs win.
        let k = kwargs.get_or_insert_with(Map::new);
        if effort == "none" {
            k.entry("enable_thinking").or_insert(Value::Bool(false));
        }
        k.entry("reasoning_effort").or_insert(Value::String(effort));
    }
    let kwargs = kwargs.map(|k| Value::Object(k).to_string());
    Ok(ChatContext {
        tools_json: tools,
        template_kwargs_json: kwargs,
        tool_choice,
        parallel_tool_calls: b.bool("parallel_tool_calls")?,
    })
}

/// Reads the `messages` of a chat body.
pub fn messages(b: &Body) -> Result<Vec<Message>, ApiError> {
    let bad =
        |i: usize, what: &str| ApiError::bad_param(&format!("messages[{i}]"), what.to_string());
    let list = b.list("messages")?;
    let mut out = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let Value::Object(m) = m else {
            return Err(bad(
                i,
                "each message must be an object with 'role' and 'content'",
            ));
        };
        let role = match m.get("role").and_then(Value::as_str) {
            Some("system" | "developer") => Role::System,
            Some("user") => Role::User,
            Some("assistant") => Role::Assistant,
            Some("tool" | "function") => Role::Tool,
            Some(other) => {
                return Err(bad(
                    i,
                    &format!("unknown role '{other}' (system, developer, user, assistant, tool)"),
                ))
            }
            None => return Err(bad(i, "a message needs a 'role'")),
        };
        let content = match m.get("content") {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(parts)) => {
                let mut text = String::new();
                for p in parts {
                    match (p.get("type").and_then(Value::as_str), p.get("text")) {
                        (Some("text"), Some(Value::String(t))) => text.push_str(t),
                        (Some(t), _) if t != "text" => {
                            return Err(bad(
                                i,
                                &format!(
                                    "content parts of type '{t}' are not supported; send text"
                                ),
                            ))
                        }
                        _ => return Err(bad(i, "a text part needs 'text'")),
                    }
                }
                text
            }
            Some(_) => return Err(bad(i, "'content' must be a string or a list of parts")),
        };
        let reasoning = match m.get("reasoning_content") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(_) => return Err(bad(i, "'reasoning_content' must be a string")),
        };
        let tool_call_id = match m.get("tool_call_id") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(_) => return Err(bad(i, "'tool_call_id' must be a string")),
        };
        let tool_calls = match m.get("tool_calls") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(calls)) => calls
                .iter()
                .map(|c| {
                    let f = c.get("function")?;
                    let arguments = match f.get("arguments") {
                        Some(Value::String(a)) => a.clone(),
                        Some(other) => other.to_string(),
                        None => "{}".into(),
                    };
                    Some(ToolCall {
                        id: c
                            .get("id")
                            .and_then(Value::as_str)
                            .unwrap_or_default()
                            .into(),
                        name: f.get("name")?.as_str()?.into(),
                        arguments,
                    })
                })
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| bad(i, "each tool call needs a 'function' with a 'name'"))?,
            Some(_) => return Err(bad(i, "'tool_calls' must be a list")),
        };
        out.push(Message {
            role,
            content,
            reasoning,
            tool_calls,
            tool_call_id,
        });
    }
    Ok(out)
}

/// Reads a `/v1/completions` body.
pub fn completion_request(b: &Body) -> Result<GenRequest, ApiError> {
    let mut r = common(b, false)?;
    r.echo = b.bool("echo")?.unwrap_or(false);
    if b.get("suffix").is_some() {
        return Err(ApiError::bad_param(
            "suffix",
            "'suffix' (fill-in-the-middle) is not supported.",
        ));
    }
    b.int_in("best_of", 1, 1)
        .map_err(|_| ApiError::bad_param("best_of", "Only best_of=1 is supported."))?;
    let bad = || {
        ApiError::bad_param(
            "prompt",
            "'prompt' must be a string, a list of strings, a list of token ids or a list of \
             such lists.",
        )
    };
    let tokens = |a: &[Value]| -> Option<Vec<u32>> {
        a.iter()
            .map(|v| v.as_u64().and_then(|t| u32::try_from(t).ok()))
            .collect()
    };
    r.prompts = match b.get("prompt") {
        Some(Value::String(s)) => vec![Prompt::Text(s.clone())],
        Some(Value::Array(a)) if a.is_empty() => return Err(bad()),
        Some(Value::Array(a)) if a[0].is_string() => a
            .iter()
            .map(|v| v.as_str().map(|s| Prompt::Text(s.into())))
            .collect::<Option<_>>()
            .ok_or_else(bad)?,
        Some(Value::Array(a)) if a[0].is_number() => {
            vec![Prompt::Tokens(tokens(a).ok_or_else(bad)?)]
        }
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| v.as_array().and_then(|x| tokens(x)).map(Prompt::Tokens))
            .collect::<Option<_>>()
            .ok_or_else(bad)?,
        None => {
            return Err(ApiError::bad_param(
                "prompt",
                "Missing required parameter: 'prompt'.",
            ))
        }
        Some(_) => return Err(bad()),
    };
    if r.prompts.len() > MAX_CHOICES {
        return Err(ApiError::bad_param(
            "prompt",
            format!("At most {MAX_CHOICES} prompts per request."),
        ));
    }
    if r.prompts
        .iter()
        .any(|p| matches!(p, Prompt::Tokens(t) if t.is_empty()))
    {
        return Err(ApiError::bad_param(
            "prompt",
            "A token prompt must not be empty.",
        ));
    }
    repeat_for_n(&mut r)?;
    Ok(r)
}

/// An `/v1/embeddings` request.
#[derive(Debug)]
pub struct EmbeddingRequest {
    pub model: String,
    pub inputs: Vec<String>,
    /// `encoding_format: "base64"`: little-endian f32 bytes, base64-encoded.
    pub base64: bool,
}

/// Most inputs of one embeddings request (OpenAI's limit).
pub const MAX_EMBEDDING_INPUTS: usize = 2048;

/// Reads a `/v1/embeddings` body.
pub fn embedding_request(b: &Body) -> Result<EmbeddingRequest, ApiError> {
    let model = b.string("model")?;
    let bad = |m: &str| ApiError::bad_param("input", m.to_string());
    let inputs = match b.get("input") {
        None => return Err(bad("Missing required parameter: 'input'.")),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) if a.iter().all(Value::is_string) => a
            .iter()
            .filter_map(|v| v.as_str().map(String::from))
            .collect(),
        Some(Value::Array(_)) => {
            return Err(bad(
                "'input' must be a string or a list of strings; token-id inputs are not \
                 supported for embeddings.",
            ))
        }
        Some(_) => return Err(bad("'input' must be a string or a list of strings.")),
    };
    if inputs.is_empty() || inputs.len() > MAX_EMBEDDING_INPUTS {
        return Err(bad("'input' must hold 1 to 2048 strings."));
    }
    if inputs.iter().any(String::is_empty) {
        return Err(bad("'input' must not contain empty strings."));
    }
    let base64 = match b.opt_string("encoding_format")?.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(_) => {
            return Err(ApiError::bad_param(
                "encoding_format",
                "'encoding_format' must be 'float' or 'base64'.",
            ))
        }
    };
    if b.get("dimensions").is_some() {
        return Err(ApiError::bad_param(
            "dimensions",
            "'dimensions' is not supported: the model's own size is returned.",
        ));
    }
    Ok(EmbeddingRequest {
        model,
        inputs,
        base64,
    })
}

/// Standard base64 (with padding) of `v`'s little-endian f32 bytes, as OpenAI sends them.
pub fn base64_f32(v: &[f32]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for c in bytes.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i <= c.len() {
                out.push(ABC[(n >> shift) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// OpenAI's name of a finish reason.
pub fn finish_reason(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
        FinishReason::Cancelled => "cancelled",
        FinishReason::ToolCalls => "tool_calls",
    }
}

/// One token's chat logprobs entry.
pub fn chat_logprob(lp: &TokenLogprob) -> Value {
    json!({
        "token": lp.text,
        "logprob": lp.logprob,
        "bytes": lp.bytes,
        "top_logprobs": lp.top.iter().map(|t| json!({
            "token": t.text,
            "logprob": t.logprob,
            "bytes": t.bytes,
        })).collect::<Vec<_>>(),
    })
}

/// Legacy completions logprobs, accumulated over chunks.
#[derive(Default)]
pub struct LegacyLogprobs {
    tokens: Vec<String>,
    token_logprobs: Vec<f32>,
    top: Vec<Value>,
    offsets: Vec<usize>,
}

impl LegacyLogprobs {
    /// Adds the tokens of `chunk`, `offset` bytes into the choice's text.
    pub fn push(&mut self, chunk: &Chunk, offset: usize) {
        let mut off = offset;
        for lp in &chunk.logprobs {
            self.tokens.push(lp.text.clone());
            self.token_logprobs.push(lp.logprob);
            let top: Map<String, Value> = lp
                .top
                .iter()
                .map(|t| (t.text.clone(), json!(t.logprob)))
                .collect();
            self.top.push(Value::Object(top));
            self.offsets.push(off);
            off += lp.text.len();
        }
    }

    /// The `logprobs` object of a choice.
    pub fn to_json(&self) -> Value {
        json!({
            "tokens": self.tokens,
            "token_logprobs": self.token_logprobs,
            "top_logprobs": self.top,
            "text_offset": self.offsets,
        })
    }
}

#[cfg(test)]
pub mod tests {
    use super::*;

    /// The body of a JSON object.
    pub fn body(v: Value) -> Body {
        Body(v.as_object().unwrap().clone())
    }

    #[test]
    fn chat_reads_parts_aliases_and_rejects_what_it_cannot_do() {
        let r = chat_request(&body(json!({
            "model": "m",
            "messages": [{"role": "developer", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                         {"role": "user", "content": "hi"}],
            "max_completion_tokens": 5, "stop": "x", "top_k": -1, "seed": -1, "frobnicate": true,
            "stop_token_ids": [2, 7], "include_stop_str_in_output": true,
        })))
        .unwrap();
        let Prompt::Chat(m, _) = &r.prompts[0] else {
            panic!()
        };
        assert_eq!(m[0].content, "ab");
        assert_eq!(r.options.max_tokens, Some(5));
        assert_eq!(r.options.stop, ["x"]);
        assert_eq!(r.options.top_k, Some(0));
        assert_eq!(r.options.seed, Some(u64::MAX));
        assert_eq!(r.options.stop_token_ids, [2, 7]);
        assert_eq!(r.options.include_stop, Some(true));
        for (bad, param) in [
            (
                json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "stop_token_ids": [-1]}),
                "stop_token_ids",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "stop_token_ids": 2}),
                "stop_token_ids",
            ),
            (json!({"model": "m", "messages": []}), "messages"),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 17}),
                "n",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 0}),
                "n",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}),
                "temperature",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
                "messages[0]",
            ),
            (
                json!({"messages": [{"role": "user", "content": "x"}]}),
                "model",
            ),
        ] {
            let e = chat_request(&body(bad)).unwrap_err();
            assert_eq!(e.status, 400);
            assert_eq!(e.param.as_deref(), Some(param), "{}", e.message);
        }
    }

    #[test]
    fn reasoning_effort_and_budgets() {
        let ask = |extra: Value| {
            let mut b = json!({"model": "m", "messages": [{"role": "user", "content": "x"}]});
            b.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            body(b)
        };
        let kwargs = |extra: Value| -> Value {
            let c = chat_context(&ask(extra)).unwrap();
            serde_json::from_str(&c.template_kwargs_json.unwrap()).unwrap()
        };
        assert_eq!(
            kwargs(json!({"reasoning_effort": "none"})),
            json!({"enable_thinking": false, "reasoning_effort": "none"})
        );
        assert_eq!(
            kwargs(json!({"reasoning_effort": "high"})),
            json!({"reasoning_effort": "high"})
        );
        // Explicit template kwargs win.
        assert_eq!(
            kwargs(json!({"reasoning_effort": "none",
                          "chat_template_kwargs": {"enable_thinking": true}})),
            json!({"enable_thinking": true, "reasoning_effort": "none"})
        );
        let budget = |extra: Value| chat_request(&ask(extra)).map(|r| r.options.reasoning_budget);
        assert_eq!(
            budget(json!({"thinking_token_budget": 5})).unwrap(),
            Some(5)
        );
        assert_eq!(
            budget(json!({"reasoning_budget_tokens": 0})).unwrap(),
            Some(0)
        );
        assert_eq!(
            budget(json!({"reasoning_budget_tokens": -1})).unwrap(),
            None
        );
        for bad in [
            json!({"thinking_token_budget": 5, "reasoning_budget_tokens": 5}),
            json!({"thinking_token_budget": -1}),
            json!({"reasoning_effort": "max"}),
        ] {
            assert_eq!(
                chat_request(&ask(bad.clone())).unwrap_err().status,
                400,
                "{bad}"
            );
        }
    }

    #[test]
    fn one_output_format_from_openai_or_vllm_keys() {
        let format = |extra: Value| {
            let mut b = json!({"model": "m", "prompt": "x"});
            b.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            completion_request(&body(b)).map(|r| r.options.format)
        };
        let regex = |r: &str| Some(OutputFormat::Regex(r.into()));
        let schema = |s: &str| Some(OutputFormat::JsonSchema(s.into()));
        for (extra, want) in [
            (json!({"guided_regex": "a+"}), regex("a+")),
            (json!({"structured_outputs": {"regex": "b"}}), regex("b")),
            (
                json!({"structured_outputs": {"json": {"type": "object"}}}),
                schema(r#"{"type":"object"}"#),
            ),
            (
                json!({"structured_outputs": {"json_object": true}}),
                Some(OutputFormat::JsonObject),
            ),
            // `text` is the default: a regex beside it is the format.
            (
                json!({"response_format": {"type": "text"}, "guided_regex": "c"}),
                regex("c"),
            ),
            (
                json!({"structured_outputs": {"disable_fallback": true}}),
                None,
            ),
            (
                json!({"guided_regex": null, "guided_json": null, "structured_outputs": null}),
                None,
            ),
            // vLLM's client sends every `StructuredOutputsParams` field, unset ones as null.
            (
                json!({"guided_choice": null, "structured_outputs": {"json": null, "regex": "d",
                       "choice": null, "grammar": null, "json_object": null,
                       "structural_tag": null}}),
                regex("d"),
            ),
        ] {
            let got = format(extra.clone()).unwrap();
            assert_eq!(format!("{got:?}"), format!("{want:?}"), "{extra}");
        }
        for (extra, param, words) in [
            (json!({"guided_regex": ""}), "guided_regex", "non-empty"),
            (
                json!({"guided_regex": 5}),
                "guided_regex",
                "regular expression",
            ),
            (
                json!({"guided_regex": "a", "guided_json": {"type": "object"}}),
                "guided_regex",
                "cannot be combined",
            ),
            (
                json!({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}}),
                "structured_outputs.regex",
                "cannot be combined",
            ),
            (
                json!({"guided_regex": "a", "guided_choice": ["a"]}),
                "response_format",
                "cannot be combined",
            ),
            (
                json!({"structured_outputs": {"grammar": "root ::= \"a\""}}),
                "structured_outputs.grammar",
                "not supported",
            ),
            (
                json!({"structured_outputs": 1}),
                "structured_outputs",
                "object",
            ),
            (
                json!({"guided_choice": ["a"], "structured_outputs": {"choice": ["b"]}}),
                "structured_outputs.choice",
                "cannot be combined",
            ),
            (
                json!({"structured_outputs": {"choice": []}}),
                "structured_outputs.choice",
                "1 to 256",
            ),
        ] {
            let e = format(extra.clone()).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{extra}: {}", e.message);
            assert!(e.message.contains(words), "{extra}: {}", e.message);
        }
    }

    #[test]
    fn tool_choice_requires_a_call_of_a_listed_tool() {
        let tools = json!([{"type": "function", "function": {"name": "get_weather"}},
                           {"type": "function", "function": {"name": "now"}}]);
        let chat = |extra: Value| {
            let mut b = json!({"model": "m", "messages": [{"role": "user", "content": "x"}],
                               "tools": tools});
            b.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            chat_request(&body(b)).map(|r| match &r.prompts[0] {
                Prompt::Chat(_, c) => c.clone(),
                _ => panic!("not a chat"),
            })
        };
        let c = chat(json!({"tool_choice": "required"})).unwrap();
        assert!(matches!(c.tool_choice, Some(ToolChoice::Required)) && c.tools_json.is_some());
        let named = json!({"type": "function", "function": {"name": "now"}});
        let c = chat(json!({ "tool_choice": named })).unwrap();
        assert!(matches!(c.tool_choice, Some(ToolChoice::Function(ref n)) if n == "now"));
        let c = chat(json!({"tool_choice": "none"})).unwrap();
        assert!(c.tool_choice.is_none() && c.tools_json.is_none());
        for (bad, words) in [
            (json!({"tool_choice": "sometimes"}), "must be"),
            (json!({"tool_choice": {"type": "function"}}), "must be"),
            (
                json!({"tool_choice": {"type": "function", "function": {"name": "later"}}}),
                "'later'",
            ),
            (
                json!({"tool_choice": "required", "tools": []}),
                "needs 'tools'",
            ),
            (
                json!({"tool_choice": named, "tools": null}),
                "needs 'tools'",
            ),
            (
                json!({"tool_choice": "required", "response_format": {"type": "json_object"}}),
                "cannot be combined",
            ),
            (
                json!({"tool_choice": named, "guided_choice": ["a"]}),
                "cannot be combined",
            ),
            (
                json!({"tool_choice": "required", "guided_regex": "a"}),
                "cannot be combined",
            ),
        ] {
            let e = chat(bad.clone()).unwrap_err();
            assert_eq!(
                e.param.as_deref(),
                Some("tool_choice"),
                "{bad}: {}",
                e.message
            );
            assert!(e.message.contains(words), "{bad}: {}", e.message);
        }
    }

    #[test]
    fn n_repeats_each_prompt_in_a_row() {
        let r =
            completion_request(&body(json!({"model": "m", "prompt": ["a", "b"], "n": 3}))).unwrap();
        let texts: Vec<&str> = r
            .prompts
            .iter()
            .map(|p| match p {
                Prompt::Text(t) => t.as_str(),
                _ => panic!("not text"),
            })
            .collect();
        assert_eq!((texts, r.n), (vec!["a", "a", "a", "b", "b", "b"], 3));
        let many = json!({"model": "m", "prompt": vec!["x"; 5], "n": 16});
        let e = completion_request(&body(many)).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("n"), "{}", e.message);
    }

    #[test]
    fn base64_of_floats_matches_python() {
        // base64.b64encode(struct.pack("<2f", 1.0, -2.5)).decode()
        assert_eq!(base64_f32(&[1.0, -2.5]), "AACAPwAAIMA=");
        assert_eq!(base64_f32(&[1.0]), "AACAPw==");
        assert_eq!(base64_f32(&[]), "");
    }

    #[test]
    fn embedding_inputs_are_checked() {
        let r = embedding_request(&body(json!({"model": "m", "input": ["a", "b"]}))).unwrap();
        assert_eq!(r.inputs, vec!["a", "b"]);
        assert!(!r.base64);
        for bad in [
            json!({"model": "m", "input": []}),
            json!({"model": "m", "input": [[1, 2]]}),
            json!({"model": "m", "input": ""}),
            json!({"model": "m", "input": "x", "encoding_format": "int8"}),
        ] {
            assert!(embedding_request(&body(bad)).is_err());
        }
    }

    #[test]
    fn completion_prompts_come_in_four_shapes() {
        let n = |p: Value| {
            completion_request(&body(json!({"model": "m", "prompt": p}))).map(|r| r.prompts.len())
        };
        assert_eq!(n(json!("a")).unwrap(), 1);
        assert_eq!(n(json!(["a", "b"])).unwrap(), 2);
        assert_eq!(n(json!([1, 2, 3])).unwrap(), 1);
        assert_eq!(n(json!([[1], [2]])).unwrap(), 2);
        assert!(n(json!([])).is_err());
        assert!(n(json!([1, "a"])).is_err());
        assert!(n(json!(7)).is_err());
    }
}
