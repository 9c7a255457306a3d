//! The model's chat template, rendered the way Hugging Face transformers renders it: Jinja with
//! `trim_blocks`, `lstrip_blocks`, loop controls, `raise_exception`, and a `tojson` that writes
//! Python's `json.dumps(ensure_ascii=False)` output.

use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, Error, ErrorKind};

/// What a template sees besides the messages: `tools` and any extra variables
/// (`enable_thinking`, ...), as transformers' `apply_chat_template(..., tools=, **kwargs)`.
#[derive(Default)]
pub struct TemplateExtras {
    /// OpenAI-shaped tool definitions.
    pub tools: Option<serde_json::Value>,
    /// Extra variables; they cannot replace `messages`, `tools` or `add_generation_prompt`.
    pub kwargs: serde_json::Map<String, serde_json::Value>,
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

impl ChatTemplate {
    /// Compiles `source`; `bos_token` and `eos_token` are the texts the template may use.
    pub fn new(source: &str, bos_token: String, eos_token: String) -> Result<Self, Error> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_filter("tojson", tojson);
        env.add_template_owned("chat", source.to_string())?;
        Ok(Self {
            env,
            bos_token,
            eos_token,
        })
    }

    /// Renders `messages` (OpenAI-shaped JSON objects), ending with the assistant's turn
    /// opener if `add_generation_prompt`.
    pub fn render(
        &self,
        messages: &[serde_json::Value],
        extras: &TemplateExtras,
        add_generation_prompt: bool,
    ) -> Result<String, Error> {
        let tmpl = self.env.get_template("chat")?;
        let mut vars: serde_json::Map<String, serde_json::Value> = extras.kwargs.clone();
        vars.insert("bos_token".into(), self.bos_token.clone().into());
        vars.insert("eos_token".into(), self.eos_token.clone().into());
        vars.insert("messages".into(), messages.to_vec().into());
        vars.insert("add_generation_prompt".into(), add_generation_prompt.into());
        if let Some(tools) = &extras.tools {
            vars.insert("tools".into(), tools.clone());
        }
        tmpl.render(Value::from_serialize(&vars))
    }
}

fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// `tojson` as transformers defines it: `json.dumps(x, ensure_ascii=False, indent=indent)`.
fn tojson(value: Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let _: Option<bool> = kwargs.get("ensure_ascii")?;
    let _: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let json = serde_json::to_value(&value)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    let mut out = String::new();
    python_json(&json, indent, 0, &mut out);
    Ok(Value::from_safe_string(out))
}

/// Python's `json.dumps` layout: `", "` and `": "` separators, or newlines and `indent` spaces.
fn python_json(v: &serde_json::Value, indent: Option<usize>, depth: usize, out: &mut String) {
    use serde_json::Value as J;
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * depth));
        }
    };
    let sep = if indent.is_some() { "," } else { ", " };
    match v {
        J::Array(items) if !items.is_empty() => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(sep);
                }
                newline(out, depth + 1);
                python_json(item, indent, depth + 1, out);
            }
            newline(out, depth);
            out.push(']');
        }
        J::Object(map) if !map.is_empty() => {
            out.push('{');
            for (i, (k, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(sep);
                }
                newline(out, depth + 1);
                out.push_str(&serde_json::Value::String(k.clone()).to_string());
                out.push_str(": ");
                python_json(item, indent, depth + 1, out);
            }
            newline(out, depth);
            out.push('}');
        }
        // Scalars and empty containers print as serde_json prints them (no escaping of non-ASCII).
        other => out.push_str(&other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tojson_matches_python_json_dumps() {
        let t = ChatTemplate::new("", String::new(), String::new()).unwrap();
        let out = t
            .env
            .render_str(
                "{{ x | tojson }}",
                minijinja::context! { x => serde_json::json!({"a": [1, "é<"], "b": {}}) },
            )
            .unwrap();
        assert_eq!(out, r#"{"a": [1, "é<"], "b": {}}"#);
    }

    #[test]
    fn raise_exception_fails_rendering() {
        let t = ChatTemplate::new(
            "{{ raise_exception('no system role') }}",
            String::new(),
            String::new(),
        )
        .unwrap();
        let err = t.render(&[], &TemplateExtras::default(), true).unwrap_err();
        assert!(err.to_string().contains("no system role"));
    }

    #[test]
    fn trims_blocks_like_transformers() {
        // Expected outputs are Jinja2's (trim_blocks + lstrip_blocks): indentation before
        // `{{ }}` stays, indentation before `{% %}` and the newline after it go.
        let msgs = [serde_json::json!({"role": "user", "content": " hi "})];
        let t = ChatTemplate::new(
            "{% for m in messages %}\n  {{ m.role }}:{{ m.content.strip() }}\n{% endfor %}",
            String::new(),
            String::new(),
        )
        .unwrap();
        assert_eq!(
            t.render(&msgs, &TemplateExtras::default(), false).unwrap(),
            "  user:hi\n"
        );
        let t = ChatTemplate::new(
            "{% for m in messages %}\n  {% if true %}{{ m.role }}{% endif %}\n{% endfor %}",
            String::new(),
            String::new(),
        )
        .unwrap();
        assert_eq!(
            t.render(&msgs, &TemplateExtras::default(), false).unwrap(),
            "user"
        );
    }
}
