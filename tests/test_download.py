"""``avlowshot download`` against a local HTTP server on 127.0.0.1 that serves a zip of a synthetic root the way the
authors' archives are laid out: an interrupted transfer is continued with a Range request, a checksum is recorded on
first use and then verified, a corrupt archive is refused and never leaves a half-unpacked root."""

from __future__ import annotations

import hashlib
import json
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from typer.testing import CliRunner

from avlowshot.cli import app
from avlowshot.data.download import dataset_prefix, registry
from avlowshot.data.synth import write_synthetic

runner = CliRunner()
FILE = "avgzsl_benchmark_datasets.zip"  # the AVCA archive: all three datasets, averaged cls and main features


class _Server:
    """Serves ``self.body`` at /<FILE>, honours ``Range: bytes=N-``; drops the connection half-way through the
    first ``drops`` responses."""

    def __init__(self):
        self.body = b""
        self.drops = 0
        self.requests: list[str | None] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                outer.requests.append(self.headers.get("Range"))
                if self.path != f"/{FILE}":
                    self.send_error(404)
                    return
                body, start = outer.body, 0
                rng = self.headers.get("Range")
                if rng:
                    start = int(rng.split("=")[1].split("-")[0])
                    if start >= len(body):
                        self.send_response(416)
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                part = body[start:]
                if outer.drops > 0:
                    outer.drops -= 1
                    self.wfile.write(part[: len(part) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(part)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = _Server()
    yield s
    s.close()


@pytest.fixture(scope="module")
def archive_bytes(tmp_path_factory):
    base = tmp_path_factory.mktemp("archive")
    root = write_synthetic("avca-main", "UCF", base / "avgzsl_benchmark_datasets" / "UCF", scale=0.02, seed=3)
    zpath = base / FILE
    with zipfile.ZipFile(zpath, "w", zipfile.ZIP_DEFLATED) as zf:
        for p in sorted(root.rglob("*")):
            if p.is_file():
                zf.write(p, p.relative_to(base).as_posix())
        zf.writestr("avgzsl_benchmark_datasets/UCF/_features_preprocessed/cache.pkl", b"the reference's cache")
    return zpath.read_bytes()


def _download(to: Path, url: str, *extra: str):
    args = ["download", "--dataset", "UCF", "--features", "main", "--layout", "avca-main", "--to", str(to),
            "--mirror", url, "--mirrors-only", *extra]  # fmt: skip
    return runner.invoke(app, args)


def test_registry_has_the_authors_links_for_every_benchmark():
    reg = registry()
    for ds in ("UCF", "ActivityNet", "VGGSound"):
        for layout in ("avca-cls", "avca-main", "tcaf-cls", "tcaf-main", "clipclap", "avdiff"):
            hits = [a for a in reg if ds in a.datasets and layout in a.layouts]
            assert len(hits) == 1 and hits[0].urls[0].startswith("https://"), (ds, layout)
    tcaf = next(a for a in reg if a.file == "ucf-supervised-temporal.zip")
    assert tcaf.urls == ["https://s3.mlcloud.uni-tuebingen.de/tcaf-gzsl/ucf-supervised-temporal.zip"]


def test_dataset_prefix_finds_the_root_inside_the_archive(tmp_path):
    names = ["a/UCF/class-split/all_class.txt", "a/VGGSound/class-split/all_class.txt", "a/UCF/features/x"]
    assert dataset_prefix(names, "UCF", tmp_path) == "a/UCF"
    assert dataset_prefix(["UCF/class-split/x.txt"], "UCF", tmp_path) == "UCF"


def test_interrupted_transfer_is_resumed_checksum_recorded_and_verified(server, archive_bytes, tmp_path, monkeypatch):
    monkeypatch.setenv("AVLOWSHOT_CONFIG_DIR", str(tmp_path / "config"))
    server.body, server.drops = archive_bytes, 1
    res = _download(tmp_path / "data", server.url)
    assert res.exit_code == 0, res.output
    # the first response was cut half-way; the retry asked for the rest only (from what had been written)
    half = len(archive_bytes) // 2
    assert server.requests[0] is None and len(server.requests) == 2
    assert half - 65536 <= int(server.requests[1].split("=")[1].rstrip("-")) <= half
    root = tmp_path / "data" / "avgzsl_benchmark_datasets" / "UCF"
    assert (root / "features" / "main_features" / "audio" / "stage_1_train").is_dir()
    assert not (root / "_features_preprocessed").exists()  # the reference's cache is not unpacked
    sha = hashlib.sha256(archive_bytes).hexdigest()
    assert json.loads((tmp_path / "config" / "known_hashes.json").read_text()) == {FILE: sha}
    assert f"sha256 {sha} (recorded: first use)" in res.output
    assert "check-data avca-main: 101 classes" in res.output and "--root-dir " in res.output
    assert not list((tmp_path / "data" / "avgzsl_benchmark_datasets").glob(".staging-*"))
    # features there already: nothing fetched
    before = len(server.requests)
    again = _download(tmp_path / "data", server.url)
    assert again.exit_code == 0 and "there already" in again.output and len(server.requests) == before
    # a second dataset root, fetched again: the recorded checksum is verified
    again = _download(tmp_path / "data2", server.url)
    assert again.exit_code == 0 and "(verified)" in again.output, again.output


def test_partial_file_is_continued_by_the_next_invocation(server, archive_bytes, tmp_path, monkeypatch):
    monkeypatch.setenv("AVLOWSHOT_CONFIG_DIR", str(tmp_path / "config"))
    server.body, server.drops = archive_bytes, 1
    res = _download(tmp_path / "data", server.url, "--retries", "0")
    assert res.exit_code == 2 and "the same command continues them" in res.output, res.output
    part = tmp_path / "data" / ".downloads" / f"{FILE}.part"
    kept = part.stat().st_size
    assert len(archive_bytes) // 2 - 65536 <= kept <= len(archive_bytes) // 2
    assert not (tmp_path / "data" / "avgzsl_benchmark_datasets").exists()  # no root from a failed download
    res = _download(tmp_path / "data", server.url, "--retries", "0")
    assert res.exit_code == 0, res.output
    assert server.requests[-1] == f"bytes={kept}-" and not part.exists()


def test_corrupt_archive_is_refused_and_leaves_no_root(server, archive_bytes, tmp_path, monkeypatch):
    monkeypatch.setenv("AVLOWSHOT_CONFIG_DIR", str(tmp_path / "config"))
    bad = bytearray(archive_bytes)
    for i in range(len(bad) // 3, len(bad) // 3 + 64):  # inside a member's compressed data
        bad[i] ^= 0xFF
    # 1. no checksum known: the unpack finds the damage (zip CRC), nothing is recorded or left behind
    server.body = bytes(bad)
    res = _download(tmp_path / "data", server.url)
    assert res.exit_code == 2 and "archive" in res.output and "corrupt" in res.output, res.output
    assert not (tmp_path / "data" / "avgzsl_benchmark_datasets" / "UCF").exists()
    assert not list((tmp_path / "data" / "avgzsl_benchmark_datasets").glob(".staging-*"))
    assert not (tmp_path / "data" / ".downloads" / FILE).exists()
    assert not (tmp_path / "config" / "known_hashes.json").exists()
    # 2. a good download records the checksum; a corrupt one later fails it and is deleted
    server.body = archive_bytes
    assert _download(tmp_path / "good", server.url).exit_code == 0
    server.body = bytes(bad)
    res = _download(tmp_path / "data", server.url)
    assert res.exit_code == 2 and "could not fetch" in res.output, res.output
    assert not (tmp_path / "data" / "avgzsl_benchmark_datasets" / "UCF").exists()
    assert not list((tmp_path / "data" / ".downloads").glob(f"{FILE}*"))


def test_mirrors_file_and_environment_extend_the_registry(server, archive_bytes, tmp_path, monkeypatch):
    monkeypatch.setenv("AVLOWSHOT_CONFIG_DIR", str(tmp_path / "config"))
    server.body = archive_bytes
    (tmp_path / "config").mkdir()
    sha = hashlib.sha256(archive_bytes).hexdigest()
    (tmp_path / "config" / "mirrors.yaml").write_text(
        f"archives:\n  {FILE}:\n    urls: [{server.url}/{FILE}]\n    sha256: {sha}\n"
    )
    args = ["download", "--dataset", "UCF", "--features", "main", "--layout", "avca-main", "--to",
            str(tmp_path / "data"), "--mirrors-only"]  # fmt: skip
    res = runner.invoke(app, args)
    assert res.exit_code == 0 and "(verified)" in res.output, res.output
    (tmp_path / "config" / "mirrors.yaml").unlink()
    monkeypatch.setenv("AVLOWSHOT_MIRRORS", f"http://127.0.0.1:9/nothing {server.url}")  # a dead mirror first
    res = runner.invoke(app, args[:-2] + [str(tmp_path / "data2"), "--mirrors-only", "--retries", "0"])
    assert res.exit_code == 0, res.output


def test_download_refuses_bad_options(tmp_path):
    res = runner.invoke(app, ["download", "--dataset", "ucf", "--features", "cls", "--to", str(tmp_path)])
    assert res.exit_code == 2 and "use --dataset UCF" in res.output
    res = runner.invoke(app, ["download", "--dataset", "UCF", "--features", "rgb", "--to", str(tmp_path)])
    assert res.exit_code == 2 and "use one of cls, main, clipclap, avdiff" in res.output
    res = runner.invoke(app, ["download", "--dataset", "UCF", "--features", "cls", "--layout", "clipclap",
                              "--to", str(tmp_path)])  # fmt: skip
    assert res.exit_code == 2 and "use one of avca-cls, tcaf-cls" in res.output
    assert not any(tmp_path.iterdir())


def test_a_web_page_instead_of_the_archive_and_an_archive_put_in_place_by_hand(
    server, archive_bytes, tmp_path, monkeypatch
):
    monkeypatch.setenv("AVLOWSHOT_CONFIG_DIR", str(tmp_path / "config"))
    server.body = b"<!DOCTYPE html><html><body>Google Drive can't scan this file for viruses.</body></html>"
    res = _download(tmp_path / "data", server.url)
    assert res.exit_code == 2 and "an HTML page" in res.output and "run the same command again" in res.output
    downloads = tmp_path / "data" / ".downloads"
    assert not (downloads / FILE).exists()
    (downloads / FILE).write_bytes(archive_bytes)  # fetched in a browser
    before = len(server.requests)
    res = _download(tmp_path / "data", server.url)
    assert res.exit_code == 0 and "(recorded: first use)" in res.output, res.output
    assert len(server.requests) == before  # the file in place was used, nothing downloaded
