//! A tokenizer rebuilt from GGUF metadata (`tokenizer.ggml.*`), matching llama.cpp's
//! `llama-vocab.cpp`: byte-level BPE (`gpt2`) with the pre-tokenizer named by
//! `tokenizer.ggml.pre`, and SentencePiece (`llama`) rebuilt as a score-ranked BPE.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PreTokenizerWrapper, SplitDelimiterBehavior,
};

use super::{eos_list, tok_err, Tokenizer};
use crate::error::{Error, Result};

// llama.cpp's token types (`llama_token_type`).
const TYPE_NORMAL: i64 = 1;
const TYPE_UNKNOWN: i64 = 2;
const TYPE_CONTROL: i64 = 3;
const TYPE_USER_DEFINED: i64 = 4;

/// GPT-2's regex as llama.cpp writes it (without the final `|\s+`: unmatched gaps are kept anyway).
const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
/// Llama 3's regex with the case-insensitive group spelled out, as llama.cpp does.
const LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2: Llama 3's regex with single digits.
const QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen3.5: Qwen2's regex with combining marks kept inside words.
const QWEN35: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const DEEPSEEK_CJK: &str = "[一-龥ࠀ-一가-퟿]+";
/// DeepSeek LLM's cased letters. Code points that Unicode normalization would rewrite are escaped.
const DEEPSEEK_LLM_LETTERS: &str = r"\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-\x{1F7D}ᾀ-ᾴᾶ-ᾼ\x{1FBE}ῂ-ῄῆ-ῌῐ-\x{1FD3}ῖ-\x{1FDB}ῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤ\x{2126}ℨ\x{212A}-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+";

/// How llama.cpp pre-tokenizes one `tokenizer.ggml.pre` family.
struct PreType {
    /// Regexes applied in turn, each splitting the pieces of the previous one (matches and gaps kept).
    regexes: &'static [&'static str],
    /// A piece that is itself a token is not merged further (Llama 3).
    ignore_merges: bool,
    /// BOS added by default when `tokenizer.ggml.add_bos_token` is absent.
    add_bos: bool,
}

/// The `tokenizer.ggml.pre` names retune supports (llama.cpp's aliases included).
#[rustfmt::skip]
pub const SUPPORTED_PRE: &[&str] = &[
    "default", "llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "dbrx", "smaug-bpe",
    "deepseek-llm", "deepseek-coder", "falcon", "mpt", "starcoder", "refact", "command-r",
    "smollm", "codeshell", "exaone", "minerva-7b", "gpt-2", "phi-2", "olmo", "jais", "exaone4",
    "qwen2", "deepseek-r1-qwen", "stablelm2", "megrez", "qwen35",
];

/// llama.cpp's `llm_tokenizer_bpe` table, for the names in [`SUPPORTED_PRE`].
fn pre_type(pre: &str) -> Option<PreType> {
    let t = |regexes, ignore_merges, add_bos| {
        Some(PreType {
            regexes,
            ignore_merges,
            add_bos,
        })
    };
    match pre {
        "default" => t(
            &[r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", "[0-9][0-9][0-9]"],
            false,
            false,
        ),
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" => t(&[LLAMA3], true, true),
        "dbrx" | "smaug-bpe" => t(&[LLAMA3], false, false),
        "deepseek-llm" => t(
            &[
                "[\r\n]",
                DEEPSEEK_LLM_LETTERS,
                r"\s?[!-/:-~！-／：-～‘-‟　-。]+",
                r"\s+$",
                DEEPSEEK_CJK,
                r"\p{N}+",
            ],
            false,
            false,
        ),
        "deepseek-coder" => t(
            &["[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", DEEPSEEK_CJK, r"\p{N}"],
            false,
            false,
        ),
        "falcon" => t(
            &[r"[\p{P}\$\+<=>\^~\|`]+", GPT2, "[0-9][0-9][0-9]"],
            false,
            false,
        ),
        // SmolLM, StarCoder and friends split every digit off first, then apply GPT-2's regex.
        "starcoder" | "refact" | "command-r" | "smollm" | "codeshell" | "exaone" | "minerva-7b" => {
            t(&[r"\p{N}", GPT2], false, false)
        }
        "gpt-2" | "phi-2" | "mpt" | "olmo" | "jais" | "exaone4" => t(&[GPT2], false, false),
        "qwen2" | "deepseek-r1-qwen" | "stablelm2" | "megrez" => t(&[QWEN2], false, false),
        "qwen35" => t(&[QWEN35], false, false),
        _ => None,
    }
}

/// The GGUF metadata keys this module reads.
struct Meta<'a> {
    path: &'a Path,
    md: &'a HashMap<String, Value>,
}

impl Meta<'_> {
    fn get(&self, key: &str) -> Option<&Value> {
        self.md.get(key)
    }
    fn require(&self, key: &str) -> Result<&Value> {
        self.get(key).ok_or_else(|| {
            Error::format(self.path, format!("missing GGUF key `{key}`: the file carries no tokenizer (use a model folder with tokenizer.json instead)"))
        })
    }
    fn bad(&self, key: &str, want: &str) -> Error {
        Error::format(self.path, format!("GGUF key `{key}` is not {want}"))
    }
    fn string(&self, key: &str) -> Result<Option<String>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(self.bad(key, "a string")),
        }
    }
    fn int(&self, key: &str) -> Result<Option<i64>> {
        self.get(key)
            .map(|v| as_int(v).ok_or_else(|| self.bad(key, "an integer")))
            .transpose()
    }
    fn id(&self, key: &str) -> Result<Option<u32>> {
        // llama.cpp writes -1 (or nothing) for "no such token".
        Ok(self.int(key)?.and_then(|v| u32::try_from(v).ok()))
    }
    fn bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => as_int(v)
                .map(|i| Some(i != 0))
                .ok_or_else(|| self.bad(key, "a boolean")),
        }
    }
    fn strings(&self, key: &str) -> Result<Vec<String>> {
        let Value::Array(items) = self.require(key)? else {
            return Err(self.bad(key, "an array"));
        };
        items
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.clone()),
                _ => Err(self.bad(key, "an array of strings")),
            })
            .collect()
    }
    fn numbers(&self, key: &str, n: usize, default: f64) -> Result<Vec<f64>> {
        let Some(v) = self.get(key) else {
            return Ok(vec![default; n]);
        };
        let Value::Array(items) = v else {
            return Err(self.bad(key, "an array"));
        };
        let out: Option<Vec<f64>> = items.iter().map(as_f64).collect();
        match out {
            Some(out) if out.len() == n => Ok(out),
            _ => Err(self.bad(key, &format!("an array of {n} numbers (one per token)"))),
        }
    }
}

fn as_int(v: &Value) -> Option<i64> {
    Some(match v {
        Value::U8(x) => *x as i64,
        Value::I8(x) => *x as i64,
        Value::U16(x) => *x as i64,
        Value::I16(x) => *x as i64,
        Value::U32(x) => *x as i64,
        Value::I32(x) => *x as i64,
        Value::U64(x) => i64::try_from(*x).ok()?,
        Value::I64(x) => *x,
        _ => return None,
    })
}

fn as_f64(v: &Value) -> Option<f64> {
    match v {
        Value::F32(x) => Some(*x as f64),
        Value::F64(x) => Some(*x),
        v => as_int(v).map(|i| i as f64),
    }
}

/// Reads the tokenizer stored in a GGUF file's metadata.
pub(super) fn from_gguf(path: &Path) -> Result<Tokenizer> {
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let content = Content::read(&mut file)
        .map_err(|e| Error::format(path, format!("not a readable GGUF file: {e}")))?;
    let meta = Meta {
        path,
        md: &content.metadata,
    };

    let kind = match meta.require("tokenizer.ggml.model")? {
        Value::String(s) => s.clone(),
        _ => return Err(meta.bad("tokenizer.ggml.model", "a string")),
    };
    let tokens = meta.strings("tokenizer.ggml.tokens")?;
    let types = meta.numbers(
        "tokenizer.ggml.token_type",
        tokens.len(),
        TYPE_NORMAL as f64,
    )?;
    let types: Vec<i64> = types.into_iter().map(|t| t as i64).collect();

    let (mut inner, default_add_bos) = match kind.as_str() {
        "gpt2" => build_bpe(&meta, &tokens)?,
        "llama" => build_spm(&meta, &tokens, &types)?,
        other => {
            return Err(Error::Unsupported {
                path: path.into(),
                reason: format!(
                    "tokenizer model `{other}` (retune reads `gpt2` byte-level BPE and `llama` SentencePiece GGUF tokenizers; use a model folder with tokenizer.json)"
                ),
            })
        }
    };

    // Control tokens are specials (skipped when decoding with skip_special); user-defined ones are
    // plain added tokens. Both are matched whole in the text before the model sees it.
    let added: Vec<AddedToken> = tokens
        .iter()
        .zip(&types)
        .filter(|(_, &t)| t == TYPE_CONTROL || t == TYPE_USER_DEFINED)
        .map(|(s, &t)| AddedToken::from(s.clone(), t == TYPE_CONTROL).normalized(false))
        .collect();
    inner
        .add_special_tokens(added.iter().filter(|t| t.special).cloned())
        .map_err(tok_err)?;
    inner
        .add_tokens(added.into_iter().filter(|t| !t.special))
        .map_err(tok_err)?;

    let token_text = |id: Option<u32>| id.and_then(|i| tokens.get(i as usize).cloned());
    let bos_id = meta
        .id("tokenizer.ggml.bos_token_id")?
        .filter(|&i| (i as usize) < tokens.len());
    let eos_id = meta
        .id("tokenizer.ggml.eos_token_id")?
        .filter(|&i| (i as usize) < tokens.len());
    let mut declared: Vec<u32> = eos_id.into_iter().collect();
    for key in ["tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"] {
        declared.extend(meta.id(key)?.filter(|&i| (i as usize) < tokens.len()));
    }
    let specials = (0u32..).zip(tokens.iter().zip(&types));
    let specials = specials
        .filter(|(_, (_, &t))| t == TYPE_CONTROL)
        .map(|(i, (s, _))| (s.as_str(), i));
    let eos_ids = eos_list(declared, specials);

    Ok(Tokenizer {
        inner,
        bos_id,
        eos_ids,
        chat_template: meta.string("tokenizer.chat_template")?,
        bos_token: token_text(bos_id),
        eos_token: token_text(eos_id),
        add_bos: meta
            .bool("tokenizer.ggml.add_bos_token")?
            .unwrap_or(default_add_bos)
            && bos_id.is_some(),
        template_origin: format!("{} (tokenizer.chat_template)", path.display()),
    })
}

/// Byte-level BPE: the pre-tokenizer's regexes, then bytes mapped to GPT-2's printable alphabet.
fn build_bpe(meta: &Meta, tokens: &[String]) -> Result<(tokenizers::Tokenizer, bool)> {
    // GGUFs written before llama.cpp named pre-tokenizers carry none; llama.cpp then uses "default".
    let pre = meta
        .string("tokenizer.ggml.pre")?
        .unwrap_or_else(|| "default".into());
    let pt = pre_type(&pre).ok_or_else(|| Error::Unsupported {
        path: meta.path.into(),
        reason: format!(
            "pre-tokenizer `{pre}` (tokenizer.ggml.pre); supported: {}",
            SUPPORTED_PRE.join(", ")
        ),
    })?;
    let merges = meta
        .strings("tokenizer.ggml.merges")?
        .into_iter()
        .map(|m| match m.split_once(' ') {
            Some((a, b)) => Ok((a.to_string(), b.to_string())),
            None => Err(Error::format(
                meta.path,
                format!("merge `{m}` in tokenizer.ggml.merges is not `left right`"),
            )),
        })
        .collect::<Result<Vec<_>>>()?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab_map(tokens), merges)
        .ignore_merges(pt.ignore_merges)
        .build()
        .map_err(|e| Error::format(meta.path, format!("tokenizer.ggml.merges: {e}")))?;

    let mut steps = Vec::with_capacity(pt.regexes.len() + 1);
    for re in pt.regexes {
        let split = Split::new(
            SplitPattern::Regex((*re).into()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| Error::Tokenizer(format!("pre-tokenizer `{pre}` regex: {e}")))?;
        steps.push(PreTokenizerWrapper::Split(split));
    }
    steps.push(PreTokenizerWrapper::ByteLevel(ByteLevel::new(
        false, false, false,
    )));

    let mut tk = tokenizers::Tokenizer::new(bpe);
    tk.with_pre_tokenizer(Some(PreSequence::new(steps)));
    tk.with_decoder(Some(ByteLevel::default()));
    Ok((tk, pt.add_bos))
}

/// SentencePiece as llama.cpp runs it: repeatedly merge the adjacent pair whose union is the
/// highest-scoring token, then fall back to `<0xXX>` byte tokens. That is BPE with merges ranked
/// by the merged token's score.
fn build_spm(
    meta: &Meta,
    tokens: &[String],
    types: &[i64],
) -> Result<(tokenizers::Tokenizer, bool)> {
    let scores = meta.numbers("tokenizer.ggml.scores", tokens.len(), 0.0)?;
    let vocab = vocab_map(tokens);
    let mut ranked: Vec<(f64, u32, String, String)> = Vec::new();
    for (id, tok) in tokens.iter().enumerate() {
        if types[id] != TYPE_NORMAL && types[id] != TYPE_USER_DEFINED {
            continue;
        }
        for (i, _) in tok.char_indices().skip(1) {
            let (l, r) = tok.split_at(i);
            if vocab.contains_key(l) && vocab.contains_key(r) {
                ranked.push((scores[id], id as u32, l.into(), r.into()));
            }
        }
    }
    // Highest score first; equal scores keep vocabulary order.
    ranked.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    let merges = ranked.into_iter().map(|(_, _, l, r)| (l, r)).collect();

    let mut builder = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .byte_fallback(true)
        .fuse_unk(true);
    let unk = meta.id("tokenizer.ggml.unknown_token_id")?.or_else(|| {
        types
            .iter()
            .position(|&t| t == TYPE_UNKNOWN)
            .map(|i| i as u32)
    });
    if let Some(unk) = unk.and_then(|i| tokens.get(i as usize)) {
        builder = builder.unk_token(unk.clone());
    }
    let bpe = builder
        .build()
        .map_err(|e| Error::format(meta.path, format!("tokenizer.ggml.tokens: {e}")))?;

    let space_prefix = meta
        .bool("tokenizer.ggml.add_space_prefix")?
        .unwrap_or(true);
    let escape = Replace::new(" ", "▁").map_err(tok_err)?;
    let unescape = Replace::new("▁", " ").map_err(tok_err)?;
    let mut norm: Vec<NormalizerWrapper> = Vec::new();
    let mut dec: Vec<DecoderWrapper> = vec![
        unescape.into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
    ];
    if space_prefix {
        // A space before every stretch of text (also after a special token), removed again on decode.
        norm.push(Prepend::new("▁".into()).into());
        dec.push(Strip::new(' ', 1, 0).into());
    }
    norm.push(escape.into());

    let mut tk = tokenizers::Tokenizer::new(bpe);
    tk.with_normalizer(Some(NormalizerSequence::new(norm)))
        .map_err(tok_err)?;
    tk.with_decoder(Some(DecoderSequence::new(dec)));
    Ok((tk, true))
}

/// Token text -> id; a repeated text keeps its last id, as llama.cpp's lookup does.
fn vocab_map(tokens: &[String]) -> Vocab {
    tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_supported_pre_tokenizer_builds() {
        for name in SUPPORTED_PRE {
            let pt = pre_type(name).unwrap_or_else(|| panic!("{name} is listed but unknown"));
            for re in pt.regexes {
                Split::new(
                    SplitPattern::Regex((*re).into()),
                    SplitDelimiterBehavior::Isolated,
                    false,
                )
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            }
        }
        assert!(pre_type("klingon").is_none());
    }
}
