"""Metrics against hand-computed values: pooled mIoU, the IEM/ReDO foreground protocol, Hungarian matching."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffseg.scoring.metrics import (
    ConfusionMatrix,
    ForegroundAccumulator,
    binary_scores,
    foreground_metrics,
    foreground_scores,
    mean_iou,
)
from diffseg.scoring.regions import HungarianIoU, ImageDependence, hungarian_miou, mask_image_dependence

# ---------------------------------------------------------------------------------------------------------------------
# Foreground metrics

# The 4x4 hand example.
#   pred        gt
#   1 1 0 0     1 1 1 0
#   1 1 0 0     1 1 0 0
#   0 0 0 0     0 0 0 0
#   0 0 0 0     0 0 0 0
# |pred & gt| = 4, |pred| = 4, |gt| = 5, |pred | gt| = 5, pixels equal: 15 of 16.
#   Acc = 15/16, IoU = 4/5, DICE = 2*4 / (4 + 5) = 8/9.
# Inverted pred (12 pixels): |~pred & gt| = 1, union = 12 + 5 - 1 = 16, equal pixels 1:
#   Acc = 1/16, IoU = 1/16, DICE = 2/17; the polarity rule keeps the prediction as it is.
PRED = np.array([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
GT = np.array([[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])


def test_foreground_hand_example():
    s = foreground_metrics(PRED[None], GT[None])
    assert s["acc"] == pytest.approx(15 / 16)
    assert s["iou"] == pytest.approx(4 / 5)
    assert s["dice"] == pytest.approx(8 / 9)
    # The same with the polarity fixed to "as is", and from torch tensors.
    s = foreground_metrics(torch.from_numpy(PRED[None]), torch.from_numpy(GT[None]), polarity="dataset", invert=False)
    assert (s.acc, s.iou, s.dice) == pytest.approx((15 / 16, 4 / 5, 8 / 9))
    # Forced inversion scores the inverted prediction.
    s = foreground_metrics(PRED[None], GT[None], polarity="dataset", invert=True)
    assert (s.acc, s.iou, s.dice) == pytest.approx((1 / 16, 1 / 16, 2 / 17))
    assert s.as_dict("val") == {"val/fg_acc": s.acc, "val/fg_iou": s.iou, "val/fg_dice": s.dice}


def test_foreground_ignore_index():
    # gt[0, 2] (a foreground pixel the prediction misses) and gt[3, 3] (a correct background pixel) become "ignore";
    # the prediction there is irrelevant. Remaining 14 pixels: |pred & gt| = 4, |pred| = 4, |gt| = 4:
    #   Acc = 14/14, IoU = 1, DICE = 1.
    gt = GT.copy()
    gt[0, 2] = 255
    gt[3, 3] = 255
    for pred in (PRED, np.where(gt == 255, 1 - PRED, PRED)):
        s = foreground_metrics(pred[None], gt[None])
        assert (s.acc, s.iou, s.dice) == pytest.approx((1.0, 1.0, 1.0))


def test_polarity_rule_inverted_prediction_is_perfect_per_image():
    pred = 1 - GT
    s = foreground_metrics(pred[None], GT[None])
    assert (s.acc, s.iou, s.dice) == (1.0, 1.0, 1.0)
    # Soft masks (N, K, H, W) are reduced by argmax: the same verdict.
    soft = np.stack([GT, 1 - GT]).astype(np.float32)[None]  # (1, 2, 4, 4): region 1 is the background
    assert foreground_scores(soft, GT[None])["iou"] == 1.0


def test_polarity_rule_is_per_metric():
    # gt has one foreground pixel, pred is empty.
    #   as is:    Acc = 15/16, IoU = 0/1 = 0,    DICE = 0/(0 + 1) = 0
    #   inverted: Acc = 1/16,  IoU = 1/16,       DICE = 2/(16 + 1) = 2/17
    # The rule keeps Acc from one polarity and IoU, DICE from the other.
    gt = np.zeros((1, 4, 4), dtype=np.int64)
    gt[0, 0, 0] = 1
    s = foreground_metrics(np.zeros_like(gt), gt)
    assert (s.acc, s.iou, s.dice) == pytest.approx((15 / 16, 1 / 16, 2 / 17))


def test_strict_polarity_when_images_disagree():
    # gt: the left half. Two images predicted correctly, one inverted (the right half).
    gt = np.zeros((3, 4, 4), dtype=np.int64)
    gt[:, :, :2] = 1
    pred = gt.copy()
    pred[2] = 1 - gt[2]
    per_image = foreground_metrics(pred, gt)
    assert (per_image.acc, per_image.iou, per_image.dice) == (1.0, 1.0, 1.0)
    # One polarity for the set: as is (mean IoU 2/3) beats inverted (1/3); the inverted image scores 0 everywhere.
    strict = foreground_metrics(pred, gt, polarity="dataset")
    assert (strict.acc, strict.iou, strict.dice) == pytest.approx((2 / 3, 2 / 3, 2 / 3))
    assert strict.fg_regions == (1,)
    np.testing.assert_allclose(strict.per_image["iou"], [1, 1, 0])


def test_empty_masks():
    # Both empty: IoU = DICE = 1 by convention; pred full against empty gt: the polarity rule finds the empty inverse.
    gt = np.zeros((2, 3, 3), dtype=np.int64)
    pred = np.stack([np.zeros((3, 3)), np.ones((3, 3))]).astype(np.int64)
    s = foreground_metrics(pred, gt)
    assert (s.acc, s.iou, s.dice) == (1.0, 1.0, 1.0)
    strict = foreground_metrics(pred, gt, polarity="dataset", invert=False)
    np.testing.assert_allclose(strict.per_image["iou"], [1.0, 0.0])
    # An image with no valid pixel has no score and is left out of the means.
    r = binary_scores(np.array([0]), np.array([0]), np.array([0]), np.array([0]))
    assert all(np.isnan(v[0]) for v in r.values())
    gt_ign = np.stack([GT, np.full((4, 4), 255)])
    s = foreground_metrics(np.stack([PRED, PRED]), gt_ign)
    assert s.iou == pytest.approx(4 / 5) and np.isnan(s.per_image["iou"][1])


# Four vertical stripes as regions: region k = column k.  gt = columns 1 and 2.
REGIONS4 = np.tile(np.arange(4), (4, 1))  # (4, 4)
GT_COLS12 = np.isin(REGIONS4, [1, 2]).astype(np.int64)


def test_reduction_best_single():
    # Candidates: each single column (IoU 4/8 = 1/2 for columns 1, 2; 0 for 0, 3) and the complement of each
    # (not column 0 = columns 1-3: IoU 8/12 = 2/3; same for not column 3; others 4/16 = 1/4).
    #   IoU  = 2/3
    #   Acc  = 12/16 (column 1 alone or columns 1-3 both get 12 pixels right)
    #   DICE = 2*8 / (12 + 8) = 4/5 (columns 1-3; column 1 alone gives 2*4 / (4 + 8) = 2/3)
    s = foreground_scores(REGIONS4[None], GT_COLS12[None], "best_single", num_regions=4)
    assert (s.acc, s.iou, s.dice) == pytest.approx((12 / 16, 2 / 3, 4 / 5))
    assert s.choice[0] in (0b1110, 0b0111)


def test_reduction_best_subset():
    s = foreground_scores(REGIONS4[None], GT_COLS12[None], "best_subset", num_regions=4)
    assert (s.acc, s.iou, s.dice) == (1.0, 1.0, 1.0)
    assert s.choice[0] == 0b0110  # regions 1 and 2


def test_reduction_fixed():
    # Given: region 1 alone is foreground -> IoU 1/2, Acc 12/16, DICE 2/3; no polarity rescue.
    s = foreground_scores(REGIONS4[None], GT_COLS12[None], "fixed", num_regions=4, fg_regions=[1])
    assert (s.acc, s.iou, s.dice) == pytest.approx((12 / 16, 1 / 2, 2 / 3))
    assert s.fg_regions == (1,)
    # Chosen once for the set: two images with gt columns 1-2, one with column 1 only.
    #   {1, 2}: mean IoU (1 + 1 + 1/2) / 3 = 5/6;  {1}: (1/2 + 1/2 + 1) / 3 = 2/3  -> {1, 2}.
    regions = np.stack([REGIONS4] * 3)
    gt = np.stack([GT_COLS12, GT_COLS12, (REGIONS4 == 1).astype(np.int64)])
    s = foreground_scores(regions, gt, "fixed", num_regions=4)
    assert s.fg_regions == (1, 2)
    assert s.iou == pytest.approx(5 / 6)
    np.testing.assert_allclose(s.per_image["iou"], [1, 1, 1 / 2])
    # best_subset, per image, would be perfect on all three.
    assert foreground_scores(regions, gt, "best_subset", num_regions=4).iou == 1.0


def test_foreground_streaming_equals_one_call():
    rng = np.random.default_rng(0)
    regions = rng.integers(0, 3, size=(6, 8, 8))
    gt = (rng.random((6, 8, 8)) < 0.4).astype(np.int64)
    gt[rng.random((6, 8, 8)) < 0.1] = 255
    for reduction in ("best_single", "best_subset", "fixed"):
        acc = ForegroundAccumulator(3, reduction)
        for i in range(0, 6, 4):
            acc.update(regions[i : i + 4], gt[i : i + 4])
        a, b = acc.compute(), foreground_scores(regions, gt, reduction, num_regions=3)
        assert (a.acc, a.iou, a.dice) == (b.acc, b.iou, b.dice)


def test_foreground_errors_name_the_shape():
    with pytest.raises(ValueError, match=r"\(2, 4, 4\)"):
        foreground_metrics(np.zeros((2, 4, 4)), np.zeros((3, 4, 4)))
    with pytest.raises(ValueError, match="outside"):
        foreground_scores(np.full((1, 2, 2), 5), np.zeros((1, 2, 2)), num_regions=3)


# ---------------------------------------------------------------------------------------------------------------------
# Confusion matrix (supervised mIoU)


def test_confusion_matrix_pooled_vs_per_image():
    # Image A: class 1 is one pixel and the prediction misses it (class-1 IoU 0 in A).
    # Image B: class 1 is 8 pixels, all predicted (IoU 1 in B).
    # Pooled: class 1 I = 8, U = 9 -> 8/9. Class 0: A I = 15, U = 16; B I = 8, U = 8 -> 23/24.
    # Per-image averaging would give class 1 (0 + 1)/2 = 1/2: pooling is what the paper reports.
    a_t = np.zeros((4, 4), dtype=np.int64)
    a_t[0, 0] = 1
    a_p = np.zeros((4, 4), dtype=np.int64)
    b_t = np.zeros((4, 4), dtype=np.int64)
    b_t[:2] = 1
    b_p = b_t.copy()
    cm = ConfusionMatrix(2)
    cm.update(a_p[None], a_t[None]).update(torch.from_numpy(b_p[None]), torch.from_numpy(b_t[None]))
    np.testing.assert_allclose(cm.iou(), [23 / 24, 8 / 9])
    assert cm.miou() == pytest.approx((23 / 24 + 8 / 9) / 2)
    assert cm.pixel_accuracy() == pytest.approx(31 / 32)
    per_image = np.mean([mean_iou(p[None], t[None], 2)[1][1] for p, t in ((a_p, a_t), (b_p, b_t))])
    assert per_image == pytest.approx(1 / 2)
    keys = cm.as_dict("test", class_names=["bg", "fg"])
    assert set(keys) == {"test/miou", "test/miou_official", "test/pixel_accuracy", "test/iou/bg", "test/iou/fg"}
    assert keys["test/miou_official"] == pytest.approx(keys["test/miou"])  # every class present, nothing ignored


def test_miou_with_an_absent_class_and_an_ignored_pixel_both_ways():
    """Hand-computed. Classes 0..3; class 3 occurs in neither target nor prediction; the last pixel is ignored (255)
    and class 2 is predicted there.
        "present" (ours): class 0 I 1 U 2, class 1 I 1 U 2; class 2 only on the ignored pixel -> not counted, like
            class 3: both left out -> mIoU (1/2 + 1/2) / 2 = 1/2.
        "official" (ddpm-segmentation compute_iou): the ignored pixel's target is no class, so predicting 2 there is a
            false positive: class 2 I 0 U 1 -> 0; class 3 absent -> 0; mIoU (1/2 + 1/2 + 0 + 0) / 4 = 1/4."""
    target = np.array([[0, 0, 1, 255]])
    pred = np.array([[0, 1, 1, 2]])
    cm = ConfusionMatrix(4).update(pred, target)
    np.testing.assert_allclose(cm.iou("present"), [0.5, 0.5, np.nan, np.nan])
    np.testing.assert_allclose(cm.iou("official"), [0.5, 0.5, 0.0, 0.0])
    assert cm.miou() == pytest.approx(0.5) and cm.miou("present") == cm.miou()
    assert cm.miou("official") == pytest.approx(0.25)
    assert mean_iou(pred, target, 4, averaging="official")[0] == pytest.approx(0.25)
    d = cm.as_dict("test", class_names=["a", "b", "c", "d"])
    assert d["test/miou"] == pytest.approx(0.5) and d["test/miou_official"] == pytest.approx(0.25)
    # Predicting class 0 on the ignored pixel instead: class 0 officially I 1 U 3, and class 2 is absent (0).
    cm0 = ConfusionMatrix(4).update(np.array([[0, 1, 1, 0]]), target)
    np.testing.assert_allclose(cm0.iou("official"), [1 / 3, 0.5, 0.0, 0.0])
    assert cm0.miou() == pytest.approx(0.5)  # ours: the ignored pixel never counts
    # streaming and merging keep the ignored-pixel counts
    half = ConfusionMatrix(4).update(pred[:, :2], target[:, :2])
    half.merge(ConfusionMatrix(4).update(pred[:, 2:], target[:, 2:]))
    assert half.miou("official") == pytest.approx(0.25)
    with pytest.raises(ValueError, match="averaging"):
        cm.miou("mean")


def test_confusion_matrix_ignore_and_absent_classes():
    # Class 2 is absent from target and prediction: no IoU, left out of the mean (not counted as 0 or 1).
    target = np.array([[0, 0, 1, 255]])
    pred = np.array([[0, 1, 1, 2]])  # the 2 sits on an ignored pixel, so it is never counted
    cm = ConfusionMatrix(3).update(pred, target)
    # class 0: I 1, U 2 -> 1/2; class 1: I 1, U 2 -> 1/2
    np.testing.assert_allclose(cm.iou()[:2], [0.5, 0.5])
    assert np.isnan(cm.iou()[2])
    assert cm.miou() == pytest.approx(0.5)
    assert "test/iou/2" not in cm.as_dict()
    # Soft predictions (N, C, H, W) are argmaxed.
    soft = np.eye(3)[pred].transpose(0, 2, 1)[:, :, None, :]  # (1, 3, 1, 4)
    target4 = target[:, None, :]  # (1, 1, 4)
    assert ConfusionMatrix(3).update(soft, target4).miou() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="outside"):
        ConfusionMatrix(2).update(np.array([[3]]), np.array([[0]]))
    with pytest.raises(ValueError, match=r"\(1, 4\)"):
        ConfusionMatrix(3).update(pred, target[:, :3])


# ---------------------------------------------------------------------------------------------------------------------
# Hungarian matching


def test_hungarian_recovers_permutation():
    rng = np.random.default_rng(1)
    gt = rng.integers(0, 4, size=(3, 8, 8))
    perm = np.array([2, 0, 3, 1])  # class c is predicted as region perm[c]
    regions = perm[gt]
    for per_image in (False, True):
        r = hungarian_miou(regions, gt, num_regions=4, num_classes=4, per_image=per_image)
        assert r.miou == 1.0
    r = hungarian_miou(torch.from_numpy(regions), torch.from_numpy(gt), 4, 4)
    assert r.mapping == {int(perm[c]): c for c in range(4)}
    assert set(r.as_dict("test")) == {"test/hungarian_miou"} | {f"test/hungarian_iou/{c}" for c in range(4)}


# gt            regions
# 0 0 1 1       1 1 1 0
# 0 0 1 1       1 1 0 0
# counts[k, c]: region 1 & class 0 = 4, region 1 & class 1 = 1, region 0 & class 1 = 3, region 0 & class 0 = 0.
# |region 0| = 3, |region 1| = 5, |class 0| = |class 1| = 4.
# IoU(1 -> 0) = 4 / (5 + 4 - 4) = 4/5; IoU(0 -> 1) = 3 / (3 + 4 - 3) = 3/4; the other pairing: 0 and 1/8.
# Matching 1 -> 0, 0 -> 1; mIoU = (4/5 + 3/4) / 2 = 31/40.
GT_H = np.array([[[0, 0, 1, 1], [0, 0, 1, 1]]])
REG_H = np.array([[[1, 1, 1, 0], [1, 1, 0, 0]]])


def test_hungarian_hand_computed_partial():
    r = hungarian_miou(REG_H, GT_H, num_regions=2, num_classes=2)
    assert r.mapping == {1: 0, 0: 1}
    np.testing.assert_allclose(r.iou, [4 / 5, 3 / 4])
    assert r.miou == pytest.approx(31 / 40)
    assert hungarian_miou(REG_H, GT_H, 2, 2, match_by="intersection").mapping == {1: 0, 0: 1}


def test_hungarian_more_and_fewer_regions_than_classes():
    # K = 3 > C = 2: region 2 (one pixel, taken from class 1) stays unmatched and its pixel counts as a miss.
    regions = REG_H.copy()
    regions[0, 1, 3] = 2
    r = hungarian_miou(regions, GT_H, num_regions=3, num_classes=2)
    # class 0 <- region 1: 4/5; class 1 <- region 0 (now 2 pixels): 2 / (2 + 4 - 2) = 1/2
    assert r.mapping == {1: 0, 0: 1}
    np.testing.assert_allclose(r.iou, [4 / 5, 1 / 2])
    # K = 2 < C = 3: a third class of two pixels gets no region and scores IoU 0 in the mean.
    gt = GT_H.copy()
    gt[0, :, 3] = 2  # class 1 = column 2 (2 pixels), class 2 = column 3 (2 pixels)
    r = hungarian_miou(REG_H, gt, num_regions=2, num_classes=3)
    # IoU(1 -> 0) = 4 / (5 + 4 - 4) = 4/5; IoU(0 -> 1) = 1 / (3 + 2 - 1) = 1/4; IoU(0 -> 2) = 2 / (3 + 2 - 2) = 2/3
    # Best: 1 -> 0, 0 -> 2; class 1 unmatched -> 0.  mIoU = (4/5 + 0 + 2/3) / 3.
    assert r.mapping == {1: 0, 0: 2}
    np.testing.assert_allclose(r.iou, [4 / 5, 0, 2 / 3])
    assert r.miou == pytest.approx((4 / 5 + 2 / 3) / 3)


def test_hungarian_pooled_vs_per_image():
    # Image A predicts the labels, image B the swapped labels. Pooled, either pairing has I = 2, U = 6 per class;
    # per image, each image is matched perfectly.
    gt = np.array([[[0, 1], [0, 1]], [[0, 1], [0, 1]]])
    regions = np.stack([gt[0], 1 - gt[1]])
    assert hungarian_miou(regions, gt, 2, 2).miou == pytest.approx(1 / 3)
    acc = HungarianIoU(2, 2, per_image=True)
    acc.update(regions[:1], gt[:1]).update(regions[1:], gt[1:])
    r = acc.compute()
    assert r.miou == 1.0
    np.testing.assert_array_equal(r.mapping, [[0, 1], [1, 0]])


def test_hungarian_ignore_index():
    gt = GT_H.copy()
    gt[0, 0, 2] = 255  # the one pixel where region 1 overlapped class 1
    r = hungarian_miou(REG_H, gt, 2, 2)
    # region 1 (now 4 counted pixels) = class 0 exactly; region 0 (3) vs class 1 (3): exact.
    assert r.miou == 1.0


def test_metrics_over_zero_images_are_errors_not_nan():
    cm = ConfusionMatrix(3)
    for metric in (cm.miou, cm.pixel_accuracy, cm.iou, cm.as_dict):
        with pytest.raises(ValueError, match="zero images"):
            metric()
    cm.update(np.full((1, 2, 2), 255), np.full((1, 2, 2), 255))  # an image whose pixels are all ignored: NaN
    assert np.isnan(cm.pixel_accuracy()) and np.isnan(cm.miou())
    with pytest.raises(ValueError, match="zero images"):
        HungarianIoU(2, 2).compute()
    with pytest.raises(ValueError, match="before any update"):
        HungarianIoU(2, 2, per_image=True).compute()


def _dependence_two_pass(masks: np.ndarray) -> float:
    """The formula of `mask_image_dependence` written out with numpy's variances (the reference)."""
    a = masks.astype(np.float64)
    if a.ndim == 3:
        a = (a[:, None] == np.arange(int(a.max()) + 1)[None, :, None, None]).astype(np.float64)
    across = a.var(axis=0).mean()
    total = a.transpose(1, 0, 2, 3).reshape(a.shape[1], -1).var(axis=1).mean()
    return float(across / total)


def test_image_dependence_streams_batch_by_batch():
    """evaluate_segmenter adds `split/dependence` batch by batch: the same number as one call over the whole set,
    also when a higher label first appears in a later batch, for hard maps and for soft masks."""
    rng = np.random.default_rng(0)
    hard = rng.integers(0, 3, (7, 5, 6))
    hard[:3] = np.minimum(hard[:3], 1)  # label 2 only from the fourth image on
    soft = rng.random((7, 3, 5, 6))
    soft /= soft.sum(1, keepdims=True)
    for masks in (hard, soft):
        acc = ImageDependence()
        for i in range(0, 7, 3):
            acc.update(masks[i : i + 3])
        assert acc.compute() == pytest.approx(_dependence_two_pass(masks), rel=1e-9)
        assert mask_image_dependence(masks) == pytest.approx(_dependence_two_pass(masks), rel=1e-9)
    fixed = np.broadcast_to(hard[:1], hard.shape)
    assert ImageDependence().update(fixed[:4]).update(fixed[4:]).compute() == 0.0  # one layout for every image
    assert np.isnan(ImageDependence().update(hard[:1]).compute())  # one image
    assert np.isnan(ImageDependence().update(hard[:2]).update(rng.integers(0, 2, (2, 4, 4))).compute())  # sizes
