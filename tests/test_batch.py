"""Batch runs: many inputs, mirrored outputs, bad images in the mix, resume and shards."""
import json
import subprocess
import sys

import cv2
import numpy as np
import pytest
from nets import square_image, write_square_net

from cam_caffe.commands import main
from cam_caffe.errors import CamError
from cam_caffe.inputs import collect, in_shard, parse_shard


@pytest.fixture(scope="module")
def square_net(tmp_path_factory):
    return write_square_net(tmp_path_factory.mktemp("square"))


def net_args(square_net):
    prototxt, model, labels = square_net
    return ["--prototxt", str(prototxt), "--weights", str(model), "--labels", str(labels),
            "--mean", "0", "--scale", str(1 / 255), "--backend", "opencv"]


def make_tree(root, count=210, bad_every=25):
    """``count`` images in nested folders, with a bad file every ``bad_every``."""
    rng = np.random.default_rng(0)
    bad = []
    for i in range(count):
        folder = root / f"set{i % 3}" / ("deep" if i % 2 else "")
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"img{i:03d}.png"
        if i % bad_every == 7:
            path.write_bytes(b"not an image at all")
            bad.append(path)
        else:
            top, left = rng.integers(0, 120, 2)
            cv2.imwrite(str(path), square_image(int(top), int(left)))
    return bad


def test_batch_of_210_with_bad_images(square_net, tmp_path, capsys):
    images = tmp_path / "images"
    bad = make_tree(images)
    out = tmp_path / "out"
    code = main([str(images), "--output-dir", str(out), "--save", "overlay,heatmap,npy,json",
                 "--boxes", "paper", "--batch-size", "32", "--jsonl", *net_args(square_net)])
    captured = capsys.readouterr()
    assert code == 1                                         # some failed
    records = [json.loads(line) for line in captured.out.splitlines()]
    assert len(records) == 210 - len(bad)
    for path in bad:
        assert f"{path}: not an image" in captured.err
    assert f"210 images: {210 - len(bad)} done, {len(bad)} failed, 0 skipped" in captured.err
    assert "Traceback" not in captured.err
    # Outputs mirror the input tree, one set per good image, nothing for bad ones.
    record = next(r for r in records if r["image"].endswith("set1/deep/img001.png"))
    stem = out / "set1" / "deep" / "img001"
    for suffix in (".cam.png", ".heatmap.png", ".cam.npy", ".cam-full.npy", ".json"):
        assert (stem.parent / (stem.name + suffix)).is_file()
    raw = np.load(stem.parent / "img001.cam.npy")
    full = np.load(stem.parent / "img001.cam-full.npy")
    assert raw.shape == (1, 16, 16) and full.shape == (1, 160, 200) and raw.dtype == np.float32
    saved = json.loads((stem.parent / "img001.json").read_text())
    assert saved["maps"] == record["maps"] and saved["backend"] == "opencv"
    assert len(saved["maps"][0]["boxes"]) == 1
    for path in bad:
        rel = path.relative_to(images).with_suffix("")
        assert not list((out / rel.parent).glob(rel.name + ".*"))
    assert not list(out.rglob("*.tmp"))


def test_paper_box_finds_the_square(square_net, tmp_path, capsys):
    path = tmp_path / "one.png"
    cv2.imwrite(str(path), square_image(50, 90))
    assert main([str(path), "--class", "square", "--boxes", "paper", "--jsonl",
                 *net_args(square_net)]) == 0
    box = json.loads(capsys.readouterr().out)["maps"][0]["boxes"][0]
    x, y, w, h = box
    # The square is at x 90..130, y 50..90; the box covers it, within a feature cell (12.5 px).
    assert abs(x - 90) <= 13 and abs(y - 50) <= 13
    assert abs(x + w - 130) <= 13 and abs(y + h - 90) <= 13


def test_top_k_maps_classes_by_name_and_montage(square_net, tmp_path, capsys):
    path = tmp_path / "a.png"
    cv2.imwrite(str(path), square_image(10, 10))
    out = tmp_path / "out"
    assert main([str(path), "--top-k", "2", "--output-dir", str(out), "--montage",
                 *net_args(square_net)]) == 0
    assert (out / "a.cam-1.png").is_file() and (out / "a.cam-2.png").is_file()
    montage = cv2.imread(str(out / "a.montage.png"))
    assert montage.shape[0] == 224 + 28 and montage.shape[1] > 3 * 224
    capsys.readouterr()
    assert main([str(path), "--class", "background,square", "--jsonl", *net_args(square_net)]) == 0
    record = json.loads(capsys.readouterr().out)
    assert [m["class"] for m in record["maps"]] == [1, 0]


def test_same_names_do_not_collide_and_inputs_are_never_overwritten(square_net, tmp_path):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        cv2.imwrite(str(tmp_path / folder / "x.png"), square_image(0, 0))
    items = collect([str(tmp_path / "a" / "x.png"), str(tmp_path / "b" / "x.png")])
    assert [str(i.stem) for i in items] == ["x", "x-2"]
    # Writing into the input folder: outputs get their own names, the input stays.
    before = (tmp_path / "a" / "x.png").read_bytes()
    assert main([str(tmp_path / "a"), "--output-dir", str(tmp_path / "a"), "-q",
                 *net_args(square_net)]) == 0
    assert (tmp_path / "a" / "x.png").read_bytes() == before
    assert (tmp_path / "a" / "x.cam.png").is_file()
    # A second run over the same folder does not pick up the outputs as inputs.
    assert [i.path.name for i in collect([str(tmp_path / "a")], tmp_path / "a")] == ["x.png"]


def test_inputs_from_list_glob_and_stdin(tmp_path):
    for name in ("p.png", "q.jpg", "r.txt"):
        (tmp_path / name).write_bytes(b"")
    listing = tmp_path / "list.txt"
    listing.write_text(f"{tmp_path / 'p.png'}\n# comment\n{tmp_path / 'q.jpg'}\n")
    assert [i.path.name for i in collect([f"@{listing}"])] == ["p.png", "q.jpg"]
    assert [i.path.name for i in collect([str(tmp_path / "*.*")])] == ["p.png", "q.jpg"]
    import io
    got = collect(["-"], stdin=io.StringIO(f"{tmp_path / 'q.jpg'}\n"))
    assert [i.path.name for i in got] == ["q.jpg"]


def test_skip_existing_resumes(square_net, tmp_path):
    images = tmp_path / "in"
    images.mkdir()
    for i in range(5):
        cv2.imwrite(str(images / f"{i}.png"), square_image(i * 10, i * 10))
    out = tmp_path / "out"
    assert main([str(images), "--output-dir", str(out), "-q", *net_args(square_net)]) == 0
    (out / "3.cam.png").unlink()
    stamp = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert main([str(images), "--output-dir", str(out), "-q", "--skip-existing",
                 *net_args(square_net)]) == 0
    assert (out / "3.cam.png").is_file()
    assert all(out.joinpath(n).stat().st_mtime_ns == t for n, t in stamp.items())


def test_shards_split_the_inputs_exactly(tmp_path):
    for i in range(50):
        (tmp_path / f"{i}.png").write_bytes(b"")
    items = collect([str(tmp_path)])
    shards = [[i.path for i in items if in_shard(i, (k, 4))] for k in range(4)]
    assert sorted(p for s in shards for p in s) == sorted(i.path for i in items)
    assert all(shards)
    assert parse_shard("3/4") == (3, 4)
    for bad in ("4/4", "a/b", "1", "-1/3", "0/0"):
        with pytest.raises(CamError):
            parse_shard(bad)


def test_ten_crop_through_the_api(square_net):
    from cam_caffe import CAMNet
    prototxt, model, labels = square_net
    net = CAMNet(prototxt, model, backend="opencv", mean="0", scale=1 / 255, labels=labels)
    image = square_image(40, 60)
    result = net.predict([image], classes=[0], ten_crop=True)[0]
    assert result.cams.shape == (1, 37, 37)                  # 32 · 256/224, like 224 → 256
    single = net.predict([image], classes=[0])[0]
    assert abs(result.probs[0] - single.probs[0]) < 0.2
    cam = result.cam(0, image.shape[:2])
    y, x = np.unravel_index(np.argmax(cam), cam.shape)
    assert 40 - 15 <= y < 80 + 15 and 60 - 15 <= x < 100 + 15


def test_batch_cli_exit_codes_in_a_subprocess(square_net, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"")
    child = subprocess.run([sys.executable, "-m", "cam_caffe", str(bad), *net_args(square_net)],
                           capture_output=True, text=True)
    assert child.returncode == 4 and "Traceback" not in child.stderr
    assert f"{bad}: " in child.stderr


def test_shard_membership_does_not_depend_on_where_the_tree_is(tmp_path):
    """The same relative tree under two roots (as on two machines of a job array)
    splits the same way: membership follows the output stem, not the absolute path."""
    for root in ("a", "elsewhere/b"):
        for i in range(40):
            folder = tmp_path / root / f"sub{i % 3}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{i}.png").write_bytes(b"")
    split = {}
    for root in ("a", "elsewhere/b"):
        items = collect([str(tmp_path / root)])
        split[root] = {str(i.stem): k for i in items for k in range(4) if in_shard(i, (k, 4))}
        assert len(split[root]) == 40 and len(set(split[root].values())) == 4
    assert split["a"] == split["elsewhere/b"]
