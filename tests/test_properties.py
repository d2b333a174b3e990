"""Property-based tests (hypothesis) of the maths, each against an independent NumPy
reference: CAM linearity, bilinear upsampling, both box rules, the ten-crop merge."""
from collections import deque

import cv2
import numpy as np
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from cam_caffe.boxes import DT_MARGIN, Box, dt_boxes, dt_boxes_from_cam, eroded_mask, paper_box
from cam_caffe.cam import class_activation_maps, softmax, upsample
from cam_caffe.tencrop import crop_offsets, merge_ten_crops, ten_crops

PROPERTY = settings()      # the profile loaded in conftest.py (60 examples; fewer in mutation.sh)
FLOATS = st.floats(-4, 4, allow_nan=False, width=32)


def maps(min_side=2, max_side=24):
    """Small float32 maps with a few distinct values, so ties and plateaus occur."""
    shapes = st.tuples(st.integers(min_side, max_side), st.integers(min_side, max_side))
    return shapes.flatmap(lambda shape: arrays(np.float32, shape,
                                               elements=st.sampled_from([0.0, 0.3, 0.5, 1.0])
                                               | FLOATS))


# ------------------------------------------------------------------ CAM
@PROPERTY
@given(data=st.data(), n=st.integers(1, 3), k=st.integers(1, 6), m=st.integers(1, 3),
       h=st.integers(1, 5), w=st.integers(1, 5), classes=st.integers(1, 5))
def test_cam_is_the_weighted_sum_and_linear_in_the_weights(data, n, k, m, h, w, classes):
    features = data.draw(arrays(np.float32, (n, k, h, w), elements=FLOATS))
    w1 = data.draw(arrays(np.float32, (classes, k), elements=FLOATS))
    w2 = data.draw(arrays(np.float32, (classes, k), elements=FLOATS))
    chosen = data.draw(arrays(np.int64, (n, m), elements=st.integers(0, classes - 1)))
    a, b = data.draw(FLOATS), data.draw(FLOATS)
    cams = class_activation_maps(features, w1, chosen)
    assert cams.shape == (n, m, h, w)
    reference = np.einsum("nmk,nkhw->nmhw", w1.astype(np.float64)[chosen], features)
    np.testing.assert_allclose(cams, reference, atol=1e-4 * max(1.0, np.abs(reference).max()))
    combined = class_activation_maps(features, a * w1 + b * w2, chosen)
    expected = a * cams + b * class_activation_maps(features, w2, chosen)
    np.testing.assert_allclose(combined, expected, atol=1e-3 * max(1.0, np.abs(expected).max()))


@PROPERTY
@given(scores=st.tuples(st.integers(1, 4), st.integers(1, 8)).flatmap(
    lambda shape: arrays(np.float64, shape, elements=st.floats(-80, 80))),
       shift=st.floats(-500, 500))
def test_softmax_is_the_normalised_exponential_of_each_row(scores, shift):
    """For nets that end at the FC layer: exp(s) / Σ exp(s) per row, float32, and the
    same for scores shifted by a constant (no overflow: 580 would overflow float32)."""
    probs = softmax(scores)
    assert probs.dtype == np.float32 and probs.shape == scores.shape
    e = np.exp(scores - scores.max(axis=1, keepdims=True))
    np.testing.assert_allclose(probs, e / e.sum(axis=1, keepdims=True), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(softmax((scores + shift).astype(np.float32)), probs,
                               rtol=1e-3, atol=1e-6)


def test_softmax_shifts_each_row_by_its_own_max():
    """Rows 200 apart: one shift for the whole batch would turn the first row into 0/0."""
    probs = softmax(np.array([[0.0, 1.0], [200.0, 201.0]], np.float32))
    expected = [1 / (1 + np.e), np.e / (1 + np.e)]
    np.testing.assert_allclose(probs, [expected, expected], rtol=1e-6)


# ------------------------------------------------------------------ upsampling
def bilinear_reference(cam, size):
    """Bilinear resize with half-pixel centres and clamped edges, in float64."""
    height, width = size
    h, w = cam.shape

    def axis(out, n):
        x = np.maximum((np.arange(out) + 0.5) * n / out - 0.5, 0)
        lo = np.minimum(np.floor(x).astype(int), n - 1)
        return lo, np.minimum(lo + 1, n - 1), x - lo
    y0, y1, fy = axis(height, h)
    x0, x1, fx = axis(width, w)
    c = cam.astype(np.float64)
    top = c[y0][:, x0] * (1 - fx) + c[y0][:, x1] * fx
    bottom = c[y1][:, x0] * (1 - fx) + c[y1][:, x1] * fx
    return top * (1 - fy)[:, None] + bottom * fy[:, None]


@PROPERTY
@given(cam=maps(1, 16), height=st.integers(1, 80), width=st.integers(1, 80))
def test_upsample_is_bilinear(cam, height, width):
    assume(height >= cam.shape[0] and width >= cam.shape[1])   # upsampling, as CAMs are
    out = upsample(cam, (height, width))
    assert out.shape == (height, width) and out.dtype == np.float32
    np.testing.assert_allclose(out, bilinear_reference(cam, (height, width)),
                               atol=1e-5 * max(1.0, np.abs(cam).max()))


def test_upsample_gives_float32_for_any_numeric_map():
    for dtype in (np.float64, np.int32, np.uint8):
        out = upsample(np.array([[0, 2], [4, 6]], dtype), (4, 4))
        assert out.dtype == np.float32
        np.testing.assert_allclose(out, bilinear_reference(np.array([[0, 2], [4, 6]]), (4, 4)),
                                   atol=1e-6)


def test_upsample_interpolates_between_cells():
    """Not nearest-neighbour: a 2-cell ramp upsampled 4x has values between the cells."""
    out = upsample(np.array([[0.0, 1.0]], np.float32), (1, 8))
    np.testing.assert_allclose(out[0], [0, 0, 0.125, 0.375, 0.625, 0.875, 1, 1], atol=1e-6)


# ------------------------------------------------------------------ paper box
def components(mask):
    """8-connected components of a boolean mask by breadth-first search: list of pixel lists."""
    seen = np.zeros(mask.shape, bool)
    found = []
    for start in zip(*np.nonzero(mask), strict=True):
        if seen[start]:
            continue
        seen[start] = True
        queue, pixels = deque([start]), []
        while queue:
            y, x = queue.popleft()
            pixels.append((y, x))
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ny, nx = y + dy, x + dx
                    if (0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx]
                            and not seen[ny, nx]):
                        seen[ny, nx] = True
                        queue.append((ny, nx))
        found.append(pixels)
    return found


def bounding_box(pixels):
    ys, xs = zip(*pixels, strict=True)
    return Box(min(xs), min(ys), max(xs) - min(xs) + 1, max(ys) - min(ys) + 1)


def paper_reference(cam, threshold):
    """Boxes of the largest 8-connected regions with (cam − min)/(max − min) ≥ threshold."""
    c = cam.astype(np.float64)
    if not c.max() > c.min():
        return None
    regions = components((c - c.min()) / (c.max() - c.min()) >= threshold - 1e-6)
    largest = max(len(r) for r in regions)
    return [bounding_box(r) for r in regions if len(r) == largest]


@PROPERTY
@given(cam=maps(), threshold=st.floats(0.05, 0.95))
def test_paper_box_is_the_largest_8_connected_region(cam, threshold):
    c = cam.astype(np.float64)
    if c.max() > c.min():   # no value within float rounding of the threshold
        norm = (c - c.min()) / (c.max() - c.min())
        assume(np.abs(norm - threshold).min() > 1e-5)
    box = paper_box(cam, threshold)
    expected = paper_reference(cam, threshold)
    if expected is None:
        assert box is None
        return
    assert box in expected
    height, width = cam.shape
    assert box.x >= 0 and box.x + box.w <= width and box.y >= 0 and box.y + box.h <= height


@PROPERTY
@given(data=st.data(), t1=st.floats(0.05, 0.9), dt=st.floats(0.01, 0.5))
def test_paper_box_shrinks_as_the_threshold_rises(data, t1, dt):
    """For one smooth blob (a random anisotropic Gaussian over an offset) the boxes nest."""
    height, width = data.draw(st.integers(8, 60)), data.draw(st.integers(8, 60))
    cy, cx = data.draw(st.floats(0, height - 1)), data.draw(st.floats(0, width - 1))
    sy, sx = data.draw(st.floats(1, 20)), data.draw(st.floats(1, 20))
    y, x = np.mgrid[:height, :width]
    cam = (np.exp(-((y - cy) / sy) ** 2 / 2 - ((x - cx) / sx) ** 2 / 2)
           + data.draw(st.floats(-3, 3))).astype(np.float32)
    assume(cam.max() > cam.min())
    low, high = paper_box(cam, t1), paper_box(cam, min(t1 + dt, 1.0))
    hx0, hy0, hx1, hy1 = high.as_xyxy()
    lx0, ly0, lx1, ly1 = low.as_xyxy()
    assert lx0 <= hx0 and ly0 <= hy0 and hx1 <= lx1 and hy1 <= ly1


def test_paper_box_reaches_the_right_and_bottom_border():
    cam = np.zeros((20, 30), np.float32)
    cam[12:, 21:] = 1.0                              # a region in the bottom-right corner
    assert paper_box(cam) == Box(21, 12, 9, 8)
    cam[0, 0] = 1.0                                  # touching diagonally only: 8-connected
    cam[1, 1] = 1.0
    assert paper_box(cam) == Box(21, 12, 9, 8)
    cam[5:12:1, 20] = 1.0                            # joined diagonally to the corner region
    assert paper_box(cam) == Box(20, 5, 10, 15)


# ------------------------------------------------------------------ dt_box
def distance_to_background(mask):
    """Euclidean distance of each pixel to the nearest 0 pixel of the mask (brute force;
    outside the image does not count); inf when there is none."""
    background = np.argwhere(~mask)
    if not len(background):
        return np.full(mask.shape, np.inf)
    grid = np.indices(mask.shape).reshape(2, -1).T
    d2 = ((grid[:, None, :] - background[None, :, :]) ** 2).sum(axis=2).min(axis=1)
    return np.sqrt(d2).reshape(mask.shape)


@PROPERTY
@given(heatmap=st.tuples(st.integers(3, 24), st.integers(3, 24)).flatmap(
    lambda shape: arrays(np.uint8, shape, elements=st.sampled_from([0, 20, 21, 100, 101,
                                                                     110, 111, 200, 255]))),
       threshold=st.sampled_from([20, 100, 110]))
def test_dt_mask_is_threshold_then_rounded_distance_above_10(heatmap, threshold):
    """dt_box's level: heatmap > threshold (a value AT the threshold is out), distance
    scaled to 255, rounded half up, kept above 10."""
    mask = heatmap > threshold
    got = eroded_mask(heatmap, threshold).astype(bool)
    if not mask.any():
        assert not got.any()
        return
    distance = distance_to_background(mask)
    if np.isinf(distance).all():        # no background at all: OpenCV's own convention
        return
    distance[~mask] = 0
    scaled = 255 * distance / distance.max()
    clear = np.abs(scaled - 10.5) > 1e-3          # float rounding decides nothing else
    np.testing.assert_array_equal(got[clear], (np.floor(scaled + 0.5) > 10)[clear])


def test_dt_mask_rounds_half_up_at_the_level():
    """Distances 1..25 from the one background pixel: 255·1/25 = 10.2 rounds to 10,
    not above 10, so the pixel next to the background goes; 255·2/25 = 20.4 stays."""
    heatmap = np.zeros((1, 26), np.uint8)
    heatmap[0, 1:] = 200
    np.testing.assert_array_equal(eroded_mask(heatmap, 20)[0], [0, 0] + [1] * 24)


@PROPERTY
@given(cam=maps(6, 40), thresholds=st.lists(st.integers(0, 254), min_size=1, max_size=3))
def test_dt_boxes_lie_inside_the_image_less_dt_boxs_margin(cam, thresholds):
    height, width = cam.shape
    for box in dt_boxes_from_cam(cam, thresholds):
        assert box.x >= 0 and box.y >= 0 and box.w > 0 and box.h > 0
        assert box.x + box.w <= width - DT_MARGIN and box.y + box.h <= height - DT_MARGIN


def test_dt_boxes_in_the_margin_are_dropped_not_negative():
    """A hole 2 px from the right edge: dt_box's clipping would give it width -1."""
    cam = np.full((6, 6), 0.3, np.float32)
    cam[1, 3] = 0.0
    assert set(dt_boxes_from_cam(cam)) == {Box(0, 0, 1, 1)}   # the outer contour's, clipped


def test_dt_box_threshold_is_strict_after_rounding_the_heatmap():
    """A CAM value that the 0–255 heatmap rounds to exactly the threshold is out; one
    that rounds to one above it is in."""
    cam = np.zeros((60, 90), np.float32)
    cam[50:55, 0:5] = 255.0                 # scale: heatmap value = cam value, rounded
    cam[10:40, 5:35] = 100.4                # → 100: not above 100
    cam[10:40, 50:80] = 100.6               # → 101: above 100
    left, right = Box(5, 10, 30, 30), Box(50, 10, 30, 30)
    boxes = dt_boxes_from_cam(cam, (100,))
    assert not [b for b in boxes if b.intersection(left)]
    assert max(b.iou(right) for b in boxes) > 0.8
    assert max(b.iou(left) for b in dt_boxes_from_cam(cam, (99,))) > 0.8


def test_dt_boxes_touching_the_right_and_bottom_border_are_clipped_as_dt_box_does():
    heatmap = np.zeros((50, 70), np.uint8)
    heatmap[20:, 40:] = 200                  # touches the right and bottom edges
    (box,) = dt_boxes(heatmap, (20,))
    assert 40 <= box.x <= 41 and 20 <= box.y <= 21        # the erosion takes ≤ 1 px
    assert box.x + box.w == 70 - DT_MARGIN and box.y + box.h == 50 - DT_MARGIN


# ------------------------------------------------------------------ ten-crop
def official_offsets(resize, crop):
    """prepare_image.m: corners, and the centre at floor((resize − crop + 1) / 2)."""
    m = resize - crop
    centre = (m + 1) // 2
    return [(0, 0), (m, 0), (0, m), (m, m), (centre, centre)]


@PROPERTY
@given(data=st.data(), crop=st.integers(2, 24), extra=st.integers(0, 9))
def test_ten_crop_merge_equals_a_loop_over_the_official_windows(data, crop, extra):
    resize = crop + extra
    assert crop_offsets(resize, crop) == official_offsets(resize, crop)
    h = data.draw(st.integers(1, 6))
    cams = data.draw(arrays(np.float32, (10, h, h), elements=FLOATS))
    merged = merge_ten_crops(cams, resize, crop)
    reference = np.zeros((resize, resize))
    for n, (x, y) in enumerate(official_offsets(resize, crop) * 2):
        window = np.abs(bilinear_reference(cams[n], (crop, crop)))
        reference[y:y + crop, x:x + crop] += window[:, ::-1] if n >= 5 else window
    np.testing.assert_allclose(merged, reference, atol=1e-4 * max(1.0, np.abs(cams).max()))
    # Linear in the maps' absolute values.
    np.testing.assert_allclose(merge_ten_crops(-2 * cams, resize, crop), 2 * merged,
                               rtol=1e-5, atol=1e-5)


@PROPERTY
@given(data=st.data(), crop=st.integers(2, 24), extra=st.integers(0, 9))
def test_ten_crops_are_the_official_windows_then_their_mirrors(data, crop, extra):
    resize = crop + extra
    image = data.draw(arrays(np.uint8, (data.draw(st.integers(1, 40)),
                                        data.draw(st.integers(1, 40)), 3)))
    square = cv2.resize(image, (resize, resize), interpolation=cv2.INTER_LINEAR)
    crops = ten_crops(image, resize, crop)
    assert crops.shape == (10, crop, crop, 3)
    for n, (x, y) in enumerate(official_offsets(resize, crop)):
        np.testing.assert_array_equal(crops[n], square[y:y + crop, x:x + crop])
        np.testing.assert_array_equal(crops[n + 5], square[y:y + crop, x:x + crop][:, ::-1])


def test_ten_crop_centre_for_an_odd_margin():
    """257 → 224: margin 33, the official centre is floor(34 / 2) = 17 (not 16)."""
    assert crop_offsets(257, 224)[4] == (17, 17)
    assert crop_offsets(27, 24)[4] == (2, 2)     # the colour net's ten-crop: margin 3
