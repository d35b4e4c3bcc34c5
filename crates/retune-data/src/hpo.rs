//! The Human Phenotype Ontology (`hp.obo`): its cardiovascular subtree, and instruction and
//! preference pairs derived from the term definitions.
//!
//! [`parse_obo`] reads the `[Term]` stanzas. [`cardiovascular_terms`] keeps the non-obsolete
//! terms with a definition that are [`CARDIOVASCULAR_ROOT`] or descend from it through `is_a`
//! (through any term, defined or not). [`instruction_pairs`] asks "What is X?" for each;
//! [`preference_pairs`] asks "Define X." and prefers X's definition over the definition of a
//! sibling (another selected term sharing an `is_a` parent). Both are derived data, not
//! curated instructions, and are labelled so when written.

use crate::{io_err, Error, Result};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;
use std::path::Path;

/// `HP:0001626` "Abnormality of the cardiovascular system".
pub const CARDIOVASCULAR_ROOT: &str = "HP:0001626";

/// One `[Term]` stanza.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct HpoTerm {
    /// `id:`, e.g. `HP:0001631`.
    pub id: String,
    /// `name:`.
    pub name: String,
    /// The quoted text of `def:`, unescaped; empty when the term has none.
    pub definition: String,
    /// Parent ids from `is_a:` lines, in file order.
    pub parents: Vec<String>,
    /// The quoted text of `synonym:` lines, unescaped.
    pub synonyms: Vec<String>,
    /// `is_obsolete: true`.
    pub obsolete: bool,
}

/// Reads every `[Term]` stanza of an OBO file.
pub fn parse_obo(path: &Path) -> Result<Vec<HpoTerm>> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    parse_obo_str(&text, path)
}

/// Reads every `[Term]` stanza of OBO text; `path` names the source in errors.
pub fn parse_obo_str(text: &str, path: &Path) -> Result<Vec<HpoTerm>> {
    let mut terms = Vec::new();
    // The term being read, when inside a [Term] stanza.
    let mut term: Option<(HpoTerm, u64)> = None;
    let bad = |line: u64, reason: String| Error::Parse {
        path: path.to_path_buf(),
        line,
        reason,
    };
    for (i, raw) in text.lines().enumerate() {
        let line_no = i as u64 + 1;
        let line = raw.trim_end();
        if line.starts_with('[') {
            if let Some((t, at)) = term.take() {
                terms.push(checked(t, at, path)?);
            }
            if line == "[Term]" {
                term = Some((HpoTerm::default(), line_no));
            }
            continue;
        }
        let Some((t, _)) = term.as_mut() else {
            continue;
        };
        let Some((tag, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim_start();
        match tag {
            "id" => t.id = strip_comment(value).to_string(),
            "name" => t.name = value.to_string(),
            "def" => {
                t.definition =
                    quoted(value).ok_or_else(|| bad(line_no, "`def:` has no quoted text".into()))?
            }
            "synonym" => t.synonyms.push(
                quoted(value)
                    .ok_or_else(|| bad(line_no, "`synonym:` has no quoted text".into()))?,
            ),
            "is_a" => t.parents.push(strip_comment(value).to_string()),
            "is_obsolete" => t.obsolete = value.trim() == "true",
            _ => {}
        }
    }
    if let Some((t, at)) = term.take() {
        terms.push(checked(t, at, path)?);
    }
    Ok(terms)
}

fn checked(t: HpoTerm, line: u64, path: &Path) -> Result<HpoTerm> {
    if t.id.is_empty() {
        return Err(Error::Parse {
            path: path.to_path_buf(),
            line,
            reason: "a [Term] stanza has no `id:`".into(),
        });
    }
    Ok(t)
}

/// `HP:0000118 ! Phenotypic abnormality {source=...}` -> `HP:0000118`.
fn strip_comment(value: &str) -> &str {
    value.split(['!', '{']).next().unwrap_or_default().trim()
}

/// The text between the first pair of unescaped double quotes, with OBO escapes resolved
/// (`\"` -> `"`, `\n` -> newline, `\t` -> tab, `\X` -> `X`).
fn quoted(value: &str) -> Option<String> {
    let rest = value.strip_prefix('"')?;
    let mut out = String::new();
    let mut chars = rest.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => return Some(out),
            '\\' => match chars.next()? {
                'n' => out.push('\n'),
                't' => out.push('\t'),
                other => out.push(other),
            },
            c => out.push(c),
        }
    }
    None
}

/// The ids of `root` and every term below it through `is_a`, over all `terms`.
pub fn descendants(terms: &[HpoTerm], root: &str) -> BTreeSet<String> {
    let mut children: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for t in terms {
        for p in &t.parents {
            children.entry(p.as_str()).or_default().push(&t.id);
        }
    }
    let mut seen = BTreeSet::from([root.to_string()]);
    let mut todo = vec![root];
    while let Some(id) = todo.pop() {
        for &child in children.get(id).into_iter().flatten() {
            if seen.insert(child.to_string()) {
                todo.push(child);
            }
        }
    }
    seen
}

/// The non-obsolete terms with a definition that are `root` or below it, sorted by id.
pub fn defined_subtree(terms: &[HpoTerm], root: &str) -> Vec<HpoTerm> {
    let ids = descendants(terms, root);
    let mut out: Vec<HpoTerm> = terms
        .iter()
        .filter(|t| ids.contains(&t.id) && !t.obsolete && !t.definition.is_empty())
        .cloned()
        .collect();
    out.sort_by(|a, b| a.id.cmp(&b.id));
    out.dedup_by(|a, b| a.id == b.id);
    out
}

/// The defined, non-obsolete terms of [`CARDIOVASCULAR_ROOT`]'s subtree (the root included),
/// sorted by id.
pub fn cardiovascular_terms(obo: &Path) -> Result<Vec<HpoTerm>> {
    let terms = parse_obo(obo)?;
    if !terms.iter().any(|t| t.id == CARDIOVASCULAR_ROOT) {
        return Err(Error::Source {
            path: obo.to_path_buf(),
            reason: format!("has no term {CARDIOVASCULAR_ROOT}"),
        });
    }
    Ok(defined_subtree(&terms, CARDIOVASCULAR_ROOT))
}

/// A derived instruction pair: "What is X?" -> X's definition.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct InstructionPair {
    /// `What is {name}?`
    pub prompt: String,
    /// The term's definition.
    pub completion: String,
    /// The term's id.
    pub hpo_id: String,
}

/// Instruction pairs for `terms`, split into (train, eval): a term is held out when
/// [`crate::in_eval`] of its id holds for `held_out_fraction`. Order follows `terms`.
pub fn instruction_pairs(
    terms: &[HpoTerm],
    held_out_fraction: f64,
) -> (Vec<InstructionPair>, Vec<InstructionPair>) {
    let (eval, train) = terms
        .iter()
        .map(|t| InstructionPair {
            prompt: format!("What is {}?", t.name),
            completion: t.definition.clone(),
            hpo_id: t.id.clone(),
        })
        .partition(|p| crate::in_eval(&p.hpo_id, held_out_fraction));
    (train, eval)
}

/// A derived preference pair: "Define X." with X's definition chosen over a sibling's.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PreferencePair {
    /// `Define {name}.`
    pub prompt: String,
    /// X's definition.
    pub chosen: String,
    /// The sibling's definition.
    pub rejected: String,
    /// X's id.
    pub hpo_id: String,
    /// The sibling's id.
    pub rejected_hpo_id: String,
}

/// One preference pair per term of `terms` that has a sibling in `terms` (another term
/// sharing an `is_a` parent) with a different definition. The sibling is the one with the
/// smallest id greater than X's, else the smallest id. Terms without one are skipped. Order
/// follows `terms`.
pub fn preference_pairs(terms: &[HpoTerm]) -> Vec<PreferencePair> {
    // parent id -> (child id -> child)
    let mut children: BTreeMap<&str, BTreeMap<&str, &HpoTerm>> = BTreeMap::new();
    for t in terms {
        for p in &t.parents {
            children.entry(p.as_str()).or_default().insert(&t.id, t);
        }
    }
    let mut pairs = Vec::new();
    for t in terms {
        let siblings: BTreeMap<&str, &HpoTerm> = t
            .parents
            .iter()
            .filter_map(|p| children.get(p.as_str()))
            .flatten()
            .filter(|(id, s)| **id != t.id && s.definition != t.definition)
            .map(|(id, s)| (*id, *s))
            .collect();
        let above = (Bound::Excluded(t.id.as_str()), Bound::Unbounded);
        let pick = siblings
            .range::<str, _>(above)
            .next()
            .or_else(|| siblings.first_key_value());
        if let Some((id, sibling)) = pick {
            pairs.push(PreferencePair {
                prompt: format!("Define {}.", t.name),
                chosen: t.definition.clone(),
                rejected: sibling.definition.clone(),
                hpo_id: t.id.clone(),
                rejected_hpo_id: id.to_string(),
            });
        }
    }
    pairs
}

/// Splits preference pairs into (train, eval) by [`crate::in_eval`] of X's id, the same rule
/// as [`instruction_pairs`], so a held-out term is held out of both.
pub fn split_preference_pairs(
    pairs: Vec<PreferencePair>,
    held_out_fraction: f64,
) -> (Vec<PreferencePair>, Vec<PreferencePair>) {
    let (eval, train) = pairs
        .into_iter()
        .partition(|p| crate::in_eval(&p.hpo_id, held_out_fraction));
    (train, eval)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoted_text_is_unescaped() {
        assert_eq!(
            quoted(r#""a \"b\" c\, d" [ref:1]"#).as_deref(),
            Some(r#"a "b" c, d"#)
        );
        assert_eq!(quoted(r#""unterminated"#), None);
        assert_eq!(strip_comment("HP:0000118 ! Phenotypic"), "HP:0000118");
    }
}
