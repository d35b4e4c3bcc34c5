use retune_assets::{fetch, Asset};
use retune_data::hpo::{
    cardiovascular_terms, defined_subtree, instruction_pairs, parse_obo, parse_obo_str,
    preference_pairs, CARDIOVASCULAR_ROOT,
};
use retune_data::{in_eval, Error};
use std::collections::BTreeMap;
use std::path::Path;

/// A small ontology: A and B under the root, a diamond D below both, an obsolete term, an
/// undefined term with a defined child, a term outside the subtree, and E sharing B's
/// definition (so B and E may never be each other's rejected answer).
pub(super) const OBO: &str = r#"format-version: 1.2
default-namespace: human_phenotype

[Term]
id: HP:0000001
name: All

[Term]
id: HP:0001626
name: Abnormality of the cardiovascular system
def: "Any abnormality of the cardiovascular system." [https://orcid.org/0000-0002-0736-9199]
is_a: HP:0000001 ! All

[Term]
id: HP:0000010
name: Heart thing A
def: "A \"quoted\" heart thing." [PMID:1, PMID:2]
synonym: "Thing \"A\"" EXACT []
is_a: HP:0001626 ! Abnormality of the cardiovascular system

[Term]
id: HP:0000020
name: Heart thing B
def: "Heart thing B." []
is_a: HP:0001626 ! Abnormality of the cardiovascular system

[Term]
id: HP:0000030
name: Diamond
def: "Below both A and B." []
is_a: HP:0000010 ! Heart thing A
is_a: HP:0000020 ! Heart thing B

[Term]
id: HP:0000040
name: obsolete Old thing
def: "Old." []
is_obsolete: true
is_a: HP:0000010

[Term]
id: HP:0000050
name: Undefined intermediate
is_a: HP:0000020 ! Heart thing B

[Term]
id: HP:0000060
name: Deep
def: "Below an undefined term." []
is_a: HP:0000050 ! Undefined intermediate

[Term]
id: HP:0000070
name: Elsewhere
def: "Not cardiovascular." []
is_a: HP:0000001 ! All

[Term]
id: HP:0000080
name: Heart thing E
def: "Heart thing B." []
is_a: HP:0001626 {source="x"} ! Abnormality of the cardiovascular system

[Typedef]
id: part_of
name: part of
"#;

fn subtree() -> Vec<retune_data::hpo::HpoTerm> {
    let terms = parse_obo_str(OBO, Path::new("snippet.obo")).unwrap();
    defined_subtree(&terms, CARDIOVASCULAR_ROOT)
}

#[test]
fn snippet_parse_and_descendants() {
    let terms = parse_obo_str(OBO, Path::new("snippet.obo")).unwrap();
    assert_eq!(terms.len(), 10, "[Typedef] is not a term");
    let a = terms.iter().find(|t| t.id == "HP:0000010").unwrap();
    assert_eq!(a.definition, r#"A "quoted" heart thing."#);
    assert_eq!(a.synonyms, [r#"Thing "A""#]);
    assert_eq!(a.parents, ["HP:0001626"]);
    let e = terms.iter().find(|t| t.id == "HP:0000080").unwrap();
    assert_eq!(e.parents, ["HP:0001626"], "trailing qualifiers are dropped");
    assert!(
        terms
            .iter()
            .find(|t| t.id == "HP:0000040")
            .unwrap()
            .obsolete
    );

    let ids: Vec<String> = subtree().into_iter().map(|t| t.id).collect();
    assert_eq!(
        ids,
        [
            "HP:0000010",
            "HP:0000020",
            "HP:0000030",
            "HP:0000060",
            "HP:0000080",
            "HP:0001626"
        ],
        "root included, diamond once, obsolete/undefined/outside left out, \
         a defined term below an undefined one kept"
    );
}

#[test]
fn snippet_sibling_pairs() {
    let terms = subtree();
    let pairs = preference_pairs(&terms);
    let got: Vec<(&str, &str)> = pairs
        .iter()
        .map(|p| (p.hpo_id.as_str(), p.rejected_hpo_id.as_str()))
        .collect();
    // A: the smallest sibling id above it (B). B: E has B's definition, so none above -> A.
    // E: none above -> smallest (A). Diamond, Deep and the root have no defined sibling.
    assert_eq!(
        got,
        [
            ("HP:0000010", "HP:0000020"),
            ("HP:0000020", "HP:0000010"),
            ("HP:0000080", "HP:0000010")
        ]
    );
    let a = &pairs[0];
    assert_eq!(a.prompt, "Define Heart thing A.");
    assert_eq!(a.chosen, r#"A "quoted" heart thing."#);
    assert_eq!(a.rejected, "Heart thing B.");
    assert!(pairs.iter().all(|p| p.chosen != p.rejected));
}

#[test]
fn snippet_instruction_split_is_by_id() {
    let terms = subtree();
    let (train, eval) = instruction_pairs(&terms, 0.5);
    assert_eq!(train.len() + eval.len(), terms.len());
    assert!(eval.iter().all(|p| in_eval(&p.hpo_id, 0.5)));
    assert!(train.iter().all(|p| !in_eval(&p.hpo_id, 0.5)));
    let a = train
        .iter()
        .chain(&eval)
        .find(|p| p.hpo_id == "HP:0000020")
        .unwrap();
    assert_eq!(a.prompt, "What is Heart thing B?");
    assert_eq!(a.completion, "Heart thing B.");
    let (all, none) = instruction_pairs(&terms, 0.0);
    assert_eq!((all.len(), none.len()), (terms.len(), 0));
}

#[test]
fn bad_obo_is_a_typed_error_with_the_line() {
    let err = parse_obo_str(
        "[Term]\nid: HP:1\ndef: unquoted text []\n",
        Path::new("bad.obo"),
    )
    .unwrap_err();
    assert!(matches!(err, Error::Parse { line: 3, .. }), "{err:?}");
    assert!(err.to_string().starts_with("bad.obo:3:"), "{err}");
    let err = parse_obo_str("[Term]\nname: no id\n", Path::new("x.obo")).unwrap_err();
    assert!(matches!(err, Error::Parse { line: 1, .. }), "{err:?}");
    assert!(matches!(
        parse_obo(Path::new("/nonexistent/hp.obo")),
        Err(Error::Io { .. })
    ));
}

#[test]
fn real_cardiovascular_terms_and_pairs() {
    let obo = fetch(Asset::Hpo).unwrap();
    let terms = cardiovascular_terms(&obo).unwrap();
    let n = terms.len();
    assert!(
        (1_300..=1_400).contains(&n),
        "{n} cardiovascular defined terms"
    );
    assert!(terms.iter().any(|t| t.id == CARDIOVASCULAR_ROOT));
    assert!(terms
        .iter()
        .all(|t| !t.obsolete && !t.definition.is_empty()));
    assert!(terms.windows(2).all(|w| w[0].id < w[1].id));
    assert!(
        terms.iter().any(|t| t.definition.contains('"')),
        "escaped quotes are unescaped"
    );
    assert!(terms.iter().all(|t| !t.definition.contains("\\\"")));

    let pairs = preference_pairs(&terms);
    assert!(pairs.len() > n * 9 / 10, "{} pairs", pairs.len());
    assert!(pairs.iter().all(|p| p.chosen != p.rejected));
    let by_id: BTreeMap<&str, _> = terms.iter().map(|t| (t.id.as_str(), t)).collect();
    for p in &pairs {
        let (x, y) = (by_id[p.hpo_id.as_str()], by_id[p.rejected_hpo_id.as_str()]);
        assert!(
            x.parents.iter().any(|q| y.parents.contains(q)),
            "{} {}",
            x.id,
            y.id
        );
        assert_eq!(p.chosen, x.definition);
        assert_eq!(p.rejected, y.definition);
    }
    let (train, eval) = instruction_pairs(&terms, 0.1);
    let share = eval.len() as f64 / n as f64;
    assert!((share - 0.1).abs() <= 0.03, "held-out share {share}");
    assert_eq!(train.len() + eval.len(), n);
}
