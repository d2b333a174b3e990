"""Boxes from CAMs: the official dt_box generator and the paper's largest-component rule."""
import math

import cv2
import numpy as np
import pytest
from conftest import shared

from cam_caffe.boxes import Box, BoxRule, draw_boxes, dt_boxes, dt_boxes_from_cam, paper_box

OFFICIAL_HEATMAP_6 = [(41, 145, 362, 202), (102, 188, 242, 126)]  # dt_box heatmap_6.jpg 20 100 110


def gaussian(shape, cx, cy, sigma, amplitude=1.0):
    y, x = np.mgrid[:shape[0], :shape[1]]
    return amplitude * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * sigma ** 2))


def test_dt_boxes_reproduce_official_sample():
    heatmap = cv2.imread(str(shared("bbox", "heatmap_6.jpg")), cv2.IMREAD_GRAYSCALE)
    numbers = [int(v) for v in shared("bbox", "heatmap_6.txt").read_text().split()]
    expected = [tuple(numbers[i:i + 4]) for i in range(0, len(numbers), 4)]
    assert expected == OFFICIAL_HEATMAP_6
    boxes = dt_boxes(heatmap, (20, 100, 110))
    assert len(boxes) == len(expected)
    for box, want in zip(boxes, expected, strict=True):
        assert np.abs(np.subtract((box.x, box.y, box.w, box.h), want)).max() <= 2, (box, want)


def plateaus(inner_value):
    heatmap = np.zeros((200, 300), np.uint8)
    heatmap[20:180, 20:280] = 60            # level 20 only: a big box
    heatmap[40:160, 40:240] = inner_value   # covers more than half of the big box
    heatmap[60:80, 250:270] = 200           # inside the big box, small
    return heatmap


def test_dt_boxes_drop_a_box_covering_over_half_of_a_larger_one():
    boxes = dt_boxes(plateaus(105), (20, 100, 110))     # inner plateau at level 100 only
    assert len(boxes) == 2
    assert boxes[0].iou(Box(20, 20, 260, 160)) > 0.9
    assert boxes[1].iou(Box(250, 60, 20, 20)) > 0.5


def test_dt_boxes_keep_the_official_merge_quirk():
    """dt_box's mergeBBox skips the box after a dropped one: the inner box of level 110
    follows the dropped one of level 100, so it escapes the big box and is kept."""
    boxes = dt_boxes(plateaus(200), (20, 100, 110))
    assert len(boxes) == 3
    assert boxes[1].iou(Box(40, 40, 200, 120)) > 0.9
    assert boxes[0].intersection(boxes[1]) > boxes[0].area // 2


def test_dt_boxes_from_cam_work_on_negative_maps():
    cam = gaussian((120, 160), 100, 50, 12) - 7.0
    boxes = dt_boxes_from_cam(cam)
    assert boxes
    x0, y0, x1, y1 = boxes[0].as_xyxy()
    assert x0 < 100 < x1 and y0 < 50 < y1


@pytest.mark.parametrize(("cx", "cy", "sigma"), [(40, 30, 6.0), (100, 70, 10.0), (15, 90, 4.0)])
def test_paper_box_around_a_gaussian_blob(cx, cy, sigma):
    box = paper_box(gaussian((120, 160), cx, cy, sigma))
    r = sigma * math.sqrt(2 * math.log(5))        # exp(-r²/2σ²) = 0.2
    lo, hi = math.ceil(cx - r), math.floor(cx + r)
    assert abs(box.x - lo) <= 1 and abs(box.x + box.w - 1 - hi) <= 1
    lo, hi = math.ceil(cy - r), math.floor(cy + r)
    assert abs(box.y - lo) <= 1 and abs(box.y + box.h - 1 - hi) <= 1


def test_paper_box_picks_the_larger_component_not_the_higher_peak():
    cam = gaussian((150, 200), 30, 30, 5, 1.0) + gaussian((150, 200), 130, 90, 15, 0.8)
    box = paper_box(cam)
    # the broad blob's region: 15·sqrt(2·ln 4) ≈ 25 px around (130, 90)
    assert box.iou(Box(105, 65, 51, 51)) > 0.85


def test_box_rule_passes_its_threshold_and_levels():
    """A BoxRule finds the boxes of its kind with its own threshold or levels (two blobs
    that one region joins at 0.2 and two separate regions at 0.6); none for a constant
    map or without a kind."""
    cam = gaussian((90, 120), 40, 45, 9) + gaussian((90, 120), 75, 45, 9)
    for threshold in (0.2, 0.6):
        assert BoxRule("paper", threshold=threshold).find(cam) == [paper_box(cam, threshold)]
    assert BoxRule("paper").find(cam) != BoxRule("paper", threshold=0.6).find(cam)
    assert BoxRule("paper").find(np.full((9, 9), 0.5)) == []
    for levels in ((20, 100, 110), (200,)):
        assert BoxRule("dt", levels=levels).find(cam) == dt_boxes_from_cam(cam, levels)
    assert BoxRule("dt").find(cam) != BoxRule("dt", levels=(200,)).find(cam)
    assert BoxRule().find(cam) == []


def test_paper_box_is_offset_invariant_and_none_for_constant_maps():
    cam = gaussian((80, 80), 50, 20, 5)
    assert paper_box(cam - 3.0) == paper_box(cam)
    assert paper_box(np.full((50, 60), 0.7, np.float32)) is None


def test_iou_against_hand_computed_values():
    a = Box(0, 0, 10, 10)
    assert a.as_xyxy() == (0, 0, 10, 10)
    assert a.iou(a) == 1.0
    assert a.iou(Box(5, 5, 10, 10)) == pytest.approx(25 / 175)
    assert a.iou(Box(2, 2, 4, 4)) == pytest.approx(16 / 100)
    assert a.iou(Box(0, 5, 10, 10)) == pytest.approx(50 / 150)
    assert a.iou(Box(10, 0, 5, 5)) == 0.0


def test_draw_boxes_returns_a_new_image():
    image = np.zeros((50, 60, 3), np.uint8)
    out = draw_boxes(image, [Box(10, 5, 20, 30)], color=(0, 0, 255), thickness=1)
    assert not image.any()
    assert tuple(out[5, 15]) == (0, 0, 255) and tuple(out[20, 20]) == (0, 0, 0)


def test_iou_edge_cases():
    a = Box(0, 0, 10, 10)
    assert a.intersection(Box(0, 20, 10, 10)) == 0          # same columns, apart in y
    assert a.intersection(Box(20, 0, 10, 10)) == 0          # same rows, apart in x
    assert Box(3, 3, 1, 1).iou(Box(3, 3, 1, 1)) == 1.0      # a union of one pixel
    assert Box(0, 0, 0, 0).iou(Box(5, 5, 0, 0)) == 0.0      # two empty boxes


def test_paper_box_constant_map_has_no_object_at_any_threshold():
    assert paper_box(np.full((8, 9), 3.0), 0.0) is None


def test_dt_boxes_box_holes_too():
    """dt_box takes the contours of holes as well (RETR_CCOMP): a ring gives its outer
    box and the box of its hole."""
    heatmap = np.zeros((100, 100), np.uint8)
    heatmap[10:90, 10:90] = 200
    heatmap[40:60, 40:60] = 0
    boxes = dt_boxes(heatmap, (20,))
    assert len(boxes) == 2
    assert boxes[0].iou(Box(10, 10, 80, 80)) > 0.9 and boxes[1].iou(Box(40, 40, 20, 20)) > 0.6


def test_dt_merge_keeps_exactly_half_an_overlap_and_compares_every_later_box():
    from cam_caffe.boxes import big_overlap, suppress
    big = Box(0, 0, 10, 10)
    assert not big_overlap(big, Box(5, 0, 10, 10))          # 50 of 100: not over half
    assert big_overlap(big, Box(4, 0, 10, 10))              # 60 of 100
    apart, inside = Box(20, 0, 5, 5), Box(0, 0, 9, 9)
    assert suppress([big, apart, inside]) == [big, apart]
    assert suppress([big, inside, apart]) == [big, apart]


def test_dt_boxes_need_a_2d_uint8_heatmap():
    for bad in (np.zeros((5, 5), np.float32), np.zeros((5, 5, 3), np.uint8)):
        with pytest.raises(ValueError, match="dt_boxes needs a 2-D uint8 heatmap, got"):
            dt_boxes(bad)


def test_dt_mask_level_is_255_times_the_distance_over_its_max_at_least_10_5():
    """dt.c: ROUND(255·d / max d) > 10, ROUND(t) = (int)(t + 0.5)."""
    from cam_caffe.boxes import eroded_mask
    heatmap = np.full((9, 24), 200, np.uint8)      # one background pixel, max d = √593
    heatmap[0, 0] = 0
    mask = eroded_mask(heatmap, 20)
    assert mask[0, 1] == 0 and mask[1, 1] == 1     # 255/√593 = 10.47 (256 would give 10.51)
    row = np.full((1, 511), 200, np.uint8)         # d = 21 of max 510: exactly 10.5, kept
    row[0, 0] = 0
    mask = eroded_mask(row, 20)[0]
    assert mask[20] == 0 and mask[21] == 1


def test_draw_boxes_default_is_green_two_pixels_wide():
    out = draw_boxes(np.zeros((40, 40, 3), np.uint8), [Box(10, 10, 20, 20)])
    assert np.nonzero(out[:, 20, 1])[0].tolist() == [9, 10, 11, 29, 30, 31]
    assert not out[..., 0].any() and not out[..., 2].any() and out[10, 20, 1] == 255


def test_contours_in_dt_boxs_margin_give_no_box():
    """dt_box clips widths to W − x − 5: a region starting at x = W − 5 (or y = H − 5)
    would get a zero or negative size, and is dropped."""
    from cam_caffe.boxes import contour_boxes
    mask = np.zeros((20, 30), np.uint8)
    mask[5:10, 25:28] = 1                       # x = 25 = W − 5: width 0
    mask[15:18, 2:8] = 1                        # y = 15 = H − 5: height 0
    assert contour_boxes(mask) == []
    mask[5:10, 24:28] = 1                       # from x = 24: width 1
    assert contour_boxes(mask) == [Box(24, 5, 1, 5)]
