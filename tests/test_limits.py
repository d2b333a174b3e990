"""Limits and failures by kind (README, "Limits and failures"): each kind has one
mechanism, and a family of tests that tries many variants of it.

- a bad entry among the inputs (FIFO, symlink loop, over-long path, NUL byte,
  non-UTF-8 list, endless device) is reported, and the batch goes on;
- non-finite outputs (NaN weights, --scale nan) fail that image, and every JSON
  written parses with a strict parser;
- decoding memory is budgeted before decoding;
- names: any file name gives one-line errors, temporaries fit NAME_MAX,
  de-duplicated output names stay unique;
- the process: image bytes on stdin, an empty shard, closed or full stdout.

Signals and killed runs are in test_interrupts.py.
"""
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import ROOT
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nets import SQUARE_PROTOTXT, square_image, write_square_net
from PIL import Image
from synthetic import save_caffemodel

from cam_caffe.batch import Options, image_cost, run_batch
from cam_caffe.budget import MemoryBudget, parse_size
from cam_caffe.commands import main
from cam_caffe.errors import CamError, one_line
from cam_caffe.inputs import collect
from cam_caffe.netdef import load_netdef

DEMO = ["--model", "demo"]
FEW = settings(max_examples=25, deadline=None,
               suppress_health_check=[HealthCheck.function_scoped_fixture])


def cli(*args, stdin=None, cwd=ROOT, timeout=120):
    """Run the real command; no traceback, never killed by a signal."""
    child = subprocess.run([sys.executable, "-m", "cam_caffe", *map(str, args)], input=stdin,
                           capture_output=True, timeout=timeout, cwd=cwd)
    err = child.stderr.decode(errors="replace")
    assert "Traceback" not in err and "internal error" not in err, err
    assert child.returncode >= 0, f"killed by signal {-child.returncode}: {err}"
    return child.returncode, child.stdout, err


def errors(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("cam-caffe: error: ")]


def strict_json(text: str):
    """json.loads that refuses NaN and Infinity, as strict parsers do."""
    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")
    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def square(tmp_path_factory):
    prototxt, model, labels = write_square_net(tmp_path_factory.mktemp("square"))
    return ["--prototxt", str(prototxt), "--weights", str(model), "--labels", str(labels),
            "--mean", "0", "--scale", str(1 / 255), "--backend", "opencv"]


def picture(path: Path, shape=(60, 80)) -> Path:
    """A small PNG (written by Python, so any file name works)."""
    path.write_bytes(cv2.imencode(".png", square_image(10, 10, 20, shape))[1].tobytes())
    return path


# ---- one bad entry must not abort the batch --------------------------------------

def test_bad_entries_among_good_images(tmp_path):
    """Each kind of bad entry is one error line naming it; the good images are done;
    a FIFO or an endless device never blocks the run."""
    good = [picture(tmp_path / f"good{i}.png") for i in range(3)]
    os.mkfifo(tmp_path / "fifo.png")
    os.symlink("loop2.png", tmp_path / "loop1.png")
    os.symlink("loop1.png", tmp_path / "loop2.png")
    latin = picture(tmp_path / os.fsdecode(b"caf\xe9.png"))     # a Latin-1 file name
    (tmp_path / "nul.txt").write_bytes(b"good0.png\nbad\0name.png\n" + os.fsencode(latin.name) + b"\n")
    too_long = "d/" * 2100 + "x.png"                              # over PATH_MAX (4096)
    code, out, err = cli(*DEMO, "good1.png", "fifo.png", "loop1.png", "@nul.txt", "@/dev/zero",
                         too_long, "-", "good2.png", "--jsonl", "--output-dir", "out",
                         stdin=b"nothing\0here.png\n", cwd=tmp_path, timeout=60)
    assert code == 1
    lines = errors(err)
    expected = {"fifo.png": "is a FIFO, not a regular file",
                "loop1.png": "Too many levels of symbolic links",
                "nul.txt:2": "NUL byte", "stdin:1": "NUL byte",
                "/dev/zero": "is a character device, not a regular file",
                "d/d/d/": "File name too long"}
    for name, words in expected.items():
        assert any(line.startswith(f"cam-caffe: error: {name}") and words in line
                   for line in lines), (name, err)
    assert len(lines) == len(expected), err
    done = sorted(strict_json(line)["image"] for line in out.decode().splitlines())
    assert done == sorted([g.name for g in good] + [os.fsdecode(b"caf\xe9.png")])
    written = (tmp_path / "out").iterdir()
    assert sorted(p.name for p in written if p.name != ".cam-caffe") == sorted(
        [f"good{i}.cam.png" for i in range(3)] + [os.fsdecode(b"caf\xe9.cam.png")])


@pytest.mark.parametrize(("option", "what"), [("--labels", "labels"), ("--prototxt", "prototxt")])
def test_endless_model_files_are_refused(option, what, tmp_path):
    args = DEMO if option == "--labels" else ["--weights", "x.caffemodel"]
    code, _, err = cli(*args, option, "/dev/zero", picture(tmp_path / "a.png"), timeout=60)
    assert code == 3 and err.strip() == \
        "cam-caffe: error: /dev/zero: is a character device, not a regular file"


def test_model_files_from_a_pipe_are_read(tmp_path):
    """--labels <(…) is a pipe: read (up to the limit), not refused."""
    fifo = tmp_path / "labels"
    os.mkfifo(fifo)
    labels = (ROOT / "models" / "demo" / "labels.txt").read_bytes()
    writer = threading.Thread(target=lambda: fifo.write_bytes(labels))
    writer.start()
    code, out, _ = cli(*DEMO, "--labels", fifo, ROOT / "images" / "demo_star_4.png", "--jsonl")
    writer.join()
    assert code == 0 and strict_json(out)["top_k"][0]["label"] == "star"


LIST_BYTES = st.lists(st.sampled_from([bytes([b]) for b in range(256) if b not in b"/*?[@."]),
                      max_size=300).map(b"".join)    # no folders, globs or nested lists


@FEW
@given(data=LIST_BYTES)
def test_any_list_bytes_give_inputs_or_reported_problems(tmp_path, monkeypatch, data):
    """Whatever bytes a list holds (binary, NUL, not UTF-8, CR LF): collecting never
    raises; each problem is a one-line CamError naming the list and line."""
    monkeypatch.chdir(tmp_path)
    listing = tmp_path / "list.txt"
    listing.write_bytes(data)
    problems = []
    items = collect([f"@{listing}"], problems=problems)
    assert all(isinstance(p, CamError) and str(p).startswith(f"{listing}:") for p in problems)
    assert all("\n" not in one_line(str(p)) for p in problems)
    assert len(items) + len(problems) <= data.count(b"\n") + 1


def test_list_of_lists_reports_self_inclusion_only_on_a_cycle(tmp_path):
    picture(tmp_path / "a.png")
    (tmp_path / "inner.txt").write_text(f"{tmp_path / 'a.png'}\n")
    (tmp_path / "outer.txt").write_text(f"@{tmp_path / 'inner.txt'}\n@{tmp_path / 'inner.txt'}\n"
                                        f"@{tmp_path / 'outer.txt'}\n")
    problems = []
    items = collect([f"@{tmp_path / 'outer.txt'}", f"@{tmp_path / 'inner.txt'}"],
                    problems=problems)
    assert [i.path.name for i in items] == ["a.png"]
    assert [str(p) for p in problems] == [f"{tmp_path / 'outer.txt'}: list file includes itself"]
    with pytest.raises(CamError, match="includes itself"):
        collect([f"@{tmp_path / 'outer.txt'}"])


# ---- NaN and infinity ----------------------------------------------------------

@pytest.fixture(scope="module")
def nan_net(tmp_path_factory):
    folder = tmp_path_factory.mktemp("nan")
    prototxt = folder / "nan.prototxt"
    prototxt.write_text(SQUARE_PROTOTXT)
    conv = np.zeros((2, 3, 1, 1), np.float32)
    conv[0, :, 0, 0] = 1 / 3
    fc = np.array([[np.nan, 0.0], [0.0, 8.0]], np.float32)
    model = folder / "nan.caffemodel"
    save_caffemodel(load_netdef(prototxt), {"bright": [conv, np.zeros(2)], "fc": [fc, np.zeros(2)]},
                    model)
    return ["--prototxt", str(prototxt), "--weights", str(model), "--mean", "0",
            "--backend", "opencv"]


@pytest.mark.parametrize("backend", ["opencv", "onnxruntime"])
def test_nan_weights_fail_each_image(backend, nan_net, tmp_path, capsys):
    images = [picture(tmp_path / f"{i}.png") for i in range(2)]
    out = tmp_path / "out"
    code = main([*map(str, images), *nan_net, "--backend", backend, "--jsonl",
                 "--output-dir", str(out), "--save", "json"])
    captured = capsys.readouterr()
    assert code == 3, captured.err
    for image in images:
        assert f"{image}: the net's output is not finite (NaN or infinity)" in captured.err
    assert captured.out == "" and not out.exists()


@pytest.mark.parametrize(("args", "code", "words"), [
    (["--scale", "nan"], 2, "argument --scale: 'nan' is not a finite number (see cam-caffe "
                            "--help)"),
    (["--scale=-inf"], 2, "argument --scale: '-inf' is not a finite number (see cam-caffe "
                          "--help)"),
    (["--mean", "{nan_mean}"], 3, "the mean holds NaN or infinity")])
def test_non_finite_transform_is_refused(args, code, words, square, tmp_path, capsys):
    np.save(tmp_path / "nan_mean.npy", np.array([0, np.inf, 0], np.float32))
    args = [a.format(nan_mean=tmp_path / "nan_mean.npy") for a in args]
    assert main([str(picture(tmp_path / "a.png")), *square, *args]) == code
    assert capsys.readouterr().err == f"cam-caffe: error: {words}\n"


def test_float_image_of_nan_is_refused(square, tmp_path, capsys):
    path = tmp_path / "nan.tif"
    Image.fromarray(np.full((20, 30), np.nan, np.float32), "F").save(path)
    assert main([str(path), *square]) == 4
    assert f"{path}: image has NaN or infinite pixel values" in capsys.readouterr().err


def test_json_written_parses_strictly(square, tmp_path, capsys):
    images = [picture(tmp_path / f"{i}.png") for i in range(3)]
    out = tmp_path / "out"
    assert main([*map(str, images), *square, "--jsonl", "--top-k", "2", "--output-dir",
                 str(out), "--save", "json", "--boxes", "dt"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    for line in lines:
        strict_json(line)
    for saved in out.glob("*.json"):
        strict_json(saved.read_text())


# ---- decoding memory -------------------------------------------------------------

def test_image_over_the_memory_budget_is_refused_before_decoding(square, tmp_path, capsys,
                                                                 monkeypatch):
    """A header-only PNG of 30000x30000: were it decoded, the error would be about the
    truncated data; the budget refuses it from its header."""
    from nets import png_header_only
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header_only(30000, 30000))
    small = picture(tmp_path / "small.png")
    monkeypatch.setenv("CAM_CAFFE_MEMORY", "2G")
    code = main([str(bomb), str(small), *square, "--max-pixels", str(10 ** 10), "-q"])
    err = capsys.readouterr().err
    assert code == 1
    need = image_cost(30000, 30000, Options()) / 2 ** 20
    assert (f"{bomb}: 30000x30000 pixels would need about {need:.0f} MiB, over the memory "
            "budget of 2048 MiB (set CAM_CAFFE_MEMORY)") in err


@FEW
@given(sizes=st.lists(st.tuples(st.integers(8, 300), st.integers(8, 300)), min_size=1,
                      max_size=12),
       budget_pixels=st.integers(20_000, 120_000), batch=st.integers(1, 5))
def test_budget_schedules_every_image_within_the_limit(square, tmp_path, monkeypatch, sizes,
                                                       budget_pixels, batch):
    """Random image sizes and budgets: every image is done exactly once, or refused
    when it could never fit; the memory reserved at any time never exceeds the
    budget (one image alone excepted, which always fits when it fits at all)."""
    from cam_caffe import CAMNet
    options = Options(batch_size=batch, jsonl=True)
    total = image_cost(budget_pixels, 1, options)
    folder = tmp_path / f"b{len(list(tmp_path.iterdir()))}"
    folder.mkdir()
    paths = []
    for i, (h, w) in enumerate(sizes):
        paths.append(folder / f"{i}.png")
        cv2.imwrite(str(paths[-1]), np.full((h, w, 3), 128, np.uint8))
    peak = []
    original = MemoryBudget.reserve

    def watched(self, size, *args):
        got = original(self, size, *args)
        peak.append(self.used)
        return got
    monkeypatch.setattr(MemoryBudget, "reserve", watched)
    monkeypatch.setenv("CAM_CAFFE_MEMORY", str(total))
    prototxt, model, _ = (Path(square[1]), Path(square[3]), None)
    net = CAMNet(prototxt, model, backend="opencv", mean="0", scale=1 / 255)
    import io
    sink = io.StringIO()
    report = run_batch(net, collect([str(p) for p in paths]), options, sink)
    done = [json.loads(line)["image"] for line in sink.getvalue().splitlines()]
    refused = [str(path) for path, _ in report.failed]
    fits = [str(p) for p, (h, w) in zip(paths, sizes, strict=True) if image_cost(w, h, options) <= total]
    assert sorted(done) == sorted(fits) and len(done) == len(set(done))
    assert sorted(refused) == sorted(set(map(str, paths)) - set(fits))
    assert all(used <= total for used in peak)


def test_forward_out_of_memory_shrinks_the_batch(square, tmp_path, monkeypatch):
    """A forward pass that runs out of memory for a batch is retried one image at a
    time; an image that fails even alone is reported, the others are done."""
    import io

    from cam_caffe import CAMNet
    paths = [picture(tmp_path / f"{i}.png", (60 + i, 80)) for i in range(5)]
    net = CAMNet(Path(square[1]), Path(square[3]), backend="opencv", mean="0", scale=1 / 255)
    real = net.predict

    def predict(images, *args, **kwargs):
        if len(images) > 1 or images[0].shape[0] == 62:      # the batch, and image 2 alone
            raise MemoryError()
        return real(images, *args, **kwargs)
    monkeypatch.setattr(net, "predict", predict)
    sink = io.StringIO()
    report = run_batch(net, collect([str(p) for p in paths]), Options(batch_size=4, jsonl=True),
                       sink)
    done = [json.loads(line)["image"] for line in sink.getvalue().splitlines()]
    assert done == [str(p) for i, p in enumerate(paths) if i != 2]
    assert [(str(path), str(e)) for path, e in report.failed] == [
        (str(paths[2]), f"{paths[2]}: out of memory (see CAM_CAFFE_MEMORY in README.md)")]
    assert report.exit_code() == 1


def test_memory_sizes():
    assert parse_size("512M") == 512 << 20 and parse_size("2G") == 2 << 30
    assert parse_size("1.5GiB") == 3 << 29 and parse_size("1000") == 1000
    for bad in ("", "x", "-1G", "0", "2Q"):
        with pytest.raises(CamError, match="CAM_CAFFE_MEMORY"):
            parse_size(bad)


# ---- names -------------------------------------------------------------------------

@given(text=st.text())
def test_one_line_keeps_every_message_on_one_printable_line(text):
    shown = one_line(text)
    assert "\n" not in shown and "\r" not in shown
    assert all(c.isprintable() or c == " " for c in shown)
    if text.isprintable():
        assert shown == text


NAME_BYTES = st.binary(min_size=1, max_size=60).filter(
    lambda b: b"/" not in b and b"\0" not in b and b not in (b".", b".."))


@FEW
@given(name=NAME_BYTES)
def test_any_file_name_gives_a_one_line_error(tmp_path, square, capsys, name):
    """Newlines, escape sequences, undecodable bytes: the error is one line that
    names the file unambiguously (control bytes escaped)."""
    path = tmp_path / os.fsdecode(name + b".png")
    path.write_bytes(b"not an image")
    assert main([str(path), *square]) == 4
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and lines[1].startswith("cam-caffe: 1 image: 0 done, 1 failed")
    assert lines[0] == f"cam-caffe: error: {one_line(str(path))}: not an image (unknown or " \
                       "unsupported format)"
    path.unlink()


def test_long_file_names(square, tmp_path, capsys):
    """A 250-byte name works (its temporaries are shortened to fit 255 bytes); an
    output name over 255 bytes is one error line for that image."""
    fits = picture(tmp_path / ("é" * 122 + "abc.png"))                # .cam.png → 255 bytes
    too_long = picture(tmp_path / ("x" * 248 + ".png"))                # .cam.png → 256
    out = tmp_path / "out"
    code = main([str(fits), str(too_long), *square, "--output-dir", str(out), "-q"])
    err = capsys.readouterr().err
    assert code == 1
    assert (out / ("é" * 122 + "abc.cam.png")).is_file()
    assert f"{out / ('x' * 248 + '.cam.png')}: cannot write: File name too long" in err
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


@FEW
@given(names=st.lists(st.sampled_from(["x", "X", "x-2", "x-3", "y", "x-2-2"]), min_size=1,
                      max_size=40))
def test_output_names_are_unique(tmp_path, names):
    """Same-named files from many folders, mixed with names that look like the
    suffixes: every stem is unique (ignoring case) and is the name or name-N."""
    root = tmp_path / f"u{len(list(tmp_path.iterdir()))}"
    specs = []
    for i, name in enumerate(names):
        (root / str(i)).mkdir(parents=True)
        (root / str(i) / f"{name}.png").write_bytes(b"")
        specs.append(str(root / str(i) / f"{name}.png"))
    items = collect(specs)
    stems = [str(item.stem) for item in items]
    assert len({s.lower() for s in stems}) == len(stems) == len(names)
    for name, stem in zip(names, stems, strict=True):
        assert stem == name or (stem.startswith(name + "-") and stem[len(name) + 1:].isdigit())


def test_top_k_above_the_class_count(square, tmp_path, capsys):
    """--top-k 50 on a 2-class net maps both classes once, and a rerun skips."""
    image = picture(tmp_path / "a.png")
    out = tmp_path / "out"
    assert main([str(image), *square, "--top-k", "50", "--output-dir", str(out), "-q"]) == 0
    assert sorted(p.name for p in out.glob("*.png")) == ["a.cam-1.png", "a.cam-2.png"]
    assert main([str(image), *square, "--top-k", "50", "--output-dir", str(out),
                 "--skip-existing", "--jsonl"]) == 0
    assert strict_json(capsys.readouterr().out)["skipped"] is True


# ---- the process: stdin, shards, standard streams ----------------------------------

def test_image_bytes_on_stdin(tmp_path):
    """`cat img | cam-caffe - -o x.png` gives the same overlay as the file itself."""
    image = ROOT / "images" / "demo_cross_3.png"
    code, out, err = cli(*DEMO, "-", "-o", tmp_path / "piped.png", "--jsonl",
                         stdin=image.read_bytes())
    assert code == 0, err
    assert strict_json(out)["image"] == "-"
    assert cli(*DEMO, image, "-o", tmp_path / "file.png")[0] == 0
    piped = cv2.imread(str(tmp_path / "piped.png"))
    assert np.array_equal(piped, cv2.imread(str(tmp_path / "file.png")))
    code, _, _ = cli(*DEMO, "-", "--output-dir", tmp_path / "out", stdin=image.read_bytes())
    assert code == 0 and (tmp_path / "out" / "stdin.cam.png").is_file()


def test_empty_shard_is_a_success(square, tmp_path, capsys):
    from cam_caffe.inputs import in_shard
    images = [picture(tmp_path / f"{i}.png") for i in range(4)]
    items = collect([str(p) for p in images])
    empty = next(k for k in range(10) if not any(in_shard(i, (k, 10)) for i in items))
    assert main([*map(str, images), *square, "--shard", f"{empty}/10"]) == 0
    assert capsys.readouterr().err == f"cam-caffe: shard {empty}/10: 0 of 4 images\n"


def test_closed_and_full_standard_streams(tmp_path):
    image = ROOT / "images" / "demo_star_4.png"
    out = tmp_path / "out"
    # stdout closed: the files are written, the lines discarded, success
    child = subprocess.run(f"{sys.executable} -m cam_caffe --model demo {image} --output-dir "
                           f"{out} --jsonl >&-", shell=True, capture_output=True, cwd=ROOT)
    assert child.returncode == 0 and (out / "demo_star_4.cam.png").is_file()
    assert child.stderr.startswith(b"cam-caffe: 1 image: 1 done") and child.stderr.count(b"\n") == 1
    # stderr closed: the error goes nowhere, stdout stays clean, the exit code tells
    child = subprocess.run(f"{sys.executable} -m cam_caffe --model demo {image} nothing.png "
                           "--jsonl 2>&-", shell=True, capture_output=True, cwd=ROOT)
    assert child.returncode == 1
    assert [strict_json(line)["image"] for line in child.stdout.decode().splitlines()] == [str(image)]
    # stdin closed: '-' has nothing to read
    child = subprocess.run(f"{sys.executable} -m cam_caffe --model demo - <&-", shell=True,
                           capture_output=True, cwd=ROOT)
    assert child.returncode == 4
    assert child.stderr == b"cam-caffe: error: stdin: closed, so '-' has no inputs to read\n"
    # stdout on a full disk: one line, exit 5
    with open("/dev/full", "w") as full:
        child = subprocess.run([sys.executable, "-m", "cam_caffe", *DEMO, str(image), "--jsonl"],
                               stdout=full, stderr=subprocess.PIPE, cwd=ROOT)
    assert child.returncode == 5
    assert child.stderr == b"cam-caffe: error: stdout: cannot write: No space left on device\n"
