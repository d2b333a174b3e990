"""End to end with real files: a generated Caffe model whose CAM is predictable."""
import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from nets import square_image, write_square_net

from cam_caffe import CAMNet, models
from cam_caffe.commands import main
from cam_caffe.errors import EXIT_SOME_FAILED

POSITIONS = [(10, 10), (10, 150), (110, 20), (60, 80), (115, 155)]


@pytest.fixture(scope="module")
def square_net(tmp_path_factory):
    return write_square_net(tmp_path_factory.mktemp("square"))


@pytest.mark.parametrize(("top", "left"), POSITIONS)
def test_cam_peak_falls_on_the_square(square_net, top, left):
    prototxt, model, labels = square_net
    net = CAMNet(prototxt, model, backend="opencv", mean="0", scale=1 / 255, labels=labels)
    image = square_image(top, left)
    result = net.predict([image], classes=[0])[0]
    assert result.cams.shape == (1, 16, 16)
    cam = result.cam(0, result.image_size)
    assert cam.shape == image.shape[:2]
    # The peak is on the square, up to one feature cell (the map is 16x16).
    cell_y, cell_x = 160 / 16, 200 / 16
    y, x = np.unravel_index(np.argmax(cam), cam.shape)
    assert top - cell_y <= y < top + 40 + cell_y and left - cell_x <= x < left + 40 + cell_x
    # The map's centre of mass is inside the square.
    weight = np.clip(cam, 0, None)
    ys, xs = np.indices(cam.shape)
    cy, cx = (weight * ys).sum() / weight.sum(), (weight * xs).sum() / weight.sum()
    assert top <= cy < top + 40 and left <= cx < left + 40
    # Outside the square the map is low: the square's mean is far above the rest.
    inside = np.zeros(cam.shape, bool)
    inside[top:top + 40, left:left + 40] = True
    assert cam[inside].mean() > 5 * max(cam[~inside].mean(), 1e-6)


def test_top1_is_background_for_small_square(square_net):
    prototxt, model, labels = square_net
    net = CAMNet(prototxt, model, backend="opencv", mean="0", scale=1 / 255, labels=labels)
    result = net.predict([square_image(60, 80)])[0]
    assert result.top(2)[0][1] == "background"
    assert result.classes == [1]
    np.testing.assert_allclose(result.probs.sum(), 1.0, rtol=1e-6)


def test_cli_writes_overlay_png(square_net, tmp_path, capsys):
    prototxt, model, labels = square_net
    image_path = tmp_path / "in.png"
    cv2.imwrite(str(image_path), square_image(60, 80))
    out = tmp_path / "out" / "overlay.png"
    code = main([str(image_path), "--class", "square", "--prototxt", str(prototxt),
                 "--weights", str(model), "--labels", str(labels), "--mean", "0",
                 "--scale", str(1 / 255), "--backend", "opencv", "--top-k", "2", "-o", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "background" in printed and "square" in printed
    overlay = cv2.imread(str(out))
    assert overlay.shape == (160, 200, 3)
    assert overlay.std() > 10                     # not blank
    # The paper style's jet colouring: red where the square is, blue far from it.
    b, _g, r = overlay[80, 100].astype(int)
    assert r > 120 and b < 60                    # jet at the max: dark red
    b, _g, r = overlay[150, 5].astype(int)
    assert b > r


def test_cli_seed_style_is_net_sized(square_net, tmp_path):
    prototxt, model, _ = square_net
    image_path = tmp_path / "in.jpg"
    cv2.imwrite(str(image_path), square_image(10, 10))
    out = tmp_path / "seed.png"
    assert main([str(image_path), "--prototxt", str(prototxt), "--weights", str(model),
                 "--mean", "0", "--scale", str(1 / 255), "--backend", "opencv",
                 "--style", "seed", "-o", str(out)]) == 0
    overlay = cv2.imread(str(out))
    assert overlay.shape == (32, 32, 3)


def test_missing_default_weights_is_one_clear_line(tmp_path):
    image_path = tmp_path / "in.png"
    cv2.imwrite(str(image_path), square_image(0, 0))
    child = subprocess.run([sys.executable, "-m", "cam_caffe", str(image_path)],
                           capture_output=True, text=True,
                           env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert child.returncode == 3
    assert "Traceback" not in child.stderr
    folder = tmp_path / "cache" / "cam-caffe" / "models" / "googlenet-cam"
    assert f" in {folder}); run: cam-caffe models download googlenet-cam, or pass --model demo" \
        in child.stderr
    assert len(child.stderr.strip().splitlines()) == 1


def test_closed_stdout_stops_quietly(square_net, tmp_path):
    """`cam-caffe … --jsonl | head -n 1`: exit 141 with nothing on stderr, not an error."""
    prototxt, weights, _ = square_net
    for i in range(40):
        cv2.imwrite(str(tmp_path / f"in{i:02d}.png"), square_image(10, 10))
    child = subprocess.Popen([sys.executable, "-m", "cam_caffe", str(tmp_path), "--prototxt",
                              str(prototxt), "--weights", str(weights), "--jsonl",
                              "--batch-size", "1"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = child.stdout.readline()
    child.stdout.close()                  # the reader goes away, as `head -n 1` does
    stderr = child.stderr.read().decode()
    assert child.wait(timeout=120) == 141, stderr
    assert first.startswith(b"{") and stderr == ""


def test_command_output_is_complete_through_a_pipe(square_net, tmp_path):
    """The command skips the interpreter's teardown (os._exit): its buffered
    stdout must still arrive in full, and the exit code must be main()'s."""
    prototxt, weights, _ = square_net
    names = [f"in{i:02d}.png" for i in range(30)]
    for name in names:
        cv2.imwrite(str(tmp_path / name), square_image(10, 10))
    args = [str(tmp_path), "--prototxt", str(prototxt), "--weights", str(weights)]
    buffered = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    child = subprocess.run([sys.executable, "-m", "cam_caffe", *args, "--jsonl"],
                           capture_output=True, text=True, env=buffered)
    assert child.returncode == 0, child.stderr
    records = [json.loads(line) for line in child.stdout.splitlines()]
    assert [Path(r["image"]).name for r in records] == names
    (tmp_path / "in00.png").write_bytes(b"not an image")
    child = subprocess.run([sys.executable, "-m", "cam_caffe", *args], capture_output=True,
                           text=True, env=buffered)
    assert child.returncode == main([*args, "--quiet"]) == EXIT_SOME_FAILED, child.stderr
    assert len(child.stdout.splitlines()) >= 29 and "in00.png" in child.stderr
    listing = subprocess.run([sys.executable, "-m", "cam_caffe", "models", "list"],
                             capture_output=True, text=True, env=buffered)  # print, no flush
    assert listing.returncode == 0
    assert all(model.name in listing.stdout for model in models.list_models())
