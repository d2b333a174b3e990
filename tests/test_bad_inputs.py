"""A corpus of bad inputs: each gives one clear line naming the file and the problem,
a non-zero exit code, no traceback, no core dump and no partial output file."""
import os
import resource
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest
from conftest import IN_CI, error_lines, run_cli
from nets import TINY, png_header_only, square_image, write_random_net, write_square_net
from PIL import Image


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    prototxt, model, labels = write_square_net(tmp_path_factory.mktemp("net"))
    return ["--prototxt", prototxt, "--weights", model, "--labels", labels, "--mean", "0",
            "--scale", 1 / 255, "--backend", "opencv"]


def make_corpus(folder):
    """Bad images (name → expected words in the error) and odd-but-valid ones."""
    rng = np.random.default_rng(0)
    picture = cv2.GaussianBlur(rng.integers(0, 256, (60, 80, 3), np.uint8), (0, 0), 2)
    Image.fromarray(picture).save(folder / "ok.jpg", quality=90)
    Image.fromarray(picture).save(folder / "ok.png")
    bad = {
        "zero.jpg": (b"", "not an image"),
        "trunc.jpg": ((folder / "ok.jpg").read_bytes()[:700], "cannot decode"),
        "trunc.png": ((folder / "ok.png").read_bytes()[:700], "truncated"),
        "text.jpg": (b"hello, I am text\n" * 20, "not an image"),
        "bomb.png": (png_header_only(50000, 50000), "over the limit"),
    }
    for name, (data, _) in bad.items():
        (folder / name).write_bytes(data)
    expected = {name: words for name, (_, words) in bad.items()}
    (folder / "dir.jpg").mkdir()
    # Valid oddities: each must be processed.
    Image.fromarray(np.full((1, 1, 3), 200, np.uint8)).save(folder / "one.png")
    Image.fromarray((rng.integers(0, 65535, (20, 30))).astype(np.uint16)).save(folder / "deep16.png")
    Image.fromarray(picture[:, :, 0]).save(folder / "grey.png")
    Image.fromarray(np.dstack([picture, np.full((60, 80), 128, np.uint8)])).save(folder / "rgba.png")
    Image.fromarray(picture).convert("CMYK").save(folder / "cmyk.jpg")
    exif = Image.Exif()
    exif[0x0112] = 8
    Image.fromarray(picture).save(folder / "rotated.jpg", exif=exif)
    return expected, ["ok.jpg", "ok.png", "one.png", "deep16.png", "grey.png", "rgba.png",
                      "cmyk.jpg", "rotated.jpg"]


def test_bad_images_in_a_batch(net, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    expected, good = make_corpus(images)
    out = tmp_path / "out"
    inputs = sorted(images.iterdir())
    child = run_cli(*inputs, "--output-dir", out, "--save", "overlay,json", "-q", *net)
    assert child.returncode == 1, child.stderr
    errors = error_lines(child)
    for name, words in expected.items():
        line = next((entry for entry in errors if f"{images / name}: " in entry), None)
        assert line is not None, f"{name} not reported:\n{child.stderr}"
        assert words in line
    for name in good:
        stem = name.rsplit(".", 1)[0]
        assert (out / f"{stem}.cam.png").is_file(), f"{name} was not processed"
    for name in expected:
        assert not list(out.glob(name.rsplit(".", 1)[0] + ".*"))
    # EXIF orientation 8 (rotate 90° counter-clockwise): 80x60 becomes 60 wide, 80 high.
    assert cv2.imread(str(out / "rotated.cam.png")).shape[:2] == (80, 60)
    assert not list(out.rglob("*.tmp"))


def test_directory_named_like_an_image_is_refused_as_image(net, tmp_path):
    (tmp_path / "x.jpg").mkdir()
    child = run_cli(tmp_path / "x.jpg", *net)
    assert child.returncode == 4 and "no input images" in child.stderr


def drop_file_permission_checks():
    """Wrapper that makes even root obey file modes (no CAP_DAC_OVERRIDE)."""
    if os.geteuid() != 0:
        return ()
    if not shutil.which("setpriv"):
        if IN_CI:
            pytest.fail("setpriv is needed to test permissions as root")
        pytest.skip("running as root without setpriv")
    return ("setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--")


def test_unreadable_image_and_unwritable_output(net, tmp_path):
    wrapper = drop_file_permission_checks()
    secret = tmp_path / "secret.png"
    cv2.imwrite(str(secret), square_image(0, 0))
    secret.chmod(0)
    child = run_cli(secret, *net, wrapper=wrapper)
    assert child.returncode == 4 and f"{secret}: permission denied" in child.stderr
    readable = tmp_path / "fine.png"
    cv2.imwrite(str(readable), square_image(0, 0))
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    child = run_cli(readable, "--output-dir", locked / "sub", *net, wrapper=wrapper)
    assert child.returncode == 5 and "cannot write" in child.stderr and "locked/sub" in child.stderr
    child = run_cli(readable, "-o", locked / "o.png", *net, wrapper=wrapper)
    assert child.returncode == 5 and f"{locked / 'o.png'}: cannot write" in child.stderr
    assert not os.listdir(locked)


def test_file_where_a_directory_is_expected(net, tmp_path):
    image = tmp_path / "i.png"
    cv2.imwrite(str(image), square_image(0, 0))
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    child = run_cli(image, "--output-dir", blocker, *net)
    assert child.returncode == 5 and "cannot write" in child.stderr
    child = run_cli(image, "-o", blocker / "o.png", *net)
    assert child.returncode == 5 and "cannot write" in child.stderr


def test_full_disk_leaves_no_partial_file(net, tmp_path):
    image = tmp_path / "i.png"
    cv2.imwrite(str(image), np.random.default_rng(0).integers(0, 256, (400, 400, 3), np.uint8))
    out = tmp_path / "full"
    out.mkdir()

    def small_file_limit():          # writes past 4 KiB fail with EFBIG, as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
    child = run_cli(image, "--output-dir", out, "--save", "overlay,npy", *net,
                    preexec=small_file_limit)
    assert child.returncode == 5
    assert "cannot write" in child.stderr and "File too large" in child.stderr
    assert os.listdir(out) == [] or all(not n.endswith(".tmp") for n in os.listdir(out))
    assert not (out / "i.cam.png").exists()


def test_full_tmpfs(net, tmp_path):
    """A real full file system: a 64 KiB tmpfs in a private mount namespace."""
    if not shutil.which("unshare") or subprocess.run(["unshare", "-m", "true"],
                                                       capture_output=True).returncode:
        # test_full_disk_leaves_no_partial_file covers a full disk everywhere
        pytest.skip("this machine does not allow private mount namespaces (unshare -m)")
    image = tmp_path / "i.png"
    cv2.imwrite(str(image), np.random.default_rng(1).integers(0, 256, (300, 300, 3), np.uint8))
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    script = (f"mount -t tmpfs -o size=64k tmpfs {mount} && "
              f"{sys.executable} -m cam_caffe {image} --output-dir {mount} --save overlay,npy "
              + " ".join(map(str, net)) + f"; echo rc=$?; ls -a {mount}")
    child = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True)
    assert "rc=5" in child.stdout, child.stdout + child.stderr
    assert "No space left on device" in child.stderr and "Traceback" not in child.stderr
    listing = child.stdout.split("rc=5")[1].split()
    assert not [n for n in listing if n.endswith(".tmp")]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    prototxt, weights = write_random_net(folder, TINY, "tiny")
    image = folder / "i.png"
    cv2.imwrite(str(image), square_image(0, 0))
    return folder, prototxt, weights, image


@pytest.mark.parametrize("backend", ["opencv", "caffe"])
def test_bad_model_files(tiny, backend):
    if backend == "caffe":
        from conftest import require_pycaffe
        require_pycaffe()
    folder, prototxt, weights, image = tiny
    cases = []
    cases.append(("missing", prototxt, folder / "nope.caffemodel", "weights file not found"))
    (folder / "empty.caffemodel").write_bytes(b"")
    cases.append(("empty", prototxt, folder / "empty.caffemodel", "empty"))
    (folder / "trunc.caffemodel").write_bytes(weights.read_bytes()[:-37])
    cases.append(("truncated", prototxt, folder / "trunc.caffemodel", "caffemodel"))
    _, other = write_random_net(folder, TINY.replace("num_output: 4", "num_output: 6"), "other")
    cases.append(("other net", prototxt, other, "does not fit"))
    (folder / "syntax.prototxt").write_text(TINY.replace("layer {", "layer {{", 1))
    cases.append(("syntax", folder / "syntax.prototxt", weights, "not a valid Caffe prototxt"))
    (folder / "unknown.prototxt").write_text(
        TINY + 'layer { name: "u" type: "Mystery" bottom: "prob" top: "u" }\n')
    cases.append(("unknown layer", folder / "unknown.prototxt", weights, "Mystery"))
    (folder / "python.prototxt").write_text(
        TINY + 'layer { name: "p" type: "Python" bottom: "prob" top: "p" '
               'python_param { module: "os" layer: "system" } }\n')
    cases.append(("python layer", folder / "python.prototxt", weights, "--allow-python-layers"))
    cases.append(("missing prototxt", folder / "none.prototxt", weights, "prototxt file not found"))
    for name, proto, model, words in cases:
        child = run_cli(image, "--prototxt", proto, "--weights", model, "--mean", "0",
                        "--backend", backend)
        assert child.returncode == 3, f"{name}: {child.returncode} {child.stderr}"
        lines = child.stderr.strip().splitlines()
        assert len(lines) == 1 and words in lines[0], f"{name}: {child.stderr}"


@pytest.mark.parametrize(("args", "words"), [
    (["--class", "7"], "out of range"),
    (["--class", "giraffe"], "no such label"),
    (["--batch-size", "0"], "not a positive integer"),
    (["--batch-size", "-3"], "not a positive integer"),
    (["--shard", "5/4"], "need 0 <= I < N"),
    (["--shard", "x"], "expected I/N"),
    (["--top-k", "0"], "not a positive integer"),
    (["--mean", "1,2"], "gives 2 values"),
    (["--backend", "tensorflow"], "invalid choice"),
    (["--colormap", "nope"], "not a matplotlib colormap"),
])
def test_bad_arguments(net, tmp_path, args, words):
    image = tmp_path / "i.png"
    cv2.imwrite(str(image), square_image(0, 0))
    child = run_cli(image, *net, *args, "-o", tmp_path / "o.png")
    assert child.returncode in (2, 3), child.stderr
    assert len(child.stderr.strip().splitlines()) == 1 and words in child.stderr
    assert not (tmp_path / "o.png").exists()
