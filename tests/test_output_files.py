"""What the written files contain: each one decoded and compared with the in-memory
result of the same images (same batches, same backend), map by map."""
import io
import json
import resource
import subprocess
import sys

import cv2
import numpy as np
import pytest
from conftest import ROOT
from nets import COLOUR_ARGS, colour_images, write_colour_net

from cam_caffe import CAMNet
from cam_caffe.batch import Options, output_paths, run_batch
from cam_caffe.boxes import Box, BoxRule, draw_boxes, dt_boxes_from_cam, paper_box
from cam_caffe.cam import upsample
from cam_caffe.commands import main
from cam_caffe.compose import Look, montage, render_overlay, thumbnail
from cam_caffe.inputs import collect
from cam_caffe.output import encode_image, write_bytes, write_image
from cam_caffe.render import heatmap, overlay_paper, overlay_seed

BATCH = 2
TOP_K = 3


@pytest.fixture(scope="module")
def colour_net(tmp_path_factory):
    return write_colour_net(tmp_path_factory.mktemp("colour"))


def cli_args(colour_net):
    prototxt, weights, labels = colour_net
    return ["--prototxt", str(prototxt), "--weights", str(weights), "--labels", str(labels),
            "--mean", COLOUR_ARGS["mean"], "--scale", str(COLOUR_ARGS["scale"]),
            "--backend", "opencv", "-q", "--workers", "0"]      # in this process: see README


def api_net(colour_net):
    prototxt, weights, labels = colour_net
    return CAMNet(prototxt, weights, backend="opencv", labels=labels, **COLOUR_ARGS)


def write_inputs(folder, images):
    for i, image in enumerate(images):
        write_image(folder / f"{i}.png", image)
    return collect([str(folder)])


def in_memory(net, items, images, **kwargs):
    """The API's predictions, batch for batch as run_batch groups them."""
    results = []
    for start in range(0, len(items), BATCH):
        chunk = [images[int(item.path.stem)] for item in items[start:start + BATCH]]
        results += net.predict(chunk, **kwargs)
    return results


def read_png(path):
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert image is not None, path
    return image


def test_every_file_holds_its_own_map(colour_net, tmp_path):
    """Overlay R and heatmap R are map R's, the .npy files hold all top-k maps, the
    JSON holds each map's class, probability and box, the montage every overlay."""
    images = colour_images(5)
    items = write_inputs(tmp_path / "in", images)
    out = tmp_path / "out"
    assert main([str(tmp_path / "in"), "--output-dir", str(out), "--top-k", str(TOP_K),
                 "--save", "overlay,heatmap,npy,json", "--boxes", "paper", "--montage",
                 "--batch-size", str(BATCH), *cli_args(colour_net)]) == 0
    net = api_net(colour_net)
    for item, result in zip(items, in_memory(net, items, images, top_k=TOP_K), strict=True):
        image, stem = images[int(item.path.stem)], out / item.path.stem
        record = json.loads(stem.with_suffix(".json").read_text())
        assert record["size"] == {"width": image.shape[1], "height": image.shape[0]}
        assert [t["class"] for t in record["top_k"]] == result.classes
        assert [m["class"] for m in record["maps"]] == result.classes
        assert len(set(result.classes)) == TOP_K
        np.testing.assert_array_equal(np.load(f"{stem}.cam.npy"), result.cams)
        fulls = np.load(f"{stem}.cam-full.npy")
        assert fulls.shape == (TOP_K, *image.shape[:2]) and fulls.dtype == np.float32
        overlays = []
        for rank, (class_id, entry) in enumerate(zip(result.classes, record["maps"], strict=True), 1):
            cam_full = upsample(result.cams[rank - 1], image.shape[:2])
            np.testing.assert_array_equal(fulls[rank - 1], cam_full)
            box = paper_box(cam_full)
            assert entry["boxes"] == [[box.x, box.y, box.w, box.h]]
            assert entry["prob"] == round(float(result.probs[class_id]), 6)
            assert entry["label"] == net.labels[class_id]
            overlay = draw_boxes(overlay_paper(image, cam_full), [box])
            np.testing.assert_array_equal(read_png(f"{stem}.cam-{rank}.png"), overlay)
            np.testing.assert_array_equal(read_png(f"{stem}.heatmap-{rank}.png"),
                                          heatmap(cam_full))
            overlays.append(overlay)
        captions = [(m["label"], m["prob"]) for m in record["maps"]]
        np.testing.assert_array_equal(read_png(f"{stem}.montage.png"),
                                      montage(image, overlays, captions))


def test_dt_boxes_in_the_json_are_those_of_each_map(colour_net, tmp_path):
    images = colour_images(3, seed=1)
    items = write_inputs(tmp_path / "in", images)
    out = tmp_path / "out"
    assert main([str(tmp_path / "in"), "--output-dir", str(out), "--top-k", "2",
                 "--save", "json", "--boxes", "dt", "--batch-size", str(BATCH),
                 *cli_args(colour_net)]) == 0
    for item, result in zip(items, in_memory(api_net(colour_net), items, images, top_k=2), strict=True):
        record = json.loads((out / f"{item.path.stem}.json").read_text())
        size = images[int(item.path.stem)].shape[:2]
        for rank, entry in enumerate(record["maps"]):
            boxes = dt_boxes_from_cam(upsample(result.cams[rank], size))
            assert boxes and entry["boxes"] == [[b.x, b.y, b.w, b.h] for b in boxes]


def test_seed_style_boxes_are_scaled_per_axis(colour_net, tmp_path):
    """The seed figure is net-sized (24x24): a box found on a 30x90 image is scaled by
    24/90 along x and 24/30 along y."""
    image = np.full((30, 90, 3), 20, np.uint8)
    cv2.circle(image, (70, 8), 7, (20, 20, 230), -1)          # a red blob, top right
    path = tmp_path / "wide.png"
    write_image(path, image)
    out = tmp_path / "seed.png"
    assert main([str(path), "--class", "red", "--style", "seed", "--boxes", "paper",
                 "-o", str(out), *cli_args(colour_net)]) == 0
    cam_full = api_net(colour_net).predict([image], classes=[2])[0].cam(2, (30, 90))
    box = paper_box(cam_full)
    assert box.x > 45 and box.y + box.h < 25                   # around the blob
    scaled = Box(round(box.x * 24 / 90), round(box.y * 24 / 30), round(box.w * 24 / 90),
                 round(box.h * 24 / 30))
    small = cv2.resize(image, (24, 24), interpolation=cv2.INTER_LINEAR)
    figure = overlay_seed(small, cv2.resize(cam_full, (24, 24), interpolation=cv2.INTER_LINEAR))
    np.testing.assert_array_equal(read_png(out), draw_boxes(figure, [scaled]))


def test_thumbnails_heatmaps_montage_and_json_follow_the_options(colour_net, tmp_path):
    """Two methods, two classes each (four maps): thumbnail R (its JPEG bytes) and
    heatmap R are map R's in the chosen look and colour map, the montage captions each overlay with its
    method, the .json file is the printed record, indented, ending in a newline."""
    prototxt, weights, labels = colour_net
    net = CAMNet(prototxt, weights, backend="opencv", labels=labels, method="cam,eigencam",
                 **COLOUR_ARGS)
    images = colour_images(2, seed=2)
    items = write_inputs(tmp_path / "in", images)
    options = Options(output_dir=tmp_path / "out", save=("heatmap", "thumb", "json"),
                      top_k=2, methods=2, style="seed", colormap="hot", alpha=0.3,
                      boxes="paper", montage=True, jsonl=True, batch_size=BATCH)
    lines = io.StringIO()
    assert run_batch(net, items, options, lines).done == 2
    look = Look("seed", "hot", 0.3, net.input_size)
    for item, result, line in zip(items, in_memory(net, items, images, top_k=2,
                                                   boxes=BoxRule("paper")),
                                  lines.getvalue().splitlines(), strict=True):
        image, paths = images[int(item.path.stem)], output_paths(item, options, 4)
        overlays, captions = [], []
        for rank in range(4):
            full = result.full_map(rank)
            np.testing.assert_array_equal(read_png(paths[f"heatmap-{rank + 1}"]),
                                          heatmap(full, "hot"))
            thumb = paths[f"thumb-{rank + 1}"]                      # a JPEG: its bytes
            assert thumb.read_bytes() == encode_image(thumb, thumbnail(image, full, look))
            overlays.append(render_overlay(image, full, result.boxes[rank], look))
            class_id = result.classes[rank]
            captions.append((f"{('cam', 'eigencam')[rank % 2]}: {net.labels[class_id]}",
                             result.prob(class_id)))
        np.testing.assert_array_equal(read_png(paths["montage"]),
                                      montage(image, overlays, captions))
        record = json.loads(line)
        assert paths["json"].read_text() == json.dumps(record, indent=2) + "\n"


def outputs(folder):
    """The output files in ``folder`` (not the .cam-caffe/ lists of what was written)."""
    return [p for p in folder.iterdir() if p.is_file()]


def test_skip_existing_needs_every_requested_output(colour_net, tmp_path):
    """An image counts as done only when all of its files are there: one missing
    numbered heatmap brings that image back, and only that image."""
    write_inputs(tmp_path / "in", colour_images(3))
    out = tmp_path / "out"
    args = [str(tmp_path / "in"), "--output-dir", str(out), "--top-k", "2",
            "--save", "overlay,heatmap,npy", *cli_args(colour_net)]
    assert main(args) == 0
    files = sorted(p.name for p in outputs(out))
    assert len(files) == 3 * 6
    (out / "1.heatmap-2.png").unlink()
    stamps = {p.name: p.stat().st_mtime_ns for p in outputs(out)}
    assert main([*args, "--skip-existing"]) == 0
    assert sorted(p.name for p in outputs(out)) == files
    changed = {p.name for p in outputs(out) if p.stat().st_mtime_ns != stamps.get(p.name)}
    assert "1.heatmap-2.png" in changed and all(name.startswith("1.") for name in changed)
    # Everything there: nothing is redone.
    stamps = {p.name: p.stat().st_mtime_ns for p in outputs(out)}
    assert main([*args, "--skip-existing"]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in outputs(out)} == stamps


def test_a_failed_rewrite_keeps_the_previous_file(tmp_path):
    """A real write error (the file size limit, as a full disk) while replacing a good
    file: the error names the file, the good file stays as it was, no temporary is left."""
    target = tmp_path / "out" / "x.cam.npy"
    write_bytes(target, b"good")

    def small_file_limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
    child = subprocess.run(
        [sys.executable, "-c", "import sys; from cam_caffe.output import write_bytes; "
         "write_bytes(sys.argv[1], bytes(10000))", str(target)],
        capture_output=True, text=True, cwd=ROOT, preexec_fn=small_file_limit)
    assert child.returncode != 0 and f"{target}: cannot write" in child.stderr
    assert target.read_bytes() == b"good"
    assert [p.name for p in target.parent.iterdir()] == ["x.cam.npy"]
