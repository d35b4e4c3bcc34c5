//! PubMed baseline XML (`PubmedArticleSet/PubmedArticle/MedlineCitation`) and the cardiology
//! subset of it.
//!
//! [`parse_pubmed_gz`] streams a gzipped file into [`PubmedArticle`]s. [`is_cardiology`] is the
//! selection rule: an English abstract of at least [`MIN_ABSTRACT_CHARS`] characters that
//! matches, checked in this order,
//! 1. `"mesh"`: a MeSH descriptor in [`CARDIOVASCULAR_MESH`] (by UI or by name),
//! 2. `"journal"`: a journal whose title or ISO abbreviation contains a stem in
//!    [`CARDIOLOGY_JOURNAL_STEMS`] and none in [`NON_CARDIOLOGY_JOURNAL_STEMS`],
//! 3. `"keyword"`: a term of [`CARDIOLOGY_KEYWORDS`] in the title, or at least
//!    [`MIN_ABSTRACT_KEYWORD_HITS`] occurrences of such terms in the abstract.
//!
//! [`cardiology_corpus`] applies it to every `.xml.gz` file of a folder; [`split_by_pmid`]
//! splits by [`crate::hash_unit`] of the decimal PMID.

use crate::{io_err, Error, Result};
use flate2::read::MultiGzDecoder;
use quick_xml::escape::resolve_predefined_entity;
use quick_xml::events::{BytesStart, Event};
use quick_xml::Reader;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

/// A MeSH descriptor attached to a citation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MeshDescriptor {
    /// Descriptor UI, e.g. `D006333`.
    pub ui: String,
    /// Descriptor name, e.g. `Heart Failure`.
    pub name: String,
}

/// The fields of one `PubmedArticle` that the datasets use. Text has its whitespace collapsed
/// and inline markup (`<i>`, `<sup>`, ...) dropped, keeping the text inside it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PubmedArticle {
    /// `MedlineCitation/PMID`.
    pub pmid: u64,
    /// `Article/ArticleTitle`.
    pub title: String,
    /// `Article/Abstract/AbstractText` sections joined by a blank line, each labelled section
    /// written `LABEL: text`. Empty when the citation has no abstract.
    pub abstract_text: String,
    /// `Article/Language` codes, e.g. `eng`.
    pub languages: Vec<String>,
    /// `Article/Journal/Title`.
    pub journal_title: String,
    /// `Article/Journal/ISOAbbreviation`.
    pub journal_iso: String,
    /// `MeshHeadingList/MeshHeading/DescriptorName`, in document order.
    pub mesh: Vec<MeshDescriptor>,
    /// `KeywordList/Keyword`, in document order.
    pub keywords: Vec<String>,
}

/// Shortest abstract (in characters) the corpus keeps.
pub const MIN_ABSTRACT_CHARS: usize = 200;

/// Occurrences of [`CARDIOLOGY_KEYWORDS`] terms an abstract needs when the title has none.
pub const MIN_ABSTRACT_KEYWORD_HITS: usize = 3;

/// Cardiovascular MeSH descriptors (UI, name): heart and coronary diseases, arrhythmias,
/// hypertension, valve and aortic disease, atherosclerosis, cardiac anatomy, diagnostics,
/// procedures and drug classes. Cerebrovascular and peripheral venous descriptors are left
/// out on purpose. A descriptor matches by UI or, case-insensitively, by name (older
/// citations carry older names, e.g. D000784 "Aneurysm, Dissecting").
pub const CARDIOVASCULAR_MESH: &[(&str, &str)] = &[
    ("D002318", "Cardiovascular Diseases"),
    ("D006331", "Heart Diseases"),
    ("D001145", "Arrhythmias, Cardiac"),
    ("D001281", "Atrial Fibrillation"),
    ("D001282", "Atrial Flutter"),
    ("D013610", "Tachycardia"),
    ("D017180", "Tachycardia, Ventricular"),
    ("D013617", "Tachycardia, Supraventricular"),
    ("D014693", "Ventricular Fibrillation"),
    ("D018879", "Ventricular Premature Complexes"),
    ("D001919", "Bradycardia"),
    ("D006327", "Heart Block"),
    ("D054537", "Atrioventricular Block"),
    ("D002037", "Bundle-Branch Block"),
    ("D014927", "Wolff-Parkinson-White Syndrome"),
    ("D012804", "Sick Sinus Syndrome"),
    ("D008133", "Long QT Syndrome"),
    ("D006323", "Heart Arrest"),
    ("D016757", "Death, Sudden, Cardiac"),
    ("D006333", "Heart Failure"),
    ("D012770", "Shock, Cardiogenic"),
    ("D018487", "Ventricular Dysfunction, Left"),
    ("D009203", "Myocardial Infarction"),
    ("D017202", "Myocardial Ischemia"),
    ("D054058", "Acute Coronary Syndrome"),
    ("D000787", "Angina Pectoris"),
    ("D003327", "Coronary Disease"),
    ("D003324", "Coronary Artery Disease"),
    ("D023921", "Coronary Stenosis"),
    ("D015428", "Myocardial Reperfusion Injury"),
    ("D009202", "Cardiomyopathies"),
    ("D002311", "Cardiomyopathy, Dilated"),
    ("D002312", "Cardiomyopathy, Hypertrophic"),
    ("D054549", "Takotsubo Cardiomyopathy"),
    ("D009205", "Myocarditis"),
    ("D004696", "Endocarditis"),
    ("D004697", "Endocarditis, Bacterial"),
    ("D010493", "Pericarditis"),
    ("D010490", "Pericardial Effusion"),
    ("D002305", "Cardiac Tamponade"),
    ("D006349", "Heart Valve Diseases"),
    ("D001024", "Aortic Valve Stenosis"),
    ("D001022", "Aortic Valve Insufficiency"),
    ("D008944", "Mitral Valve Insufficiency"),
    ("D008946", "Mitral Valve Stenosis"),
    ("D008945", "Mitral Valve Prolapse"),
    ("D012214", "Rheumatic Heart Disease"),
    ("D006330", "Heart Defects, Congenital"),
    ("D006344", "Heart Septal Defects, Atrial"),
    ("D006345", "Heart Septal Defects, Ventricular"),
    ("D013771", "Tetralogy of Fallot"),
    ("D006332", "Cardiomegaly"),
    ("D017379", "Hypertrophy, Left Ventricular"),
    ("D006973", "Hypertension"),
    ("D006976", "Hypertension, Pulmonary"),
    ("D050197", "Atherosclerosis"),
    ("D001161", "Arteriosclerosis"),
    ("D001014", "Aortic Aneurysm"),
    ("D000784", "Aortic Dissection"),
    ("D001017", "Aortic Coarctation"),
    ("D006321", "Heart"),
    ("D009206", "Myocardium"),
    ("D006352", "Heart Ventricles"),
    ("D006325", "Heart Atria"),
    ("D003331", "Coronary Vessels"),
    ("D006329", "Heart Conduction System"),
    ("D004562", "Electrocardiography"),
    ("D015716", "Electrocardiography, Ambulatory"),
    ("D004452", "Echocardiography"),
    ("D015150", "Echocardiography, Doppler"),
    ("D006328", "Cardiac Catheterization"),
    ("D017023", "Coronary Angiography"),
    ("D006348", "Cardiac Surgical Procedures"),
    ("D001026", "Coronary Artery Bypass"),
    ("D062645", "Percutaneous Coronary Intervention"),
    ("D015906", "Angioplasty, Balloon, Coronary"),
    ("D065467", "Transcatheter Aortic Valve Replacement"),
    ("D019918", "Heart Valve Prosthesis Implantation"),
    ("D006350", "Heart Valve Prosthesis"),
    ("D002304", "Cardiac Pacing, Artificial"),
    ("D010138", "Pacemaker, Artificial"),
    ("D017147", "Defibrillators, Implantable"),
    ("D017115", "Catheter Ablation"),
    ("D016027", "Heart Transplantation"),
    ("D000889", "Anti-Arrhythmia Agents"),
    ("D000959", "Antihypertensive Agents"),
    ("D002316", "Cardiotonic Agents"),
    ("D002309", "Cardiology"),
];

/// Lower-case stems; a journal whose title or ISO abbreviation contains one (as a substring,
/// case-insensitively) is a cardiology journal.
pub const CARDIOLOGY_JOURNAL_STEMS: &[&str] = &[
    "cardio",
    "cardiac",
    "heart",
    "circulation",
    "arrhythm",
    "echocardiogr",
    "hypertens",
    "atheroscler",
    "vasc",
    "coronary",
    "angiol",
    "card ",
    "card.",
];

/// Journals whose title contains one of these (case-insensitively) are not cardiology
/// journals even when they contain a stem: stroke and cerebrovascular journals are neurology.
pub const NON_CARDIOLOGY_JOURNAL_STEMS: &[&str] = &["stroke", "cerebrovasc"];

/// Lower-case terms matched as whole words in the title and abstract; a trailing `*` makes
/// the term a stem (a word that starts with it), e.g. `echocardiogra*` matches
/// "echocardiography" and "echocardiographic".
pub const CARDIOLOGY_KEYWORDS: &[&str] = &[
    "atrial fibrillation",
    "atrial flutter",
    "myocardial infarction",
    "myocardial ischemia",
    "myocardial ischaemia",
    "heart failure",
    "heart disease",
    "heart diseases",
    "coronary",
    "cardiac",
    "cardiovascular",
    "cardiolog*",
    "cardiomyopath*",
    "arrhythmi*",
    "left ventricle",
    "left ventricular",
    "right ventricle",
    "right ventricular",
    "ventricular tachycardia",
    "ventricular fibrillation",
    "ventricular arrhythmia*",
    "hypertension",
    "hypertensive",
    "echocardiogra*",
    "electrocardiogra*",
    "angina",
    "atheroscleros*",
    "atherosclerotic",
    "myocarditis",
    "endocarditis",
    "pericardi*",
    "tachycardi*",
    "bradycardi*",
    "mitral",
    "tricuspid",
    "aortic stenosis",
    "aortic valve",
    "angioplasty",
    "pacemaker*",
    "defibrillat*",
    "ejection fraction",
];

/// Reads every `PubmedArticle` of a gzipped PubMed XML file.
pub fn parse_pubmed_gz(path: &Path) -> Result<Vec<PubmedArticle>> {
    let file = File::open(path).map_err(io_err(path))?;
    let xml = BufReader::with_capacity(1 << 16, MultiGzDecoder::new(file));
    parse_pubmed_xml(xml, path)
}

/// Which field the text being read belongs to.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Field {
    Pmid,
    Title,
    Abstract,
    Language,
    JournalTitle,
    JournalIso,
    Descriptor,
    Keyword,
}

/// Element paths relative to `PubmedArticle` whose text is kept.
const FIELDS: &[(&[&str], Field)] = &[
    (&["MedlineCitation", "PMID"], Field::Pmid),
    (
        &["MedlineCitation", "Article", "ArticleTitle"],
        Field::Title,
    ),
    (
        &["MedlineCitation", "Article", "Abstract", "AbstractText"],
        Field::Abstract,
    ),
    (&["MedlineCitation", "Article", "Language"], Field::Language),
    (
        &["MedlineCitation", "Article", "Journal", "Title"],
        Field::JournalTitle,
    ),
    (
        &["MedlineCitation", "Article", "Journal", "ISOAbbreviation"],
        Field::JournalIso,
    ),
    (
        &[
            "MedlineCitation",
            "MeshHeadingList",
            "MeshHeading",
            "DescriptorName",
        ],
        Field::Descriptor,
    ),
    (
        &["MedlineCitation", "KeywordList", "Keyword"],
        Field::Keyword,
    ),
];

/// The text being collected for one field, with the attribute it needs (a section label or a
/// descriptor UI).
struct Capture {
    field: Field,
    depth: usize,
    attr: String,
    text: String,
}

/// An article being read: its fields so far and its abstract sections.
#[derive(Default)]
struct Partial {
    article: PubmedArticle,
    pmid: Option<String>,
    sections: Vec<String>,
}

/// Reads every `PubmedArticle` of an uncompressed PubMed XML stream; `path` names the source
/// in errors.
pub fn parse_pubmed_xml<R: BufRead>(xml: R, path: &Path) -> Result<Vec<PubmedArticle>> {
    let mut reader = Reader::from_reader(xml);
    let mut buf = Vec::new();
    let mut stack: Vec<String> = Vec::new();
    let mut depth = 0;
    // Depth of the open `PubmedArticle` element in `stack`, while inside one.
    let mut article_at: Option<usize> = None;
    let mut partial = Partial::default();
    let mut capture: Option<Capture> = None;
    let mut articles = Vec::new();
    let xml_err = |reader: &Reader<R>, source| Error::Xml {
        path: path.to_path_buf(),
        position: reader.error_position(),
        source,
    };
    loop {
        let event = match reader.read_event_into(&mut buf) {
            Ok(event) => event,
            Err(source) => return Err(xml_err(&reader, source)),
        };
        match event {
            Event::Start(start) => {
                let name = start.name().0;
                // The open elements are `stack[..depth]`; their Strings are reused.
                match stack.get_mut(depth) {
                    Some(slot) => {
                        slot.clear();
                        slot.push_str(name);
                    }
                    None => stack.push(name.to_string()),
                }
                depth += 1;
                if article_at.is_none() && name == "PubmedArticle" {
                    article_at = Some(depth - 1);
                    partial = Partial::default();
                } else if let (Some(at), None) = (article_at, &capture) {
                    if let Some(field) = field_at(&stack[at + 1..depth]) {
                        capture = Some(Capture {
                            field,
                            depth,
                            attr: field_attr(field, &start, path, &reader)?,
                            text: String::new(),
                        });
                    }
                }
            }
            Event::End(_) => {
                if let Some(c) = capture.take_if(|c| c.depth == depth) {
                    store(&mut partial, c);
                }
                depth = depth.saturating_sub(1);
                if article_at.is_some_and(|at| at == depth) {
                    article_at = None;
                    let done = std::mem::take(&mut partial);
                    articles.push(finish(done, path, reader.buffer_position())?);
                }
            }
            Event::Text(text) => {
                if let Some(c) = capture.as_mut() {
                    c.text.push_str(&text);
                }
            }
            Event::CData(text) => {
                if let Some(c) = capture.as_mut() {
                    c.text.push_str(&text);
                }
            }
            Event::GeneralRef(reference) => {
                if let Some(c) = capture.as_mut() {
                    match reference.resolve_char_ref() {
                        Ok(Some(ch)) => c.text.push(ch),
                        Ok(None) => match resolve_predefined_entity(&reference) {
                            Some(s) => c.text.push_str(s),
                            // An entity the DTD would define: keep it as written.
                            None => {
                                c.text.push('&');
                                c.text.push_str(&reference);
                                c.text.push(';');
                            }
                        },
                        Err(source) => return Err(xml_err(&reader, source)),
                    }
                }
            }
            Event::Eof => break,
            _ => {}
        }
        buf.clear();
    }
    if article_at.is_some() {
        return Err(Error::Pubmed {
            path: path.to_path_buf(),
            position: reader.buffer_position(),
            reason: "the file ends inside a PubmedArticle".into(),
        });
    }
    Ok(articles)
}

fn field_at(rel: &[String]) -> Option<Field> {
    FIELDS.iter().find_map(|(p, f)| {
        (p.len() == rel.len() && p.iter().zip(rel).all(|(a, b)| *a == b.as_str())).then_some(*f)
    })
}

/// The attribute a field needs: `Label` of an abstract section, `UI` of a descriptor.
fn field_attr<R>(
    field: Field,
    start: &BytesStart,
    path: &Path,
    reader: &Reader<R>,
) -> Result<String> {
    let name = match field {
        Field::Abstract => "Label",
        Field::Descriptor => "UI",
        _ => return Ok(String::new()),
    };
    let attr = start.try_get_attribute(name).map_err(|e| Error::Xml {
        path: path.to_path_buf(),
        position: reader.buffer_position(),
        source: e.into(),
    })?;
    match attr {
        None => Ok(String::new()),
        Some(a) => a
            .normalized_value(quick_xml::XmlVersion::Implicit1_0)
            .map(|v| collapse_ws(&v))
            .map_err(|source| Error::Xml {
                path: path.to_path_buf(),
                position: reader.buffer_position(),
                source,
            }),
    }
}

/// Collapses runs of whitespace into one space and trims.
fn collapse_ws(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn store(p: &mut Partial, c: Capture) {
    let text = collapse_ws(&c.text);
    let a = &mut p.article;
    match c.field {
        Field::Pmid => p.pmid = Some(text),
        Field::Title => a.title = text,
        Field::Abstract if text.is_empty() => {}
        Field::Abstract if c.attr.is_empty() => p.sections.push(text),
        Field::Abstract => p.sections.push(format!("{}: {text}", c.attr)),
        Field::Language => a.languages.push(text),
        Field::JournalTitle => a.journal_title = text,
        Field::JournalIso => a.journal_iso = text,
        Field::Descriptor => a.mesh.push(MeshDescriptor {
            ui: c.attr,
            name: text,
        }),
        Field::Keyword if text.is_empty() => {}
        Field::Keyword => a.keywords.push(text),
    }
}

fn finish(p: Partial, path: &Path, position: u64) -> Result<PubmedArticle> {
    let bad = |reason: String| Error::Pubmed {
        path: path.to_path_buf(),
        position,
        reason,
    };
    let pmid = p
        .pmid
        .ok_or_else(|| bad("a PubmedArticle has no MedlineCitation/PMID".into()))?;
    let pmid = pmid
        .parse::<u64>()
        .map_err(|_| bad(format!("PMID `{pmid}` is not a number")))?;
    let mut article = p.article;
    article.pmid = pmid;
    article.abstract_text = p.sections.join("\n\n");
    Ok(article)
}

/// English (`Language` includes `eng`) with an abstract of at least [`MIN_ABSTRACT_CHARS`]
/// characters.
pub fn is_eligible(a: &PubmedArticle) -> bool {
    a.languages.iter().any(|l| l.eq_ignore_ascii_case("eng"))
        && a.abstract_text.chars().count() >= MIN_ABSTRACT_CHARS
}

/// The cardiology rule (see the module docs): `None` for an article that is not
/// [`is_eligible`] or matches no rule, else the first rule that matched: `"mesh"`,
/// `"journal"` or `"keyword"`.
pub fn is_cardiology(a: &PubmedArticle) -> Option<&'static str> {
    if !is_eligible(a) {
        return None;
    }
    if cardiovascular_descriptor(a).is_some() {
        return Some("mesh");
    }
    if is_cardiology_journal(a) {
        return Some("journal");
    }
    let title_hits = keyword_hits(&a.title.to_lowercase());
    let abstract_hits = keyword_hits(&a.abstract_text.to_lowercase());
    if title_hits > 0 || abstract_hits >= MIN_ABSTRACT_KEYWORD_HITS {
        return Some("keyword");
    }
    None
}

/// The first descriptor of `a` that is in [`CARDIOVASCULAR_MESH`], as listed there.
pub fn cardiovascular_descriptor(a: &PubmedArticle) -> Option<&'static str> {
    a.mesh.iter().find_map(|d| {
        CARDIOVASCULAR_MESH
            .iter()
            .find(|(ui, name)| d.ui == *ui || d.name.eq_ignore_ascii_case(name))
            .map(|(_, name)| *name)
    })
}

/// Whether the journal title or ISO abbreviation contains a [`CARDIOLOGY_JOURNAL_STEMS`] stem
/// and no [`NON_CARDIOLOGY_JOURNAL_STEMS`] one.
pub fn is_cardiology_journal(a: &PubmedArticle) -> bool {
    let title = format!("{} | {}", a.journal_title, a.journal_iso).to_lowercase();
    CARDIOLOGY_JOURNAL_STEMS.iter().any(|s| title.contains(s))
        && !NON_CARDIOLOGY_JOURNAL_STEMS
            .iter()
            .any(|s| title.contains(s))
}

/// Occurrences of [`CARDIOLOGY_KEYWORDS`] terms in lower-case `text`, each a whole word (or a
/// word starting with a `*` stem).
pub fn keyword_hits(text: &str) -> usize {
    let bytes = text.as_bytes();
    let mut hits = 0;
    for (i, &b) in bytes.iter().enumerate() {
        // Every term starts with an ASCII letter, so `i` is a char boundary where one can.
        if !b.is_ascii_lowercase() {
            continue;
        }
        let after_word = match i.checked_sub(1).map(|j| bytes[j]) {
            None => false,
            Some(p) if p.is_ascii() => p.is_ascii_alphanumeric(),
            Some(_) => text[..i]
                .chars()
                .next_back()
                .is_some_and(char::is_alphanumeric),
        };
        if after_word {
            continue;
        }
        for k in CARDIOLOGY_KEYWORDS {
            if k.as_bytes()[0] != b {
                continue;
            }
            let (term, stem) = match k.strip_suffix('*') {
                Some(t) => (t, true),
                None => (*k, false),
            };
            if text[i..].starts_with(term)
                && (stem
                    || !text[i + term.len()..]
                        .chars()
                        .next()
                        .is_some_and(char::is_alphanumeric))
            {
                hits += 1;
            }
        }
    }
    hits
}

/// How the cardiology corpus was selected, for the manifest.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CorpusStats {
    /// `.xml.gz` files read, in the order read.
    pub files: Vec<String>,
    /// `PubmedArticle` records read.
    pub articles: usize,
    /// Records with a non-empty abstract.
    pub with_abstract: usize,
    /// Records passing [`is_eligible`].
    pub eligible: usize,
    /// Selected records per rule (`mesh`, `journal`, `keyword`), before de-duplication.
    pub by_rule: BTreeMap<String, usize>,
    /// Selected records dropped because their PMID was seen already.
    pub duplicates: usize,
    /// Articles in the corpus.
    pub selected: usize,
}

/// The `.xml.gz` files of `dir`, sorted by name.
pub fn pubmed_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let path = entry.map_err(io_err(dir))?.path();
        if path.to_string_lossy().ends_with(".xml.gz") {
            files.push(path);
        }
    }
    files.sort();
    if files.is_empty() {
        return Err(Error::Source {
            path: dir.to_path_buf(),
            reason: "holds no .xml.gz PubMed files".into(),
        });
    }
    Ok(files)
}

/// The English cardiology abstracts ([`is_cardiology`]) of every `.xml.gz` file in
/// `pubmed_dir`, sorted by PMID, one per PMID.
pub fn cardiology_corpus(pubmed_dir: &Path) -> Result<Vec<PubmedArticle>> {
    cardiology_corpus_with_stats(pubmed_dir).map(|(articles, _)| articles)
}

/// [`cardiology_corpus`] with the counts behind it. Files are read and filtered in parallel,
/// then combined in sorted file order; when a PMID occurs twice, the record from the later
/// file (a newer baseline) is kept.
pub fn cardiology_corpus_with_stats(
    pubmed_dir: &Path,
) -> Result<(Vec<PubmedArticle>, CorpusStats)> {
    let files = pubmed_files(pubmed_dir)?;
    let per_file: Vec<Result<(CorpusStats, Vec<PubmedArticle>)>> = std::thread::scope(|s| {
        let handles: Vec<_> = files
            .iter()
            .map(|f| s.spawn(move || select_file(f)))
            .collect();
        handles
            .into_iter()
            .zip(&files)
            .map(|(h, f)| {
                h.join().unwrap_or_else(|_| {
                    Err(Error::Source {
                        path: f.clone(),
                        reason: "the parser thread panicked".into(),
                    })
                })
            })
            .collect()
    });
    let mut stats = CorpusStats::default();
    let mut by_pmid = BTreeMap::new();
    for file in per_file {
        let (s, selected) = file?;
        stats.files.extend(s.files);
        stats.articles += s.articles;
        stats.with_abstract += s.with_abstract;
        stats.eligible += s.eligible;
        for (rule, n) in s.by_rule {
            *stats.by_rule.entry(rule).or_default() += n;
        }
        for a in selected {
            if by_pmid.insert(a.pmid, a).is_some() {
                stats.duplicates += 1;
            }
        }
    }
    stats.selected = by_pmid.len();
    Ok((by_pmid.into_values().collect(), stats))
}

/// The cardiology articles of one file, in file order, with that file's counts.
fn select_file(path: &Path) -> Result<(CorpusStats, Vec<PubmedArticle>)> {
    let mut stats = CorpusStats {
        files: vec![path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into()],
        ..CorpusStats::default()
    };
    let mut selected = Vec::new();
    for a in parse_pubmed_gz(path)? {
        stats.articles += 1;
        stats.with_abstract += usize::from(!a.abstract_text.is_empty());
        stats.eligible += usize::from(is_eligible(&a));
        if let Some(rule) = is_cardiology(&a) {
            *stats.by_rule.entry(rule.to_string()).or_default() += 1;
            selected.push(a);
        }
    }
    stats.selected = selected.len();
    Ok((stats, selected))
}

/// Splits `articles` into (train, eval): an article goes to eval when
/// [`crate::in_eval`] of its decimal PMID holds for `eval_fraction`. Order is kept.
pub fn split_by_pmid(
    articles: Vec<PubmedArticle>,
    eval_fraction: f64,
) -> (Vec<PubmedArticle>, Vec<PubmedArticle>) {
    let (eval, train) = articles
        .into_iter()
        .partition(|a| crate::in_eval(&a.pmid.to_string(), eval_fraction));
    (train, eval)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keywords_match_whole_words_and_stems() {
        assert_eq!(keyword_hits("the coronary arteries"), 1);
        assert_eq!(keyword_hits("intraventricular haemorrhage"), 0);
        assert_eq!(keyword_hits("echocardiographic and echocardiography"), 2);
        assert_eq!(keyword_hits("cardiacs"), 0);
        assert_eq!(keyword_hits("atrial fibrillation (af)"), 1);
    }
}
