"""Preprocessing, image loading and rendering against independent NumPy references."""
import cv2
import numpy as np
import pytest
from conftest import shared
from PIL import Image

from cam_caffe import proto
from cam_caffe.cam import normalize
from cam_caffe.errors import ImageError, ModelError
from cam_caffe.image import load_image
from cam_caffe.output import encode_image, encode_png
from cam_caffe.preprocess import Preprocessor, parse_mean
from cam_caffe.render import colormap_lut, heatmap, overlay_paper, overlay_seed


def test_preprocess_is_bgr_resize_minus_mean_times_scale():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (50, 70, 3), np.uint8)
    pre = Preprocessor((20, 30), parse_mean("104,117,123"), scale=0.5)
    batch = pre([image, image])
    assert batch.shape == (2, 3, 20, 30) and batch.dtype == np.float32
    resized = cv2.resize(image, (30, 20), interpolation=cv2.INTER_LINEAR).astype(np.float32)
    expected = (resized - np.array([104, 117, 123], np.float32)) * 0.5
    np.testing.assert_allclose(batch[1], expected.transpose(2, 0, 1), rtol=1e-6)


def test_mean_from_npy_and_binaryproto(tmp_path):
    mean_image = np.random.default_rng(1).uniform(90, 130, (3, 8, 8)).astype(np.float32)
    np.save(tmp_path / "m.npy", mean_image)
    blob = proto.BlobProto()
    blob.shape.dim.extend([1, 3, 8, 8])
    blob.data.extend(mean_image.ravel().tolist())
    (tmp_path / "m.binaryproto").write_bytes(blob.SerializeToString())
    for name in ("m.npy", "m.binaryproto"):
        mean = parse_mean(tmp_path / name)
        np.testing.assert_allclose(mean, mean_image, rtol=1e-6)
        same = Preprocessor((8, 8), mean)
        np.testing.assert_allclose(same.mean, mean_image)
        other = Preprocessor((4, 4), mean)     # another size: the channel means
        np.testing.assert_allclose(other.mean.ravel(), mean_image.mean(axis=(1, 2)), rtol=1e-5)


def test_imagenet_mean_file_channel_means():
    mean = parse_mean(shared("imagenet", "ilsvrc_2012_mean.npy"))
    assert mean.shape == (3, 256, 256)
    np.testing.assert_allclose(mean.mean(axis=(1, 2)), [104.0, 116.7, 122.7], atol=0.1)


@pytest.mark.parametrize(("spec", "message"), [("1,2", "gives 2 values"), ("x.txt", "expected numbers"),
                                          ("missing.npy", "not found")])
def test_bad_mean(spec, message):
    with pytest.raises(ModelError, match=message):
        parse_mean(spec)


def test_normalize_and_constant_map():
    np.testing.assert_allclose(normalize(np.array([[2.0, 4.0], [6.0, 4.0]])),
                               [[0, 0.5], [1, 0.5]])
    flat = np.zeros((5, 5), np.float32)
    with np.errstate(all="raise"):
        assert not normalize(flat).any()
        image = np.full((5, 5, 3), 100, np.uint8)
        out = overlay_paper(image, flat)
    assert np.isfinite(out).all()
    # Constant map: heatmap is the colormap's first colour everywhere.
    assert (out == np.rint(0.2 * 100 + 0.7 * colormap_lut("jet")[0])).all()


@pytest.mark.parametrize("name", ["jet", "viridis"])
def test_colormap_lut_equals_matplotlib(name):
    """jet is built in (no matplotlib import at start-up); it must equal matplotlib's."""
    import matplotlib
    colormap_lut.cache_clear()          # compute it here, not in an earlier test
    rgb = matplotlib.colormaps[name](np.arange(256) / 255.0)[:, :3]
    np.testing.assert_array_equal(colormap_lut(name), np.rint(rgb[:, ::-1] * 255).astype(np.uint8))


def test_paper_overlay_formula():
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (6, 9, 3), np.uint8)
    cam = rng.normal(size=(6, 9)).astype(np.float32)
    import matplotlib
    norm = (cam - cam.min()) / (cam.max() - cam.min())
    jet = matplotlib.colormaps["jet"](np.rint(norm * 255).astype(int) / 255.0)[..., :3][..., ::-1]
    expected = np.clip(np.rint(0.2 * image + 0.7 * np.rint(jet * 255)), 0, 255)
    np.testing.assert_allclose(overlay_paper(image, cam), expected, atol=1)   # float32 rounding
    assert heatmap(cam, "viridis").shape == (6, 9, 3)


def test_seed_overlay_is_matplotlib_alpha_blend():
    image = np.full((32, 32, 3), 200, np.uint8)
    cam = np.zeros((32, 32), np.float32)
    cam[8:24, 8:24] = 1.0
    out = overlay_seed(image, cam).astype(float)
    assert out.shape == (32, 32, 3)
    # alpha 0.5 over the image: 0.5·200 + 0.5·jet(x), jet(1) = dark red, jet(0) = dark blue (BGR).
    np.testing.assert_allclose(out[16, 16], 0.5 * 200 + 0.5 * np.array([0, 0, 127.5]), atol=3)
    np.testing.assert_allclose(out[1, 1], 0.5 * 200 + 0.5 * np.array([127.5, 0, 0]), atol=3)


def write_png(path, array, mode=None):
    Image.fromarray(array, mode).save(path) if mode else Image.fromarray(array).save(path)
    return path


def test_image_conversions(tmp_path):
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    out = load_image(write_png(tmp_path / "g.png", grey))
    assert out.shape == (3, 4, 3) and (out[..., 0] == grey).all() and (out[..., 2] == grey).all()
    deep = (np.arange(12, dtype=np.uint16).reshape(3, 4) * 5000)
    Image.fromarray(deep).save(tmp_path / "d.png")
    out = load_image(tmp_path / "d.png")
    np.testing.assert_array_equal(out[..., 1], np.rint(deep / 257).astype(np.uint8))
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)          # opaque red
    rgba[1, 1] = (0, 0, 255, 0)            # transparent blue → white
    out = load_image(write_png(tmp_path / "a.png", rgba))
    assert tuple(out[0, 0]) == (0, 0, 255) and tuple(out[1, 1]) == (255, 255, 255)


@pytest.mark.parametrize("name", ["img1.jpg", "img2.jpg", "test.jpg"])
def test_jpeg_decodes_as_opencv_does(tmp_path, name):
    """Real photos: the same BGR pixels as OpenCV's own decoder, in a writable array."""
    path = shared("googlenet_cam", name)
    out = load_image(path)
    np.testing.assert_array_equal(out, cv2.imread(str(path)))
    assert out.flags.writeable and out.flags.c_contiguous
    palette = Image.open(path).convert("P")            # a converted mode takes the same path
    palette.save(tmp_path / "p.png")
    np.testing.assert_array_equal(load_image(tmp_path / "p.png"),
                                  np.asarray(palette.convert("RGB"))[..., ::-1])


def test_exif_orientation_is_applied(tmp_path):
    array = np.zeros((10, 20, 3), np.uint8)
    array[:, :10] = 255                                 # left half white
    im = Image.fromarray(array)
    exif = Image.Exif()
    exif[0x0112] = 6                                     # rotate 90° clockwise to view
    im.save(tmp_path / "r.jpg", exif=exif, quality=95)
    out = load_image(tmp_path / "r.jpg")
    assert out.shape == (20, 10, 3)
    assert out[:10].mean() > 200 and out[10:].mean() < 50   # white half is now on top


def test_pixel_limit(tmp_path):
    write_png(tmp_path / "big.png", np.zeros((100, 100, 3), np.uint8))
    with pytest.raises(ImageError, match="over the limit of 5000"):
        load_image(tmp_path / "big.png", max_pixels=5000)


@pytest.mark.parametrize("shape", [(1, 1, 3), (1, 7, 3), (5, 1, 3), (375, 500, 3), (33, 17),
                                   (1, 1)])
def test_png_encoder_is_lossless_for_two_independent_decoders(tmp_path, shape):
    rng = np.random.default_rng(sum(shape))
    image = rng.integers(0, 256, shape, dtype=np.uint8)
    data = encode_image("x.png", image)
    path = tmp_path / "x.png"
    path.write_bytes(data)
    with Image.open(path) as png:
        png.verify()                                  # chunk CRCs and structure
    with Image.open(path) as png:
        assert png.mode == ("RGB" if image.ndim == 3 else "L")
        rgb = np.asarray(png)
    assert np.array_equal(rgb, image[..., ::-1] if image.ndim == 3 else image)
    assert np.array_equal(cv2.imread(str(path), cv2.IMREAD_UNCHANGED), image)


def test_png_encoder_compresses_like_opencv():
    """A real overlay: smaller than OpenCV's own PNG of it (106,747 bytes against
    112,305 when measured), so a .png output is this encoder's, not OpenCV's; and far
    below raw."""
    image = cv2.imread(str(shared("googlenet_cam", "img1.jpg")))
    overlay = overlay_paper(image, cv2.resize(np.random.default_rng(0).random((14, 14),
                                                                           np.float32),
                                              image.shape[1::-1]))
    ours = len(encode_image("x.png", overlay))
    assert ours < len(cv2.imencode(".png", overlay)[1])
    assert ours < overlay.nbytes / 1.5


def test_png_encoder_rejects_other_images():
    with pytest.raises(ValueError, match="uint8 BGR or grey"):
        encode_png(np.zeros((4, 4, 4), np.uint8))
    with pytest.raises(ValueError, match="uint8 BGR or grey"):
        encode_png(np.zeros((4, 4), np.float32))


def test_default_mean_is_the_ilsvrc_mean_in_bgr_order():
    """Without --mean (and none in the prototxt) a 3-channel net subtracts ImageNet's
    mean, in Caffe's BGR order: the channel means of BVLC's mean image, rounded."""
    ilsvrc = np.load(shared("imagenet", "ilsvrc_2012_mean.npy"))
    default = parse_mean(None)
    np.testing.assert_allclose(default, ilsvrc.mean(axis=(1, 2)), atol=0.5)
    assert default.tolist() == [104.0, 117.0, 123.0]
    image = np.zeros((4, 4, 3), np.uint8)
    image[..., 0] = 200                                     # blue (BGR), as decoded
    batch = Preprocessor((4, 4), default)([image])
    np.testing.assert_allclose(batch[0, :, 0, 0], [200 - 104, -117, -123])


def test_mean_values_parse_as_float32_numbers():
    for spec, channels, expected in [(None, 1, [117.0]), (None, 4, [117.0] * 4),
                                     ("1e2, 2.5E-1 -3", 3, [100.0, 0.25, -3.0]),
                                     ("7", 2, [7.0, 7.0])]:
        mean = parse_mean(spec, channels)
        assert mean.dtype == np.float32 and mean.tolist() == expected, spec
    with pytest.raises(ModelError, match=r"^--mean '1\.\.2': expected numbers, a \.npy or a \.binaryproto file$"):
        parse_mean("1..2")


def test_mean_files_are_checked(tmp_path):
    np.save(tmp_path / "bgr.npy", np.array([1.0, 2.0, 3.0]))
    mean = parse_mean(tmp_path / "bgr.npy")
    assert mean.dtype == np.float32 and mean.tolist() == [1.0, 2.0, 3.0]
    np.save(tmp_path / "objects.npy", np.array([{"not": "numbers"}], dtype=object))
    with pytest.raises(ModelError, match=r"objects\.npy: not a NumPy mean file"):
        parse_mean(tmp_path / "objects.npy")           # never unpickled
    for name, array in [("flat.npy", np.zeros((3, 5))), ("four.npy", np.zeros((4, 8, 8))),
                        ("two.npy", np.zeros(2))]:
        np.save(tmp_path / name, array)
        shape = list(array.shape)
        with pytest.raises(ModelError, match=rf"{name}: mean has shape \{shape}\, expected "
                                             r"\(3,\) or \(3, H, W\)"):
            parse_mean(tmp_path / name)
    (tmp_path / "bad.binaryproto").write_bytes(b"\xff\xff\xff not protobuf")
    with pytest.raises(ModelError, match=r"bad\.binaryproto: not a Caffe mean \.binaryproto"):
        parse_mean(tmp_path / "bad.binaryproto")
    with pytest.raises(ModelError, match=r"missing\.binaryproto: mean file not found"):
        parse_mean(tmp_path / "missing.binaryproto")
    blob = proto.BlobProto()
    blob.shape.dim.extend([1, 1, 1, 1])
    blob.data.append(42.0)
    (tmp_path / "one.binaryproto").write_bytes(blob.SerializeToString())
    assert parse_mean(tmp_path / "one.binaryproto", channels=1).tolist() == [42.0]
    blob.data.append(43.0)
    (tmp_path / "two.binaryproto").write_bytes(blob.SerializeToString())
    with pytest.raises(ModelError, match=r"mean blob holds 2 values for shape \[1\]"):
        parse_mean(tmp_path / "two.binaryproto", channels=1)


def test_preprocess_grey_net_and_scale():
    """A 1-channel net gets the grey image (ITU-R 601 weights, as Caffe's grey decode)."""
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (6, 8, 3), np.uint8)
    pre = Preprocessor((6, 8), np.array([10.0]), scale=2.0, channels=1)
    assert pre.mean.dtype == np.float32
    batch = pre([image])
    assert batch.shape == (1, 1, 6, 8)
    b, g, r = (image[..., i].astype(np.float64) for i in range(3))
    grey = np.rint(0.114 * b + 0.587 * g + 0.299 * r)
    np.testing.assert_allclose(batch[0, 0], (grey - 10.0) * 2.0, atol=2.0)
    colour = Preprocessor((6, 8), np.array([1.0, 2.0, 3.0]), scale=2.0)([image])
    expected = (image.transpose(2, 0, 1) - np.array([1.0, 2.0, 3.0]).reshape(3, 1, 1)) * 2.0
    np.testing.assert_allclose(colour[0], expected)


def test_normalize_gives_float32_and_overlay_checks_the_map_size():
    assert normalize(np.array([[1.0, 3.0]])).dtype == np.float32
    with pytest.raises(ValueError, match=r"CAM shape \(5, 5\) differs from image shape \(5, 6\)$"):
        overlay_paper(np.zeros((5, 6, 3), np.uint8), np.zeros((5, 5), np.float32))


def test_paper_overlay_uses_the_colormap_asked_for():
    import matplotlib
    rng = np.random.default_rng(4)
    image = rng.integers(0, 256, (5, 7, 3), np.uint8)
    cam = rng.normal(size=(5, 7)).astype(np.float32)
    norm = (cam - cam.min()) / (cam.max() - cam.min())
    viridis = matplotlib.colormaps["viridis"](np.rint(norm * 255).astype(int) / 255.0)
    expected = np.rint(0.2 * image + 0.5 * np.rint(viridis[..., 2::-1] * 255))
    np.testing.assert_allclose(overlay_paper(image, cam, "viridis", 0.5), expected, atol=1)


def test_seed_overlay_keeps_the_size_and_the_image_colours():
    """A 150x200 map gives a 150x200 figure (100 dpi); a blue BGR image stays blue
    under jet's dark blue at alpha 0.5."""
    image = np.zeros((150, 200, 3), np.uint8)
    image[..., 0] = 255                                     # blue, in BGR
    cam = np.zeros((150, 200), np.float32)
    cam[50:100, 80:120] = 1.0
    out = overlay_seed(image, cam).astype(float)
    assert out.shape == (150, 200, 3)
    np.testing.assert_allclose(out[5, 5], 0.5 * np.array([255, 0, 0]) + 0.5 * np.array([127.5, 0, 0]),
                               atol=3)
    np.testing.assert_allclose(out[75, 100], 0.5 * np.array([255, 0, 0]) + 0.5 * np.array([0, 0, 127.5]),
                               atol=3)


def test_preprocessor_refuses_non_finite_scale_and_mean():
    with pytest.raises(ModelError, match=r"^--scale nan: not a finite number$"):
        Preprocessor((4, 4), parse_mean(None), scale=float("nan"))
    with pytest.raises(ModelError, match=r"^the mean holds NaN or infinity$"):
        Preprocessor((4, 4), np.array([1.0, np.inf, 3.0]))
    for text in ("104,nan,123", "1e999"):
        with pytest.raises(ModelError, match=rf"^--mean '{text}': every value must be a "
                                             r"finite number$"):
            parse_mean(text)
