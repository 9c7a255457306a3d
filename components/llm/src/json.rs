//! Structured output: a byte-level checker that says whether a text can still grow into a
//! JSON object of a grammar, so the sampler can drop every token that would leave it. The
//! grammar is any JSON object (JSON mode, `response_format` `json_object`) or one compiled
//! from a JSON Schema (`json_schema`).
//!
//! The whole state is `Copy` (the open containers are a fixed stack of small frames), so
//! trying a token is copying the state and feeding it the token's bytes: no allocation per
//! candidate across a 150k vocabulary.

use std::cell::OnceCell;
use std::collections::HashMap;

use regex_syntax::hir::{Hir, HirKind, Look, Repetition};
use serde_json::Value;

use crate::pattern::{self, Mode, Pattern, Trie};

/// Deepest nesting of objects and arrays.
const MAX_DEPTH: usize = 64;

/// Longest run of whitespace between tokens. Small models in JSON mode can fall into
/// emitting newlines forever, which the grammar allows; llama.cpp's JSON grammars cap the
/// run in the same way.
const MAX_WHITESPACE: u8 = 20;

/// Most nodes a schema compiles to, most properties of an object and values of an enum
/// (one bit each in a match), and the longest key or enum value in bytes.
const MAX_NODES: usize = 4096;
const MAX_CHOICES: usize = 64;
const MAX_TEXT: usize = 255;

/// Most `$ref` and `anyOf` nodes in a row (the checker follows them recursively).
const MAX_CHAIN: usize = 128;

/// The literals `true`, `false` and `null`.
const LITERALS: [&[u8]; 3] = [b"true", b"false", b"null"];

/// A node of a [`Grammar`].
type NodeId = u16;

/// Nodes every grammar starts with: any value, an object of any values, an array of any.
const ANY: NodeId = 0;
const ANY_OBJECT: NodeId = 1;
const ANY_ARRAY: NodeId = 2;

/// What a value must be.
#[derive(Debug)]
enum Node {
    /// Any JSON value.
    Any,
    /// An object of these properties, in this order (those not required may be left out).
    Object(Vec<Prop>),
    /// An object of any keys, each value of this node, with this many entries.
    Map {
        value: NodeId,
        entries: Count,
    },
    /// An array, each item of this node, with this many items.
    Array {
        item: NodeId,
        items: Count,
    },
    /// A string of this many characters (code points, as JSON Schema counts them) that
    /// matches the grammar's pattern of this index, if any.
    String(Count, Option<u16>),
    /// A number in this range.
    Number(Range),
    /// An integer in this range.
    Integer(Range),
    Boolean,
    Null,
    /// Exactly one of these JSON texts (`enum`, `const`), compact as serde_json writes them.
    Literals(Vec<Vec<u8>>),
    /// One of these nodes, told apart by their first byte.
    AnyOf(Vec<NodeId>),
    /// An object of one of several shapes told apart by the value of their first property,
    /// `key` (a discriminated union: pydantic's `Field(discriminator=...)`, a tool call's
    /// `name`): each of `values` (JSON text) leads to the object node that goes on.
    Tagged {
        key: Vec<u8>,
        values: Vec<(Vec<u8>, NodeId)>,
    },
    /// The node a `$ref` names.
    Ref(NodeId),
}

/// How many items an array, or characters a string, may have (`minItems`/`maxItems`,
/// `minLength`/`maxLength`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Count {
    min: u32,
    max: u32,
}

/// Most calls in one required answer with parallel calls: a model that keeps writing calls
/// is cut there rather than at `max_tokens`.
pub const MAX_CALLS: u32 = 16;

impl Count {
    const ANY: Count = Count {
        min: 0,
        max: u32::MAX,
    };
}

/// Largest magnitude a bounded number may reach, and most digits it may have: the digits
/// are kept as one integer, below 2^53, so that the value the checker compares is the one
/// a JSON parser reads (`m / 10^k` in floating point rounds once, as parsing does).
const BOUNDED_DIGITS: u8 = 15;
const BOUNDED_MAGNITUDE: f64 = 1e15;

/// The values a number may take (`minimum`, `maximum`, `exclusiveMinimum`,
/// `exclusiveMaximum`).
#[derive(Clone, Copy, Debug, PartialEq)]
struct Range {
    lo: f64,
    lo_open: bool,
    hi: f64,
    hi_open: bool,
}

impl Range {
    const ANY: Range = Range {
        lo: f64::NEG_INFINITY,
        lo_open: false,
        hi: f64::INFINITY,
        hi_open: false,
    };

    fn bounded(&self) -> bool {
        *self != Range::ANY
    }

    fn holds(&self, v: f64) -> bool {
        (v > self.lo || (v == self.lo && !self.lo_open))
            && (v < self.hi || (v == self.hi && !self.hi_open))
    }

    /// Whether some value from `a` to `b` (each end included or not) is in the range.
    fn meets(&self, a: f64, a_in: bool, b: f64, b_in: bool) -> bool {
        (b > self.lo || (b == self.lo && b_in && !self.lo_open))
            && (a < self.hi || (a == self.hi && a_in && !self.hi_open))
    }
}

/// A property of an object node.
#[derive(Debug)]
struct Prop {
    /// The key as JSON text, quotes included.
    key: Vec<u8>,
    node: NodeId,
    required: bool,
}

/// What a JSON output must match: built once per request.
#[derive(Debug)]
pub struct Grammar {
    nodes: Vec<Node>,
    root: NodeId,
    /// The strings' `pattern`s (and `format`s).
    patterns: Vec<Pattern>,
}

/// Most patterns a schema may have: with [`pattern::MAX_PATTERN_BYTES`] each, a request's
/// grammar stays within a few MiB.
const MAX_PATTERNS: usize = 32;

/// RFC 3339's `full-date`, each month with its own days (29 February in leap years only)
/// and years from 0001, as a date parser checks.
const DATE: &str = r"(([0-9]{3}[1-9]|[0-9]{2}[1-9]0|[0-9][1-9]00|[1-9]000)-((0[1-9]|1[0-2])-(0[1-9]|1[0-9]|2[0-8])|(0[13-9]|1[0-2])-(29|30)|(0[13578]|1[02])-31)|([0-9]{2}(0[48]|[2468][048]|[13579][26])|(0[48]|[2468][048]|[13579][26])00)-02-29)";

/// RFC 3339's `full-time`: hours, minutes, seconds, a fraction, an offset.
const TIME: &str =
    r"([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.[0-9]+)?(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])";

/// The pattern of a `format` the compiler follows (RFC 3339's `date-time` with `T`,
/// `date` and `time`; a UUID; an IPv4 address); others are annotations.
fn format_pattern(format: &str) -> Option<String> {
    let octet = r"(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])";
    Some(match format {
        "date-time" => format!("^{DATE}T{TIME}$"),
        "date" => format!("^{DATE}$"),
        "time" => format!("^{TIME}$"),
        "uuid" => {
            r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$".into()
        }
        "ipv4" => format!(r"^({octet}\.){{3}}{octet}$"),
        _ => return None,
    })
}

/// A whole-string pattern of one character repeated, `^C{m,n}$` (C a class, `.`, or one
/// character; pydantic's `constr(pattern=r"^\w{3,20}$")`), as `^C*$` and a length of
/// `m..=n` characters: a DFA counts by copying itself, and a Unicode class copied 20
/// times takes megabytes (`^\w{3,20}$`: 3 MiB), while the string counts its characters
/// anyway. Other patterns are left as they are, with any length.
fn counted(hir: Hir) -> (Hir, Count) {
    let one_char = |h: &Hir| match h.kind() {
        HirKind::Class(_) => true,
        HirKind::Literal(lit) => std::str::from_utf8(&lit.0).is_ok_and(|t| t.chars().count() == 1),
        _ => false,
    };
    if let HirKind::Concat(parts) = hir.kind() {
        if let [start, middle, end] = parts.as_slice() {
            let mut middle = middle;
            while let HirKind::Capture(c) = middle.kind() {
                middle = &*c.sub;
            }
            let anchored = *start.kind() == HirKind::Look(Look::Start)
                && *end.kind() == HirKind::Look(Look::End);
            if let HirKind::Repetition(r) = middle.kind() {
                if anchored && one_char(&r.sub) {
                    let any = Hir::repetition(Repetition {
                        min: 0,
                        max: None,
                        greedy: true,
                        sub: r.sub.clone(),
                    });
                    let length = Count {
                        min: r.min,
                        max: r.max.unwrap_or(u32::MAX),
                    };
                    return (Hir::concat(vec![start.clone(), any, end.clone()]), length);
                }
            }
        }
    }
    (hir, Count::ANY)
}

impl Grammar {
    fn base() -> Vec<Node> {
        vec![
            Node::Any,
            Node::Map {
                value: ANY,
                entries: Count::ANY,
            },
            Node::Array {
                item: ANY,
                items: Count::ANY,
            },
        ]
    }

    /// Any JSON object (JSON mode).
    pub fn any_object() -> Self {
        Self {
            nodes: Self::base(),
            root: ANY_OBJECT,
            patterns: Vec::new(),
        }
    }

    /// The grammar of a JSON Schema whose root is an object. Supported: `type` (one or a
    /// list), `properties` (written in their order), `required`, `additionalProperties`,
    /// `items`, `enum`, `const`, `anyOf`/`oneOf` whose branches start with different
    /// characters or are objects told apart by their first property, `$ref` into
    /// `$defs`/`definitions` (recursion included), `minLength`/`maxLength`,
    /// `minItems`/`maxItems`, `minimum`/`maximum`/`exclusiveMinimum`/`exclusiveMaximum` (a
    /// bounded number is written without an exponent, in at most 15 digits), `pattern`, and
    /// the `format`s of [`format_pattern`]; other formats and annotations (`title`,
    /// `description`, ...) are ignored. Any other keyword is an error naming it, rather than
    /// output that does not follow it.
    pub fn from_schema(schema: &str) -> Result<Self, String> {
        let root: Value =
            serde_json::from_str(schema).map_err(|e| format!("the schema is not JSON: {e}"))?;
        let mut c = Compiler {
            root: &root,
            nodes: Self::base(),
            refs: HashMap::new(),
            depth: 0,
            patterns: Vec::new(),
        };
        let top = c.node(&root)?;
        let g = Self {
            nodes: c.nodes,
            patterns: c.patterns,
            root: top,
        };
        if g.first_bytes()?[top as usize] != 1 << b'{' {
            return Err("the schema's root must be an object".into());
        }
        Ok(g)
    }

    /// The grammar of one call of one of `tools` (name, `parameters` schema):
    /// `{"name": NAME, "arguments": {...}}`, the object Hermes-style models (Qwen2.5, Qwen3)
    /// write inside `<tool_call>`, its arguments following the tool's parameters. A tool
    /// without parameters takes `{}`. With `many`, a JSON array of 1 to [`MAX_CALLS`] such
    /// calls (vLLM's form of a required call).
    pub fn tool_call(tools: &[(&str, Option<&Value>)], many: bool) -> Result<Self, String> {
        let none = serde_json::json!({"type": "object", "additionalProperties": false});
        let mut c = Compiler {
            root: &none,
            nodes: Self::base(),
            refs: HashMap::new(),
            depth: 0,
            patterns: Vec::new(),
        };
        let mut calls = Vec::new();
        let mut arguments = Vec::new();
        for &(name, parameters) in tools {
            let parameters = parameters.unwrap_or(&none);
            // Each schema's `$ref`s are its own.
            c.root = parameters;
            c.refs.clear();
            let args = match c.node(parameters) {
                Ok(ANY) => ANY_OBJECT,
                Ok(args) => args,
                Err(e) => return Err(format!("tool '{name}': {e}")),
            };
            arguments.push((name, args));
            let name_node = c.literals(&[Value::String(name.to_string())])?;
            let call = Node::Object(vec![
                Prop {
                    key: b"\"name\"".to_vec(),
                    node: name_node,
                    required: true,
                },
                Prop {
                    key: b"\"arguments\"".to_vec(),
                    node: args,
                    required: true,
                },
            ]);
            calls.push(c.add(call)?);
        }
        let root = match calls[..] {
            [] => return Err("no tools to call".into()),
            [one] => one,
            _ => {
                let tagged = c
                    .tagged(&calls)
                    .ok_or("tool names must be distinct (at most 64 tools)")?;
                c.add(tagged)?
            }
        };
        let root = if many {
            c.add(Node::Array {
                item: root,
                items: Count {
                    min: 1,
                    max: MAX_CALLS,
                },
            })?
        } else {
            root
        };
        let g = Self {
            nodes: c.nodes,
            patterns: c.patterns,
            root,
        };
        let first = g.first_bytes()?;
        if let Some((name, _)) = arguments
            .iter()
            .find(|(_, args)| first[*args as usize] != 1 << b'{')
        {
            return Err(format!("tool '{name}': its parameters must be an object"));
        }
        Ok(g)
    }

    /// The bytes a value of each node can start with, as bit sets; checks on the way that
    /// `anyOf` branches start differently (the checker picks one by its first byte) and
    /// that no `$ref` leads back to itself before an object or array opens (the checker
    /// would go round it forever).
    fn first_bytes(&self) -> Result<Vec<u128>, String> {
        let mut memo = vec![None; self.nodes.len()];
        let mut active = vec![false; self.nodes.len()];
        for id in 0..self.nodes.len() {
            self.first_bytes_of(id as NodeId, &mut memo, &mut active, 0)?;
        }
        Ok(memo.into_iter().map(|m| m.unwrap_or(0)).collect())
    }

    fn first_bytes_of(
        &self,
        node: NodeId,
        memo: &mut [Option<u128>],
        active: &mut [bool],
        depth: usize,
    ) -> Result<u128, String> {
        let i = node as usize;
        if let Some(m) = memo[i] {
            return Ok(m);
        }
        if active[i] {
            return Err("a $ref refers to itself without an object or array between".into());
        }
        // Chains of references and branches are walked recursively, here and by the checker.
        if depth > MAX_CHAIN {
            return Err(format!("more than {MAX_CHAIN} $ref or anyOf in a row"));
        }
        active[i] = true;
        let bit = |b: u8| 1u128 << b;
        let number = (b'0'..=b'9').fold(bit(b'-'), |m, d| m | bit(d));
        let m = match &self.nodes[i] {
            Node::Any => {
                number | bit(b'{') | bit(b'[') | bit(b'"') | bit(b't') | bit(b'f') | bit(b'n')
            }
            Node::Object(_) | Node::Map { .. } | Node::Tagged { .. } => bit(b'{'),
            Node::Array { .. } => bit(b'['),
            Node::String(..) => bit(b'"'),
            Node::Number(_) | Node::Integer(_) => number,
            Node::Boolean => bit(b't') | bit(b'f'),
            Node::Null => bit(b'n'),
            // serde_json's texts start with an ASCII byte.
            Node::Literals(texts) => texts.iter().fold(0, |m, t| m | bit(t[0] & 0x7f)),
            Node::AnyOf(alts) => {
                let mut all = 0;
                for &a in alts {
                    let m = self.first_bytes_of(a, memo, active, depth + 1)?;
                    if all & m != 0 {
                        return Err("'anyOf' branches that can start with the same character \
                                    are not supported (objects can be told apart by a first \
                                    required property of different 'const' values)"
                            .into());
                    }
                    all |= m;
                }
                all
            }
            Node::Ref(target) => self.first_bytes_of(*target, memo, active, depth + 1)?,
        };
        active[i] = false;
        memo[i] = Some(m);
        Ok(m)
    }

    /// How many characters a string of `node` may have.
    fn chars(&self, node: NodeId) -> Count {
        match self.nodes[node as usize] {
            Node::String(count, _) => count,
            _ => Count::ANY,
        }
    }

    /// The pattern a string of `node` must match.
    fn pattern(&self, node: NodeId) -> Option<&Pattern> {
        match self.nodes[node as usize] {
            Node::String(_, Some(p)) => self.patterns.get(p as usize),
            _ => None,
        }
    }

    /// The range of a bounded number node.
    fn range(&self, node: NodeId) -> Option<Range> {
        match self.nodes[node as usize] {
            Node::Number(r) | Node::Integer(r) if r.bounded() => Some(r),
            _ => None,
        }
    }

    fn props(&self, node: NodeId) -> &[Prop] {
        match &self.nodes[node as usize] {
            Node::Object(props) => props,
            _ => &[],
        }
    }

    /// The texts a match at `node` chooses among: an object's keys or an enum's values.
    fn text(&self, node: NodeId, key: bool, i: usize) -> &[u8] {
        match &self.nodes[node as usize] {
            Node::Object(props) if key => &props[i].key,
            Node::Literals(texts) if !key => &texts[i],
            Node::Tagged { key: k, .. } if key => k,
            Node::Tagged { values, .. } => &values[i].0,
            _ => &[],
        }
    }
}

/// Keywords that say nothing about which texts match.
const ANNOTATIONS: &[&str] = &[
    "title",
    "description",
    "default",
    "examples",
    "format",
    "$schema",
    "$id",
    "$comment",
    "$defs",
    "definitions",
    "deprecated",
    // OpenAPI's (pydantic writes it for discriminated unions): each branch's `const` says
    // the same.
    "discriminator",
    "readOnly",
    "writeOnly",
];

/// Keywords the compiler follows, besides [`BOUNDS`].
const KEYWORDS: &[&str] = &[
    "type",
    "properties",
    "required",
    "additionalProperties",
    "items",
    "enum",
    "const",
    "anyOf",
    "oneOf",
    "$ref",
];

/// Keywords that bound a value of one type, and that type.
const BOUNDS: &[(&str, &str)] = &[
    ("minLength", "string"),
    ("maxLength", "string"),
    ("pattern", "string"),
    ("minItems", "array"),
    ("minProperties", "object"),
    ("maxProperties", "object"),
    ("maxItems", "array"),
    ("minimum", "number"),
    ("maximum", "number"),
    ("exclusiveMinimum", "number"),
    ("exclusiveMaximum", "number"),
];

/// Whether the compiler follows keyword `k`.
fn followed(k: &str) -> bool {
    KEYWORDS.contains(&k) || BOUNDS.iter().any(|(b, _)| *b == k)
}

/// The `min`/`max` count keywords of `obj` (`minLength`, `maxItems`, ...).
fn count(obj: &serde_json::Map<String, Value>, min: &str, max: &str) -> Result<Count, String> {
    let get = |k: &str, default: u32| match obj.get(k) {
        None => Ok(default),
        Some(v) => match v.as_u64() {
            // A count past any output is no bound.
            Some(n) => Ok(n.min(u64::from(u32::MAX)) as u32),
            None => Err(format!("'{k}' must be a whole number, not {v}")),
        },
    };
    let c = Count {
        min: get(min, 0)?,
        max: get(max, u32::MAX)?,
    };
    if c.min > c.max {
        return Err(format!("'{min}' is above '{max}': nothing matches"));
    }
    Ok(c)
}

/// The range the bound keywords of `obj` give a number (an integer if `integer`).
fn range(obj: &serde_json::Map<String, Value>, integer: bool) -> Result<Range, String> {
    let number = |k: &str| match obj.get(k) {
        None => Ok(None),
        Some(v) => v
            .as_f64()
            .map(Some)
            .ok_or_else(|| format!("'{k}' must be a number, not {v}")),
    };
    let mut r = Range::ANY;
    if let Some(lo) = number("minimum")? {
        r.lo = lo;
    }
    if let Some(hi) = number("maximum")? {
        r.hi = hi;
    }
    // Draft 4 writes `"exclusiveMinimum": true` beside `minimum`; later drafts a number.
    match obj.get("exclusiveMinimum") {
        Some(Value::Bool(open)) => r.lo_open = *open,
        _ => {
            if let Some(lo) = number("exclusiveMinimum")?.filter(|&lo| lo >= r.lo) {
                (r.lo, r.lo_open) = (lo, true);
            }
        }
    }
    match obj.get("exclusiveMaximum") {
        Some(Value::Bool(open)) => r.hi_open = *open,
        _ => {
            if let Some(hi) = number("exclusiveMaximum")?.filter(|&hi| hi <= r.hi) {
                (r.hi, r.hi_open) = (hi, true);
            }
        }
    }
    if r.lo >= BOUNDED_MAGNITUDE || r.hi <= -BOUNDED_MAGNITUDE {
        return Err(format!(
            "a bounded number must be able to lie within ±{BOUNDED_MAGNITUDE:e}"
        ));
    }
    let empty = if integer {
        let lo = if r.lo_open {
            r.lo.floor() + 1.0
        } else {
            r.lo.ceil()
        };
        let hi = if r.hi_open {
            r.hi.ceil() - 1.0
        } else {
            r.hi.floor()
        };
        lo > hi
    } else {
        !r.meets(r.lo, !r.lo_open, r.hi, !r.hi_open)
    };
    if empty {
        return Err("the bounds leave no number between them".into());
    }
    Ok(r)
}

struct Compiler<'a> {
    root: &'a Value,
    nodes: Vec<Node>,
    refs: HashMap<String, NodeId>,
    /// How deep `node` is in itself: nesting and `$ref` chains, which serde_json's own
    /// nesting limit does not bound.
    depth: usize,
    patterns: Vec<Pattern>,
}

impl Compiler<'_> {
    fn add(&mut self, node: Node) -> Result<NodeId, String> {
        if self.nodes.len() >= MAX_NODES {
            return Err(format!("the schema has more than {MAX_NODES} parts"));
        }
        self.nodes.push(node);
        Ok((self.nodes.len() - 1) as NodeId)
    }

    fn node(&mut self, s: &Value) -> Result<NodeId, String> {
        if self.depth > 4 * MAX_CHAIN {
            return Err(format!("the schema nests more than {} deep", 4 * MAX_CHAIN));
        }
        self.depth += 1;
        let node = self.node_inner(s);
        self.depth -= 1;
        node
    }

    fn node_inner(&mut self, s: &Value) -> Result<NodeId, String> {
        let obj = match s {
            Value::Bool(true) => return Ok(ANY),
            Value::Bool(false) => return Err("a schema of false matches nothing".into()),
            Value::Object(o) => o,
            _ => return Err(format!("a schema must be an object, not {s}")),
        };
        if let Some(k) = obj
            .keys()
            .find(|k| !ANNOTATIONS.contains(&k.as_str()) && !followed(k))
        {
            return Err(format!("the keyword '{k}' is not supported"));
        }
        if let Some(r) = obj.get("$ref") {
            if let Some(k) = obj.keys().find(|k| followed(k) && *k != "$ref") {
                return Err(format!("'{k}' beside '$ref' is not supported"));
            }
            return self.reference(r);
        }
        if let Some(c) = obj.get("const") {
            return self.literals(std::slice::from_ref(c));
        }
        if let Some(e) = obj.get("enum") {
            let values = e.as_array().ok_or("'enum' must be a list")?;
            return self.literals(values);
        }
        if let Some(alts) = obj.get("anyOf").or_else(|| obj.get("oneOf")) {
            let alts = alts.as_array().ok_or("'anyOf' must be a list")?;
            let ids = alts
                .iter()
                .map(|a| self.node(a))
                .collect::<Result<Vec<_>, _>>()?;
            return self.any_of(ids);
        }
        match obj.get("type") {
            None if obj.contains_key("properties") || obj.contains_key("additionalProperties") => {
                self.typed("object", obj)
            }
            None if obj.contains_key("items") => self.typed("array", obj),
            None => match BOUNDS.iter().find(|(k, _)| obj.contains_key(*k)) {
                // A bound on one type beside any value of the others is not followed.
                Some((k, t)) => Err(format!("'{k}' needs \"type\": \"{t}\"")),
                None => Ok(ANY),
            },
            Some(Value::String(t)) => self.typed(t, obj),
            Some(Value::Array(types)) => {
                let names: Vec<&str> = types.iter().filter_map(Value::as_str).collect();
                if names.len() != types.len() || names.is_empty() {
                    return Err("'type' must be a name or a list of names".into());
                }
                let mut ids = Vec::new();
                for &t in &names {
                    // A number may be an integer: "integer" beside "number" adds nothing.
                    if t == "integer" && names.contains(&"number") {
                        continue;
                    }
                    ids.push(self.typed(t, obj)?);
                }
                self.any_of(ids)
            }
            Some(t) => Err(format!("'type' must be a name or a list of names, not {t}")),
        }
    }

    fn typed(&mut self, t: &str, obj: &serde_json::Map<String, Value>) -> Result<NodeId, String> {
        match t {
            "object" => self.object(obj),
            "array" => {
                let items = count(obj, "minItems", "maxItems")?;
                // An open array counts its items in 16 bits.
                if items.min > u32::from(u16::MAX) {
                    return Err(format!("'minItems' above {} is not supported", u16::MAX));
                }
                let item = match obj.get("items") {
                    None | Some(Value::Bool(true)) => ANY,
                    Some(items) => self.node(items)?,
                };
                if item == ANY && items == Count::ANY {
                    return Ok(ANY_ARRAY);
                }
                self.add(Node::Array { item, items })
            }
            "string" => {
                let mut chars = count(obj, "minLength", "maxLength")?;
                let format = obj.get("format").and_then(Value::as_str);
                let regex = match (obj.get("pattern"), format.and_then(format_pattern)) {
                    (None, None) => None,
                    (Some(Value::String(p)), None) => Some(p.clone()),
                    (None, Some(regex)) => Some(regex),
                    (Some(Value::String(_)), Some(_)) => {
                        return Err(format!(
                            "'pattern' beside \"format\": {:?} is not supported",
                            format.unwrap_or_default()
                        ))
                    }
                    (Some(p), _) => return Err(format!("'pattern' must be a string, not {p}")),
                };
                let pattern = match regex {
                    None => None,
                    Some(_) if self.patterns.len() == MAX_PATTERNS => {
                        return Err(format!("more than {MAX_PATTERNS} patterns"))
                    }
                    Some(regex) => {
                        let (p, length) = pattern::build_narrowing(&regex, |hir| {
                            let (hir, length) = counted(hir);
                            Ok((Pattern::new(&hir, &regex, Mode::Search)?, length))
                        })?;
                        chars = Count {
                            min: chars.min.max(length.min),
                            max: chars.max.min(length.max),
                        };
                        if chars.min > chars.max {
                            return Err(format!(
                                "the pattern {regex:?} and 'minLength'/'maxLength' leave no \
                                 length: nothing matches"
                            ));
                        }
                        let need = p.need_of(p.start);
                        if need > chars.max {
                            return Err(format!(
                                "the pattern {regex:?} needs {need} characters, more than \
                                 'maxLength' {}",
                                chars.max
                            ));
                        }
                        self.patterns.push(p);
                        Some((self.patterns.len() - 1) as u16)
                    }
                };
                self.add(Node::String(chars, pattern))
            }
            "number" => {
                let r = range(obj, false)?;
                self.add(Node::Number(r))
            }
            "integer" => {
                let r = range(obj, true)?;
                self.add(Node::Integer(r))
            }
            "boolean" => self.add(Node::Boolean),
            "null" => self.add(Node::Null),
            _ => Err(format!("unknown type '{t}'")),
        }
    }

    fn object(&mut self, obj: &serde_json::Map<String, Value>) -> Result<NodeId, String> {
        let none = serde_json::Map::new();
        let props = match obj.get("properties") {
            None => &none,
            Some(Value::Object(p)) => p,
            Some(_) => return Err("'properties' must be an object".into()),
        };
        let required: Vec<&str> = match obj.get("required") {
            None => Vec::new(),
            Some(Value::Array(r)) => r
                .iter()
                .map(|v| v.as_str().ok_or("'required' must list names"))
                .collect::<Result<_, _>>()?,
            Some(_) => return Err("'required' must be a list".into()),
        };
        if let Some(r) = required.iter().find(|r| !props.contains_key(**r)) {
            return Err(format!("required property '{r}' is not in 'properties'"));
        }
        let entries = count(obj, "minProperties", "maxProperties")?;
        // An open map counts its entries in 16 bits.
        if entries.min > u32::from(u16::MAX) {
            return Err(format!(
                "'minProperties' above {} is not supported",
                u16::MAX
            ));
        }
        if props.is_empty() {
            // Only the keys it allows: any (a map) or none.
            let value = match obj.get("additionalProperties") {
                None | Some(Value::Bool(true)) if entries == Count::ANY => return Ok(ANY_OBJECT),
                None | Some(Value::Bool(true)) => ANY,
                Some(Value::Bool(false)) if entries.min > 0 => {
                    return Err("'minProperties' on an object without properties: nothing \
                                matches"
                        .into())
                }
                Some(Value::Bool(false)) => return self.add(Node::Object(Vec::new())),
                Some(value) => self.node(value)?,
            };
            return self.add(Node::Map { value, entries });
        }
        // With properties, the output holds only those, the required ones always: counts
        // that this keeps to anyway are fine, others would need a count of the optional
        // ones written.
        let required_count = required.len() as u32;
        if entries.min > required_count || entries.max < props.len() as u32 {
            return Err(format!(
                "'minProperties'/'maxProperties' on an object with properties must allow \
                 from its {required_count} required to all its {} properties",
                props.len()
            ));
        }
        // With properties, the output holds only those: a valid instance whatever
        // `additionalProperties` allows besides.
        if props.len() > MAX_CHOICES {
            return Err(format!("an object with more than {MAX_CHOICES} properties"));
        }
        let mut out = Vec::new();
        for (name, schema) in props {
            let key = serde_json::to_vec(name).map_err(|e| e.to_string())?;
            if key.len() > MAX_TEXT {
                return Err(format!("property name longer than {MAX_TEXT} bytes"));
            }
            out.push(Prop {
                key,
                node: self.node(schema)?,
                required: required.contains(&name.as_str()),
            });
        }
        self.add(Node::Object(out))
    }

    fn literals(&mut self, values: &[Value]) -> Result<NodeId, String> {
        if values.is_empty() || values.len() > MAX_CHOICES {
            return Err(format!("'enum' must list 1 to {MAX_CHOICES} values"));
        }
        let texts: Vec<Vec<u8>> = values
            .iter()
            .map(|v| serde_json::to_vec(v).map_err(|e| e.to_string()))
            .collect::<Result<_, _>>()?;
        if texts.iter().any(|t| t.len() > MAX_TEXT) {
            return Err(format!("an 'enum' value longer than {MAX_TEXT} bytes"));
        }
        self.add(Node::Literals(texts))
    }

    fn any_of(&mut self, ids: Vec<NodeId>) -> Result<NodeId, String> {
        if ids.is_empty() {
            return Err("'anyOf' must list at least one schema".into());
        }
        if let [one] = ids[..] {
            return Ok(one);
        }
        // Objects all start with `{`: several are one branch if a first property tells them
        // apart.
        let (objects, mut ids): (Vec<NodeId>, Vec<NodeId>) = ids
            .into_iter()
            .partition(|&id| matches!(self.resolved(id), Some(Node::Object(_))));
        match objects[..] {
            [] => {}
            [one] => ids.push(one),
            _ => match self.tagged(&objects) {
                Some(tagged) => ids.push(self.add(tagged)?),
                None => ids.extend(objects),
            },
        }
        if let [one] = ids[..] {
            return Ok(one);
        }
        // That the branches start differently is checked once every `$ref` is resolved.
        self.add(Node::AnyOf(ids))
    }

    /// The id of the node `id` names once `$ref`s are followed; `None` for a reference
    /// still being compiled (recursion).
    fn resolve(&self, mut id: NodeId) -> Option<NodeId> {
        for _ in 0..=MAX_CHAIN {
            match self.nodes.get(id as usize)? {
                Node::Ref(to) => id = *to,
                _ => return Some(id),
            }
        }
        None
    }

    fn resolved(&self, id: NodeId) -> Option<&Node> {
        self.nodes.get(self.resolve(id)? as usize)
    }

    /// One node for the object nodes `ids` if each starts with the same required key whose
    /// values (`const`, `enum`) no two share.
    fn tagged(&self, ids: &[NodeId]) -> Option<Node> {
        let mut key: Option<&[u8]> = None;
        let mut values: Vec<(Vec<u8>, NodeId)> = Vec::new();
        for &id in ids {
            let object = self.resolve(id)?;
            let Some(Node::Object(props)) = self.nodes.get(object as usize) else {
                return None;
            };
            let first = props.first().filter(|p| p.required)?;
            if *key.get_or_insert(&first.key) != first.key.as_slice() {
                return None;
            }
            let Some(Node::Literals(texts)) = self.resolved(first.node) else {
                return None;
            };
            for t in texts {
                if values.iter().any(|(v, _)| v == t) {
                    return None;
                }
                values.push((t.clone(), object));
            }
        }
        let key = key?.to_vec();
        (values.len() <= MAX_CHOICES).then_some(Node::Tagged { key, values })
    }

    fn reference(&mut self, r: &Value) -> Result<NodeId, String> {
        let r = r.as_str().ok_or("'$ref' must be a string")?;
        if let Some(&id) = self.refs.get(r) {
            return Ok(id);
        }
        let target = if r == "#" {
            Some(self.root)
        } else {
            r.strip_prefix("#/$defs/")
                .map(|n| ("$defs", n))
                .or_else(|| r.strip_prefix("#/definitions/").map(|n| ("definitions", n)))
                .and_then(|(defs, name)| self.root.get(defs)?.get(name))
        };
        let target = target.ok_or_else(|| format!("'$ref' {r} names nothing in the schema"))?;
        // Taken before compiling the target, so that a reference inside it finds it.
        let id = self.add(Node::Ref(NodeId::MAX))?;
        self.refs.insert(r.to_string(), id);
        let to = self.node(target)?;
        self.nodes[id as usize] = Node::Ref(to);
        Ok(id)
    }
}

/// Where in a number the text is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Num {
    Minus,
    Zero,
    Int,
    Dot,
    Frac,
    Exp,
    ExpSign,
    ExpDigits,
}

impl Num {
    /// The state after `b`; `integer` takes no fraction, `bounded` no exponent.
    fn next(self, b: u8, integer: bool, bounded: bool) -> Option<Num> {
        let digit = b.is_ascii_digit();
        Some(match (self, b) {
            (Num::Minus, b'0') => Num::Zero,
            (Num::Minus, _) if digit => Num::Int,
            (Num::Int, _) if digit => Num::Int,
            _ if integer => return None,
            (Num::Zero | Num::Int, b'.') => Num::Dot,
            (Num::Dot | Num::Frac, _) if digit => Num::Frac,
            _ if bounded => return None,
            (Num::Zero | Num::Int | Num::Frac, b'e' | b'E') => Num::Exp,
            (Num::Exp, b'+' | b'-') => Num::ExpSign,
            (Num::Exp | Num::ExpSign | Num::ExpDigits, _) if digit => Num::ExpDigits,
            _ => return None,
        })
    }

    /// Whether the number is complete here (the next byte may end it).
    fn complete(self) -> bool {
        matches!(self, Num::Zero | Num::Int | Num::Frac | Num::ExpDigits)
    }
}

/// A bounded number's sign and digits, kept as the one integer `m` (see
/// [`BOUNDED_DIGITS`]), `frac` of its `count` digits after the point.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Digits {
    neg: bool,
    count: u8,
    frac: u8,
    m: u64,
}

impl Digits {
    /// The number begun by `b` (`-` or a digit).
    fn start(b: u8) -> Self {
        let digit = b.is_ascii_digit();
        Self {
            neg: b == b'-',
            count: u8::from(digit),
            frac: 0,
            m: if digit { u64::from(b - b'0') } else { 0 },
        }
    }

    /// Adds digit `b` (after the point if `fraction`); false if there is no room for it.
    fn push(&mut self, b: u8, fraction: bool) -> bool {
        if self.count == BOUNDED_DIGITS {
            return false;
        }
        self.count += 1;
        self.frac += u8::from(fraction);
        self.m = self.m * 10 + u64::from(b - b'0');
        true
    }

    /// The number's value, as a JSON parser reads its text: `m / 10^frac` rounds once.
    fn value(&self) -> f64 {
        let v = self.m as f64 / 10f64.powi(i32::from(self.frac));
        if self.neg {
            -v
        } else {
            v
        }
    }

    /// Whether a number at `num` (an integer if `integer`) with these digits can still end
    /// in `r`.
    fn can_end_in(&self, r: Range, num: Num, integer: bool) -> bool {
        let ten = |n: u8| 10f64.powi(i32::from(n));
        let room = BOUNDED_DIGITS - self.count;
        // Where the magnitude can end up: from `a` (included) to `b` (included or not),
        // mirrored for a negative number.
        let meets = |a: f64, b: f64, b_in: bool| {
            if self.neg {
                r.meets(-b, b_in, -a, true)
            } else {
                r.meets(a, true, b, b_in)
            }
        };
        let m = self.m as f64;
        match num {
            Num::Minus if integer => meets(0.0, ten(BOUNDED_DIGITS) - 1.0, true),
            Num::Minus => meets(0.0, ten(BOUNDED_DIGITS), false),
            Num::Zero => meets(0.0, if integer { 0.0 } else { 1.0 }, integer),
            // More digits scale it by 10^j; a number's fraction fills the gaps while there
            // is room for one.
            Num::Int => (0..=room).any(|j| {
                let (a, b) = (m * ten(j), (m + 1.0) * ten(j));
                if integer || j == room {
                    meets(a, b - 1.0, true)
                } else {
                    meets(a, b, false)
                }
            }),
            Num::Dot | Num::Frac if room == 0 => num == Num::Frac && r.holds(self.value()),
            Num::Dot | Num::Frac => {
                let f = ten(self.frac);
                meets(m / f, (m + 1.0) / f, false)
            }
            // Bounded numbers take no exponent.
            Num::Exp | Num::ExpSign | Num::ExpDigits => false,
        }
    }
}

/// What the next byte may be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Lex {
    /// Nothing yet: the root value (an object).
    Start,
    /// A value (after `:`, or after `,` in an array).
    Value,
    /// Just after `[`: a value or `]`.
    ValueOrClose,
    /// After `,` in an object: a key.
    Key,
    /// Just after `{`: a key or `}`.
    KeyOrClose,
    /// After a key.
    Colon,
    /// After a value: `,` or the closer of the innermost container.
    After,
    /// Inside a string of `node` (a key's if `key`), `chars` characters written; `escape` is
    /// 0 outside an escape, 1 after `\`, 2..=5 inside `\u` with `escape - 1` hex digits to
    /// go, and 6 after `\uD` (3 to go: a surrogate pair's first half may follow); `utf8`
    /// is what a character begun awaits (see [`utf8_lead`]), `pattern` the state of the
    /// node's pattern, if it has one.
    Str {
        key: bool,
        escape: u8,
        node: NodeId,
        chars: u32,
        utf8: u8,
        pattern: u32,
    },
    /// Inside a number of `node`; a bounded one also keeps its `digits`.
    Number {
        num: Num,
        integer: bool,
        node: NodeId,
        digits: Digits,
    },
    /// Inside literal `LITERALS[word]`, `at` bytes of it written.
    Literal { word: u8, at: u8 },
    /// `at` bytes into one of the texts of `node` whose bits are set in `choices`: the keys
    /// of an object node (`key`) or the values of an enum.
    Match {
        node: NodeId,
        choices: u64,
        at: u8,
        key: bool,
    },
    /// The root object is closed: nothing more.
    Done,
}

/// An open object or array: its node, and for an object node the index of the first
/// property that may still come, for an array the items begun.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Frame {
    node: NodeId,
    next: u16,
}

/// How far a text is into a value of a [`Grammar`], as the state after its bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JsonPrefix {
    lex: Lex,
    frames: [Frame; MAX_DEPTH],
    depth: u8,
    /// Whitespace bytes since the last other byte outside strings.
    whitespace: u8,
}

impl Default for JsonPrefix {
    fn default() -> Self {
        Self::new()
    }
}

/// The set of the first `n` (≤ 64) indices.
fn all_bits(n: usize) -> u64 {
    if n >= 64 {
        u64::MAX
    } else {
        (1 << n) - 1
    }
}

/// The indices of the set bits of `m`.
fn bits(m: u64) -> impl Iterator<Item = usize> {
    (0..64).filter(move |i| m & (1 << i) != 0)
}

impl JsonPrefix {
    /// The state before any byte.
    pub fn new() -> Self {
        Self {
            lex: Lex::Start,
            frames: [Frame::default(); MAX_DEPTH],
            depth: 0,
            whitespace: 0,
        }
    }

    /// Whether the root object is complete.
    pub fn is_done(&self) -> bool {
        self.lex == Lex::Done
    }

    /// Feeds `bytes`; false (and the state is then meaningless) if they leave the grammar.
    pub fn push_all(&mut self, g: &Grammar, bytes: &[u8]) -> bool {
        bytes.iter().all(|&b| self.push(g, b))
    }

    /// Whether the text followed by `bytes` can still match the grammar.
    pub fn accepts(&self, g: &Grammar, bytes: &[u8]) -> bool {
        let mut s = *self;
        s.push_all(g, bytes)
    }

    /// Whether the text is inside a string, outside an escape and a character, where every
    /// byte but `"`, `\` and control characters is text that leaves the state as it is but
    /// for its length and its pattern's state; and that pattern, if the string has one.
    fn in_string_text<'g>(&self, g: &'g Grammar) -> Option<Option<(&'g Pattern, u32)>> {
        match self.lex {
            Lex::Str {
                escape: 0,
                utf8: 0,
                node,
                pattern,
                ..
            } => Some(g.pattern(node).map(|p| (p, pattern))),
            _ => None,
        }
    }

    /// How many more characters the string being written may take, if it has a maximum.
    fn string_room(&self, g: &Grammar) -> Option<u32> {
        match self.lex {
            Lex::Str { node, chars, .. } => {
                let max = g.chars(node).max;
                (max != u32::MAX).then(|| max.saturating_sub(chars))
            }
            _ => None,
        }
    }

    /// Feeds one byte; false if it leaves the grammar.
    pub fn push(&mut self, g: &Grammar, b: u8) -> bool {
        match self.lex {
            Lex::Done => false,
            Lex::Str { .. } => self.string_byte(g, b),
            Lex::Number { .. } => self.number_byte(g, b),
            Lex::Literal { word, at } => {
                let lit = LITERALS[word as usize];
                if lit[at as usize] != b {
                    return false;
                }
                self.lex = if at as usize + 1 == lit.len() {
                    Lex::After
                } else {
                    Lex::Literal { word, at: at + 1 }
                };
                true
            }
            Lex::Match {
                node,
                choices,
                at,
                key,
            } => self.match_byte(g, node, choices, at, key, b),
            Lex::Start => self.value_start(g, g.root, b),
            lex => {
                if is_blank(b) {
                    self.whitespace += 1;
                    return self.whitespace <= MAX_WHITESPACE;
                }
                self.whitespace = 0;
                self.structural(g, lex, b)
            }
        }
    }

    fn top(&self) -> Option<Frame> {
        (self.depth > 0).then(|| self.frames[self.depth as usize - 1])
    }

    /// The keys an object may write next: from its next property up to the first required.
    fn key_choices(g: &Grammar, frame: Frame) -> u64 {
        if let Node::Tagged { .. } = g.nodes[frame.node as usize] {
            // Its first key; the frame moves to the chosen object after the value.
            return u64::from(frame.next == 0);
        }
        let mut m = 0;
        for (i, p) in g
            .props(frame.node)
            .iter()
            .enumerate()
            .skip(frame.next as usize)
        {
            m |= 1 << i;
            if p.required {
                break;
            }
        }
        m
    }

    /// A byte other than whitespace between tokens.
    fn structural(&mut self, g: &Grammar, lex: Lex, b: u8) -> bool {
        let Some(top) = self.top() else {
            return false;
        };
        let node = &g.nodes[top.node as usize];
        match (lex, b) {
            (Lex::ValueOrClose, b']') => self.close(g, true),
            (Lex::Value | Lex::ValueOrClose, _) => {
                let value = match node {
                    Node::Object(props) => props[top.next as usize - 1].node,
                    Node::Tagged { values, .. } => {
                        let all = all_bits(values.len());
                        return self.match_byte(g, top.node, all, 0, false, b);
                    }
                    Node::Map { value, .. } => *value,
                    Node::Array { item, items } => {
                        if u32::from(top.next) >= items.max {
                            return false;
                        }
                        self.frames[self.depth as usize - 1].next = top.next.saturating_add(1);
                        *item
                    }
                    _ => return false,
                };
                self.value_start(g, value, b)
            }
            (Lex::Key | Lex::KeyOrClose, b'"') => match node {
                Node::Map { entries, .. } => {
                    if u32::from(top.next) >= entries.max {
                        return false;
                    }
                    self.frames[self.depth as usize - 1].next = top.next.saturating_add(1);
                    self.lex = Lex::Str {
                        key: true,
                        escape: 0,
                        node: ANY,
                        chars: 0,
                        utf8: 0,
                        pattern: 0,
                    };
                    true
                }
                _ => self.match_byte(g, top.node, Self::key_choices(g, top), 0, true, b),
            },
            (Lex::KeyOrClose, b'}') => self.close(g, false),
            (Lex::Colon, b':') => {
                self.lex = Lex::Value;
                true
            }
            (Lex::After, b',') => {
                self.lex = match node {
                    Node::Array { items, .. } if u32::from(top.next) >= items.max => return false,
                    Node::Map { entries, .. } if u32::from(top.next) >= entries.max => {
                        return false
                    }
                    Node::Array { .. } => Lex::Value,
                    Node::Object(_) if Self::key_choices(g, top) == 0 => return false,
                    _ => Lex::Key,
                };
                true
            }
            (Lex::After, b']') => self.close(g, true),
            (Lex::After, b'}') => self.close(g, false),
            _ => false,
        }
    }

    fn value_start(&mut self, g: &Grammar, node: NodeId, b: u8) -> bool {
        let number = |integer| {
            let num = match b {
                b'-' => Num::Minus,
                b'0' => Num::Zero,
                b'1'..=b'9' => Num::Int,
                _ => return None,
            };
            Some(Lex::Number {
                num,
                integer,
                node,
                digits: Digits::start(b),
            })
        };
        let string = Lex::Str {
            key: false,
            escape: 0,
            node,
            chars: 0,
            utf8: 0,
            pattern: g.pattern(node).map_or(0, |p| p.start),
        };
        let literal = |word| Lex::Literal { word, at: 1 };
        let lex = match &g.nodes[node as usize] {
            Node::Any => match b {
                b'{' => return self.open(ANY_OBJECT, false),
                b'[' => return self.open(ANY_ARRAY, true),
                b'"' => Some(string),
                b't' => Some(literal(0)),
                b'f' => Some(literal(1)),
                b'n' => Some(literal(2)),
                _ => number(false),
            },
            Node::Object(_) | Node::Map { .. } | Node::Tagged { .. } => {
                return b == b'{' && self.open(node, false)
            }
            Node::Array { .. } => return b == b'[' && self.open(node, true),
            Node::String(..) => (b == b'"').then_some(string),
            Node::Number(_) => number(false),
            Node::Integer(_) => number(true),
            Node::Boolean => match b {
                b't' => Some(literal(0)),
                b'f' => Some(literal(1)),
                _ => None,
            },
            Node::Null => (b == b'n').then(|| literal(2)),
            Node::Literals(texts) => {
                return self.match_byte(g, node, all_bits(texts.len()), 0, false, b)
            }
            Node::AnyOf(alts) => {
                for &a in alts {
                    let mut s = *self;
                    if s.value_start(g, a, b) {
                        *self = s;
                        return true;
                    }
                }
                return false;
            }
            Node::Ref(target) => return self.value_start(g, *target, b),
        };
        match lex {
            Some(lex) => {
                self.lex = lex;
                self.number_can_end_in_range(g)
            }
            None => false,
        }
    }

    /// One byte in a number: the byte that ends it belongs to what follows it.
    fn number_byte(&mut self, g: &Grammar, b: u8) -> bool {
        let Lex::Number {
            num,
            integer,
            node,
            mut digits,
        } = self.lex
        else {
            return false;
        };
        let range = g.range(node);
        match num.next(b, integer, range.is_some()) {
            Some(next) => {
                if range.is_some() && b.is_ascii_digit() && !digits.push(b, next == Num::Frac) {
                    return false;
                }
                self.lex = Lex::Number {
                    num: next,
                    integer,
                    node,
                    digits,
                };
                self.number_can_end_in_range(g)
            }
            None if num.complete() => {
                if range.is_some_and(|r| !r.holds(digits.value())) {
                    return false;
                }
                self.lex = Lex::After;
                self.push(g, b)
            }
            None => false,
        }
    }

    /// Whether the number being written (if one, and bounded) can still end in its range.
    fn number_can_end_in_range(&self, g: &Grammar) -> bool {
        match self.lex {
            Lex::Number {
                num,
                integer,
                node,
                digits,
            } => g
                .range(node)
                .is_none_or(|r| digits.can_end_in(r, num, integer)),
            _ => true,
        }
    }

    /// One byte of a key or an enum value, `at` bytes into the texts in `choices`.
    fn match_byte(
        &mut self,
        g: &Grammar,
        node: NodeId,
        choices: u64,
        at: u8,
        key: bool,
        b: u8,
    ) -> bool {
        let text = |i| g.text(node, key, i);
        let on: u64 = bits(choices)
            .filter(|&i| text(i).get(at as usize) == Some(&b))
            .fold(0, |m, i| m | 1 << i);
        if on != 0 {
            let at = at + 1;
            // A key is a quoted string, so a whole key is no other key's beginning.
            if key {
                if let Some(i) = bits(on).find(|&i| text(i).len() == at as usize) {
                    self.frames[self.depth as usize - 1].next = i as u16 + 1;
                    self.lex = Lex::Colon;
                    return true;
                }
            }
            self.lex = Lex::Match {
                node,
                choices: on,
                at,
                key,
            };
            return true;
        }
        // A whole value (`1` of `[1, 10]`) ends at the first byte that continues none; all
        // in `choices` agree on their first `at` bytes, so at most one is whole.
        if key {
            return false;
        }
        let Some(i) = bits(choices).find(|&i| text(i).len() == at as usize) else {
            return false;
        };
        if let Node::Tagged { values, .. } = &g.nodes[node as usize] {
            // The tag is written: its object goes on after its first property.
            self.frames[self.depth as usize - 1] = Frame {
                node: values[i].1,
                next: 1,
            };
        }
        self.lex = Lex::After;
        self.push(g, b)
    }

    fn string_byte(&mut self, g: &Grammar, b: u8) -> bool {
        let Lex::Str {
            key,
            escape,
            node,
            mut chars,
            utf8,
            pattern,
        } = self.lex
        else {
            return false;
        };
        let count = g.chars(node);
        let p = g.pattern(node);
        let mut next_utf8 = 0;
        // The byte of the string's text that `b` writes, if it writes one (escapes decoded).
        let mut text = None;
        let escape = match (escape, b) {
            _ if utf8 != 0 => {
                let Some(u) = utf8_continue(utf8, b) else {
                    return false;
                };
                next_utf8 = u;
                text = Some(b);
                0
            }
            (0, b'"') => {
                if chars < count.min || p.is_some_and(|p| !p.matched(pattern)) {
                    return false;
                }
                self.lex = if key { Lex::Colon } else { Lex::After };
                return true;
            }
            // Control characters must be escaped; any other byte is text (UTF-8 included).
            (0, 0..=0x1f) => return false,
            // Any other byte starts a character (an escape is one): it must be valid UTF-8,
            // or the text is not JSON.
            (0, _) => {
                let Some(lead) = utf8_lead(b) else {
                    return false;
                };
                if chars >= count.max {
                    return false;
                }
                chars += 1;
                next_utf8 = lead;
                if b == b'\\' {
                    // Under a pattern, only if an escape can write what comes next.
                    if let Some(p) = p {
                        let mut escapes = (0..=u8::MAX).filter_map(unescape);
                        let room = count.max.saturating_sub(chars);
                        if !escapes.any(|t| p.step(pattern, t, room).is_some()) {
                            return false;
                        }
                    }
                    1
                } else {
                    text = Some(b);
                    0
                }
            }
            (1, _) if unescape(b).is_some() => {
                text = unescape(b);
                0
            }
            // A pattern reads the text a byte at a time: a character is written as itself
            // there, not as `\u` (control characters but the five short escapes are left
            // out).
            (1, b'u') if p.is_some() => return false,
            (1, b'u') => 5,
            (5, b'd' | b'D') => 6,
            // `\uD800` to `\uDBFF` is the first half of a pair, one character with its second.
            (6, b'8'..=b'9' | b'a'..=b'b' | b'A'..=b'B') => {
                chars -= 1;
                3
            }
            (6, _) if b.is_ascii_hexdigit() => 3,
            (2..=5, _) if b.is_ascii_hexdigit() => {
                if escape == 2 {
                    0
                } else {
                    escape - 1
                }
            }
            _ => return false,
        };
        let pattern = match (p, text) {
            (Some(p), Some(t)) => match p.step(pattern, t, count.max.saturating_sub(chars)) {
                Some(state) => state,
                None => return false,
            },
            _ => pattern,
        };
        self.lex = Lex::Str {
            key,
            escape,
            node,
            chars,
            utf8: next_utf8,
            pattern,
        };
        true
    }

    fn open(&mut self, node: NodeId, array: bool) -> bool {
        if self.depth as usize == MAX_DEPTH {
            return false;
        }
        self.frames[self.depth as usize] = Frame { node, next: 0 };
        self.depth += 1;
        self.lex = if array {
            Lex::ValueOrClose
        } else {
            Lex::KeyOrClose
        };
        true
    }

    fn close(&mut self, g: &Grammar, array: bool) -> bool {
        let Some(top) = self.top() else {
            return false;
        };
        let ok = match &g.nodes[top.node as usize] {
            Node::Array { items, .. } => array && u32::from(top.next) >= items.min,
            Node::Map { entries, .. } => !array && u32::from(top.next) >= entries.min,
            // An object closes once no required property is left.
            Node::Object(props) => !array && props[top.next as usize..].iter().all(|p| !p.required),
            _ => false,
        };
        if !ok {
            return false;
        }
        self.depth -= 1;
        self.lex = if self.depth == 0 {
            Lex::Done
        } else {
            Lex::After
        };
        true
    }
}

/// What a string awaits after the byte `b` starts a character: the number of UTF-8
/// continuation bytes (low two bits) and which range the first must be in (the bits above;
/// see [`utf8_continue`]), so that the text stays what `str::from_utf8` takes: no overlong
/// form, no surrogate, nothing past U+10FFFF. `None` if no character starts with `b`.
fn utf8_lead(b: u8) -> Option<u8> {
    Some(match b {
        0x00..=0x7f => 0,
        0xc2..=0xdf => 1,
        0xe0 => 2 | 1 << 2,
        0xed => 2 | 2 << 2,
        0xe1..=0xef => 2,
        0xf0 => 3 | 3 << 2,
        0xf4 => 3 | 4 << 2,
        0xf1..=0xf3 => 3,
        _ => return None,
    })
}

/// What a string awaits after continuation byte `b`, if `utf8` takes it.
fn utf8_continue(utf8: u8, b: u8) -> Option<u8> {
    let (lo, hi) = match utf8 >> 2 {
        1 => (0xa0, 0xbf),
        2 => (0x80, 0x9f),
        3 => (0x90, 0xbf),
        4 => (0x80, 0x8f),
        _ => (0x80, 0xbf),
    };
    (lo..=hi).contains(&b).then(|| (utf8 & 3) - 1)
}

/// The text byte that the short escape `\c` writes, if `c` makes one.
fn unescape(c: u8) -> Option<u8> {
    Some(match c {
        b'"' | b'\\' | b'/' => c,
        b'b' => 8,
        b'f' => 12,
        b'n' => b'\n',
        b'r' => b'\r',
        b't' => b'\t',
        _ => return None,
    })
}

/// JSON's whitespace.
fn is_blank(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

/// A vocabulary sorted for [`JsonPrefix`]: which tokens can follow a state, found without
/// trying every token on it. It depends on the vocabulary alone, not on a grammar.
pub struct TokenTable {
    /// Tokens in the vocabulary.
    tokens: usize,
    /// Tokens that start with a byte other than whitespace, by that byte (tokens without
    /// bytes, control tokens among them, are in no list).
    by_first: Vec<Vec<u32>>,
    /// Tokens that start with whitespace, by their first other byte: about half of a
    /// vocabulary (` the`), which a state that takes whitespace need not try one by one.
    after_blank: Vec<Vec<u32>>,
    /// Tokens of whitespace alone.
    blank: Vec<u32>,
    /// Tokens that are not plain string text: empty, holding `"`, `\` or a control
    /// character, or not whole UTF-8 characters (byte-level BPE splits some).
    not_plain: Vec<u32>,
    /// The other tokens by how many characters they start (bytes but UTF-8 continuation
    /// bytes): what they add to a string's length.
    plain_by_chars: Vec<Vec<u32>>,
    /// The same tokens as a trie of their bytes, walked under a pattern: built at its first use
    /// (a sort of the vocabulary: 30 ms for Qwen3's, natively).
    plain_trie: OnceCell<Trie>,
}

/// Whether a string's text may hold `b` without it changing the string's state (beyond
/// its length).
fn plain_byte(b: u8) -> bool {
    b >= 0x20 && b != b'"' && b != b'\\'
}

impl TokenTable {
    /// Sorts the tokens whose bytes `pieces` yields, in id order.
    pub fn new<'a>(pieces: impl IntoIterator<Item = &'a [u8]>) -> Self {
        let mut by_first = vec![Vec::new(); 256];
        let mut after_blank = vec![Vec::new(); 256];
        let mut blank = Vec::new();
        let mut not_plain = Vec::new();
        let mut plain_by_chars: Vec<Vec<u32>> = Vec::new();
        let mut tokens = 0;
        for (t, piece) in pieces.into_iter().enumerate() {
            let t = t as u32;
            match (piece.first(), piece.iter().find(|&&b| !is_blank(b))) {
                (None, _) => {}
                (Some(&first), _) if !is_blank(first) => by_first[first as usize].push(t),
                (_, Some(&solid)) => after_blank[solid as usize].push(t),
                (_, None) => blank.push(t),
            }
            let text = std::str::from_utf8(piece).ok();
            match text.filter(|t| !t.is_empty() && t.bytes().all(plain_byte)) {
                None => not_plain.push(t),
                Some(text) => {
                    let chars = text.chars().count();
                    if plain_by_chars.len() <= chars {
                        plain_by_chars.resize(chars + 1, Vec::new());
                    }
                    plain_by_chars[chars].push(t);
                }
            }
            tokens += 1;
        }
        Self {
            tokens,
            by_first,
            after_blank,
            blank,
            not_plain,
            plain_by_chars,
            plain_trie: OnceCell::new(),
        }
    }

    /// Sets the logit of every token that `state` does not accept to −∞, `piece` giving
    /// each token's bytes; logits past the vocabulary (padding) are set too. Returns whether
    /// any finite logit is left.
    pub fn mask<'p>(
        &self,
        g: &Grammar,
        state: &JsonPrefix,
        piece: impl Fn(u32) -> &'p [u8],
        logits: &mut [f32],
    ) -> bool {
        if let Some(pattern) = state.in_string_text(g) {
            // Inside a string nearly every token is text that changes nothing but the
            // string's length (and its pattern's state): only the others need trying.
            for &t in &self.not_plain {
                if let Some(l) = logits.get_mut(t as usize) {
                    let p = piece(t);
                    if p.is_empty() || !state.accepts(g, p) {
                        *l = f32::NEG_INFINITY;
                    }
                }
            }
            let mut refuse = |t: u32| {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = f32::NEG_INFINITY;
                }
            };
            let room = state.string_room(g);
            match pattern {
                // Under a pattern, those its DFA takes (text is the token's bytes here) with
                // a match still in reach of the length left.
                Some((p, at)) => {
                    let trie = self.plain_trie.get_or_init(|| {
                        let plain = self.plain_by_chars.iter().flatten();
                        Trie::new(plain.map(|&t| (piece(t), t)).collect())
                    });
                    trie.walk(p, at, room.unwrap_or(u32::MAX), refuse);
                }
                // Else, if the string has a length to keep to, those that would pass it go.
                None => {
                    if let Some(room) = room {
                        let too_long = self.plain_by_chars.iter().skip(room as usize + 1);
                        too_long.flatten().for_each(|&t| refuse(t));
                    }
                }
            }
            if let Some(padding) = logits.get_mut(self.tokens..) {
                padding.fill(f32::NEG_INFINITY);
            }
            return logits.iter().any(|&l| l > f32::NEG_INFINITY);
        }
        // Elsewhere few bytes can come next: only tokens that start with one are tried.
        let mut kept = Vec::new();
        let mut try_all = |tokens: &[u32]| {
            for &t in tokens {
                if let Some(&l) = logits.get(t as usize) {
                    if state.accepts(g, piece(t)) {
                        kept.push((t, l));
                    }
                }
            }
        };
        // Outside strings and matches every whitespace byte does the same, and the state
        // after it is the same whatever the run's length (but for its cap, which trying the
        // token checks), so one blank decides for all tokens that start blank. In a match (a
        // key, an enum value) a blank is text of a key or value that holds one, or the gap
        // after a whole value, and the four differ: there every token that starts blank is
        // tried, if any blank can come at all. (In a string only the space is text; the
        // others must be escaped.)
        let matching = matches!(state.lex, Lex::Match { .. });
        let mut after_blank = *state;
        let one_blank = !matching && after_blank.push(g, b' ');
        let every_blank = matching && b" \t\n\r".iter().any(|&w| state.accepts(g, &[w]));
        if one_blank || every_blank {
            try_all(&self.blank);
        }
        for b in 0..=255u8 {
            if state.accepts(g, &[b]) {
                try_all(&self.by_first[b as usize]);
            }
            if every_blank || (one_blank && after_blank.accepts(g, &[b])) {
                try_all(&self.after_blank[b as usize]);
            }
        }
        logits.fill(f32::NEG_INFINITY);
        let mut any = false;
        for (t, l) in kept {
            logits[t as usize] = l;
            any |= l > f32::NEG_INFINITY;
        }
        any
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn any() -> Grammar {
        Grammar::any_object()
    }

    fn fed(g: &Grammar, text: &[u8]) -> Option<JsonPrefix> {
        let mut s = JsonPrefix::new();
        s.push_all(g, text).then_some(s)
    }

    /// Whether `text` is accepted byte by byte and completes the root object.
    fn whole(g: &Grammar, text: &str) -> bool {
        fed(g, text.as_bytes()).is_some_and(|s| s.is_done())
    }

    const VALID: &[&str] = &[
        "{}",
        r#"{"a":1}"#,
        r#"{ "name" : "Tom", "age": 3, "tags": ["cat", "grey"], "x": null }"#,
        r#"{"n":[0,-0,12,-3.25,1e5,1E+5,2.5e-3,0.0]}"#,
        r#"{"t":true,"f":false,"o":{"p":{"q":[[],[{}],{"r":[1,2]}]}}}"#,
        r#"{"esc":"a\"b\\c\/d\b\f\n\r\t\u00e9\uD83D\uDE00"}"#,
        "{\"utf8\":\"caf\u{e9} \u{1f600}\"}",
        "{\n  \"a\": [\n    1,\n    2\n  ]\n}",
    ];

    #[test]
    fn valid_objects_are_accepted_byte_by_byte_and_end_done() {
        let g = any();
        for doc in VALID {
            // The checker agrees with a real parser on what it accepts.
            let parsed: Value = serde_json::from_str(doc).unwrap();
            assert!(parsed.is_object(), "{doc}");
            let mut s = JsonPrefix::new();
            for (i, &b) in doc.as_bytes().iter().enumerate() {
                assert!(!s.is_done(), "{doc}: done before byte {i}");
                assert!(s.push(&g, b), "{doc}: byte {i} ({:?}) refused", b as char);
            }
            assert!(s.is_done(), "{doc}");
            assert!(!s.accepts(&g, b" "), "nothing may follow the object");
        }
    }

    #[test]
    fn invalid_texts_are_refused_where_they_go_wrong() {
        // (text, how many bytes are accepted before the refused one)
        let cases: &[(&str, usize)] = &[
            ("[1]", 0),
            ("```json", 0),
            (r#"{"a" 1}"#, 5),
            (r#"{a:1}"#, 1),
            (r#"{"a":01}"#, 6),
            (r#"{"a":1.}"#, 7),
            (r#"{"a":1e}"#, 7),
            (r#"{"a":-}"#, 6),
            (r#"{"a":tru}"#, 8),
            (r#"{"a":nulL}"#, 8),
            (r#"{"a":[1,]}"#, 8),
            (r#"{"a":1,}"#, 7),
            (r#"{"a":[}"#, 6),
            (r#"{"a":{]"#, 6),
            (r#"{"a":"\x"}"#, 7),
            (r#"{"a":"\u12g"}"#, 10),
            ("{\"a\":\"line\nbreak\"}", 10),
            (r#"{"a":'x'}"#, 5),
            (r#"{"a":1}}"#, 7),
        ];
        let g = any();
        for &(text, ok) in cases {
            let bytes = text.as_bytes();
            let mut s = fed(&g, &bytes[..ok]).unwrap_or_else(|| panic!("{text}: prefix refused"));
            assert!(!s.push(&g, bytes[ok]), "{text}: byte {ok} accepted");
            assert!(
                !serde_json::from_str::<Value>(text).is_ok_and(|v| v.is_object()),
                "{text} is a JSON object"
            );
        }
    }

    #[test]
    fn strings_hold_whole_utf8_characters_only() {
        // Byte-level BPE vocabularies split characters across tokens: a string must not
        // close on half of one, nor hold bytes no UTF-8 text has.
        let g = any();
        let mut ok: Vec<Vec<u8>> = Vec::new();
        for c in [
            '\u{e9}',
            '\u{20ac}',
            '\u{1f600}',
            '\u{7ff}',
            '\u{800}',
            '\u{ffff}',
            '\u{10ffff}',
        ] {
            ok.push(format!("{{\"a\":\"x{c}\"}}").into_bytes());
        }
        for doc in &ok {
            assert!(fed(&g, doc).is_some_and(|s| s.is_done()), "{doc:x?}");
            // Cut before its last byte, the character cannot be closed.
            let cut = &doc[..doc.len() - 3];
            assert!(!fed(&g, cut).unwrap().accepts(&g, b"\"}"), "{cut:x?}");
        }
        for bad in [
            &b"\x80"[..],
            b"\xc3",
            b"\xc3\x28",
            b"\xc0\x80",
            b"\xc1\xbf",
            b"\xe0\x80\x80",
            b"\xed\xa0\x80",
            b"\xf0\x80\x80\x80",
            b"\xf4\x90\x80\x80",
            b"\xf5\x80\x80\x80",
            b"\xff",
        ] {
            let doc = [&b"{\"a\":\"x"[..], bad, b"\"}"].concat();
            assert!(std::str::from_utf8(&doc).is_err());
            assert!(fed(&g, &doc).is_none(), "{doc:x?}");
            // In a map's key too.
            let key = [&b"{\""[..], bad, b"\":1}"].concat();
            assert!(fed(&g, &key).is_none(), "{key:x?}");
        }
    }

    #[test]
    fn the_object_opens_at_the_first_byte() {
        // JSON allows whitespace before it, but a model given room for it can spend its
        // tokens there (and a leading newline is what a fenced block starts with).
        let (g, s) = (any(), JsonPrefix::new());
        assert!(!s.accepts(&g, b" {}"));
        assert!(!s.accepts(&g, b"\n{}"));
        assert!(s.accepts(&g, b"{}"));
    }

    #[test]
    fn accepts_leaves_the_state_alone() {
        let g = any();
        let s = fed(&g, br#"{"a":"#).unwrap();
        assert!(s.accepts(&g, b" \"x\"}"));
        assert!(!s.accepts(&g, b"}"));
        assert_eq!(s, fed(&g, br#"{"a":"#).unwrap());
    }

    #[test]
    fn a_number_ends_at_the_byte_after_it() {
        // "1}" in one token: the brace ends the number and closes the object.
        let g = any();
        let s = fed(&g, br#"{"a":"#).unwrap();
        assert!(s.accepts(&g, b"1}"));
        assert!(s.accepts(&g, b"10.5e3, \"b\": 2}"));
        assert!(whole(&g, r#"{"a":12}"#));
    }

    #[test]
    fn whitespace_runs_are_capped() {
        let g = any();
        let s = fed(&g, b"{").unwrap();
        let run = vec![b'\n'; MAX_WHITESPACE as usize];
        assert!(s.accepts(&g, &run));
        let mut longer = run.clone();
        longer.push(b' ');
        assert!(!s.accepts(&g, &longer));
        // Any other byte starts a new run; whitespace inside strings does not count.
        let mut broken = run.clone();
        broken.extend_from_slice(b"\"k\":");
        broken.extend_from_slice(&run);
        assert!(s.accepts(&g, &broken));
        assert!(fed(&g, b"{\"a\":\"").unwrap().accepts(&g, &[b' '; 100]));
    }

    #[test]
    fn nesting_is_capped() {
        let g = any();
        let mut text = String::from("{\"a\":");
        text.push_str(&"[".repeat(MAX_DEPTH - 1));
        let s = fed(&g, text.as_bytes()).unwrap();
        assert!(!s.accepts(&g, b"["));
        assert!(!s.accepts(&g, b"{"));
        assert!(s.accepts(&g, b"1"));
        let mut closed = "]".repeat(MAX_DEPTH - 1);
        closed.push('}');
        let mut end = s;
        assert!(end.push_all(&g, closed.as_bytes()) && end.is_done());
    }

    #[test]
    fn every_prefix_of_a_valid_object_is_accepted() {
        // Splitting a document anywhere (as tokens do) never refuses a piece.
        let g = any();
        for doc in VALID {
            let bytes = doc.as_bytes();
            for cut in 0..=bytes.len() {
                let s = fed(&g, &bytes[..cut]).unwrap_or_else(|| panic!("{doc} cut at {cut}"));
                assert!(s.accepts(&g, &bytes[cut..]), "{doc} cut at {cut}");
            }
        }
    }

    /// What pydantic writes for a model with a nested model, an optional field, an enum
    /// and a list, as OpenAI's SDK sends it (`client.beta.chat.completions.parse`).
    const PET: &str = r##"{
        "$defs": {
            "Color": {"enum": ["black", "white", "ginger"], "title": "Color", "type": "string"},
            "Owner": {"properties": {"name": {"title": "Name", "type": "string"}},
                      "required": ["name"], "title": "Owner", "type": "object",
                      "additionalProperties": false}
        },
        "properties": {
            "name": {"title": "Name", "type": "string"},
            "age": {"title": "Age", "type": "integer"},
            "color": {"$ref": "#/$defs/Color"},
            "weight": {"anyOf": [{"type": "number"}, {"type": "null"}], "default": null},
            "owner": {"$ref": "#/$defs/Owner"},
            "tags": {"items": {"type": "string"}, "type": "array"},
            "indoor": {"type": "boolean"}
        },
        "required": ["name", "age", "color", "owner"],
        "title": "Pet", "type": "object", "additionalProperties": false
    }"##;

    #[test]
    fn a_schema_takes_its_instances_in_property_order() {
        let g = Grammar::from_schema(PET).unwrap();
        for doc in [
            r#"{"name":"Tom","age":3,"color":"black","owner":{"name":"Ann"}}"#,
            r#"{"name": "Tom", "age": -12, "color": "ginger", "weight": 4.5e0,
                "owner": {"name": ""}, "tags": ["a", "b"], "indoor": true}"#,
            r#"{"name":"Tom","age":0,"color":"white","weight":null,"owner":{"name":"x"},"tags":[]}"#,
        ] {
            assert!(whole(&g, doc), "{doc}");
            // Each of them is valid JSON, and an object.
            assert!(serde_json::from_str::<Value>(doc).unwrap().is_object());
        }
        for doc in [
            // A required property missing, out of order, unknown, or of the wrong type.
            r#"{"name":"Tom","age":3,"color":"black"}"#,
            r#"{"age":3,"name":"Tom","color":"black","owner":{"name":"Ann"}}"#,
            r#"{"name":"Tom","age":3,"colour":"black","owner":{"name":"Ann"}}"#,
            r#"{"name":"Tom","age":3.5,"color":"black","owner":{"name":"Ann"}}"#,
            r#"{"name":"Tom","age":"3","color":"black","owner":{"name":"Ann"}}"#,
            r#"{"name":"Tom","age":3,"color":"blue","owner":{"name":"Ann"}}"#,
            r#"{"name":"Tom","age":3,"color":"black","weight":"4","owner":{"name":"Ann"}}"#,
            r#"{"name":"Tom","age":3,"color":"black","owner":{"name":"Ann","x":1}}"#,
            r#"{"name":"Tom","age":3,"color":"black","owner":{"name":"Ann"},"tags":[1]}"#,
            r#"{"name":"Tom","age":3,"color":"black","owner":{"name":"Ann"},}"#,
        ] {
            assert!(!whole(&g, doc), "{doc}");
        }
    }

    #[test]
    fn enum_values_that_begin_alike_end_at_the_next_byte() {
        let g = Grammar::from_schema(
            r#"{"type":"object","properties":{"n":{"enum":[1,10,"1",true,null]}},"required":["n"]}"#,
        )
        .unwrap();
        for v in ["1", "10", "\"1\"", "true", "null"] {
            assert!(whole(&g, &format!("{{\"n\":{v}}}")), "{v}");
            assert!(whole(&g, &format!("{{\"n\": {v} }}")), "{v}");
        }
        for v in ["100", "2", "\"10\"", "false", "1.0"] {
            assert!(!whole(&g, &format!("{{\"n\":{v}}}")), "{v}");
        }
    }

    #[test]
    fn a_recursive_schema_nests() {
        let g = Grammar::from_schema(
            r##"{"type":"object","properties":{"v":{"type":"integer"},
                "kids":{"type":"array","items":{"$ref":"#"}}},"required":["v"]}"##,
        )
        .unwrap();
        assert!(whole(
            &g,
            r#"{"v":1,"kids":[{"v":2},{"v":3,"kids":[{"v":4}]}]}"#
        ));
        assert!(!whole(&g, r#"{"v":1,"kids":[{"kids":[]}]}"#));
    }

    #[test]
    fn a_linked_list_through_an_optional_ref_compiles() {
        // pydantic's `next: Optional["Node"]`: the anyOf is met while its $ref is open.
        let g = Grammar::from_schema(
            r##"{"$defs":{"Node":{"type":"object","properties":{"v":{"type":"integer"},
                "next":{"anyOf":[{"$ref":"#/$defs/Node"},{"type":"null"}]}},
                "required":["v","next"]}},"$ref":"#/$defs/Node"}"##,
        )
        .unwrap();
        assert!(whole(&g, r#"{"v":1,"next":{"v":2,"next":null}}"#));
        assert!(!whole(&g, r#"{"v":1,"next":{"v":2}}"#));
    }

    /// pydantic's `pet: Union[Cat, Dog, Lizard] = Field(discriminator="pet_type")`, and an
    /// `Optional` one, whose `null` sits beside the objects.
    const PETS: &str = r##"{
        "$defs": {
            "Cat": {"properties": {"pet_type": {"const": "cat", "title": "Pet Type", "type": "string"},
                    "meows": {"type": "integer"}}, "required": ["pet_type", "meows"], "type": "object"},
            "Dog": {"properties": {"pet_type": {"const": "dog", "type": "string"},
                    "barks": {"type": "number"}}, "required": ["pet_type", "barks"], "type": "object"},
            "Lizard": {"properties": {"pet_type": {"enum": ["reptile", "lizard"], "type": "string"},
                    "scales": {"type": "boolean"}}, "required": ["pet_type"], "type": "object"}
        },
        "properties": {
            "pet": {"discriminator": {"propertyName": "pet_type", "mapping": {"cat": "#/$defs/Cat",
                    "dog": "#/$defs/Dog", "lizard": "#/$defs/Lizard", "reptile": "#/$defs/Lizard"}},
                    "oneOf": [{"$ref": "#/$defs/Cat"}, {"$ref": "#/$defs/Dog"}, {"$ref": "#/$defs/Lizard"}]},
            "spare": {"anyOf": [{"$ref": "#/$defs/Dog"}, {"type": "null"}, {"$ref": "#/$defs/Cat"}]}
        },
        "required": ["pet"], "type": "object"
    }"##;

    #[test]
    fn objects_told_apart_by_their_first_property_are_one_branch() {
        let g = Grammar::from_schema(PETS).unwrap();
        for doc in [
            r#"{"pet":{"pet_type":"cat","meows":3}}"#,
            r#"{"pet": {"pet_type": "dog", "barks": 2.5}, "spare": null}"#,
            r#"{"pet":{"pet_type":"reptile"},"spare":{"pet_type":"cat","meows":0}}"#,
            r#"{"pet":{ "pet_type" : "lizard" , "scales" : true }}"#,
        ] {
            assert!(whole(&g, doc), "{doc}");
        }
        for doc in [
            // Another shape's property, the tag not first, an unknown or a cut tag, a
            // required property missing, nothing at all.
            r#"{"pet":{"pet_type":"cat","barks":3}}"#,
            r#"{"pet":{"meows":3,"pet_type":"cat"}}"#,
            r#"{"pet":{"pet_type":"cow","meows":3}}"#,
            r#"{"pet":{"pet_type":"ca","meows":3}}"#,
            r#"{"pet":{"pet_type":"dog"}}"#,
            r#"{"pet":{}}"#,
            r#"{"pet":{"pet_type":"lizard","meows":1}}"#,
        ] {
            assert!(!whole(&g, doc), "{doc}");
        }
        // Tags that two shapes share cannot tell them apart.
        let err = Grammar::from_schema(
            r#"{"type":"object","properties":{"a":{"anyOf":[
                {"type":"object","properties":{"k":{"const":1},"x":{"type":"string"}},"required":["k"]},
                {"type":"object","properties":{"k":{"enum":[2,1]}},"required":["k"]}]}}}"#,
        )
        .unwrap_err();
        assert!(err.contains("same character"), "{err}");
    }

    fn tools() -> Vec<(&'static str, Option<Value>)> {
        vec![
            (
                "get_weather",
                Some(
                    serde_json::json!({"type": "object", "properties": {"city": {"type": "string"},
                    "unit": {"enum": ["c", "f"]}}, "required": ["city"]}),
                ),
            ),
            ("add_pet", Some(serde_json::from_str(PETS).unwrap())),
            ("now", None),
        ]
    }

    fn tool_grammar(tools: &[(&str, Option<Value>)]) -> Result<Grammar, String> {
        let refs: Vec<(&str, Option<&Value>)> =
            tools.iter().map(|(n, p)| (*n, p.as_ref())).collect();
        Grammar::tool_call(&refs, false)
    }

    #[test]
    fn a_tool_call_names_a_tool_and_follows_its_parameters() {
        let all = tool_grammar(&tools()).unwrap();
        let named = tool_grammar(&tools()[..1]).unwrap();
        let weather = r#"{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}"#;
        for g in [&all, &named] {
            assert!(whole(g, weather));
            assert!(!whole(
                g,
                r#"{"name": "get_weather", "arguments": {"unit": "c"}}"#
            ));
            assert!(!whole(g, r#"{"name": "get_weather"}"#));
            assert!(!whole(g, r#"{"arguments": {"city": "Paris"}}"#));
        }
        // Its `$ref`s are its own parameters' (`#` is the parameters, not the call).
        let pet = r#"{"name":"add_pet","arguments":{"pet":{"pet_type":"dog","barks":1}}}"#;
        assert!(whole(&all, pet));
        assert!(whole(&all, r#"{"name":"now","arguments":{}}"#));
        assert!(!whole(&all, r#"{"name":"now","arguments":{"x":1}}"#));
        assert!(!whole(
            &all,
            r#"{"name":"add_pet","arguments":{"city":"Paris"}}"#
        ));
        for doc in [
            pet,
            r#"{"name":"now","arguments":{}}"#,
            r#"{"name":"get_wether","arguments":{}}"#,
        ] {
            assert!(!whole(&named, doc), "{doc}");
        }
        check_table(&all, &[weather.as_bytes(), pet.as_bytes()]);

        let mut twice = tools();
        twice[2].0 = "add_pet";
        let err = tool_grammar(&twice).unwrap_err();
        assert!(err.contains("distinct"), "{err}");
        let err = tool_grammar(&[("f", Some(serde_json::json!({"type": "string"})))]).unwrap_err();
        assert!(err.contains("'f'") && err.contains("object"), "{err}");
        let err = tool_grammar(&[(
            "f",
            Some(serde_json::json!({"type": "object",
            "properties": {"a": {"type": "integer", "multipleOf": 2}}})),
        )])
        .unwrap_err();
        assert!(err.contains("'f'") && err.contains("multipleOf"), "{err}");
        assert!(tool_grammar(&[]).is_err());
        // Parameters of `{}` take any object.
        let open = tool_grammar(&[("f", Some(serde_json::json!({})))]).unwrap();
        assert!(whole(&open, r#"{"name":"f","arguments":{"x":[1]}}"#));
        assert!(!whole(&open, r#"{"name":"f","arguments":[1]}"#));
    }

    #[test]
    fn parallel_calls_are_an_array_of_one_to_sixteen() {
        let tools = tools();
        let refs: Vec<(&str, Option<&Value>)> =
            tools.iter().map(|(n, p)| (*n, p.as_ref())).collect();
        let g = Grammar::tool_call(&refs, true).unwrap();
        let weather = r#"{"name": "get_weather", "arguments": {"city": "Paris"}}"#;
        let now = r#"{"name":"now","arguments":{}}"#;
        assert!(whole(&g, &format!("[{weather}]")));
        assert!(whole(&g, &format!("[{weather}, {now}]")));
        assert!(!whole(&g, "[]"));
        assert!(!whole(&g, weather));
        assert!(!whole(&g, r#"[{"name":"now","arguments":{}}, 1]"#));
        let calls = |n: usize| format!("[{}]", vec![now; n].join(","));
        assert!(whole(&g, &calls(MAX_CALLS as usize)));
        assert!(!whole(&g, &calls(MAX_CALLS as usize + 1)));
        check_table(&g, &[format!("[{weather},{now}]").as_bytes()]);
    }

    /// A schema whose property `a` refers to `D0` of `$defs` `D0`..`D{n-1}` (`def(i)` the
    /// body of `Di`, which may refer to `D{i+1}`) and `Dn`, an object.
    fn chain_schema(n: usize, def: impl Fn(usize) -> String) -> String {
        let defs: Vec<String> = (0..n)
            .map(|i| format!(r#""D{i}":{}"#, def(i)))
            .chain(std::iter::once(format!(r#""D{n}":{{"type":"object"}}"#)))
            .collect();
        format!(
            r##"{{"$defs":{{{}}},"type":"object","properties":{{"a":{{"$ref":"#/$defs/D0"}}}}}}"##,
            defs.join(",")
        )
    }

    #[test]
    fn a_schema_of_shared_branches_compiles_in_linear_time() {
        // D0 = anyOf[D1, D1], D1 = anyOf[D2, D2], ...: 2^60 paths if walked without memory;
        // refused (the branches overlap) at once.
        let schema = chain_schema(60, |i| {
            let next = format!(r##"{{"$ref":"#/$defs/D{}"}}"##, i + 1);
            format!(r#"{{"anyOf":[{next},{next}]}}"#)
        });
        let err = Grammar::from_schema(&schema).unwrap_err();
        assert!(err.contains("same character"), "{err}");
    }

    #[test]
    fn a_long_ref_chain_is_refused_not_a_stack_overflow() {
        let schema = chain_schema(3000, |i| format!(r##"{{"$ref":"#/$defs/D{}"}}"##, i + 1));
        let err = Grammar::from_schema(&schema).unwrap_err();
        assert!(err.contains("deep"), "{err}");
    }

    #[test]
    fn open_objects_and_maps() {
        let g = Grammar::from_schema(
            r#"{"type":"object","properties":{"any":{},"map":{"type":"object",
                "additionalProperties":{"type":"integer"}},"none":{"type":"object",
                "additionalProperties":false}},"required":["any","map","none"]}"#,
        )
        .unwrap();
        assert!(whole(
            &g,
            r#"{"any":[{"x":null}],"map":{"a":1,"b":2},"none":{}}"#
        ));
        assert!(!whole(&g, r#"{"any":1,"map":{"a":"1"},"none":{}}"#));
        assert!(!whole(&g, r#"{"any":1,"map":{},"none":{"a":1}}"#));
    }

    #[test]
    fn schemas_it_cannot_follow_are_refused_by_name() {
        for (schema, words) in [
            (r#"{"type":"string"}"#, "root must be an object"),
            (
                r#"{"type":"object","properties":{"a":{"type":"string","pattern":"(?=x)"}}}"#,
                "pattern \"(?=x)\" is not supported: look-around",
            ),
            (
                r#"{"type":"object","properties":{"a":{"type":"string","pattern":"x","format":"date"}}}"#,
                "beside",
            ),
            (
                r#"{"type":"object","properties":{"a":{"type":"string","pattern":5}}}"#,
                "must be a string",
            ),
            (
                r#"{"type":"object","properties":{"a":{"type":"string","pattern":"^\\p{L}{1000}x$"}}}"#,
                "not supported",
            ),
            (
                r#"{"type":"object","properties":{"a":{"type":"string","pattern":"(a{1000}){1000}"}}}"#,
                "not supported",
            ),
            (
                r#"{"type":"object","properties":{"a":{"type":"integer"}},"minProperties":1}"#,
                "from its 0 required",
            ),
            (
                r#"{"type":"object","additionalProperties":false,"minProperties":1}"#,
                "nothing matches",
            ),
            (
                r#"{"type":"object","properties":{"a":{"maxProperties":1}}}"#,
                "needs \"type\": \"object\"",
            ),
            (
                r#"{"type":"object","properties":{"a":{"type":"integer","multipleOf":2}}}"#,
                "multipleOf",
            ),
            (
                r#"{"type":"object","properties":{"a":{"type":"string","minLength":-1}}}"#,
                "whole number",
            ),
            (
                r#"{"type":"object","properties":{"a":{"type":"array","minItems":3,"maxItems":2}}}"#,
                "nothing matches",
            ),
            (
                r#"{"type":"object","properties":{"a":{"type":"number","minimum":2,"exclusiveMaximum":2}}}"#,
                "no number",
            ),
            (
                r#"{"type":"object","properties":{"a":{"type":"integer","exclusiveMinimum":1,"maximum":1.5}}}"#,
                "no number",
            ),
            (
                r#"{"type":"object","properties":{"a":{"type":"number","minimum":"1"}}}"#,
                "must be a number",
            ),
            (
                r#"{"type":"object","properties":{"a":{"type":"integer","minimum":1e16}}}"#,
                "1e15",
            ),
            (
                r#"{"type":"object","properties":{"a":{"maxLength":3}}}"#,
                "needs \"type\": \"string\"",
            ),
            (
                r#"{"type":"object","properties":{"a":{"type":"string"}},"required":["b"]}"#,
                "'b'",
            ),
            (
                r#"{"type":"object","properties":{"a":{"anyOf":[{"type":"object"},{"type":"object","properties":{}}]}}}"#,
                "same character",
            ),
            (
                r#"{"type":"object","properties":{"a":{"type":["integer","string"]}}}"#,
                "",
            ),
            (
                r##"{"type":"object","properties":{"a":{"$ref":"#/$defs/B"}}}"##,
                "names nothing",
            ),
            (
                r##"{"$defs":{"A":{"$ref":"#/$defs/A"}},"type":"object","properties":{"a":{"$ref":"#/$defs/A"}}}"##,
                "refers to itself",
            ),
            (
                r#"{"type":"object","properties":{"a":{"type":"date"}}}"#,
                "date",
            ),
            (
                r#"{"type":"object","properties":{"a":{"type":"string","pattern":"^x\\x01$"}}}"#,
                "no text a JSON string can hold",
            ),
            (
                r#"{"type":"object","properties":{"a":{"type":"string","pattern":"^\\w{2,4}$","minLength":5}}}"#,
                "leave no length",
            ),
            (
                r#"{"type":"object","properties":{"a":{"type":"string","format":"date","maxLength":9}}}"#,
                "needs 10 characters, more than 'maxLength' 9",
            ),
            ("not json", "not JSON"),
            (
                r#"{"type":"object","properties":{"a":{"enum":[]}}}"#,
                "enum",
            ),
        ] {
            match Grammar::from_schema(schema) {
                // A list of types that start differently is fine.
                Ok(_) if words.is_empty() => {}
                Ok(_) => panic!("{schema} compiled"),
                Err(e) => assert!(e.contains(words), "{schema}: {e}"),
            }
        }
    }

    /// pydantic's `Field(min_length=2, max_length=4)`, `conlist(str, min_length=1,
    /// max_length=2)`, `Field(ge=1, le=5)` on an int, `Field(ge=0, le=1)` on a float,
    /// `Field(gt=0)`, and an integer from 10 to 20 below zero.
    const BOUNDED: &str = r#"{"type": "object", "properties": {
        "s": {"type": "string", "minLength": 2, "maxLength": 4},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 2},
        "stars": {"type": "integer", "minimum": 1, "maximum": 5},
        "score": {"type": "number", "minimum": 0, "maximum": 1},
        "pos": {"type": "number", "exclusiveMinimum": 0},
        "neg": {"type": "integer", "minimum": -20, "maximum": -10},
        "old": {"type": "number", "maximum": 1, "exclusiveMaximum": true},
        "map": {"type": "object", "additionalProperties": {"type": "integer"},
                "minProperties": 1, "maxProperties": 2},
        "few": {"type": "object", "maxProperties": 1}
    }}"#;

    #[test]
    fn lengths_counts_and_ranges_are_kept() {
        let g = Grammar::from_schema(BOUNDED).unwrap();
        let ok = |doc: &str| whole(&g, &format!("{{{doc}}}"));
        for doc in [
            r#""s":"ab""#,
            r#""s":"abcd""#,
            "\"s\":\"caf\u{e9}\"",
            r#""s":"\u00e9\n""#,
            r#""s":"\uD83D\uDE00x""#,
            "\"s\":\"\u{1f600}\u{1f600}\u{1f600}\u{1f600}\"",
            r#""tags":["a"]"#,
            r#""tags":[ "a" , "b" ]"#,
            r#""stars":1"#,
            r#""stars":5"#,
            r#""score":0"#,
            r#""score":1"#,
            r#""score":0.25"#,
            r#""score":1.000"#,
            r#""score":-0"#,
            r#""pos":0.001"#,
            r#""pos":7"#,
            r#""neg":-10"#,
            r#""neg":-20"#,
            r#""neg":-15"#,
            r#""old":0.5"#,
            r#""old":-3"#,
            r#""map":{"a":1}"#,
            r#""map":{ "a":1 , "b":2 }"#,
            r#""few":{}"#,
            r#""few":{"x":[1,{"y":2}]}"#,
        ] {
            assert!(ok(doc), "{doc}");
        }
        for doc in [
            r#""s":"a""#,
            r#""s":"""#,
            r#""s":"abcde""#,
            "\"s\":\"caf\u{e9}s\"",
            r#""s":"\uD83D\uDE00""#,
            r#""s":"\n\t\"\\x""#,
            r#""tags":[]"#,
            r#""tags":["a","b","c"]"#,
            r#""stars":0"#,
            r#""stars":6"#,
            r#""stars":10"#,
            r#""stars":-1"#,
            r#""stars":1.0"#,
            r#""score":1.01"#,
            r#""score":-0.1"#,
            r#""score":2"#,
            r#""score":1e0"#,
            r#""pos":0"#,
            r#""pos":0.000"#,
            r#""pos":-1"#,
            r#""neg":-9"#,
            r#""neg":-21"#,
            r#""neg":0"#,
            r#""neg":-100"#,
            r#""old":1"#,
            r#""old":1.0"#,
            r#""map":{}"#,
            r#""map":{"a":1,"b":2,"c":3}"#,
            r#""map":{"a":"1"}"#,
            r#""few":{"x":1,"y":2}"#,
        ] {
            assert!(!ok(doc), "{doc}");
        }
        // Refused where no completion is left: 10 to 20 below zero may start `-1` or
        // `-2`, not `-3`, and `-2` must end at once or be `-20`.
        let at = |text: &str| fed(&g, text.as_bytes()).is_some();
        assert!(at(r#"{"neg":-1"#) && at(r#"{"neg":-2"#) && !at(r#"{"neg":-3"#));
        assert!(at(r#"{"neg":-20"#) && !at(r#"{"neg":-21"#) && !at(r#"{"neg":-2}"#));
        assert!(!at(r#"{"stars":0"#) && !at(r#"{"score":1.1"#) && at(r#"{"score":0.9"#));
    }

    /// Patterns and the formats the compiler follows, as pydantic writes them:
    /// `constr(pattern=...)`, `datetime`, `date`, `UUID`, `IPv4Address`; and a pattern
    /// searched anywhere in the string, one that needs an escaped newline, and one with a
    /// length.
    const PATTERNED: &str = r#"{"type": "object", "properties": {
        "code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]+$"},
        "when": {"type": "string", "format": "date-time"},
        "day": {"type": "string", "format": "date"},
        "id": {"type": "string", "format": "uuid"},
        "ip": {"type": "string", "format": "ipv4"},
        "free": {"type": "string", "pattern": "cat"},
        "lines": {"type": "string", "pattern": "^a\nb$"},
        "short": {"type": "string", "pattern": "^[a-z]+$", "maxLength": 3},
        "mail": {"type": "string", "format": "email"},
        "trap": {"type": "string", "pattern": "^(ab\\x01|cd)$"},
        "tight": {"type": "string", "pattern": "cat", "maxLength": 4},
        "tab": {"type": "string", "pattern": "^a\\tb$", "maxLength": 3},
        "user": {"type": "string", "pattern": "^\\w{3,20}$"},
        "name": {"type": "string", "pattern": "^([\\p{L} ]{1,40})$", "maxLength": 10}
    }}"#;

    #[test]
    fn a_pattern_too_big_in_unicode_is_followed_in_ascii() {
        // The counted `\w`s inside a larger pattern: no whole-string length to take out,
        // and a Unicode DFA far over the limit.
        let schema = r#"{"type":"object","properties":{"w":{"type":"string",
            "pattern":"^\\w{1,40}( \\w{1,40})*$"}},"required":["w"]}"#;
        let g = Grammar::from_schema(schema).unwrap();
        let ok = |w: &str| whole(&g, &format!("{{\"w\":\"{w}\"}}"));
        assert!(ok("snake_case and more") && ok(&"x".repeat(40)));
        assert!(!ok("") && !ok("a  b") && !ok(&"x".repeat(41)));
        // Narrower than the pattern: a Unicode letter it would take is not written.
        assert!(!ok("caf\u{e9}"));
    }

    #[test]
    fn patterns_and_formats_are_kept() {
        let g = Grammar::from_schema(PATTERNED).unwrap();
        let ok = |doc: &str| whole(&g, &format!("{{{doc}}}"));
        for doc in [
            r#""code":"ABC-12""#,
            r#""when":"2024-05-01T12:30:00Z""#,
            r#""when":"2024-05-01T23:59:59.125+02:00""#,
            r#""day":"2024-02-29""#,
            r#""day":"2000-02-29""#,
            r#""day":"2023-04-30""#,
            r#""day":"2023-12-31""#,
            r#""day":"0001-01-01""#,
            r#""day":"0400-02-29""#,
            r#""id":"123e4567-e89b-12d3-a456-426614174000""#,
            r#""ip":"192.168.0.1""#,
            r#""free":"my cat!""#,
            r#""free":"cat""#,
            "\"free\":\"caf\u{e9} cat \u{1f600}\"",
            r#""lines":"a\nb""#,
            r#""short":"abc""#,
            // Formats it does not follow stay annotations.
            r#""mail":"not an address""#,
            r#""trap":"cd""#,
            r#""tight":"xcat""#,
            r#""tight":"cat!""#,
            r#""tab":"a\tb""#,
            r#""user":"abc""#,
            r#""user":"a_very_long_name_890""#,
            "\"user\":\"\u{e9}t\u{e9}\"",
            r#""name":"Ada""#,
            r#""name":"Ada Byron""#,
        ] {
            assert!(ok(doc), "{doc}");
        }
        for doc in [
            r#""code":"AB-1""#,
            r#""code":"abc-1""#,
            r#""code":"ABC-""#,
            r#""code":"ABC-1x""#,
            r#""when":"2024-05-01 12:30:00Z""#,
            r#""when":"2024-05-01T12:30:00""#,
            r#""when":"2024-13-01T12:30:00Z""#,
            r#""day":"2024-5-1""#,
            r#""day":"2023-02-29""#,
            r#""day":"1900-02-29""#,
            r#""day":"2024-02-30""#,
            r#""day":"2024-04-31""#,
            r#""day":"2024-00-10""#,
            r#""day":"0000-01-01""#,
            r#""day":"0000-02-29""#,
            r#""id":"123e4567e89b12d3a456426614174000""#,
            r#""ip":"256.1.1.1""#,
            r#""free":"dog""#,
            r#""free":"ca""#,
            r#""lines":"ab""#,
            // A pattern reads characters as themselves, not as `\u` escapes.
            r#""lines":"a\u000ab""#,
            r#""short":"abcd""#,
            r#""short":"ab1""#,
            r#""tight":"xxcat""#,
            r#""user":"ab""#,
            r#""user":"a_very_long_name_8901""#,
            r#""user":"a b c""#,
            r#""name":"""#,
            r#""name":"Ada Lovelace""#,
            r#""name":"Ada1""#,
        ] {
            assert!(!ok(doc), "{doc}");
        }
        // Refused at the byte after which no match can come.
        let at = |text: &str| fed(&g, text.as_bytes()).is_some();
        assert!(at(r#"{"code":"AB"#) && !at(r#"{"code":"A1"#));
        assert!(at(r#"{"day":"2024-1"#) && !at(r#"{"day":"2024-2"#));
        assert!(at(r#"{"free":"xyz"#) && !at(r#"{"free":"xyz""#));
        // An escape only where one can write what the pattern takes next.
        assert!(!at(r#"{"code":"ABC\"#) && at(r#"{"lines":"a\"#));
        // Not where the match would need a character a string cannot hold under a pattern
        // (`\x01` only as `\u0001`), or more characters than `maxLength` leaves.
        assert!(at(r#"{"trap":"c"#) && !at(r#"{"trap":"a"#));
        assert!(at(r#"{"tight":"x"#) && !at(r#"{"tight":"xx"#) && !at(r#"{"tight":"cx"#));
        assert!(at(r#"{"tight":"ca"#) && at(r#"{"tight":"xca"#) && !at(r#"{"tight":"xcb"#));
        assert!(at(r#"{"tab":"a\"#) && at(r#"{"tab":"a\t"#) && !at(r#"{"tab":"a\n"#));
    }

    /// Every text of up to `len` bytes over `alphabet`, in length order.
    fn texts(alphabet: &[u8], len: usize) -> Vec<Vec<u8>> {
        let mut all = vec![Vec::new()];
        let mut last = vec![Vec::new()];
        for _ in 0..len {
            last = last
                .iter()
                .flat_map(|t: &Vec<u8>| {
                    alphabet.iter().map(move |&b| {
                        let mut t = t.clone();
                        t.push(b);
                        t
                    })
                })
                .collect();
            all.extend(last.iter().cloned());
        }
        all
    }

    #[test]
    fn a_bounded_number_is_accepted_exactly_when_its_value_is_in_range() {
        // Against serde_json's reading of the text, every number of up to five bytes over
        // a small alphabet, for ranges open and closed, and every accepted prefix can still
        // be finished.
        let ranges = [
            r#""minimum": 1, "maximum": 5"#,
            r#""minimum": 0, "maximum": 1"#,
            r#""exclusiveMinimum": 0, "exclusiveMaximum": 1"#,
            r#""minimum": -20, "maximum": -10"#,
            r#""minimum": 0.25"#,
            r#""maximum": -0.5"#,
            r#""minimum": 10, "maximum": 10"#,
            r#""minimum": 0.05, "maximum": 0.1"#,
        ];
        let numbers = texts(b"-0125.", 5);
        let endings = texts(b"}0123456789.-", 4);
        for range in ranges {
            for ty in ["number", "integer"] {
                let schema = format!(
                    r#"{{"type":"object","properties":{{"n":{{"type":"{ty}",{range}}}}},"required":["n"]}}"#
                );
                let Ok(g) = Grammar::from_schema(&schema) else {
                    // No integer between 0 and 1, or 0.05 and 0.1.
                    assert_eq!(ty, "integer", "{schema}");
                    continue;
                };
                let bounds: Value = serde_json::from_str(&format!("{{{range}}}")).unwrap();
                let b = |k: &str| bounds.get(k).and_then(Value::as_f64);
                let holds = |v: f64| {
                    b("minimum").is_none_or(|lo| v >= lo)
                        && b("maximum").is_none_or(|hi| v <= hi)
                        && b("exclusiveMinimum").is_none_or(|lo| v > lo)
                        && b("exclusiveMaximum").is_none_or(|hi| v < hi)
                };
                for n in &numbers {
                    let text = String::from_utf8_lossy(n);
                    let doc = format!("{{\"n\":{text}}}");
                    let want = serde_json::from_str::<Value>(&doc).is_ok_and(|d| {
                        let v = &d["n"];
                        // `-0` is an integer, though serde_json reads it as a float.
                        (ty == "number" || !text.contains('.')) && v.as_f64().is_some_and(holds)
                    });
                    assert_eq!(whole(&g, &doc), want, "{doc} as {ty} with {range}");
                    let prefix = format!("{{\"n\":{text}");
                    if let Some(s) = fed(&g, prefix.as_bytes()) {
                        let done = endings.iter().any(|t| {
                            let mut e = s;
                            e.push_all(&g, t) && e.is_done()
                        });
                        assert!(done, "{prefix} as {ty} with {range}: no way to finish");
                    }
                }
            }
        }
    }

    /// A vocabulary with every byte alone, JSON-ish pieces and an empty (control) token.
    fn vocab() -> Vec<Vec<u8>> {
        let mut v: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
        for p in [
            "",
            "{\"",
            "\":",
            "\": \"",
            "\",",
            "\"}",
            "\n}",
            " the",
            "true",
            "tr",
            "ue}",
            "null",
            "12",
            "3.5",
            "e-3",
            "\\n",
            "\\u00",
            "e9",
            "],",
            "[{",
            "}}",
            " ",
            "\n  ",
            "cat",
            "\"cat\"",
            "caf\u{e9}",
            "{}",
            ", \"",
            "0,",
            "-1",
            "```json",
            " }",
            "\n\n",
            " \"",
            "  \"a\":",
            "\t1",
            " \\n",
            " true",
            " t",
            "\n ]",
            "\r\n",
            " 7",
            "\"name",
            "\"age\":",
            " \"Tom\"",
            "black",
            "\"black\"",
            " b",
            "\"a b\"",
            "a b",
            " c\"",
        ] {
            v.push(p.as_bytes().to_vec());
        }
        // Pieces of characters, as byte-level BPE has them: "é" and "😀" split.
        for p in [
            &b"\xc3"[..],
            b"\xa9",
            b"caf\xc3",
            b"\xa9\"",
            b"\xf0\x9f",
            b"\x98\x80",
        ] {
            v.push(p.to_vec());
        }
        v
    }

    /// Compares [`TokenTable::mask`] with trying every token, at every state along `docs`.
    fn check_table(g: &Grammar, docs: &[&[u8]]) {
        let vocab = vocab();
        let table = TokenTable::new(vocab.iter().map(Vec::as_slice));
        for doc in docs {
            for cut in 0..doc.len() {
                let bytes = &doc[..cut];
                let shown = String::from_utf8_lossy(bytes);
                let s = fed(g, bytes).unwrap_or_else(|| panic!("{shown:?} refused"));
                // Two padding logits past the vocabulary, which must be masked too.
                let mut logits: Vec<f32> = (0..vocab.len() + 2).map(|i| i as f32).collect();
                let any = table.mask(g, &s, |t| &vocab[t as usize], &mut logits);
                for (t, &l) in logits.iter().enumerate() {
                    let want = vocab
                        .get(t)
                        .is_some_and(|p| !p.is_empty() && s.accepts(g, p));
                    assert_eq!(l > f32::NEG_INFINITY, want, "after {shown:?}, token {t}");
                    if want {
                        assert_eq!(l, t as f32, "a kept logit moved");
                    }
                }
                assert!(any, "after {shown:?}: the next byte alone is a token");
            }
        }
    }

    #[test]
    fn the_table_masks_exactly_the_tokens_the_state_refuses() {
        // States along documents, and at the whitespace cap.
        let near_cap = format!("{{{}}}", "\n".repeat(MAX_WHITESPACE as usize - 1));
        let at_cap = format!("{{\"a\":1{}}}", " ".repeat(MAX_WHITESPACE as usize));
        let mut docs: Vec<&[u8]> = VALID.iter().map(|d| d.as_bytes()).collect();
        docs.extend([near_cap.as_bytes(), at_cap.as_bytes()]);
        check_table(&any(), &docs);
        // And along a schema's instance: keys and enum values are matched, not free text,
        // and one of them holds a space.
        let g = Grammar::from_schema(
            r#"{"type":"object","properties":{"name":{"type":"string"},"age":{"type":"integer"},
                "c":{"enum":["black","a b","a"]},"n":{"enum":[1,10]}},"required":["name"]}"#,
        )
        .unwrap();
        check_table(
            &g,
            &[
                br#"{"name": "Tom", "age": 12, "c": "a b", "n": 10}"#,
                b"{\"name\":\"x\",\"c\":\"a\" ,\"n\":1 }",
            ],
        );
        // Strings under patterns: text that changes the state, blanks included.
        let g = Grammar::from_schema(PATTERNED).unwrap();
        check_table(
            &g,
            &[
                br#"{"code": "ABC-12", "free": "a b cat", "short": "a"}"#,
                "{\"free\": \"caf\u{e9} \\n\\t the cat\", \"lines\":\"a\\nb\"}".as_bytes(),
                br#"{"trap": "cd", "tight": "xcat", "tab": "a\tb"}"#,
                br#"{"tight": "acat"}"#,
                br#"{"tight": "cat "}"#,
                "{\"user\": \"\u{e9}t\u{e9}_1\", \"name\": \"Ada B\"}".as_bytes(),
            ],
        );
        // Strings near their length limits (multi-character tokens are cut off as room runs
        // out), arrays at their counts, numbers near their bounds.
        let g = Grammar::from_schema(BOUNDED).unwrap();
        check_table(
            &g,
            &[
                "{\"s\":\"caf\u{e9}\",\"tags\":[\"a b\", \"\"]}".as_bytes(),
                br#"{"s": "\u00e9\"", "stars": 5, "score": 0.5, "neg": -12, "old": 0.75}"#,
                br#"{"s":"ab","pos":12,"neg":-20}"#,
                br#"{"map": {"a": 1, "b": 2}, "few": {"k": {}}}"#,
            ],
        );
        let vocab = vocab();
        let table = TokenTable::new(vocab.iter().map(Vec::as_slice));
        let done = fed(&any(), b"{}").unwrap();
        let mut logits = vec![0.0; vocab.len()];
        assert!(!table.mask(&any(), &done, |t| &vocab[t as usize], &mut logits));
    }
}
