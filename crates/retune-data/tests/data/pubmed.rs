use flate2::write::GzEncoder;
use flate2::Compression;
use retune_assets::{fetch, Asset};
use retune_data::pubmed::{
    cardiology_corpus, cardiology_corpus_with_stats, is_cardiology, parse_pubmed_gz, split_by_pmid,
    PubmedArticle,
};
use retune_data::{in_eval, Error};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Three citations: a cardiology one found by MeSH (labelled abstract, inline markup, an
/// entity, a nested PMID and a non-English OtherAbstract that must be ignored), a
/// non-cardiology one, and a German one that would otherwise match.
pub(super) const SNIPPET: &str = r#"<?xml version="1.0" encoding="utf-8"?>
<!DOCTYPE PubmedArticleSet PUBLIC "-//NLM//DTD PubMedArticle, 1st January 2019//EN" "https://dtd.nlm.nih.gov/ncbi/pubmed/out/pubmed_190101.dtd">
<PubmedArticleSet>
  <PubmedArticle>
    <MedlineCitation Status="MEDLINE" Owner="NLM">
      <PMID Version="1">111</PMID>
      <Article PubModel="Print">
        <Journal>
          <Title>Journal of general testing</Title>
          <ISOAbbreviation>J Gen Test</ISOAbbreviation>
        </Journal>
        <ArticleTitle>Diuretics in <i>chronic</i> failure.</ArticleTitle>
        <Abstract>
          <AbstractText Label="BACKGROUND" NlmCategory="BACKGROUND">Patients with fluid overload
            need &amp; deserve care that is tested in trials of adequate size and length.</AbstractText>
          <AbstractText Label="RESULTS" NlmCategory="RESULTS">Loop diuretics relieved congestion in 80% of
            patients (p &lt; 0.01); 10<sup>3</sup> doses were given over the course of one year.</AbstractText>
          <AbstractText/>
          <CopyrightInformation>Copyright 2021 Nobody.</CopyrightInformation>
        </Abstract>
        <Language>eng</Language>
      </Article>
      <CommentsCorrectionsList>
        <CommentsCorrections RefType="CommentIn">
          <RefSource>Other J. 2020</RefSource>
          <PMID Version="1">999</PMID>
        </CommentsCorrections>
      </CommentsCorrectionsList>
      <MeshHeadingList>
        <MeshHeading>
          <DescriptorName UI="D006801" MajorTopicYN="N">Humans</DescriptorName>
        </MeshHeading>
        <MeshHeading>
          <DescriptorName UI="D006333" MajorTopicYN="Y">Heart Failure</DescriptorName>
          <QualifierName UI="Q000188" MajorTopicYN="N">drug therapy</QualifierName>
        </MeshHeading>
      </MeshHeadingList>
      <OtherAbstract Type="Publisher" Language="fre">
        <AbstractText>Un autre resume qui ne doit pas etre lu.</AbstractText>
      </OtherAbstract>
      <KeywordList Owner="NOTNLM">
        <Keyword MajorTopicYN="N">diuretics</Keyword>
        <Keyword MajorTopicYN="N">congestion</Keyword>
      </KeywordList>
    </MedlineCitation>
    <PubmedData>
      <ReferenceList><Reference><Citation>Ref.</Citation></Reference></ReferenceList>
    </PubmedData>
  </PubmedArticle>
  <PubmedArticle>
    <MedlineCitation Status="MEDLINE" Owner="NLM">
      <PMID Version="1">222</PMID>
      <Article PubModel="Print">
        <Journal><Title>Soil biology</Title><ISOAbbreviation>Soil Biol</ISOAbbreviation></Journal>
        <ArticleTitle>Nitrogen fixing bacteria in clay soils.</ArticleTitle>
        <Abstract>
          <AbstractText>We counted nitrogen fixing bacteria in forty clay soils sampled over three seasons and related the counts to moisture, temperature and the crops grown, finding that moisture explained most of the variation between the sites studied.</AbstractText>
        </Abstract>
        <Language>eng</Language>
      </Article>
      <MeshHeadingList>
        <MeshHeading><DescriptorName UI="D012987">Soil</DescriptorName></MeshHeading>
      </MeshHeadingList>
    </MedlineCitation>
  </PubmedArticle>
  <PubmedArticle>
    <MedlineCitation Status="MEDLINE" Owner="NLM">
      <PMID Version="1">333</PMID>
      <Article PubModel="Print">
        <Journal><Title>Herz</Title><ISOAbbreviation>Herz</ISOAbbreviation></Journal>
        <ArticleTitle>[Heart failure treated with diuretics].</ArticleTitle>
        <Abstract>
          <AbstractText>Patients with heart failure and fluid overload were treated with loop diuretics for a year; congestion improved in most of them and the dose needed fell over time in those who also restricted their salt intake.</AbstractText>
        </Abstract>
        <Language>ger</Language>
      </Article>
      <MeshHeadingList>
        <MeshHeading><DescriptorName UI="D006333">Heart Failure</DescriptorName></MeshHeading>
      </MeshHeadingList>
    </MedlineCitation>
  </PubmedArticle>
  <DeleteCitation><PMID Version="1">444</PMID></DeleteCitation>
</PubmedArticleSet>
"#;

pub(super) fn write_gz(path: &Path, xml: &str) {
    let mut gz = GzEncoder::new(Vec::new(), Compression::default());
    gz.write_all(xml.as_bytes()).unwrap();
    std::fs::write(path, gz.finish().unwrap()).unwrap();
}

fn snippet_dir() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pubmed99n0001.xml.gz");
    write_gz(&file, SNIPPET);
    (dir, file)
}

#[test]
fn snippet_fields_and_labelled_abstract() {
    let (_dir, file) = snippet_dir();
    let articles = parse_pubmed_gz(&file).unwrap();
    assert_eq!(articles.len(), 3);
    let a = &articles[0];
    assert_eq!(
        a.pmid, 111,
        "the nested CommentsCorrections PMID must not win"
    );
    assert_eq!(a.title, "Diuretics in chronic failure.");
    assert_eq!(
        a.abstract_text,
        "BACKGROUND: Patients with fluid overload need & deserve care that is tested in trials \
         of adequate size and length.\n\nRESULTS: Loop diuretics relieved congestion in 80% of \
         patients (p < 0.01); 103 doses were given over the course of one year."
    );
    assert_eq!(a.languages, ["eng"]);
    assert_eq!(a.journal_title, "Journal of general testing");
    assert_eq!(a.journal_iso, "J Gen Test");
    let mesh: Vec<_> = a
        .mesh
        .iter()
        .map(|d| (d.ui.as_str(), d.name.as_str()))
        .collect();
    assert_eq!(mesh, [("D006801", "Humans"), ("D006333", "Heart Failure")]);
    assert_eq!(a.keywords, ["diuretics", "congestion"]);
    assert_eq!(articles[1].pmid, 222);
    assert_eq!(articles[2].languages, ["ger"]);
}

#[test]
fn snippet_rule() {
    let (_dir, file) = snippet_dir();
    let articles = parse_pubmed_gz(&file).unwrap();
    assert_eq!(is_cardiology(&articles[0]), Some("mesh"));
    assert_eq!(is_cardiology(&articles[1]), None, "soil science");
    assert_eq!(is_cardiology(&articles[2]), None, "not English");
    let (corpus, stats) = cardiology_corpus_with_stats(file.parent().unwrap()).unwrap();
    assert_eq!(corpus.iter().map(|a| a.pmid).collect::<Vec<_>>(), [111]);
    assert_eq!((stats.articles, stats.eligible, stats.selected), (3, 2, 1));
    assert_eq!(stats.by_rule.get("mesh"), Some(&1));
}

fn english(title: &str, journal: &str, abstract_text: &str) -> PubmedArticle {
    PubmedArticle {
        pmid: 1,
        title: title.into(),
        abstract_text: abstract_text.into(),
        languages: vec!["eng".into()],
        journal_title: journal.into(),
        ..PubmedArticle::default()
    }
}

#[test]
fn journal_and_keyword_rules() {
    let plain = "We describe a study of a kind that could appear anywhere, with a method, a \
                 sample of adequate size, results that are reported in full and a discussion \
                 of their limits, so that the abstract is long enough to be kept by the rule.";
    assert_eq!(
        is_cardiology(&english(
            "A study.",
            "The American journal of cardiology",
            plain
        )),
        Some("journal")
    );
    assert_eq!(
        is_cardiology(&english(
            "A study.",
            "Journal of stroke and cerebrovascular diseases",
            plain
        )),
        None,
        "stroke journals are excluded"
    );
    assert_eq!(
        is_cardiology(&english("Atrial fibrillation in runners.", "Sports", plain)),
        Some("keyword"),
        "one keyword in the title is enough"
    );
    let two = format!("{plain} Cardiac output and coronary flow were measured.");
    let three = format!("{two} Echocardiographic findings were normal.");
    assert_eq!(is_cardiology(&english("A study.", "Sports", &two)), None);
    assert_eq!(
        is_cardiology(&english("A study.", "Sports", &three)),
        Some("keyword")
    );
    assert_eq!(
        is_cardiology(&english("Atrial fibrillation.", "Sports", "Too short.")),
        None,
        "abstracts under 200 characters are dropped"
    );
}

#[test]
fn malformed_input_is_a_typed_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.xml.gz");
    write_gz(
        &bad,
        "<PubmedArticleSet><PubmedArticle><MedlineCitation></Oops>",
    );
    let err = parse_pubmed_gz(&bad).unwrap_err();
    assert!(matches!(err, Error::Xml { .. }), "{err:?}");
    assert!(err.to_string().contains("bad.xml.gz"), "{err}");

    let no_pmid = dir.path().join("nopmid.xml.gz");
    write_gz(
        &no_pmid,
        "<PubmedArticleSet><PubmedArticle><MedlineCitation/></PubmedArticle></PubmedArticleSet>",
    );
    let err = parse_pubmed_gz(&no_pmid).unwrap_err();
    assert!(matches!(err, Error::Pubmed { .. }), "{err:?}");
    assert!(err.to_string().contains("nopmid.xml.gz"), "{err}");

    let not_gz = dir.path().join("plain.xml.gz");
    std::fs::write(&not_gz, "not gzip").unwrap();
    assert!(parse_pubmed_gz(&not_gz).is_err());
    let empty = tempfile::tempdir().unwrap();
    assert!(matches!(
        cardiology_corpus(empty.path()),
        Err(Error::Source { .. })
    ));
}

#[test]
fn real_cardiology_corpus_is_plausible_and_deterministic() {
    let dir = fetch(Asset::PubMed).unwrap();
    let (corpus, stats) = cardiology_corpus_with_stats(&dir).unwrap();
    let n = corpus.len();
    assert!((1_000..=3_000).contains(&n), "{n} cardiology abstracts");
    assert_eq!(stats.selected, n);
    assert_eq!(stats.by_rule.values().sum::<usize>(), n + stats.duplicates);
    assert!(
        corpus.windows(2).all(|w| w[0].pmid < w[1].pmid),
        "sorted, unique"
    );
    assert!(corpus.iter().all(|a| is_cardiology(a).is_some()));
    assert_eq!(cardiology_corpus(&dir).unwrap(), corpus, "two calls agree");

    let (train, eval) = split_by_pmid(corpus.clone(), 0.1);
    assert_eq!(train.len() + eval.len(), n);
    let share = eval.len() as f64 / n as f64;
    assert!((share - 0.1).abs() <= 0.03, "eval share {share}");
    assert!(eval.iter().all(|a| in_eval(&a.pmid.to_string(), 0.1)));
    assert!(train.iter().all(|a| !in_eval(&a.pmid.to_string(), 0.1)));
    // The side depends on the PMID alone, not on what else is split with it.
    let (_, eval_rev) = split_by_pmid(corpus.into_iter().rev().collect(), 0.1);
    let mut a: Vec<u64> = eval.iter().map(|a| a.pmid).collect();
    let mut b: Vec<u64> = eval_rev.iter().map(|a| a.pmid).collect();
    a.sort();
    b.sort();
    assert_eq!(a, b);
}
