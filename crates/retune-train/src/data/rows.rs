//! Rows of each format: parsed and validated (every problem of a row, each with its field),
//! then tokenised with their loss masks.

use super::source::Issue;
use crate::config::DataFormat;
use retune_core::tokenizer::{ChatMessage, Tokenizer};
use serde_json::Value;

/// The clock chat templates see when rendering training data (`strftime_now`): 2024-07-26
/// 00:00:00 UTC, so Llama 3.1's "Today Date" line (and any other date a template writes) is the
/// same on every run and machine.
pub const CHAT_TIME: i64 = 1_721_952_000;

/// Roles a message may have.
pub const ROLES: [&str; 3] = ["system", "user", "assistant"];

/// One message of a conversation; `train`: whether an assistant turn is in the loss.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Msg {
    pub role: String,
    pub content: String,
    pub train: bool,
}

/// A string or a conversation (preference rows accept either).
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Side {
    Text(String),
    Chat(Vec<Msg>),
}

/// A validated row.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Record {
    Text(String),
    PromptCompletion {
        prompt: String,
        completion: String,
    },
    Chat(Vec<Msg>),
    Alpaca {
        instruction: String,
        input: String,
        output: String,
    },
    Preference {
        prompt: Side,
        chosen: Side,
        rejected: Side,
    },
}

impl Record {
    /// The format name, as `data.format` writes it.
    pub fn format(&self) -> &'static str {
        match self {
            Record::Text(_) => "text",
            Record::PromptCompletion { .. } => "prompt-completion",
            Record::Chat(_) => "messages",
            Record::Alpaca { .. } => "alpaca",
            Record::Preference { .. } => "preference",
        }
    }
}

/// `data.format` as written in the config.
pub fn format_name(f: DataFormat) -> &'static str {
    match f {
        DataFormat::Auto => "auto",
        DataFormat::Text => "text",
        DataFormat::PromptCompletion => "prompt-completion",
        DataFormat::Messages => "messages",
        DataFormat::Alpaca => "alpaca",
        DataFormat::Preference => "preference",
    }
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A required string field; `nonempty`: blank is a problem.
fn string(v: &Value, key: &str, nonempty: bool, issues: &mut Vec<Issue>) -> String {
    match v.get(key) {
        Some(Value::String(s)) => {
            if nonempty && s.trim().is_empty() {
                issues.push((key.into(), "empty".into()));
            }
            s.clone()
        }
        Some(other) => {
            issues.push((
                key.into(),
                format!("expected a string, found {}", json_type(other)),
            ));
            String::new()
        }
        None => {
            issues.push((key.into(), "missing".into()));
            String::new()
        }
    }
}

/// Messages at `v` (named `field`), every problem collected.
fn messages(v: Option<&Value>, field: &str, issues: &mut Vec<Issue>) -> Vec<Msg> {
    let list = match v {
        Some(Value::Array(a)) => a,
        Some(other) => {
            issues.push((
                field.into(),
                format!("expected a list of messages, found {}", json_type(other)),
            ));
            return Vec::new();
        }
        None => {
            issues.push((field.into(), "missing".into()));
            return Vec::new();
        }
    };
    if list.is_empty() {
        issues.push((field.into(), "no messages".into()));
    }
    let mut out = Vec::new();
    for (i, m) in list.iter().enumerate() {
        let at = |k: &str| format!("{field}[{i}].{k}");
        if !m.is_object() {
            issues.push((
                format!("{field}[{i}]"),
                format!("expected an object, found {}", json_type(m)),
            ));
            continue;
        }
        let role = match m.get("role") {
            Some(Value::String(r)) if ROLES.contains(&r.as_str()) => r.clone(),
            Some(Value::String(r)) => {
                issues.push((
                    at("role"),
                    format!("unknown role {r:?} (expected system, user or assistant)"),
                ));
                r.clone()
            }
            Some(other) => {
                issues.push((
                    at("role"),
                    format!("expected a string, found {}", json_type(other)),
                ));
                String::new()
            }
            None => {
                issues.push((at("role"), "missing".into()));
                String::new()
            }
        };
        let content = match m.get("content") {
            Some(Value::String(c)) => {
                if c.trim().is_empty() {
                    issues.push((at("content"), "empty content".into()));
                }
                c.clone()
            }
            Some(other) => {
                issues.push((
                    at("content"),
                    format!("expected a string, found {}", json_type(other)),
                ));
                String::new()
            }
            None => {
                issues.push((at("content"), "missing".into()));
                String::new()
            }
        };
        let train = match m.get("weight") {
            None | Some(Value::Null) => true,
            Some(w) if w.as_f64() == Some(1.0) => true,
            Some(w) if w.as_f64() == Some(0.0) => false,
            Some(w) => {
                issues.push((at("weight"), format!("expected 0 or 1, found {w}")));
                true
            }
        };
        out.push(Msg {
            role,
            content,
            train,
        });
    }
    out
}

fn side(v: &Value, key: &str, issues: &mut Vec<Issue>) -> Side {
    match v.get(key) {
        Some(Value::String(s)) => {
            if key != "prompt" && s.trim().is_empty() {
                issues.push((key.into(), "empty".into()));
            }
            Side::Text(s.clone())
        }
        Some(a @ Value::Array(_)) => Side::Chat(messages(Some(a), key, issues)),
        Some(other) => {
            issues.push((
                key.into(),
                format!(
                    "expected a string or a list of messages, found {}",
                    json_type(other)
                ),
            ));
            Side::Text(String::new())
        }
        None => {
            issues.push((key.into(), "missing".into()));
            Side::Text(String::new())
        }
    }
}

/// Parses and validates a JSON row of `format` (not `Auto`).
pub(crate) fn parse(format: DataFormat, v: &Value) -> Result<Record, Vec<Issue>> {
    if !v.is_object() {
        return Err(vec![(
            String::new(),
            format!("expected a JSON object, found {}", json_type(v)),
        )]);
    }
    let mut issues = Vec::new();
    let rec = match format {
        DataFormat::Auto | DataFormat::Text => Record::Text(string(v, "text", false, &mut issues)),
        DataFormat::PromptCompletion => Record::PromptCompletion {
            prompt: string(v, "prompt", false, &mut issues),
            completion: string(v, "completion", true, &mut issues),
        },
        DataFormat::Messages => {
            let msgs = messages(v.get("messages"), "messages", &mut issues);
            let assistant = msgs.iter().filter(|m| m.role == "assistant");
            if assistant.clone().count() == 0 {
                if !msgs.is_empty() {
                    issues.push(("messages".into(), "no assistant turn".into()));
                }
            } else if !assistant.clone().any(|m| m.train) {
                issues.push((
                    "messages".into(),
                    "every assistant turn has weight 0: nothing to learn".into(),
                ));
            }
            Record::Chat(msgs)
        }
        DataFormat::Alpaca => {
            let input = match v.get("input") {
                None | Some(Value::Null) => String::new(),
                Some(Value::String(s)) => s.clone(),
                Some(other) => {
                    issues.push((
                        "input".into(),
                        format!("expected a string, found {}", json_type(other)),
                    ));
                    String::new()
                }
            };
            Record::Alpaca {
                instruction: string(v, "instruction", true, &mut issues),
                input,
                output: string(v, "output", true, &mut issues),
            }
        }
        DataFormat::Preference => {
            let prompt = side(v, "prompt", &mut issues);
            let chosen = side(v, "chosen", &mut issues);
            let rejected = side(v, "rejected", &mut issues);
            if v.get("chosen").is_some() && chosen == rejected {
                issues.push(("rejected".into(), "equal to chosen".into()));
            }
            Record::Preference {
                prompt,
                chosen,
                rejected,
            }
        }
    };
    if issues.is_empty() {
        Ok(rec)
    } else {
        Err(issues)
    }
}

/// Token ids with their loss mask.
#[derive(Debug)]
pub(crate) struct Encoded {
    pub ids: Vec<u32>,
    pub is_target: Vec<bool>,
    /// Assistant turns in the loss whose span holds no EOS / end-of-turn token.
    pub turns_without_eos: usize,
}

fn tok_err(e: retune_core::Error) -> Issue {
    (String::new(), e.to_string())
}

fn eos(tok: &Tokenizer) -> u32 {
    tok.eos_ids.first().copied().unwrap_or(0)
}

fn chat_messages(msgs: &[Msg]) -> Vec<ChatMessage> {
    msgs.iter()
        .map(|m| ChatMessage::new(m.role.clone(), m.content.clone()))
        .collect()
}

/// What `retune generate --chat` feeds the model: the template rendered at [`CHAT_TIME`],
/// tokenised with specials parsed and BOS added as [`Tokenizer::encode`] does.
pub fn render_ids(
    tok: &Tokenizer,
    msgs: &[ChatMessage],
    add_generation_prompt: bool,
) -> Result<Vec<u32>, retune_core::Error> {
    tok.encode(
        &tok.render_chat_at(msgs, add_generation_prompt, CHAT_TIME)?,
        true,
    )
}

fn template_name(tok: &Tokenizer) -> String {
    use sha2::{Digest, Sha256};
    let src = tok.chat_template.as_deref().unwrap_or("");
    let h: String = Sha256::digest(src.as_bytes())
        .iter()
        .take(6)
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("the model's chat template (sha256 {h}…)")
}

fn prefix_error(tok: &Tokenizer, k: usize, what: &str) -> Issue {
    (
        format!("messages[{k}]"),
        format!(
            "{} renders the conversation up to this turn {what}, so the assistant turn cannot \
             be located for the loss; the template is not prefix-consistent (fix the template, \
             or use prompt/completion rows)",
            template_name(tok)
        ),
    )
}

/// Renders a conversation with the chat template and marks each assistant turn's tokens (the
/// tokens between the conversation before it with a generation prompt and the conversation
/// through it, end-of-turn token included) as targets; everything else is a target only with
/// `train_on_prompt`. A turn with weight 0 is never a target.
pub(crate) fn encode_chat(
    tok: &Tokenizer,
    msgs: &[Msg],
    train_on_prompt: bool,
) -> Result<Encoded, Issue> {
    let cm = chat_messages(msgs);
    let ids = render_ids(tok, &cm, false).map_err(tok_err)?;
    let mut is_target = vec![train_on_prompt; ids.len()];
    let mut turns_without_eos = 0;
    for (k, m) in msgs.iter().enumerate() {
        if m.role != "assistant" {
            continue;
        }
        let start = if k == 0 {
            tok.encode("", true).map_err(tok_err)?
        } else {
            render_ids(tok, &cm[..k], true).map_err(tok_err)?
        };
        let end = render_ids(tok, &cm[..=k], false).map_err(tok_err)?;
        if !end.starts_with(&start) {
            return Err(prefix_error(
                tok,
                k,
                "with a generation prompt to tokens that do not start the rendering with it",
            ));
        }
        if !ids.starts_with(&end) {
            return Err(prefix_error(
                tok,
                k,
                "to tokens that do not start the whole conversation's rendering",
            ));
        }
        for t in &mut is_target[start.len()..end.len()] {
            *t = m.train;
        }
        if m.train && !ids[start.len()..end.len()].iter().any(|&i| tok.is_eos(i)) {
            turns_without_eos += 1;
        }
    }
    if let Some(t) = is_target.first_mut() {
        *t = false;
    }
    Ok(Encoded {
        ids,
        is_target,
        turns_without_eos,
    })
}

/// `prompt` then `completion` then EOS, as TRL tokenises plain prompt/completion pairs.
fn encode_pc(
    tok: &Tokenizer,
    prompt: &str,
    completion: &str,
    train_on_prompt: bool,
) -> Result<Encoded, Issue> {
    let mut ids = tok.encode(prompt, true).map_err(tok_err)?;
    let prompt_len = ids.len();
    ids.extend(tok.encode_raw(completion).map_err(tok_err)?);
    ids.push(eos(tok));
    let mut is_target: Vec<bool> = (0..ids.len())
        .map(|i| i >= prompt_len || train_on_prompt)
        .collect();
    is_target[0] = false;
    Ok(Encoded {
        ids,
        is_target,
        turns_without_eos: 0,
    })
}

/// The Alpaca prompt without a chat template: the instruction, then a blank line and the input
/// when there is one, then a blank line.
pub fn alpaca_prompt(instruction: &str, input: &str) -> String {
    if input.trim().is_empty() {
        format!("{instruction}\n\n")
    } else {
        format!("{instruction}\n\n{input}\n\n")
    }
}

/// The user message of an Alpaca row rendered with a chat template: the instruction, then a
/// blank line and the input when there is one.
pub fn alpaca_user(instruction: &str, input: &str) -> String {
    if input.trim().is_empty() {
        instruction.to_string()
    } else {
        format!("{instruction}\n\n{input}")
    }
}

/// Tokenises a supervised row (not a preference row) with its loss mask. Text rows are all
/// targets (after BOS), ending in EOS.
pub(crate) fn encode_sft(
    tok: &Tokenizer,
    rec: &Record,
    train_on_prompt: bool,
) -> Result<Encoded, Issue> {
    match rec {
        Record::Text(t) => {
            let mut ids = tok.encode(t, true).map_err(tok_err)?;
            ids.push(eos(tok));
            let mut is_target = vec![true; ids.len()];
            is_target[0] = false;
            Ok(Encoded {
                ids,
                is_target,
                turns_without_eos: 0,
            })
        }
        Record::PromptCompletion { prompt, completion } => {
            encode_pc(tok, prompt, completion, train_on_prompt)
        }
        Record::Chat(msgs) => encode_chat(tok, msgs, train_on_prompt),
        Record::Alpaca {
            instruction,
            input,
            output,
        } => {
            if tok.chat_template.is_some() {
                let msgs = [
                    Msg {
                        role: "user".into(),
                        content: alpaca_user(instruction, input),
                        train: true,
                    },
                    Msg {
                        role: "assistant".into(),
                        content: output.clone(),
                        train: true,
                    },
                ];
                encode_chat(tok, &msgs, train_on_prompt)
            } else {
                encode_pc(
                    tok,
                    &alpaca_prompt(instruction, input),
                    output,
                    train_on_prompt,
                )
            }
        }
        Record::Preference { .. } => Err((
            String::new(),
            "a preference row is not a supervised example".into(),
        )),
    }
}

/// A tokenised preference pair.
#[derive(Clone, Debug, PartialEq)]
pub struct PreferenceExample {
    /// The prompt (BOS included; with a chat template, the generation prompt included).
    pub prompt_ids: Vec<u32>,
    /// The chosen response after the prompt (end-of-turn / EOS included).
    pub chosen_ids: Vec<u32>,
    /// The rejected response after the prompt (end-of-turn / EOS included).
    pub rejected_ids: Vec<u32>,
    /// Content hash (hex).
    pub hash: String,
}

/// `(prompt, chosen, rejected)` token ids.
pub(crate) type PairIds = (Vec<u32>, Vec<u32>, Vec<u32>);

/// Tokenises a preference row: strings as prompt/completion pairs, conversations with the chat
/// template (a string prompt then becomes a user message, a string response an assistant one).
pub(crate) fn encode_preference(
    tok: &Tokenizer,
    prompt: &Side,
    chosen: &Side,
    rejected: &Side,
) -> Result<PairIds, Issue> {
    let chat = [prompt, chosen, rejected]
        .iter()
        .any(|s| matches!(s, Side::Chat(_)));
    if !chat {
        let text = |s: &Side| match s {
            Side::Text(t) => t.clone(),
            Side::Chat(_) => unreachable!(),
        };
        let p = tok.encode(&text(prompt), true).map_err(tok_err)?;
        let response = |s: &Side| -> Result<Vec<u32>, Issue> {
            let mut ids = tok.encode_raw(&text(s)).map_err(tok_err)?;
            ids.push(eos(tok));
            Ok(ids)
        };
        return Ok((p, response(chosen)?, response(rejected)?));
    }
    let as_msgs = |s: &Side, role: &str| match s {
        Side::Text(t) => vec![Msg {
            role: role.into(),
            content: t.clone(),
            train: true,
        }],
        Side::Chat(m) => m.clone(),
    };
    let p = chat_messages(&as_msgs(prompt, "user"));
    let p_ids = render_ids(tok, &p, true).map_err(tok_err)?;
    let response = |s: &Side, field: &str| -> Result<Vec<u32>, Issue> {
        let mut all = p.clone();
        all.extend(chat_messages(&as_msgs(s, "assistant")));
        let ids = render_ids(tok, &all, false).map_err(tok_err)?;
        if !ids.starts_with(&p_ids) {
            return Err((
                field.into(),
                format!(
                    "{} renders the prompt with a generation prompt to tokens that do not start \
                     the rendering of prompt + {field}; the template is not prefix-consistent",
                    template_name(tok)
                ),
            ));
        }
        Ok(ids[p_ids.len()..].to_vec())
    };
    let c = response(chosen, "chosen")?;
    let r = response(rejected, "rejected")?;
    Ok((p_ids, c, r))
}
