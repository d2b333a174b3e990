"""Ten crops and their merge, checked against the official stored activations of img1.jpg."""
import cv2
import numpy as np
import pytest
from conftest import shared

from cam_caffe.tencrop import crop_offsets, merge_ten_crops, ten_crops

CUP = 968
# The white cup with its saucer in img1.jpg (256×256), x0, y0, x1, y1 in pixels, read off
# the image: cup body about x 122–175, y 105–133, saucer about x 108–178 down to y 140.
CUP_XYXY = (108, 100, 182, 142)
# Crops 1–5 as (x, y): top-left, top-right, bottom-left, bottom-right, centre.
OFFSETS_XY = [(0, 0), (32, 0), (0, 32), (32, 32), (16, 16)]


def golden_cams(class_id=CUP):
    data = np.load(shared("googlenet_cam", "golden_img1.npz"))
    features, weights = data["cam_conv"], data["cam_fc_weights"]
    return np.stack([weights[class_id] @ f.reshape(1024, -1) for f in features]).reshape(10, 14, 14)


def reference_merge(cams):
    merged = np.zeros((256, 256), np.float64)
    for n in range(10):
        large = cv2.resize(cams[n].astype(np.float32), (224, 224), interpolation=cv2.INTER_LINEAR)
        if n >= 5:
            large = large[:, ::-1]
        x0, y0 = OFFSETS_XY[n % 5]
        for y in range(224):
            for x in range(224):
                merged[y0 + y, x0 + x] += abs(float(large[y, x]))
    return merged


def test_merge_equals_loop_reference():
    cams = golden_cams()
    merged = merge_ten_crops(cams)
    assert merged.shape == (256, 256) and merged.dtype == np.float32
    np.testing.assert_allclose(merged, reference_merge(cams), rtol=1e-5, atol=1e-5)


def test_crops_agree_once_placed_back():
    """The crop order: each crop's placed map matches crop 1's where all crops overlap
    (r ≥ 0.87 here; with crops 2 and 3 swapped, r ≈ 0.1 for crops 2, 3, 7, 8)."""
    cams = golden_cams()
    placed = [merge_ten_crops(np.where(np.arange(10)[:, None, None] == n, cams, 0))
              for n in range(10)]
    common = (slice(32, 224), slice(32, 224))   # inside every crop
    for n in range(1, 10):
        r = np.corrcoef(placed[0][common].ravel(), placed[n][common].ravel())[0, 1]
        assert r > 0.8, f"crop {n + 1} disagrees with crop 1 (r={r:.2f})"


def test_merged_cup_map_peaks_on_the_cup():
    image = cv2.imread(str(shared("googlenet_cam", "img1.jpg")))
    height, width = image.shape[:2]
    merged = cv2.resize(merge_ten_crops(golden_cams()), (width, height),
                        interpolation=cv2.INTER_LINEAR)
    y, x = np.unravel_index(np.argmax(merged), merged.shape)
    x0, y0, x1, y1 = CUP_XYXY
    assert x0 <= x < x1 and y0 <= y < y1, (x, y)


def test_ten_crops_layout():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)
    square = cv2.resize(image, (256, 256), interpolation=cv2.INTER_LINEAR)
    crops = ten_crops(image)
    assert crops.shape == (10, 224, 224, 3) and crops.dtype == np.uint8
    np.testing.assert_array_equal(crops[0], square[:224, :224])
    np.testing.assert_array_equal(crops[1], square[:224, 32:])
    np.testing.assert_array_equal(crops[4], square[16:240, 16:240])
    np.testing.assert_array_equal(crops[5], crops[0][:, ::-1])
    np.testing.assert_array_equal(crops[5:], crops[:5, :, ::-1])


def test_merge_undoes_ten_crops():
    """Cropping a map and merging the crops gives the map times its coverage."""
    rng = np.random.default_rng(1)
    grey = rng.random((256, 256)).astype(np.float32)
    coverage = merge_ten_crops(np.ones((10, 224, 224), np.float32))
    assert coverage.min() == 2 and coverage.max() == 10
    np.testing.assert_allclose(merge_ten_crops(ten_crops(grey)), grey * coverage, rtol=1e-6)



def test_defaults_are_the_official_256_and_224():
    assert crop_offsets() == [(0, 0), (32, 0), (0, 32), (32, 32), (16, 16)]
    image = np.random.default_rng(2).integers(0, 256, (50, 60, 3), np.uint8)
    np.testing.assert_array_equal(ten_crops(image), ten_crops(image, 256, 224))
    cams = np.random.default_rng(3).random((10, 7, 7)).astype(np.float32)
    np.testing.assert_array_equal(merge_ten_crops(cams), merge_ten_crops(cams, 256, 224))
    assert merge_ten_crops(cams).shape == (256, 256)


def test_crop_sizes_from_one_to_the_resize_size():
    assert crop_offsets(5, 1)[4] == (2, 2) and crop_offsets(5, 5) == [(0, 0)] * 5
    for crop, resize in ((0, 5), (6, 5), (-1, 5)):
        with pytest.raises(ValueError, match=f"crop {crop} must be in 1..{resize}"):
            crop_offsets(resize, crop)


def test_merge_takes_any_numeric_maps_and_checks_their_shape():
    ints = np.ones((10, 3, 3), np.int64)
    np.testing.assert_array_equal(merge_ten_crops(ints, 8, 6),
                                  merge_ten_crops(ints.astype(np.float32), 8, 6))
    for shape in ((9, 3, 3), (10, 3), (2, 10, 3, 3)):
        with pytest.raises(ValueError, match=r"needs \(10, h, w\) maps, got \(" ):
            merge_ten_crops(np.zeros(shape, np.float32))
