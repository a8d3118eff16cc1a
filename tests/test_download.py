"""`download` against a hub-like HTTP server on 127.0.0.1 that the tests start and stop."""

import hashlib
import http.server
import os
import subprocess
import sys
import threading
import time

import pytest
import torch

from speculative_gpt2.checkpoints import DownloadError, download
from gpt2_model import GPT2
from speculative_gpt2.checkpoints import PRESETS
from speculative_gpt2.errors import CheckpointError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class FakeHub(http.server.ThreadingHTTPServer):
    """Serves `/openai-community/gpt2/resolve/main/<file>` like the hub: large files answer with a redirect to
    a CDN path and announce their SHA-256 in `X-Linked-Etag`; small files announce their git blob SHA-1 in
    `ETag`; the CDN honours Range requests."""

    daemon_threads = True

    def __init__(self, files):
        super().__init__(("127.0.0.1", 0), Handler)
        self.files = files
        self.announced_sha = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
        self.announced_git = {name: hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
                              for name, data in files.items()}
        self.truncate_config = False  # send config.json cut short, without a Content-Length, once
        self.cut_next_get_after = None  # bytes sent before the connection is dropped, once
        self.fail_next_gets = 0  # answer this many GETs with 503 first
        self.ranges = []
        self.delay = 0.0

    @property
    def endpoint(self):
        return f"http://127.0.0.1:{self.server_address[1]}"


class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _resolve(self):
        name = self.path.rsplit("/", 1)[-1]
        if name not in self.server.files:
            self.send_error(404)
            return None
        if "/resolve/main/" in self.path and name.endswith(".safetensors"):
            self.send_response(302)
            self.send_header("Location", f"/cdn/{name}")
            self.send_header("X-Linked-Etag", f'"{self.server.announced_sha[name]}"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        return name

    def do_HEAD(self):
        name = self._resolve()
        if name is not None:
            self.send_response(200)
            self.send_header("ETag", f'"{self.server.announced_git[name]}"')
            self.end_headers()

    def do_GET(self):
        name = self._resolve()
        if name is None:
            return
        if self.server.fail_next_gets:
            self.server.fail_next_gets -= 1
            self.send_error(503)
            return
        data = self.server.files[name]
        range_header = self.headers.get("Range")
        self.server.ranges.append(range_header)
        start = int(range_header.removeprefix("bytes=").rstrip("-")) if range_header else 0
        if start >= len(data):
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(data)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(206 if range_header else 200)
        if self.server.truncate_config and name == "config.json":
            self.server.truncate_config = False
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.close_connection = True  # the end of the body is the end of the connection: looks complete
            return
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        cut = self.server.cut_next_get_after
        if cut is not None and name.endswith(".safetensors"):
            self.server.cut_next_get_after = None
            self.wfile.write(data[start : start + cut])
            self.wfile.flush()
            self.connection.shutdown(2)  # the connection drops mid-file
            return
        for i in range(start, len(data), 1 << 20):  # in 1 MiB pieces, `delay` seconds apart
            self.wfile.write(data[i : i + (1 << 20)])
            time.sleep(self.server.delay)


@pytest.fixture
def hub(reference_folder, monkeypatch):
    folder, _ = reference_folder
    server = FakeHub({name: (folder / name).read_bytes() for name in ("config.json", "model.safetensors")})
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
    monkeypatch.setenv("HF_HOME", "/nonexistent-hf-home")  # never satisfied from a real cache
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    # The served model passes for the preset gpt2 by shape (3 layers, 4 heads, 96 wide), as the real one would.
    monkeypatch.setitem(PRESETS, "gpt2", (3, 4, 96))
    yield server
    server.shutdown()
    server.server_close()


def test_download_with_progress_bar_then_load(hub, tmp_path, capsys, reference_folder):
    model = GPT2.from_pretrained("gpt2", weights_dir=tmp_path)
    folder = tmp_path / "gpt2"
    assert sorted(p.name for p in folder.iterdir()) == [".verified.json", "config.json", "model.safetensors"]
    assert (folder / "model.safetensors").read_bytes() == hub.files["model.safetensors"]
    err = capsys.readouterr().err
    assert "model.safetensors" in err and "100%" in err
    reference = reference_folder[1]
    idx = torch.randint(0, 50257, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), reference(idx).logits, atol=1e-4, rtol=0)


def test_resume_after_the_connection_drops(hub, tmp_path):
    size = len(hub.files["model.safetensors"])
    hub.cut_next_get_after = size // 3
    download("gpt2", tmp_path)
    assert (tmp_path / "gpt2" / "model.safetensors").read_bytes() == hub.files["model.safetensors"]
    assert hub.ranges[-1] == f"bytes={size // 3}-"  # resumed where it stopped, not from scratch
    assert not (tmp_path / "gpt2" / "model.safetensors.part").exists()


def test_wrong_sha256_is_rejected_and_leaves_no_file(hub, tmp_path):
    hub.announced_sha["model.safetensors"] = "0" * 64
    with pytest.raises(DownloadError, match="SHA-256 .* does not match the expected 0000.*by hand from http://127"):
        download("gpt2", tmp_path)
    assert sorted(p.name for p in (tmp_path / "gpt2").iterdir()) == ["config.json"]


def test_unreachable_endpoint(tmp_path, monkeypatch):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr("time.sleep", lambda s: None)
    with pytest.raises(DownloadError, match=r"failed after 4 tries.*by hand from http://127\.0\.0\.1"):
        GPT2.from_pretrained("gpt2", weights_dir=tmp_path)
    assert not (tmp_path / "gpt2" / "model.safetensors").exists()


def test_missing_file_on_the_hub(hub, tmp_path):
    del hub.files["model.safetensors"]
    with pytest.raises(DownloadError, match="HTTP 404"):
        download("gpt2", tmp_path)
    assert not (tmp_path / "gpt2" / "model.safetensors").exists()


def test_server_errors_are_retried(hub, tmp_path, monkeypatch):
    monkeypatch.setattr("time.sleep", lambda s: None)
    hub.fail_next_gets = 2
    download("gpt2", tmp_path)
    assert (tmp_path / "gpt2" / "model.safetensors").read_bytes() == hub.files["model.safetensors"]
    hub.fail_next_gets = 10
    with pytest.raises(DownloadError, match="failed after 4 tries: HTTP 503"):
        download("gpt2", tmp_path / "again")


def test_left_over_partial_files(hub, tmp_path, monkeypatch):
    monkeypatch.setattr("time.sleep", lambda s: None)
    data = hub.files["model.safetensors"]
    folder = tmp_path / "gpt2"
    folder.mkdir()
    (folder / "model.safetensors.part").write_bytes(data)  # complete but never renamed: only verified and renamed
    download("gpt2", tmp_path)
    assert (folder / "model.safetensors").read_bytes() == data and hub.ranges[-1] == f"bytes={len(data)}-"
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors.part").write_bytes(data + b"stale")  # longer than the file: start over
    download("gpt2", tmp_path)
    assert (folder / "model.safetensors").read_bytes() == data and hub.ranges[-1] is None


def test_config_is_verified_too(hub, tmp_path):
    hub.truncate_config = True  # cut short with no Content-Length: only its git hash can tell
    with pytest.raises(DownloadError, match="config.json: git SHA-1 .* does not match"):
        download("gpt2", tmp_path)
    assert not (tmp_path / "gpt2" / "config.json").exists()
    download("gpt2", tmp_path)
    assert (tmp_path / "gpt2" / "config.json").read_bytes() == hub.files["config.json"]


@pytest.mark.parametrize("stale", ["same size", "wrong prefix"])
def test_a_stale_partial_file_restarts_once_by_itself(hub, tmp_path, capsys, stale):
    data = hub.files["model.safetensors"]
    folder = tmp_path / "gpt2"
    folder.mkdir()
    wrong = bytes(len(data)) if stale == "same size" else b"x" * (len(data) // 2)
    (folder / "model.safetensors.part").write_bytes(wrong)
    download("gpt2", tmp_path)  # the first run succeeds
    assert (folder / "model.safetensors").read_bytes() == data
    assert "was stale" in capsys.readouterr().err
    assert not (folder / "model.safetensors.part").exists()


def test_a_failed_download_leaves_nothing_behind(hub, tmp_path, monkeypatch):
    monkeypatch.setattr("time.sleep", lambda s: None)
    hub.fail_next_gets = 100
    with pytest.raises(DownloadError, match="python -m speculative_gpt2.random_checkpoint gpt2") as failed:
        download("gpt2", tmp_path)
    assert not (tmp_path / "gpt2").exists()
    # Said once, and the random weights go where the README puts them, whatever --weights-dir is.
    message = str(failed.value)
    assert message.lower().count("instead") == 0 and ". What to do: pass a checkpoint folder in place of" in message
    assert message.endswith("random_checkpoint gpt2 weights/random-gpt2, then pass weights/random-gpt2")


def test_hf_hub_offline_is_honoured(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="HF_HUB_OFFLINE is set: pass a checkpoint folder"):
        GPT2.from_pretrained("gpt2", weights_dir=tmp_path)
    assert hub.ranges == [] and not (tmp_path / "gpt2").exists()  # no request was made


@pytest.mark.parametrize("endpoint", ["not a url", "ftp://example.org", "127.0.0.1:8080"])
def test_an_endpoint_that_is_not_a_url(tmp_path, monkeypatch, endpoint):
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    with pytest.raises(DownloadError, match="HF_ENDPOINT=.* is not an http"):
        download("gpt2", tmp_path)
    assert not (tmp_path / "gpt2").exists()


def run_downloader(*args, env):
    return subprocess.run([sys.executable, "-m", "speculative_gpt2.checkpoints", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120, env=os.environ | env)


@pytest.mark.parametrize("case", ["weights dir is a file", "endpoint is not a URL", "unreachable"])
def test_the_download_command_fails_in_one_line(tmp_path, case):
    (tmp_path / "file").write_text("")
    weights = tmp_path / "file" if case == "weights dir is a file" else tmp_path / "weights"
    endpoint = "not a url" if case == "endpoint is not a URL" else "http://127.0.0.1:9"
    result = run_downloader("gpt2", "--weights-dir", str(weights), env={"HF_ENDPOINT": endpoint})
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "speculative_gpt2.checkpoints: error: " in result.stderr
    assert "Traceback" not in result.stderr


def test_two_downloads_of_one_preset_wait_for_each_other(hub, tmp_path):
    hub.delay = 0.05  # slow enough that the two overlap
    results = {}

    def fetch(i):
        try:
            results[i] = GPT2.from_pretrained("gpt2", weights_dir=tmp_path).config.n_layer
        except Exception as e:  # noqa: BLE001 -- reported below, whatever it is
            results[i] = e

    threads = [threading.Thread(target=fetch, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results == {0: 3, 1: 3}
    assert hub.ranges == [None, None]  # config.json and model.safetensors, once each: the second download waited
    assert not list((tmp_path / "gpt2").glob("*.part"))


def test_a_mirror_serving_another_model_is_refused_on_the_first_run_as_on_the_second(hub, tmp_path, monkeypatch):
    monkeypatch.setitem(PRESETS, "gpt2", (12, 12, 768))  # the real preset's shape: the served 3-layer model differs
    for run in range(2):
        with pytest.raises(CheckpointError, match="holds a model with n_layer=3.*not the preset gpt2"):
            GPT2.from_pretrained("gpt2", weights_dir=tmp_path)
    assert hub.ranges == [None, None]  # config.json and model.safetensors downloaded once, refused twice


def test_a_symlink_at_the_partial_files_name_is_not_followed(hub, tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "model.safetensors.part").symlink_to(victim)
    with pytest.raises(DownloadError, match="model.safetensors.part is a symbolic link"):
        download("gpt2", tmp_path)
    assert victim.read_bytes() == b"precious"
