//! Model names as users type them: `--model OWNER/NAME[@REV][:QUANT]` found in a Hugging Face
//! cache laid out as `huggingface_hub` does (refs → snapshots → links into blobs), `--model
//! builtin`, `flashmoe models --json`, and `flashmoe pull` against a local server that speaks the
//! Hub's URL layout (including a download cut in the middle and resumed).

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

const SHA: &str = "0123456789abcdef0123456789abcdef01234567";
const OLD_SHA: &str = "89abcdef0123456789abcdef0123456789abcdef";

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/models/qwen35-moe-tiny")
}

/// The flashmoe binary with the Hugging Face cache and flashmoe's cache in `tmp`.
fn flashmoe(tmp: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_flashmoe"))
        .args(args)
        .env("HF_HUB_CACHE", tmp.join("hub"))
        .env("FLASHMOE_HOME", tmp.join("flashmoe"))
        .env_remove("HF_ENDPOINT")
        .env_remove("HF_TOKEN")
        .env_remove("FLASHMOE_URL")
        .output()
        .unwrap()
}

fn ok(o: &Output) -> (String, String) {
    let (out, err) = (String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned());
    assert!(o.status.success(), "stderr: {err}");
    (out, err)
}

/// The one-line error of a command that must fail cleanly.
fn error_line(o: &Output) -> String {
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.starts_with("[flashmoe] ")).collect();
    assert_eq!(lines.len(), 1, "one error line expected: {err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    lines[0].to_string()
}

/// Puts `files` (name → bytes) into the cache as `huggingface_hub` does: each file a blob named
/// by its etag, the snapshot entry a relative link to it, `refs/<rev>` holding the commit.
fn cache_repo(hub: &Path, repo: &str, commit: &str, refs: &[&str], files: &[(&str, Vec<u8>)]) -> PathBuf {
    let dir = hub.join(format!("models--{}", repo.replace('/', "--")));
    let snapshot = dir.join("snapshots").join(commit);
    std::fs::create_dir_all(dir.join("blobs")).unwrap();
    for (name, bytes) in files {
        let etag = format!("{:016x}{:08x}", fnv(bytes), bytes.len());
        std::fs::write(dir.join("blobs").join(&etag), bytes).unwrap();
        let link = snapshot.join(name);
        std::fs::create_dir_all(link.parent().unwrap()).unwrap();
        let depth = name.matches('/').count() + 2;
        let target = format!("{}blobs/{etag}", "../".repeat(depth));
        std::os::unix::fs::symlink(target, &link).unwrap();
    }
    for r in refs {
        std::fs::create_dir_all(dir.join("refs")).unwrap();
        std::fs::write(dir.join("refs").join(r), commit).unwrap();
    }
    snapshot
}

fn fnv(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf29ce484222325u64, |h, &x| (h ^ x as u64).wrapping_mul(0x100000001b3))
}

fn fixture_files() -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(fixture())
        .unwrap()
        .flatten()
        .map(|e| (e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).unwrap()))
        .filter(|(n, _)| n != "reference.json")
        .collect();
    v.sort();
    v
}

fn as_refs(v: &[(String, Vec<u8>)]) -> Vec<(&str, Vec<u8>)> {
    v.iter().map(|(n, b)| (n.as_str(), b.clone())).collect()
}

fn run_text(tmp: &Path, model: &str) -> String {
    // Greedy: the texts of two runs are compared (the built-in model samples by default).
    let o = flashmoe(
        tmp,
        &["run", "--model", model, "--prompt", "Hello", "--raw", "--max-tokens", "6", "--temperature", "0"],
    );
    ok(&o).0
}

#[test]
fn hub_names_resolve_in_the_hugging_face_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = tmp.path().join("hub");
    let files = fixture_files();
    cache_repo(&hub, "flashmoe-test/tiny", SHA, &["main"], &as_refs(&files));
    // An older revision, reachable by tag and by commit.
    cache_repo(&hub, "flashmoe-test/tiny", OLD_SHA, &["v0.1"], &as_refs(&files));

    let direct = run_text(tmp.path(), fixture().to_str().unwrap());
    assert!(!direct.is_empty());
    assert_eq!(run_text(tmp.path(), "flashmoe-test/tiny"), direct);
    assert_eq!(run_text(tmp.path(), "flashmoe-test/tiny@v0.1"), direct);
    assert_eq!(run_text(tmp.path(), &format!("flashmoe-test/tiny@{OLD_SHA}")), direct);

    // The resolved snapshot is named on stderr.
    let o = flashmoe(tmp.path(), &["run", "--model", "flashmoe-test/tiny@v0.1", "--prompt", "a", "--max-tokens", "1"]);
    let (_, err) = ok(&o);
    assert!(err.contains(&format!("snapshots/{OLD_SHA}")), "{err}");

    // `convert` takes the same names.
    let packed = tmp.path().join("packed");
    ok(&flashmoe(tmp.path(), &["convert", "flashmoe-test/tiny@v0.1", packed.to_str().unwrap()]));
    ok(&flashmoe(tmp.path(), &["verify", packed.to_str().unwrap()]));

    // Not in the cache: how to get it, and where we looked.
    let e = error_line(&flashmoe(tmp.path(), &["run", "--model", "nobody/nothing", "--prompt", "a"]));
    assert!(e.contains("flashmoe pull nobody/nothing"), "{e}");
    assert!(e.contains(hub.to_str().unwrap()) && e.contains("HF_HUB_CACHE"), "{e}");
    // A revision that is not there: the refs and snapshots that are.
    let e = error_line(&flashmoe(tmp.path(), &["info", "--model", "flashmoe-test/tiny@v9"]));
    assert!(e.contains("`v9`") && e.contains("main") && e.contains("v0.1") && e.contains(SHA), "{e}");
    assert!(e.contains("flashmoe pull flashmoe-test/tiny --revision v9"), "{e}");
    // HF_HOME/hub when HF_HUB_CACHE is not set.
    let o = Command::new(env!("CARGO_BIN_EXE_flashmoe"))
        .args(["info", "--model", "flashmoe-test/tiny"])
        .env_remove("HF_HUB_CACHE")
        .env("HF_HOME", tmp.path())
        .env("FLASHMOE_HOME", tmp.path().join("flashmoe"))
        .output()
        .unwrap();
    assert!(ok(&o).0.contains("experts"));
}

#[test]
fn quant_tags_pick_gguf_files() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = tmp.path().join("hub");
    let gguf = |n: usize| {
        let mut b = b"GGUF".to_vec();
        b.resize(n, 7);
        b
    };
    let repo = "unsloth/Tiny-GGUF";
    let files = [
        ("Tiny-Q8_0.gguf", gguf(100)),
        ("Q4_K_M/Tiny-Q4_K_M-00001-of-00002.gguf", gguf(300)),
        ("Q4_K_M/Tiny-Q4_K_M-00002-of-00002.gguf", gguf(200)),
        ("Tiny-UD-Q4_K_XL.gguf", gguf(150)),
        ("mmproj-F16.gguf", gguf(50)),
        ("README.md", b"# Tiny".to_vec()),
    ];
    let snapshot = cache_repo(&hub, repo, SHA, &["main"], &files);
    // The resolved file is named on stderr; loading a GGUF is another part's job, so only the
    // resolution is checked here.
    let resolved = |reference: &str| {
        let o = flashmoe(tmp.path(), &["info", "--model", reference]);
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        err.lines()
            .find_map(|l| l.strip_prefix("[flashmoe] model: "))
            .map(str::to_string)
            .unwrap_or_else(|| panic!("{reference}: {err}"))
    };
    let q4 = resolved("unsloth/Tiny-GGUF:q4_k_m");
    assert!(q4.ends_with(&format!("({})", snapshot.join("Q4_K_M/Tiny-Q4_K_M-00001-of-00002.gguf").display())), "{q4}");
    assert!(q4.starts_with("unsloth/Tiny-GGUF:q4_k_m "), "{q4}");
    let q8 = resolved("unsloth/Tiny-GGUF:Q8_0");
    assert!(q8.ends_with(&format!("({})", snapshot.join("Tiny-Q8_0.gguf").display())), "{q8}");
    let ud = resolved("unsloth/Tiny-GGUF:UD-Q4_K_XL");
    assert!(ud.ends_with("Tiny-UD-Q4_K_XL.gguf)"), "{ud}");

    // No such quant, or no quant given for a repo with several: the candidates are listed.
    let e = error_line(&flashmoe(tmp.path(), &["info", "--model", "unsloth/Tiny-GGUF:Q4_K"]));
    assert!(e.contains("Q8_0") && e.contains("Q4_K_M") && e.contains("UD-Q4_K_XL") && !e.contains("mmproj"), "{e}");
    let e = error_line(&flashmoe(tmp.path(), &["info", "--model", "unsloth/Tiny-GGUF"]));
    assert!(e.contains("unsloth/Tiny-GGUF:QUANT") && e.contains("Q8_0"), "{e}");
    // Two files with the same tag: ambiguous, both named.
    cache_repo(&hub, repo, SHA, &["main"], &[("Other-Q8_0.gguf", gguf(10))]);
    let e = error_line(&flashmoe(tmp.path(), &["info", "--model", "unsloth/Tiny-GGUF:Q8_0"]));
    assert!(e.contains("Tiny-Q8_0.gguf") && e.contains("Other-Q8_0.gguf"), "{e}");
    // A split file with a part missing.
    std::fs::remove_file(snapshot.join("Q4_K_M/Tiny-Q4_K_M-00002-of-00002.gguf")).unwrap();
    let e = error_line(&flashmoe(tmp.path(), &["info", "--model", "unsloth/Tiny-GGUF:Q4_K_M"]));
    assert!(e.contains("Tiny-Q4_K_M-00002-of-00002.gguf"), "{e}");
    // A local split GGUF given by any part resolves to the first part, all parts checked.
    let local = tmp.path().join("local");
    std::fs::create_dir_all(&local).unwrap();
    std::fs::write(local.join("M-Q2_K-00001-of-00002.gguf"), gguf(8)).unwrap();
    std::fs::write(local.join("M-Q2_K-00002-of-00002.gguf"), gguf(8)).unwrap();
    let second = local.join("M-Q2_K-00002-of-00002.gguf");
    // (Loading GGUF is not this part's job: the loader's error names the file it was given.)
    let e = error_line(&flashmoe(tmp.path(), &["info", "--model", second.to_str().unwrap()]));
    assert!(e.contains("M-Q2_K-00001-of-00002.gguf") && !e.contains("00002-of-00002"), "{e}");
    std::fs::remove_file(local.join("M-Q2_K-00001-of-00002.gguf")).unwrap();
    let e = error_line(&flashmoe(tmp.path(), &["info", "--model", second.to_str().unwrap()]));
    assert!(e.contains("missing part(s): M-Q2_K-00001-of-00002.gguf"), "{e}");
}

/// (expert bytes, all tensor bytes) of a safetensors file, read from its header.
fn tensor_bytes(file: &Path) -> (u64, u64) {
    let b = std::fs::read(file).unwrap();
    let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
    let h: Value = serde_json::from_slice(&b[8..8 + n]).unwrap();
    let (mut experts, mut all) = (0, 0);
    for (name, t) in h.as_object().unwrap() {
        if name == "__metadata__" {
            continue;
        }
        let off = t["data_offsets"].as_array().unwrap();
        let len = off[1].as_u64().unwrap() - off[0].as_u64().unwrap();
        all += len;
        if name.contains(".mlp.experts.") {
            experts += len;
        }
    }
    (experts, all)
}

#[test]
fn models_lists_the_caches_with_formats_and_sizes() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = tmp.path().join("hub");
    let files = fixture_files();
    cache_repo(&hub, "flashmoe-test/tiny", SHA, &["main"], &as_refs(&files));
    let mlx_dir = fixture().with_file_name("qwen35-moe-tiny-mlx4");
    let mlx: Vec<(String, Vec<u8>)> = std::fs::read_dir(&mlx_dir)
        .unwrap()
        .flatten()
        .map(|e| (e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).unwrap()))
        .collect();
    cache_repo(&hub, "mlx-community/tiny-4bit", SHA, &["main"], &as_refs(&mlx));
    cache_repo(&hub, "unsloth/Tiny-GGUF", SHA, &["main"], &[("Tiny-Q8_0.gguf", vec![1; 1000])]);
    // A broken download (link to a missing blob) and an empty repo folder are skipped, not fatal.
    let broken = cache_repo(&hub, "flashmoe-test/broken", SHA, &["main"], &as_refs(&files));
    let blob = std::fs::read_link(broken.join("config.json")).unwrap();
    std::fs::remove_file(broken.join(&blob)).unwrap();
    std::fs::create_dir_all(hub.join("models--someone--empty")).unwrap();

    let (out, _) = ok(&flashmoe(tmp.path(), &["models", "--json"]));
    let v: Value = serde_json::from_str(&out).unwrap();
    let models = v["models"].as_array().unwrap();
    let find = |name: &str| {
        models.iter().find(|m| m["name"] == name).unwrap_or_else(|| panic!("{name} not listed: {out}")).clone()
    };
    assert_eq!(find("builtin")["source"], "builtin");

    let tiny = find("flashmoe-test/tiny");
    assert_eq!(tiny["format"], "safetensors f32");
    assert_eq!(tiny["revision"], "main");
    let on_disk: u64 = files.iter().map(|(_, b)| b.len() as u64).sum();
    assert_eq!(tiny["size_on_disk"], on_disk);
    let (mut experts, mut all) = (0, 0);
    for shard in ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"] {
        let (e, a) = tensor_bytes(&fixture().join(shard));
        experts += e;
        all += a;
    }
    assert_eq!(tiny["expert_bytes"], experts);
    let non_expert = tiny["non_expert_bytes"].as_u64().unwrap();
    // Non-expert weights: everything but the experts, less the small vectors (norms, conv).
    assert!(non_expert <= all - experts && non_expert * 10 >= (all - experts) * 9, "{non_expert} vs {}", all - experts);
    assert_eq!(tiny["fits"], "experts in RAM");

    let m = find("mlx-community/tiny-4bit");
    assert_eq!(m["format"], "MLX 4-bit");
    assert_eq!(m["size_on_disk"], mlx.iter().map(|(_, b)| b.len() as u64).sum::<u64>());
    let g = find("unsloth/Tiny-GGUF:Q8_0");
    assert_eq!(g["format"], "GGUF Q8_0");
    assert_eq!(g["size_on_disk"], 1000);

    let skipped = v["skipped"].as_array().unwrap();
    assert!(skipped.iter().any(|s| s["reason"].as_str().unwrap().contains("flashmoe-test/broken")), "{out}");
    assert!(skipped.iter().any(|s| s["path"].as_str().unwrap().ends_with("models--someone--empty")), "{out}");
    assert!(!models.iter().any(|m| m["name"] == "flashmoe-test/broken"));

    // The table says the same in words.
    let (table, _) = ok(&flashmoe(tmp.path(), &["models"]));
    assert!(
        table.contains("flashmoe-test/tiny") && table.contains("MLX 4-bit") && table.contains("skipped"),
        "{table}"
    );
}

#[test]
fn builtin_is_a_model_name_everywhere() {
    let tmp = tempfile::tempdir().unwrap();
    let default = run_text(tmp.path(), "builtin");
    let o = flashmoe(tmp.path(), &["run", "--prompt", "Hello", "--raw", "--max-tokens", "6", "--temperature", "0"]);
    assert_eq!(ok(&o).0, default);
    let (out, _) = ok(&flashmoe(tmp.path(), &["info", "--model", "builtin"]));
    assert!(out.contains("experts"), "{out}");
    let (out, _) = ok(&flashmoe(tmp.path(), &["tokenize", "--model", "builtin", "--json", "Hello"]));
    assert!(out.trim().starts_with('['), "{out}");
    // Once unpacked, `models` shows where.
    let (out, _) = ok(&flashmoe(tmp.path(), &["models", "--json"]));
    let v: Value = serde_json::from_str(&out).unwrap();
    let b = &v["models"][0];
    assert_eq!(b["name"], "builtin");
    assert!(b["path"].as_str().unwrap().starts_with(tmp.path().join("flashmoe").to_str().unwrap()), "{b}");
    assert_eq!(b["fits"], "experts in RAM");
}

/// A local stand-in for the Hub: `/api/models/{owner}/{name}/revision/{rev}` and
/// `/{owner}/{name}/resolve/{rev}/{file}` with the headers `hf-hub` reads (etag, x-repo-commit,
/// content-range for its 1-byte probe) and range requests. `cut` makes the first full download
/// of that file stop half way (the connection drops). Every Range header is recorded.
struct MockHub {
    addr: std::net::SocketAddr,
    ranges: Arc<Mutex<Vec<(String, String)>>>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

fn mock_hub(repo: &'static str, files: Vec<(String, Vec<u8>)>, cut: Option<&'static str>) -> MockHub {
    use axum::body::Body;
    use axum::extract::{Path as AxPath, State};
    use axum::http::{HeaderMap, StatusCode, header};
    use axum::response::{IntoResponse, Response};
    use axum::routing::get;

    #[derive(Clone)]
    struct Hub {
        repo: &'static str,
        files: Arc<Vec<(String, Vec<u8>)>>,
        cut: Arc<Mutex<Option<&'static str>>>,
        ranges: Arc<Mutex<Vec<(String, String)>>>,
    }
    async fn info(State(h): State<Hub>, AxPath((owner, name, rev)): AxPath<(String, String, String)>) -> Response {
        if format!("{owner}/{name}") != h.repo || rev != "main" {
            return (StatusCode::NOT_FOUND, "Repository not found").into_response();
        }
        let siblings: Vec<Value> = h.files.iter().map(|(n, _)| serde_json::json!({"rfilename": n})).collect();
        axum::Json(serde_json::json!({"id": h.repo, "sha": SHA, "siblings": siblings})).into_response()
    }
    async fn resolve(
        State(h): State<Hub>,
        AxPath((owner, name, _rev, file)): AxPath<(String, String, String, String)>,
        headers: HeaderMap,
    ) -> Response {
        let Some((_, bytes)) = h.files.iter().find(|(n, _)| *n == file).filter(|_| format!("{owner}/{name}") == h.repo)
        else {
            return (StatusCode::NOT_FOUND, "Entry not found").into_response();
        };
        let size = bytes.len();
        let range = headers.get(header::RANGE).and_then(|r| r.to_str().ok()).map(str::to_string);
        let (start, end) = match range.as_deref().and_then(|r| r.strip_prefix("bytes=")) {
            Some(r) => {
                h.ranges.lock().unwrap().push((file.clone(), r.to_string()));
                let (a, b) = r.split_once('-').unwrap();
                let a: usize = a.parse().unwrap();
                let b: usize = if b.is_empty() { size - 1 } else { b.parse::<usize>().unwrap().min(size - 1) };
                (a, b)
            }
            None => (0, size - 1),
        };
        let body = bytes[start..=end].to_vec();
        let mut resp = Response::builder()
            .status(if range.is_some() { StatusCode::PARTIAL_CONTENT } else { StatusCode::OK })
            .header(header::ETAG, format!("\"{:016x}{:08x}\"", fnv(bytes), size))
            .header("x-repo-commit", SHA)
            .header(header::ACCEPT_RANGES, "bytes")
            .header(header::CONTENT_LENGTH, body.len());
        if range.is_some() {
            resp = resp.header(header::CONTENT_RANGE, format!("bytes {start}-{end}/{size}"));
        }
        let cut_now = start == 0 && end > 0 && {
            let mut c = h.cut.lock().unwrap();
            if *c == Some(file.as_str()) { c.take().is_some() } else { false }
        };
        if cut_now {
            // Half the body, then the connection drops.
            let half = body[..body.len() / 2].to_vec();
            let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
                vec![Ok(half), Err(std::io::Error::new(std::io::ErrorKind::ConnectionReset, "cut"))];
            return resp.body(Body::from_stream(futures::stream::iter(chunks))).unwrap();
        }
        resp.body(Body::from(body)).unwrap()
    }

    let ranges = Arc::new(Mutex::new(Vec::new()));
    let state = Hub { repo, files: Arc::new(files), cut: Arc::new(Mutex::new(cut)), ranges: ranges.clone() };
    let app = axum::Router::new()
        .route("/api/models/{owner}/{name}/revision/{rev}", get(info))
        .route("/{owner}/{name}/resolve/{rev}/{*file}", get(resolve))
        .with_state(state);
    let (tx, rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stop_rx.await;
                })
                .await
                .unwrap();
        });
    });
    MockHub { addr: rx.recv().unwrap(), ranges, _stop: stop_tx }
}

fn pull(tmp: &Path, hub: &MockHub, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_flashmoe"))
        .arg("pull")
        .args(args)
        .env("HF_HUB_CACHE", tmp.join("hub"))
        .env("FLASHMOE_HOME", tmp.join("flashmoe"))
        .env("HF_ENDPOINT", format!("http://{}", hub.addr))
        .env_remove("HF_TOKEN")
        .output()
        .unwrap()
}

#[test]
fn pull_downloads_into_the_cache_resumes_a_cut_download_and_then_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let files = fixture_files();
    let big = "model-00001-of-00002.safetensors";
    let hub = mock_hub("flashmoe-test/tiny", files.clone(), Some(big));

    // The first attempt loses the connection half way through the big shard: a clean error,
    // and no half file where the model is looked for.
    let e = error_line(&pull(tmp.path(), &hub, &["flashmoe-test/tiny"]));
    assert!(e.contains("flashmoe-test/tiny"), "{e}");
    let repo_dir = tmp.path().join("hub/models--flashmoe-test--tiny");
    assert!(!repo_dir.join("snapshots").join(SHA).join(big).exists());
    let part: Vec<PathBuf> = std::fs::read_dir(repo_dir.join("blobs"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "part"))
        .collect();
    assert_eq!(part.len(), 1, "{part:?}");
    let partial = std::fs::metadata(&part[0]).unwrap().len();
    // `models` says the download was interrupted and how to finish it.
    let (out, _) = ok(&flashmoe(tmp.path(), &["models", "--json"]));
    let v: Value = serde_json::from_str(&out).unwrap();
    let notes: Vec<&str> = v["skipped"].as_array().unwrap().iter().map(|s| s["reason"].as_str().unwrap()).collect();
    assert!(notes.iter().any(|n| n.contains("interrupted") && n.contains("flashmoe pull flashmoe-test/tiny")), "{out}");
    let full = files.iter().find(|(n, _)| n == big).unwrap().1.len() as u64;
    assert!(partial > 0 && partial < full, "{partial} of {full}");

    // The second attempt resumes where the first stopped (a range request from there).
    let o = pull(tmp.path(), &hub, &["flashmoe-test/tiny"]);
    let (_, err) = ok(&o);
    assert!(err.contains("flashmoe run --model flashmoe-test/tiny"), "{err}");
    let ranges = hub.ranges.lock().unwrap().clone();
    assert!(ranges.contains(&(big.to_string(), format!("{partial}-"))), "{ranges:?}");
    let snapshot = repo_dir.join("snapshots").join(SHA);
    for (name, bytes) in &files {
        assert_eq!(&std::fs::read(snapshot.join(name)).unwrap(), bytes, "{name}");
        assert!(std::fs::symlink_metadata(snapshot.join(name)).unwrap().file_type().is_symlink(), "{name}");
    }
    assert_eq!(std::fs::read_to_string(repo_dir.join("refs/main")).unwrap().trim(), SHA);

    // What was pulled runs by name, with the same text as the fixture folder.
    assert_eq!(run_text(tmp.path(), "flashmoe-test/tiny"), run_text(tmp.path(), fixture().to_str().unwrap()));

    // A second pull finds everything there.
    let (_, err) = ok(&pull(tmp.path(), &hub, &["flashmoe-test/tiny"]));
    assert!(err.contains("0 file(s) downloaded"), "{err}");

    // --include: only the matching files, into a separate cache.
    let other = tempfile::tempdir().unwrap();
    ok(&pull(other.path(), &hub, &["flashmoe-test/tiny", "--include", "*.json"]));
    let snap = other.path().join("hub/models--flashmoe-test--tiny/snapshots").join(SHA);
    let mut got: Vec<String> =
        std::fs::read_dir(&snap).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    got.sort();
    let mut want: Vec<String> = files.iter().map(|(n, _)| n.clone()).filter(|n| n.ends_with(".json")).collect();
    want.sort();
    assert_eq!(got, want);

    // Unknown repo, and a name that is not a repo: one line each.
    let e = error_line(&pull(tmp.path(), &hub, &["nobody/nothing"]));
    assert!(e.contains("404") && e.contains("nobody/nothing"), "{e}");
    let e = error_line(&pull(tmp.path(), &hub, &["not-a-repo"]));
    assert!(e.contains("OWNER/NAME"), "{e}");
    let e = error_line(&pull(tmp.path(), &hub, &["flashmoe-test/tiny", "--include", "*.nothing"]));
    assert!(e.contains("none of its"), "{e}");
}
