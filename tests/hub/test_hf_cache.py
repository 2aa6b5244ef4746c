"""`flashmoe pull`, `--model OWNER/NAME` and `flashmoe models` against the official
`huggingface_hub` package: the cache `flashmoe pull` writes is the one huggingface_hub reads, and
the cache huggingface_hub writes is the one flashmoe reads (same snapshot, same size on disk).

Both download from a local server that speaks the Hub's URL layout (`/api/models/{repo}/revision/
{rev}`, `/{repo}/resolve/{rev}/{file}` with the X-Repo-Commit / ETag / range headers), serving the
tiny fixture model. Uses `target/debug/flashmoe` (FLASHMOE_BIN to override).
"""

import hashlib
import json
import os
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from huggingface_hub import scan_cache_dir, snapshot_download, try_to_load_from_cache

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("FLASHMOE_BIN", ROOT / "target" / "debug" / "flashmoe"))
FIXTURE = ROOT / "testdata" / "models" / "qwen35-moe-tiny"
REPO = "flashmoe-test/tiny"
SHA = "0123456789abcdef0123456789abcdef01234567"
FILES = {p.name: p.read_bytes() for p in sorted(FIXTURE.iterdir()) if p.name != "reference.json"}


class Hub(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def _file(self):
        prefix = f"/{REPO}/resolve/"
        if not self.path.startswith(prefix):
            return None
        _rev, _, name = self.path[len(prefix) :].partition("/")
        return name if name in FILES else None

    def _headers(self, name, start, end, partial):
        data = FILES[name]
        self.send_response(206 if partial else 200)
        self.send_header("ETag", '"%s"' % hashlib.sha256(data).hexdigest())
        self.send_header("X-Repo-Commit", SHA)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(end - start + 1))
        if partial:
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        self.end_headers()

    def _range(self, name):
        size = len(FILES[name])
        r = self.headers.get("Range")
        if not r:
            return 0, size - 1, False
        a, _, b = r.removeprefix("bytes=").partition("-")
        return int(a), min(int(b), size - 1) if b else size - 1, True

    def do_HEAD(self):
        name = self._file()
        if name is None:
            self.send_response(404)
            self.end_headers()
            return
        start, end, partial = self._range(name)
        self._headers(name, start, end, partial)

    def do_GET(self):
        path = self.path.split("?")[0]
        body = None
        if path == f"/api/models/{REPO}/revision/main":
            body = {"id": REPO, "sha": SHA, "siblings": [{"rfilename": n} for n in FILES]}
        elif path == f"/api/models/{REPO}/tree/{SHA}":
            # The file listing newer huggingface_hub versions ask for.
            body = [{"type": "file", "path": n, "size": len(d), "oid": hashlib.sha1(d).hexdigest()} for n, d in FILES.items()]
        if body is not None:
            body = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        name = self._file()
        if name is None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        start, end, partial = self._range(name)
        self._headers(name, start, end, partial)
        self.wfile.write(FILES[name][start : end + 1])


@pytest.fixture(scope="module")
def endpoint():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def flashmoe(cache, *args, endpoint=None):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HOME", "HF_TOKEN", "HF_ENDPOINT")}
    env.update({"HF_HUB_CACHE": str(cache), "FLASHMOE_HOME": str(cache.parent / "flashmoe")})
    if endpoint:
        env["HF_ENDPOINT"] = endpoint
    r = subprocess.run([str(BIN), *args], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r


def listed(cache):
    models = json.loads(flashmoe(cache, "models", "--json").stdout)["models"]
    return next(m for m in models if m["name"] == REPO)


def run_text(cache, model):
    return flashmoe(cache, "run", "--model", model, "--prompt", "Hello", "--raw", "--max-tokens", "5").stdout


def test_flashmoe_pull_writes_the_cache_huggingface_hub_reads(tmp_path, endpoint):
    cache = tmp_path / "hub"
    flashmoe(cache, "pull", REPO, endpoint=endpoint)
    info = scan_cache_dir(cache)
    assert [r.repo_id for r in info.repos] == [REPO]
    repo = next(iter(info.repos))
    (rev,) = repo.revisions
    assert rev.commit_hash == SHA and rev.refs == frozenset({"main"})
    assert sorted(f.file_name for f in rev.files) == sorted(FILES)
    assert info.warnings == []
    for name, data in FILES.items():
        path = try_to_load_from_cache(REPO, name, cache_dir=cache)
        assert Path(path).read_bytes() == data
    snapshot = snapshot_download(REPO, cache_dir=cache, local_files_only=True)
    m = listed(cache)
    assert m["path"] == snapshot
    assert m["size_on_disk"] == repo.size_on_disk == sum(len(d) for d in FILES.values())
    assert run_text(cache, REPO) == run_text(cache, str(FIXTURE))


def test_flashmoe_reads_the_cache_huggingface_hub_writes(tmp_path, endpoint):
    cache = tmp_path / "hub"
    snapshot = snapshot_download(REPO, cache_dir=cache, endpoint=endpoint)
    m = listed(cache)
    assert m["path"] == snapshot
    assert m["revision"] == "main"
    assert m["size_on_disk"] == scan_cache_dir(cache).size_on_disk
    assert run_text(cache, REPO) == run_text(cache, str(FIXTURE))
