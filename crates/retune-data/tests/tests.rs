//! Integration tests of retune-data, one module per source: hand-written snippets first,
//! then the real assets (fetched through `retune-assets`, cached after the first run).

mod data {
    mod brown;
    mod build;
    mod hpo;
    mod jsonl;
    mod pubmed;
}
