"""Checkpoints by name through pooch, served from a local HTTP server on 127.0.0.1."""

import functools
import warnings
import http.server
import threading

import numpy as np
import pytest
import torch

import scxtrimo
from conftest import DEFAULT
from scxtrimo.models import _io, _registry


class _Quiet(http.server.SimpleHTTPRequestHandler):
    requests: list = []

    def log_message(self, *args):
        pass

    def do_GET(self):
        _Quiet.requests.append(self.path)
        super().do_GET()


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(_Quiet, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    _Quiet.requests = []
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def published(server, tmp_path, monkeypatch):
    root, url = server
    torch.manual_seed(0)
    model = scxtrimo.models.XTrimoGene("xtrimo-3m")
    folder = model.save(root / "xtrimo-test", dtype=torch.float16)
    hashes = {f: _io.sha256_file(folder / f) for f in _registry.FILES}
    monkeypatch.setenv(_registry.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(_registry, "REMOTE", {})
    scxtrimo.models.register("xtrimo-test", f"{url}/xtrimo-test", hashes)
    return model, folder


def test_download_cache_reuse_and_identity(published, pbmc3k, tmp_path):
    model, folder = published
    loaded = scxtrimo.models.load("xtrimo-test")
    assert len(_Quiet.requests) == 3
    assert (tmp_path / "cache" / "xtrimo-test" / "model.safetensors").is_file()
    assert loaded.checkpoint_name == "xtrimo-test"
    again = scxtrimo.models.load("xtrimo-test")  # from the cache: no new request
    assert len(_Quiet.requests) == 3
    local = scxtrimo.models.load(folder)
    a, b = pbmc3k[:40].copy(), pbmc3k[:40].copy()
    scxtrimo.tl.embed(a, model=again, progress=False)
    scxtrimo.tl.embed(b, model=local, progress=False)
    np.testing.assert_array_equal(a.obsm["X_xtrimo"], b.obsm["X_xtrimo"])


def test_corrupted_file_is_refused(published, tmp_path):
    _, folder = published
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[-100] ^= 0xFF
    (folder / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        scxtrimo.models.load("xtrimo-test")
    assert not (tmp_path / "cache" / "xtrimo-test" / "model.safetensors").exists()


def test_tampered_cache_is_downloaded_again(published, tmp_path):
    _, folder = published
    scxtrimo.models.load("xtrimo-test")
    cached = tmp_path / "cache" / "xtrimo-test" / "genes.txt"
    cached.write_text("A1BG\n")
    scxtrimo.models.load("xtrimo-test")
    assert _Quiet.requests.count("/xtrimo-test/genes.txt") == 2
    assert cached.read_bytes() == (folder / "genes.txt").read_bytes()


def test_registry_needs_every_hash():
    with pytest.raises(ValueError, match="sha256"):
        _registry.RemoteCheckpoint("x", "http://127.0.0.1/", {"config.json": "0" * 64})


def test_registered_name_is_not_shadowed_by_a_local_folder(published, tmp_path, monkeypatch):
    model, folder = published
    monkeypatch.chdir(tmp_path)
    scxtrimo.models.XTrimoGene("xtrimo-3m").save("xtrimo-test")
    assert scxtrimo.models.load("xtrimo-test").checkpoint_sha256 == _io.sha256_file(folder / "model.safetensors")


def test_register_refuses_bundled_names_bad_names_and_bad_hashes(monkeypatch):
    monkeypatch.setattr(_registry, "REMOTE", {})
    good = {f: "ab" * 32 for f in _registry.FILES}
    with pytest.raises(ValueError, match="bundled"):
        scxtrimo.models.register(DEFAULT, "http://127.0.0.1/", good)
    for name in ("../x", "a/b", "a\\b", "..", "", None):
        with pytest.raises(ValueError, match="name"):
            scxtrimo.models.register(name, "http://127.0.0.1/", good)
    for bad in (None, "abc", "g" * 64, "ab" * 33, 12):
        with pytest.raises(ValueError, match=r"sha256 of model\.safetensors.*64 hex"):
            scxtrimo.models.register("x", "http://127.0.0.1/", {**good, "model.safetensors": bad})
    with pytest.raises(ValueError, match="unknown files"):
        scxtrimo.models.register("x", "http://127.0.0.1/", {**good, "model.ckpt": "ab" * 32})
    assert _registry.REMOTE == {}
    entry = scxtrimo.models.register("x", "http://127.0.0.1/", {**good, "genes.txt": "SHA256:" + "AB" * 32})
    assert entry.sha256 == good and _registry.REMOTE == {"x": entry}


def test_registering_a_name_again_warns_that_it_replaces_the_download(monkeypatch):
    monkeypatch.setattr(_registry, "REMOTE", {})
    good = {f: "ab" * 32 for f in _registry.FILES}
    scxtrimo.models.register("x", "http://127.0.0.1/a/", good)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same entry again: nothing to say
        scxtrimo.models.register("x", "http://127.0.0.1/a/", good)
    with pytest.warns(UserWarning, match="replaces"):
        scxtrimo.models.register("x", "http://127.0.0.1/b/", good)
    assert _registry.REMOTE["x"].base_url == "http://127.0.0.1/b/"
