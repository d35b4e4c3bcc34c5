use retune_assets::{fetch, Asset};
use retune_data::brown::{brown_text, untag, word_count};
use retune_data::Error;
use std::path::Path;

const TAGGED: &str =
    "\n\n\tThe/at jury/nn said/vbd ``/`` it/pps was/bedz 1-1/2/cd miles/nns ''/'' ,/, \
(/( not/* far/rb )/) ;/. Atlanta's/np$ ``/`` best/jjt ''/'' !/.\n\
It/pps ended/vbd ,/, said/vbd Ivan/np Allen/np Jr./np ./.\n\n\n\
Headline/nn-hl here/rb-hl \n\
\tNew/jj paragraph/nn :/: yes/rb ?/.\n";

#[test]
fn snippet_untags_and_detokenises() {
    let text = untag(TAGGED, Path::new("ca99")).unwrap();
    assert_eq!(
        text,
        "The jury said \"it was 1-1/2 miles\", (not far); Atlanta's \"best\"!\n\
         It ended, said Ivan Allen Jr.\n\
         \n\
         Headline here\n\
         New paragraph: yes?\n"
    );
    assert_eq!(word_count(&text), 22);
}

#[test]
fn bad_token_is_a_typed_error_with_the_line() {
    let err = untag("\n\tgood/jj\n\tbad token/nn\n", Path::new("cz01")).unwrap_err();
    assert!(matches!(err, Error::Parse { line: 3, .. }), "{err:?}");
    assert!(err.to_string().starts_with("cz01:3:"), "{err}");
}

#[test]
fn only_corpus_files_in_sorted_order() {
    let dir = tempfile::tempdir().unwrap();
    for (name, body) in [
        ("cb02", "Second/ap ./.\n"),
        ("ca01", "First/od ./.\n"),
        ("README", "not/a corpus/file"),
        ("CONTENTS", "no"),
        ("package.json", "{}"),
    ] {
        std::fs::write(dir.path().join(name), body).unwrap();
    }
    let all = brown_text(dir.path(), None).unwrap();
    assert_eq!(
        all,
        [
            ("ca01".to_string(), "First.\n".to_string()),
            ("cb02".to_string(), "Second.\n".to_string())
        ]
    );
    assert_eq!(brown_text(dir.path(), Some(1)).unwrap().len(), 1);
    let empty = tempfile::tempdir().unwrap();
    assert!(matches!(
        brown_text(empty.path(), None),
        Err(Error::Source { .. })
    ));
}

#[test]
fn real_brown_ca01_and_counts() {
    let dir = fetch(Asset::BrownCorpus).unwrap();
    let all = brown_text(&dir, None).unwrap();
    assert_eq!(all.len(), 500);
    assert_eq!(all[0].0, "ca01");
    assert_eq!(all[499].0, "cr09");
    let first_line = all[0].1.lines().next().unwrap();
    assert_eq!(
        first_line,
        "The Fulton County Grand Jury said Friday an investigation of Atlanta's recent primary \
         election produced \"no evidence\" that any irregularities took place."
    );
    assert!(all
        .iter()
        .all(|(_, t)| !t.contains("/nn ") && !t.contains("/at ")));
    let words: usize = all.iter().map(|(_, t)| word_count(t)).sum();
    assert!((900_000..1_100_000).contains(&words), "{words} words");
    let first25: usize = all[..25].iter().map(|(_, t)| word_count(t)).sum();
    assert!(
        (45_000..55_000).contains(&first25),
        "{first25} words in 25 files"
    );
}
