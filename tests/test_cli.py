"""The command line a new user meets: arguments checked before any work, outputs that
never replace what the run did not create, and output that says what happened."""
import fcntl
import os
import pty
import re
import shutil
import struct
import subprocess
import sys
import termios

import cv2
import numpy as np
import pytest
from conftest import ROOT, draw_on_terminal, error_lines, read_terminal, run_cli, terminal_screen
from nets import COLOUR_ARGS, colour_images, write_colour_net

from cam_caffe import CAMNet
from cam_caffe.commands import main
from cam_caffe.compose import CAPTION_FONT, fit_caption, montage
from cam_caffe.errors import EXIT_CODES
from cam_caffe.progress import finish, progress_bar

IMAGES = ROOT / "images"
STAR = IMAGES / "demo_star_4.png"          # the demo model's class 4, "star"
DEMO = ["--model", "demo", "--backend", "opencv"]


def test_o_refuses_to_overwrite_its_input(tmp_path):
    photo = tmp_path / "star.png"
    shutil.copy(STAR, photo)
    os.link(photo, tmp_path / "hardlink.png")
    (tmp_path / "symlink.png").symlink_to(photo)
    before = photo.read_bytes()
    for target in ("star.png", "hardlink.png", "symlink.png"):
        child = run_cli(photo, *DEMO, "-o", tmp_path / target)
        assert child.returncode == 5, child.stderr
        assert error_lines(child) == [f"cam-caffe: error: {tmp_path / target}: -o would "
                                      "overwrite the input image"]
        assert child.stdout == ""                   # refused before the model ran
    assert photo.read_bytes() == before


def test_output_dir_never_replaces_a_file_it_did_not_write(tmp_path, capsys):
    """--output-dir = the input folder, which holds the user's own photo.cam.png."""
    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(STAR, folder / "photo.png")
    shutil.copy(IMAGES / "demo_circle_0.png", folder / "other.png")
    users = folder / "photo.cam.png"
    users.write_bytes(b"the user's own file")
    args = [str(folder), "--output-dir", str(folder), "-q", *DEMO]
    assert main(args) == 1                                   # photo refused, other done
    err = capsys.readouterr().err
    assert f"{users}: exists and was not written by cam-caffe; --overwrite replaces it" in err
    assert users.read_bytes() == b"the user's own file"
    assert cv2.imread(str(folder / "other.cam.png")) is not None
    # A rerun of the same command replaces its own earlier outputs, and still not the user's.
    own = folder / "other.cam.png"
    own.write_bytes(b"stale output of an earlier run")
    assert main(args) == 1
    assert users.read_bytes() == b"the user's own file"
    assert cv2.imread(str(own)) is not None
    # --overwrite: asked for, so replaced; from then on the file is cam-caffe's own.
    assert main([*args, "--overwrite"]) == 0
    assert cv2.imread(str(users)) is not None
    assert main(args) == 0
    capsys.readouterr()


def test_own_outputs_are_recognised_across_processes_and_shards(tmp_path):
    """Each process keeps its own list; a later run reads them all."""
    images = tmp_path / "images"
    shutil.copytree(IMAGES, images)
    out = tmp_path / "out"
    for shard in ("0/2", "1/2"):
        child = run_cli(images, "--output-dir", out, "--shard", shard, "-q", *DEMO)
        assert child.returncode == 0, child.stderr
    lists = list((out / ".cam-caffe").glob("written-*.txt"))
    assert len(lists) == 2
    assert len(list(out.glob("*.cam.png"))) == len(list(IMAGES.glob("*.png")))
    child = run_cli(images, "--output-dir", out, "--save", "overlay,json", "-q", *DEMO)
    assert child.returncode == 0, child.stderr
    assert len(list((out / ".cam-caffe").glob("written-*.txt"))) == 3   # the .json files


@pytest.mark.parametrize(("args", "code", "words"), [
    (["-o", "x.xyz"], 2, "x.xyz: unknown image format '.xyz'"),
    (["-o", "noext"], 2, "noext: no extension"),
    (["--show"], 2, "--show needs a display"),
    (["--output-dir", "{file}"], 5, "is not a directory"),
    (["--output-dir", "{file}/sub"], 5, "cannot write"),
    (["-o", "{file}/o.png"], 5, "cannot write"),
])
def test_outputs_are_checked_before_the_model_loads(tmp_path, args, code, words):
    """The model named here does not exist: the output's error must come first, as one
    line, however many images there are."""
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    args = [a.replace("{file}", str(blocker)) for a in args]
    images = IMAGES if "--output-dir" in args else STAR
    child = subprocess.run(
        [sys.executable, "-m", "cam_caffe", str(images), *args, "--prototxt",
         str(tmp_path / "none.prototxt"), "--weights", str(tmp_path / "none.caffemodel")],
        capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "MPLBACKEND": "agg"})
    assert child.returncode == code, child.stderr
    assert len(child.stderr.splitlines()) == 1 and words in child.stderr, child.stderr
    assert blocker.read_text() == "a file" and sorted(os.listdir(tmp_path)) == ["blocker"]


@pytest.mark.parametrize(("args", "words"), [
    (["--alpha", "-0.1"], "'-0.1' is not a number in [0, 1]"),
    (["--alpha", "1.5"], "'1.5' is not a number in [0, 1]"),
    (["--alpha", "nan"], "'nan' is not a number in [0, 1]"),
    (["--alpha", "inf"], "'inf' is not a number in [0, 1]"),
    (["--box-threshold", "0"], "'0' is not a number in (0, 1]"),
    (["--box-threshold", "1.01"], "'1.01' is not a number in (0, 1]"),
    (["--box-threshold", "nan"], "'nan' is not a number in (0, 1]"),
    (["--scale", "nan"], "'nan' is not a finite number"),
    (["--scale=-inf"], "'-inf' is not a finite number"),
    (["--mean", "1e999"], "'1e999': every value must be a finite number"),
    (["--mean", "104,nan,123"], "'104,nan,123': every value must be a finite number"),
    (["--skip-existing"], "--skip-existing needs --output-dir"),
    (["--overwrite"], "--overwrite needs --output-dir"),
    (["--model", "googlenet"], "unknown model 'googlenet': did you mean 'googlenet-cam'? "
                               "known models: googlenet-cam, "),
    (["--class", "5"], "--class 5: out of range, the net has 5 classes (0–4)"),
    (["--class", "-1"], "--class -1: out of range, the net has 5 classes (0–4)"),
])
def test_bad_values_exit_2_with_the_valid_range(args, words):
    child = run_cli(STAR, *DEMO, *args)
    assert child.returncode == 2, child.stderr
    assert error_lines(child) == child.stderr.splitlines() and len(error_lines(child)) == 1
    assert words in child.stderr, child.stderr


@pytest.mark.parametrize("args", [["--alpha", "0"], ["--alpha", "1"], ["--box-threshold", "1"],
                                  ["--boxes", "paper", "--box-threshold", "1e-3"]])
def test_the_ends_of_the_ranges_are_accepted(tmp_path, args, capsys):
    assert main([str(STAR), *DEMO, *args, "-o", str(tmp_path / "o.png")]) == 0
    assert cv2.imread(str(tmp_path / "o.png")) is not None


def test_ambiguous_label_name_is_refused_with_the_ids(tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("circle\ncrane\nring, circle\ncross\ncrane\n")
    child = run_cli(STAR, *DEMO, "--labels", labels, "--class", "crane")
    assert child.returncode == 2
    assert error_lines(child) == ["cam-caffe: error: --class 'crane' is ambiguous: classes "
                                  "1 (crane), 4 (crane); give the id"]
    child = run_cli(STAR, *DEMO, "--labels", labels, "--class", "circle")   # a comma part too
    assert "classes 0 (circle), 2 (ring, circle)" in child.stderr
    child = run_cli(STAR, *DEMO, "--labels", labels, "--class", "cross,4", "--jsonl")
    assert child.returncode == 0 and '"class": 3' in child.stdout and '"class": 4' in child.stdout


def test_each_mapped_class_is_printed_with_where_its_map_went(tmp_path):
    child = run_cli(STAR, *DEMO, "--class", "3")
    assert child.returncode == 0
    lines = child.stdout.splitlines()
    assert lines[0] == str(STAR)
    assert re.fullmatch(r" +4  0\.9\d{3}  star", lines[1])           # the top-1 class
    assert re.fullmatch(r"  map 3  0\.0\d{3}  cross \(map not written\)", lines[2])
    assert len(lines) == 3
    assert "no file written: -o FILE writes an image's overlay, --output-dir DIR" in child.stderr

    child = run_cli(STAR, *DEMO, "--class", "cross,star", "-o", tmp_path / "o.png")
    lines = child.stdout.splitlines()
    assert re.fullmatch(r" +4  0\.9\d{3}  star \(map not written\)", lines[1])
    assert re.fullmatch(rf"  map 3  0\.0\d{{3}}  cross -> {tmp_path / 'o.png'}", lines[2])
    assert "no file written" not in child.stderr

    out = tmp_path / "out"
    child = run_cli(STAR, *DEMO, "--top-k", "2", "--output-dir", out, "--save",
                    "overlay,heatmap,json")
    lines = child.stdout.splitlines()
    assert lines[1].endswith(f"  star -> {out / 'demo_star_4.cam-1.png'}, "
                             f"{out / 'demo_star_4.heatmap-1.png'}")
    assert lines[2].endswith(f"  triangle -> {out / 'demo_star_4.cam-2.png'}, "
                             f"{out / 'demo_star_4.heatmap-2.png'}")
    assert lines[3:] == [f"  files: {out / 'demo_star_4.json'}"]


def test_every_run_ends_with_a_summary_on_stderr(tmp_path):
    bad = tmp_path / "images"
    shutil.copytree(IMAGES, bad)
    (bad / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    child = run_cli(bad, "--output-dir", out, "--jsonl", *DEMO)
    assert child.returncode == 1
    summary = child.stderr.splitlines()[-1]
    assert re.fullmatch(r"cam-caffe: 7 images: 6 done, 1 failed, 0 skipped in \d+\.\d s "
                        r"\(\d+\.\d images/s\)", summary), child.stderr
    assert len(child.stdout.splitlines()) == 6             # stdout: only the JSON lines
    child = run_cli(bad, "--output-dir", out, "--skip-existing", *DEMO)
    assert "7 images: 0 done, 1 failed, 6 skipped" in child.stderr
    child = run_cli(STAR, "-o", tmp_path / "o.png", *DEMO)
    assert "cam-caffe: 1 image: 1 done, 0 failed, 0 skipped" in child.stderr
    child = run_cli(STAR, "-o", tmp_path / "o.png", "-q", *DEMO)
    assert child.stderr == "" and child.stdout == ""


@pytest.mark.parametrize("columns", [None, 60])       # None: a terminal of size 0x0
def test_progress_bar_and_records_share_a_terminal_cleanly(tmp_path, columns):
    """stdout and stderr on one terminal: the bar (counts, rate, time left) is redrawn
    below the records, never mixed into them, fits the terminal (80 columns where it
    has no size), and gives way to the summary at the end."""
    main_fd, other_fd = pty.openpty()
    if columns:
        fcntl.ioctl(other_fd, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    child = subprocess.Popen([sys.executable, "-m", "cam_caffe", str(IMAGES), "--batch-size",
                              "1", "--output-dir", str(tmp_path / "out"), *DEMO],
                             stdin=subprocess.DEVNULL, stdout=other_fd, stderr=other_fd)
    os.close(other_fd)
    data = read_terminal(main_fd)
    assert child.wait(timeout=60) == 0
    for done in range(1, 6):                                 # the bar was drawn after each
        assert data.count(f"| {done}/6 [".encode()) == 1, done
    screen = [line for line in terminal_screen(data) if line]
    bar = r" *\d+%\|.*\| \d/6 \[\d\d:\d\d<(\d\d:\d\d|\?), +(\d+\.\d+|\?)img/s\]"
    names = sorted(p.name for p in IMAGES.glob("*.png"))
    records = [line for line in screen if not line.startswith(" ")
               and not re.fullmatch(bar, line)]
    assert records[:-1] == [str(IMAGES / name) for name in names]      # never mixed
    assert re.fullmatch(r"cam-caffe: 6 images: 6 done, 0 failed, 0 skipped in .*", records[-1])
    bars = [line for line in screen if re.fullmatch(bar, line)]
    assert len(bars) == 1 and bars[0].startswith("100%|") and "| 6/6 [" in bars[0]  # the last
    assert len(bars[0]) <= (columns or 80)


def test_score_cam_forwards_have_a_bar_that_stays_when_done(monkeypatch, tmp_path):
    prototxt, weights, _ = write_colour_net(tmp_path)
    net = CAMNet(prototxt, weights, backend="opencv", method="scorecam", batch_size=3,
                 progress=True, **COLOUR_ARGS)
    images = colour_images(2)
    screen = draw_on_terminal(monkeypatch, lambda: net.predict(images, top_k=1))
    k = net.spec.channels
    assert len(screen) == 1 and len(screen[0]) <= 80
    assert re.fullmatch(rf"masked forwards: 100%\|.*\| {2 * k}/{2 * k} "
                        r"\[\d\d:\d\d<00:00, +\d+\.\d+fwd/s\]", screen[0]), screen


def test_a_bar_stopped_before_its_total_is_erased(monkeypatch):
    def stopped() -> None:
        bar = progress_bar(10, True, "img", mininterval=0)
        bar.update(4)
        finish(bar)

    def done() -> None:
        bar = progress_bar(None, True, "B", unit_scale=True, desc="x.caffemodel")
        bar.update(2_500_000)
        finish(bar)

    assert draw_on_terminal(monkeypatch, stopped) == []
    assert draw_on_terminal(monkeypatch, lambda: finish(progress_bar(10, False, "img"))) == []
    assert draw_on_terminal(monkeypatch, lambda: finish(progress_bar(0, True, "img"))) == []
    screen = draw_on_terminal(monkeypatch, done)          # no total: counts and rate
    assert len(screen) == 1 and re.fullmatch(r"x\.caffemodel: 2\.50MB \[\d\d:\d\d, .*B/s\]",
                                             screen[0]), screen


def test_help_names_the_subcommands_and_every_exit_code(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for command in ("cam-caffe models list", "cam-caffe evaluate", "cam-caffe export"):
        assert command in text
    codes = [int(c) for c in re.findall(r"^  (\d+) +\S", text.split("exit codes:")[1], re.M)]
    readme = (ROOT / "README.md").read_text()
    table = readme.split("### Exit codes")[1].split("\n\n")[1]
    assert codes == sorted(EXIT_CODES) == [int(c) for c in re.findall(r"^\| (\d+) \|", table,
                                                                       re.M)]


@pytest.mark.parametrize("label", ["garter snake, grass snake", "x" * 80, "a,b", "short"])
@pytest.mark.parametrize("width", [60, 120, 224])
def test_montage_caption_shortens_the_label_never_the_probability(label, width):
    text = fit_caption(label, 0.8123, width)
    assert text.endswith("0.812")
    assert cv2.getTextSize(text, *CAPTION_FONT)[0][0] <= width
    shown = text[:-5].rstrip()
    if cv2.getTextSize(f"{label} 0.812", *CAPTION_FONT)[0][0] <= width:
        assert shown == label
    elif shown:
        assert shown == label.split(",")[0] or (shown.endswith("..")
                                                and label.startswith(shown[:-2]))


def test_montage_draws_the_fitted_caption():
    image = np.full((100, 100, 3), 128, np.uint8)
    picture = montage(image, [image], [("garter snake, grass snake", 0.8123)], height=56)
    strip = picture[:28, 56 + 4:]                          # the overlay's caption
    expected = np.full((28, 56, 3), 255, np.uint8)
    cv2.putText(expected, fit_caption("garter snake, grass snake", 0.8123, 48), (4, 19),
                CAPTION_FONT[0], CAPTION_FONT[1], (0, 0, 0), CAPTION_FONT[2], cv2.LINE_AA)
    assert np.array_equal(strip, expected)


def test_ledgers_see_each_others_records_as_they_grow(tmp_path):
    """Two processes' ledgers of one folder (as two shards or Dask workers have)."""
    from cam_caffe.output import OutputLedger
    first, second = OutputLedger(tmp_path), OutputLedger(tmp_path)
    a, b = tmp_path / "a.cam.png", tmp_path / "sub" / "b\nnewline.cam.png"
    b.parent.mkdir()
    for path in (a, b):
        path.write_bytes(b"x")
    assert second.foreign([a, b]) == [a, b]
    first.record([a])
    assert second.foreign([a, b]) == [b]            # read since the last look
    first.record([b])
    with open(next((tmp_path / ".cam-caffe").glob("written-*.txt")), "ab") as f:
        f.write(b'"half a line')                    # a writer killed mid-line
    assert second.foreign([a, b]) == []
    assert len(list((tmp_path / ".cam-caffe").iterdir())) == 1     # one list per writer


HEAVY = ("cv2", "PIL", "matplotlib", "onnx", "onnxruntime", "caffe", "distributed")


def imported(*python_args: str) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Run ``python -X importtime ARGS`` in a child; its result and every top-level
    package it imported (the first part of each module ``-X importtime`` lists)."""
    child = subprocess.run([sys.executable, "-X", "importtime", *python_args], cwd=ROOT,
                           capture_output=True, text=True, timeout=60)
    names = re.findall(r"^import time:\s+\d+ \|\s+\d+ \| *(\S+)$", child.stderr, re.M)
    return child, {name.split(".")[0] for name in names}


def test_import_lists_are_read_right():
    """The check below sees heavy imports where there are some."""
    child, packages = imported("-c", "import cam_caffe.image")
    assert child.returncode == 0 and {"cv2", "PIL", "numpy"} <= packages


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["models", "list"],
                                  ["models", "path", "demo"]])
def test_commands_that_only_print_start_without_heavy_imports(args):
    """`cam-caffe --help`, `--version` and `models list`/`path` (the real entry point,
    launch.entry) load no OpenCV, Pillow, matplotlib, ONNX, backend or Dask."""
    child, packages = imported("-m", "cam_caffe", *args)
    assert child.returncode == 0 and child.stdout.strip()
    assert not packages & set(HEAVY), sorted(packages & set(HEAVY))


def test_import_cam_caffe_is_light():
    child, packages = imported("-c", "import cam_caffe")
    assert child.returncode == 0 and "cam_caffe" in packages
    assert not packages & {*HEAVY, "numpy"}


@pytest.mark.parametrize("bad", [["--scale", "nan"], ["--mean", "1,2,inf"], ["--model", "nope"],
                                 ["--box-threshold", "0"], ["--dt-thresholds", "300"],
                                 ["--gpu", "-1"], ["--input-size", "0x3"], ["--threads", "0"],
                                 ["--max-memory", "lots"], ["--method", "magic"]])
def test_evaluate_checks_the_shared_options_as_cam_caffe_does(bad, capsys):
    """The model, backend, method and box options are declared once: a bad value is the
    same one-line usage error (exit 2) from both commands, before any model loads."""
    errors = []
    for argv in ([str(STAR), *bad], ["evaluate", str(STAR), "--faithfulness", *bad]):
        assert main(argv) == 2
        errors.append(capsys.readouterr().err.replace("cam-caffe evaluate --help", "cam-caffe --help"))
    assert errors[0] == errors[1] and errors[0].count("\n") == 1 and bad[0] in errors[0]
