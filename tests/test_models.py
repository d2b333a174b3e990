"""``cam-caffe models``: the registry, and the real download code against a local HTTP server.

The server (127.0.0.1, port 0, one thread) serves generated files, honours
Range requests unless told not to, and can drop a connection mid-file. No
test touches the outside network.
"""
from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import cv2
import numpy as np
import pytest
from conftest import GOOGLENET, draw_on_terminal
from nets import SQUARE_LABELS, SQUARE_PROTOTXT, square_image, write_square_net
from synthetic import random_weights, save_caffemodel
from tqdm import tqdm

from cam_caffe import models
from cam_caffe.commands import main, options
from cam_caffe.commands import models as models_command
from cam_caffe.errors import EXIT_MODEL, ModelError
from cam_caffe.models import FileSpec, Model, fetch, registry, verify
from cam_caffe.netdef import load_netdef

# The same layer names with other sizes: a caffemodel of "another net".
OTHER_PROTOTXT = SQUARE_PROTOTXT.replace("num_output: 2 kernel_size: 1",
                                         "num_output: 4 kernel_size: 1")
NOT_CAM_PROTOTXT = """
name: "NoGap"
input: "data"
input_shape { dim: 1 dim: 3 dim: 8 dim: 8 }
layer { name: "fc" type: "InnerProduct" bottom: "data" top: "fc"
        inner_product_param { num_output: 2 } }
layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }
"""


# ---------------------------------------------------------------- the server

class Server:
    """Files by name, plus per-file misbehaviour; records (path, Range header) per request."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.drops: dict[str, list[int]] = {}   # name -> bytes to send before dropping, per request
        self.ignore_range: set[str] = set()
        self.requests: list[tuple[str, str | None]] = []
        self.url = ""

    def ranges(self, name: str) -> list[str | None]:
        return [r for path, r in self.requests if path == name]


def _handler(state: Server):
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            name = urlsplit(self.path).path.lstrip("/")
            range_header = self.headers.get("Range")
            state.requests.append((name, range_header))
            data = state.files.get(name)
            if data is None:
                self.send_error(404, "Not Found")
                return
            start = 0
            if range_header and name not in state.ignore_range:
                start = int(re.fullmatch(r"bytes=(\d+)-", range_header).group(1))
                if start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            else:
                self.send_response(200)
            body = data[start:]
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            drops = state.drops.get(name)
            if drops:
                self.wfile.write(body[:drops.pop(0)])   # then the connection closes early
                self.close_connection = True
                return
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    return Handler


@pytest.fixture
def server():
    state = Server()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    httpd.daemon_threads = True
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield state
    httpd.shutdown()
    httpd.server_close()
    thread.join(5)


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """A private cache, no base-URL override from the environment, no retry delay."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(models.BASE_URL_ENV, raising=False)
    monkeypatch.setattr(fetch, "RETRY_DELAY", 0.0)


# ---------------------------------------------------------------- generated files

def _caffemodel(folder: Path, prototxt_text: str, name: str, seed: int = 0) -> bytes:
    prototxt = folder / f"{name}.prototxt"
    prototxt.write_text(prototxt_text)
    netdef = load_netdef(prototxt)
    model = folder / f"{name}.caffemodel"
    save_caffemodel(netdef, random_weights(netdef, seed), model)
    return model.read_bytes()


@pytest.fixture(scope="module")
def blobs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("blobs")
    good = _caffemodel(folder, SQUARE_PROTOTXT, "tiny")
    rng = np.random.default_rng(7)
    return {
        "tiny.prototxt": SQUARE_PROTOTXT.encode(),
        "tiny.txt": SQUARE_LABELS.encode(),
        "tiny.caffemodel": good,
        "truncated.caffemodel": good[:len(good) // 2],
        "corrupt.caffemodel": rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        "other.caffemodel": _caffemodel(folder, OTHER_PROTOTXT, "other"),
        "nocam.prototxt": NOT_CAM_PROTOTXT.encode(),
        "three.txt": b"a\nb\nc\n",
    }


def register(monkeypatch, base: str, name: str = "tiny", *, weights: str = "tiny.caffemodel",
             size: int | None = None, sha256: str | None = None,
             prototxt: str = "tiny.prototxt", labels: str | None = "tiny.txt") -> Model:
    """A temporary registry entry whose files are under ``base``."""
    model = Model(name=name, description="tiny test net",
                  prototxt=FileSpec(f"{base}/{prototxt}"),
                  weights=FileSpec(f"{base}/{weights}", size, sha256),
                  labels=FileSpec(f"{base}/{labels}") if labels else None,
                  num_classes=2, mean=(0.0, 0.0, 0.0), input_size=(32, 32))
    monkeypatch.setitem(models.REGISTRY, name, model)
    return model


def cache(*parts: str) -> Path:
    return models.cache_root().joinpath(*parts)


def leftovers(name: str = "tiny") -> list[str]:
    folder = cache(name)
    return sorted(p.name for p in folder.iterdir() if p.name != ".lock") if folder.exists() else []


# ---------------------------------------------------------------- registry

def test_registry_entries():
    names = [m.name for m in models.list_models()]
    assert names[0] == models.DEFAULT_MODEL == "googlenet-cam"
    assert set(names) == {"googlenet-cam", "vgg16-cam", "alexnet-cam",
                          "googlenet-cam-places205", "demo"}
    official = "http://cnnlocalization.csail.mit.edu/demoCAM/models/"
    assert models.get("googlenet-cam").weights.location == \
        official + "imagenet_googlenetCAM_train_iter_120000.caffemodel"
    for name, weights in [("vgg16-cam", "vgg16CAM_train_iter_90000.caffemodel"),
                          ("alexnet-cam", "alexnetplusCAM_imagenet.caffemodel"),
                          ("googlenet-cam-places205",
                           "places_googlenetCAM_train_iter_120000.caffemodel")]:
        m = models.get(name)
        assert m.weights.location == official + weights and m.weights.remote
        assert m.prototxt.remote and m.prototxt.filename.startswith("deploy_")
    for m in models.list_models():
        for _, spec in m.files():            # no invented checksums: only real hex digests
            assert spec.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", spec.sha256)
    assert models.get("demo").local and not models.get("googlenet-cam").local
    assert models.get("googlenet-cam").mean_arg == "104.0,117.0,123.0"


def test_project_googlenet_prototxt_passes_the_prototxt_checks():
    model = models.get("googlenet-cam")
    assert models.file_path(model, model.prototxt) == GOOGLENET
    netdef, spec = verify.check_prototxt(model, models.file_path(model, model.prototxt))
    assert spec.num_classes == 1000 and netdef.input_shape == (1, 3, 224, 224)


def test_unknown_name_lists_the_models():
    with pytest.raises(ModelError, match=r"unknown model 'googlenet-cm': did you mean "
                                         r"'googlenet-cam'\?.*vgg16-cam"):
        models.get("googlenet-cm")


def test_path_of_a_model_not_downloaded(capsys):
    assert main(["models", "path", "vgg16-cam"]) == EXIT_MODEL
    err = capsys.readouterr().err
    assert "not downloaded" in err and "run: cam-caffe models download vgg16-cam" in err
    assert err.count("\n") == 1


def test_demo_model_absent_then_present(tmp_path, monkeypatch, blobs, capsys):
    monkeypatch.setattr(registry, "PROJECT_ROOT", tmp_path / "project")
    with pytest.raises(ModelError, match=r"model 'demo' is not present: .*deploy.prototxt"):
        models.model_path("demo")
    with pytest.raises(ModelError, match="not present"):
        models.download("demo")
    demo = tmp_path / "project" / "models" / "demo"
    demo.mkdir(parents=True)
    (demo / "deploy.prototxt").write_bytes(blobs["tiny.prototxt"])
    (demo / "demo.caffemodel").write_bytes(blobs["tiny.caffemodel"])
    (demo / "labels.txt").write_bytes(blobs["tiny.txt"])
    expected = (demo / "deploy.prototxt", demo / "demo.caffemodel", demo / "labels.txt")
    assert models.model_path("demo") == expected
    assert models.download("demo") == expected            # verified, nothing fetched
    assert main(["models", "list"]) == 0
    line = next(entry for entry in capsys.readouterr().out.splitlines() if entry.startswith("demo "))
    assert "local" in line


def test_default_model_missing_error_is_true(server, tmp_path, monkeypatch, capsys):
    """Without its files, the main command names what is missing and the absolute folder;
    copying the files there, or running the command it names, makes it run."""
    register(monkeypatch, "http://models.invalid/cam", name=models.DEFAULT_MODEL)
    monkeypatch.setattr(options, "DEFAULT_WEIGHTS", tmp_path / "no-checkout-weights.caffemodel")
    square = dict(zip(["tiny.prototxt", "tiny.caffemodel", "tiny.txt"],
                      (p.read_bytes() for p in write_square_net(tmp_path)), strict=True))
    image = tmp_path / "square.png"
    cv2.imwrite(str(image), square_image(60, 80))
    folder = cache(models.DEFAULT_MODEL)
    assert main([str(image), "--jsonl"]) == EXIT_MODEL
    assert capsys.readouterr().err == (
        f"cam-caffe: error: model 'googlenet-cam' is not downloaded (missing tiny.prototxt, "
        f"tiny.txt, tiny.caffemodel in {folder}); run: cam-caffe models download googlenet-cam, "
        "or pass --model demo, or --prototxt and --weights\n")

    def runs() -> None:
        assert main([str(image), "--jsonl"]) == 0
        record = json.loads(capsys.readouterr().out)
        assert record["model"]["weights"] == str(folder / "tiny.caffemodel")
        assert record["top_k"][0]["label"] == "square"

    folder.mkdir(parents=True)
    for name, data in square.items():          # copied into the folder it names
        (folder / name).write_bytes(data)
    runs()
    for name in square:                         # or the command it names
        (folder / name).unlink()
    server.files.update(square)
    monkeypatch.setenv(models.BASE_URL_ENV, server.url)
    assert main(["models", "download", "googlenet-cam", "-q"]) == 0
    capsys.readouterr()
    runs()
    assert main([str(image), "--model", "demo", "--jsonl"]) == 0   # the other way out


# ---------------------------------------------------------------- downloads that work

def test_download_through_the_cli(server, blobs, monkeypatch, capsys):
    server.files.update(blobs)
    good = blobs["tiny.caffemodel"]
    # Official-looking locations that must not be contacted: --base-url replaces them.
    register(monkeypatch, "http://models.invalid/cam", size=len(good),
             sha256=hashlib.sha256(good).hexdigest())
    assert main(["models", "download", "tiny", "--base-url", server.url + "/"]) == 0
    out = capsys.readouterr().out
    # Only the weights have a published checksum: not "verified".
    assert "tiny: structure checked (no published checksum for its prototxt, labels)\n" in out
    folder = cache("tiny")
    assert (folder / "tiny.caffemodel").read_bytes() == good
    assert (folder / "tiny.prototxt").read_bytes() == blobs["tiny.prototxt"]
    assert (folder / "tiny.txt").read_bytes() == blobs["tiny.txt"]
    assert leftovers() == ["tiny.caffemodel", "tiny.prototxt", "tiny.txt"]
    assert all(r is None for _, r in server.requests)          # fresh downloads: no Range

    assert main(["models", "path", "tiny"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"prototxt: {folder / 'tiny.prototxt'}", f"weights:  {folder / 'tiny.caffemodel'}",
        f"labels:   {folder / 'tiny.txt'}"]
    assert models.model_path("tiny") == (folder / "tiny.prototxt", folder / "tiny.caffemodel",
                                         folder / "tiny.txt")
    assert main(["models", "list"]) == 0
    line = next(entry for entry in capsys.readouterr().out.splitlines() if entry.startswith("tiny "))
    assert " yes " in line

    # Present files are not fetched again; --force fetches them again.
    count = len(server.requests)
    assert main(["models", "download", "tiny", "--base-url", server.url]) == 0
    assert len(server.requests) == count
    assert main(["models", "download", "tiny", "--base-url", server.url, "--force"]) == 0
    assert len(server.requests) == count + 3


def test_base_url_from_the_environment(server, blobs, monkeypatch):
    server.files.update(blobs)
    register(monkeypatch, "http://models.invalid/cam", labels=None)
    monkeypatch.setenv(models.BASE_URL_ENV, server.url)
    _prototxt, weights, labels = models.download("tiny", progress=False)
    assert labels is None and weights.read_bytes() == blobs["tiny.caffemodel"]
    assert sorted(name for name, _ in server.requests) == ["tiny.caffemodel", "tiny.prototxt"]


def test_progress_bar_on_a_terminal(server, blobs, monkeypatch):
    """One bar a file, left at 100% with its size; a try that stopped early is erased
    and the bar of the resumed one starts where it stopped."""
    server.files.update(blobs)
    good = blobs["tiny.caffemodel"]
    server.drops["tiny.caffemodel"] = [len(good) // 2]
    register(monkeypatch, server.url)
    screen = draw_on_terminal(monkeypatch, lambda: models.download("tiny"))
    sizes = {"tiny.prototxt": len(blobs["tiny.prototxt"]), "tiny.txt": len(blobs["tiny.txt"]),
             "tiny.caffemodel": len(good)}
    assert len(screen) == 3, screen
    for line, (name, size) in zip(screen, sizes.items(), strict=True):
        shown = tqdm.format_sizeof(size)
        assert line.startswith(f"{name}: 100%|") and f"| {shown}/{shown} [" in line, line
        assert re.search(r"\[\d\d:\d\d<00:00, +[\d.]+[kMG]?B/s\]$", line), line


def test_no_progress_bar_when_not_a_terminal_or_quiet(server, blobs, monkeypatch, capsys):
    server.files.update(blobs)
    register(monkeypatch, server.url)
    models.download("tiny", progress=True)          # pytest's stderr is not a terminal
    assert capsys.readouterr().err == ""
    assert draw_on_terminal(monkeypatch,
                            lambda: models.download("tiny", progress=False, force=True)) == []


def test_dropped_connection_is_resumed_with_range(server, blobs, monkeypatch):
    server.files.update(blobs)
    good = blobs["tiny.caffemodel"]
    half = len(good) // 2
    server.drops["tiny.caffemodel"] = [half]
    register(monkeypatch, server.url)
    _, weights, _ = models.download("tiny", progress=False)
    assert server.ranges("tiny.caffemodel") == [None, f"bytes={half}-"]
    assert weights.read_bytes() == good
    assert leftovers() == ["tiny.caffemodel", "tiny.prototxt", "tiny.txt"]


def test_interrupted_download_keeps_its_part_and_resumes_next_time(server, blobs, monkeypatch):
    server.files.update(blobs)
    good = blobs["tiny.caffemodel"]
    server.drops["tiny.caffemodel"] = [100] * models.RETRIES   # every try gets 100 bytes more
    register(monkeypatch, server.url)
    with pytest.raises(ModelError, match=r"tiny\.caffemodel: download interrupted .*"
                                         r"run the command again to resume") as e:
        models.download("tiny", progress=False)
    assert "\n" not in str(e.value)
    part = cache("tiny", "tiny.caffemodel.part")
    assert part.read_bytes() == good[:100 * models.RETRIES]
    assert not cache("tiny", "tiny.caffemodel").exists()
    _, weights, _ = models.download("tiny", progress=False)       # the server behaves now
    assert server.ranges("tiny.caffemodel") == [None, "bytes=100-", "bytes=200-", "bytes=300-"]
    assert weights.read_bytes() == good and not part.exists()


def test_server_ignoring_range_restarts_the_file(server, blobs, monkeypatch):
    server.files.update(blobs)
    good = blobs["tiny.caffemodel"]
    server.ignore_range.add("tiny.caffemodel")
    register(monkeypatch, server.url)
    part = cache("tiny", "tiny.caffemodel.part")
    part.parent.mkdir(parents=True)
    part.write_bytes(b"\xff" * 123)               # not a prefix of the file: must be replaced
    _, weights, _ = models.download("tiny", progress=False)
    assert server.ranges("tiny.caffemodel") == ["bytes=123-"]    # asked; got 200 and all bytes
    assert weights.read_bytes() == good and not part.exists()


def test_complete_part_file_answered_416(server, blobs, monkeypatch):
    server.files.update(blobs)
    good = blobs["tiny.caffemodel"]
    register(monkeypatch, server.url)                 # size unknown: the server must say
    part = cache("tiny", "tiny.caffemodel.part")
    part.parent.mkdir(parents=True)
    part.write_bytes(good)
    _, weights, _ = models.download("tiny", progress=False)
    assert server.ranges("tiny.caffemodel") == [f"bytes={len(good)}-"]
    assert weights.read_bytes() == good


def test_known_size_complete_part_needs_no_request(server, blobs, monkeypatch):
    server.files.update(blobs)
    good = blobs["tiny.caffemodel"]
    register(monkeypatch, server.url, size=len(good))
    part = cache("tiny", "tiny.caffemodel.part")
    part.parent.mkdir(parents=True)
    part.write_bytes(good)
    models.download("tiny", progress=False)
    assert server.ranges("tiny.caffemodel") == []


# ---------------------------------------------------------------- downloads that fail

def _fails(monkeypatch, server, pattern: str, **entry) -> ModelError:
    register(monkeypatch, server.url, **entry)
    with pytest.raises(ModelError, match=pattern) as e:
        models.download("tiny", progress=False)
    message = str(e.value)
    assert "\n" not in message
    weights = models.get("tiny").weights.filename
    assert not cache("tiny", weights).exists()
    assert not cache("tiny", weights + ".part").exists()
    assert not models.is_downloaded("tiny")
    return e.value


def test_truncated_with_known_size(server, blobs, monkeypatch):
    server.files.update(blobs)
    n, m = len(blobs["truncated.caffemodel"]), len(blobs["tiny.caffemodel"])
    e = _fails(monkeypatch, server, rf"truncated\.caffemodel: truncated: got {n} of {m} bytes",
               weights="truncated.caffemodel", size=m)
    assert f"downloaded from {server.url}/truncated.caffemodel" in str(e)


def test_truncated_with_unknown_size(server, blobs, monkeypatch):
    server.files.update(blobs)
    _fails(monkeypatch, server, r"truncated\.caffemodel: (not a Caffe caffemodel|incomplete)",
           weights="truncated.caffemodel")


def test_corrupt_caffemodel(server, blobs, monkeypatch):
    server.files.update(blobs)
    e = _fails(monkeypatch, server, r"corrupt\.caffemodel: not a Caffe caffemodel",
               weights="corrupt.caffemodel")
    assert str(cache("tiny", "corrupt.caffemodel")) in str(e)
    assert ".part" not in str(e)


def test_caffemodel_of_another_net(server, blobs, monkeypatch):
    server.files.update(blobs)
    _fails(monkeypatch, server, r"other\.caffemodel: does not fit its prototxt .*layer 'bright'",
           weights="other.caffemodel")


def test_checksum_mismatch(server, blobs, monkeypatch):
    server.files.update(blobs)
    _fails(monkeypatch, server, r"tiny\.caffemodel: checksum mismatch: SHA-256 is [0-9a-f]{64}, "
                                r"expected 0{64}", sha256="0" * 64)


def test_weights_missing_a_layer(server, blobs, tmp_path, monkeypatch):
    prototxt = tmp_path / "tiny.prototxt"
    prototxt.write_text(SQUARE_PROTOTXT)
    netdef = load_netdef(prototxt)
    weights = random_weights(netdef)
    del weights["fc"]
    save_caffemodel(netdef, weights, tmp_path / "nofc.caffemodel")
    server.files.update(blobs, **{"nofc.caffemodel": (tmp_path / "nofc.caffemodel").read_bytes()})
    _fails(monkeypatch, server, r"nofc\.caffemodel: incomplete: no weights for layer 'fc'",
           weights="nofc.caffemodel")


def test_prototxt_without_cam_structure(server, blobs, monkeypatch):
    server.files.update(blobs)
    _fails(monkeypatch, server, r"nocam\.prototxt: no CAM structure found",
           prototxt="nocam.prototxt")
    assert not cache("tiny", "nocam.prototxt").exists()
    assert server.ranges("tiny.caffemodel") == []          # stopped before the weights


def test_labels_that_do_not_count_the_classes(server, blobs, monkeypatch):
    server.files.update(blobs)
    _fails(monkeypatch, server, r"three\.txt: has 3 labels, the net has 2 classes",
           labels="three.txt")


def test_404(server, blobs, monkeypatch):
    server.files.update(blobs)
    e = _fails(monkeypatch, server, r"/missing\.caffemodel: HTTP 404", weights="missing.caffemodel")
    assert str(e).startswith(f"{server.url}/missing.caffemodel: ")


def test_404_through_the_cli_is_one_line(server, blobs, monkeypatch, capsys):
    server.files.update(blobs)
    register(monkeypatch, server.url, weights="missing.caffemodel")
    assert main(["models", "download", "tiny", "-q"]) == EXIT_MODEL
    err = capsys.readouterr().err
    assert err.startswith("cam-caffe: error: ") and err.count("\n") == 1
    assert f"{server.url}/missing.caffemodel: HTTP 404" in err


def _unreachable() -> str:
    """The URL of a local port nothing listens on: a server that cannot be reached."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_connection_refused(blobs, monkeypatch):
    url = _unreachable()
    register(monkeypatch, url)
    with pytest.raises(ModelError, match=rf"^{re.escape(url)}/tiny\.prototxt: cannot reach the "
                                         r"server \(Connection refused\); "):
        models.download("tiny", progress=False)
    assert leftovers() == []


def test_offline_download_says_how_to_get_the_files_and_that_works(blobs, monkeypatch, capsys):
    """Offline: the one-line error names --base-url and the absolute path to copy the
    file to; files copied there are checked and used without contacting the server."""
    url = _unreachable()
    register(monkeypatch, url)
    folder = cache("tiny")
    for name in ["tiny.prototxt", "tiny.txt", "tiny.caffemodel"]:   # the download order
        assert main(["models", "download", "tiny"]) == EXIT_MODEL
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err
        assert err == (f"cam-caffe: error: {url}/{name}: cannot reach the server (Connection "
                       f"refused); fetch it from a mirror with --base-url URL (or "
                       f"${models.BASE_URL_ENV}), or copy it to {folder / name} and run the "
                       "command again\n")
        assert folder.is_absolute()
        (folder / name).write_bytes(blobs[name])              # do what it says
    assert main(["models", "download", "tiny"]) == 0
    assert capsys.readouterr().out.startswith("tiny: structure checked (no published checksum")
    assert models.model_path("tiny")[1] == folder / "tiny.caffemodel"
    assert leftovers() == ["tiny.caffemodel", "tiny.prototxt", "tiny.txt"]


def test_a_bad_file_put_there_by_hand_is_reported_and_kept(blobs, monkeypatch):
    register(monkeypatch, _unreachable())
    folder = cache("tiny")
    folder.mkdir(parents=True)
    for name in ["tiny.prototxt", "tiny.txt"]:
        (folder / name).write_bytes(blobs[name])
    (folder / "tiny.caffemodel").write_bytes(blobs["other.caffemodel"])   # another net's
    with pytest.raises(ModelError, match=r"tiny\.caffemodel: does not fit its prototxt .*"
                                         r"\(it was there before this download: delete it, "
                                         r"or use --force, to download it again\)$"):
        models.download("tiny", progress=False)
    assert (folder / "tiny.caffemodel").read_bytes() == blobs["other.caffemodel"]


def test_verified_only_with_published_checksums(monkeypatch):
    good = hashlib.sha256(b"x").hexdigest()
    tiny = register(monkeypatch, "http://models.invalid", sha256=good)
    assert models_command.checked(tiny) == \
        "structure checked (no published checksum for its prototxt, labels)"
    all_summed = Model(name="x", description="", prototxt=FileSpec("http://h/p", None, good),
                       weights=FileSpec("http://h/w", None, good), labels=None,
                       num_classes=None, mean=None)
    assert models_command.checked(all_summed) == \
        "verified (published SHA-256) and structure checked"
    assert models_command.checked(models.get("googlenet-cam")) == \
        "structure checked (no published checksum for its labels, weights)"
    assert models_command.checked(models.get("demo")) == "structure checked (ships with cam-caffe)"


def test_models_alone_shows_its_own_help(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: cam-caffe models ") and "download" in out and "path" in out
    assert main(["models", "nosuch"]) == 2
    assert "(see cam-caffe models --help)" in capsys.readouterr().err
