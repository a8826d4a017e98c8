"""The batched MLP ensemble equals E independent MLPs; voting, uncertainty, streaming training, the bundle API."""

from __future__ import annotations

import copy
import dataclasses
import gc
import math
import weakref

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffseg.data.shard_reader import ShardSet
from diffseg.data.shards import FeatureMeta, begin_shard_set, end_shard_set, write_shard
from diffseg.methods import pixel_training as pixel_mod
from diffseg.methods.features import FeatureConfig
from diffseg.methods.pixel import (
    MLPEnsemble,
    PixelSegmenter,
    image_score,
    paper_hidden,
    predict_pixels,
    vote_and_uncertainty,
)
from diffseg.methods.pixel_training import PixelTrainConfig, ensemble_train_step, make_optimizer, train_ensemble


def _members(e, d, k, seed=0):
    torch.manual_seed(seed)
    return [MLPEnsemble.member_mlp(d, k) for _ in range(e)]


def test_paper_architecture():
    assert paper_hidden(19) == (128, 32) and paper_hidden(29) == (128, 32) and paper_hidden(30) == (256, 128)
    mlp = MLPEnsemble.member_mlp(10, 19)
    kinds = [type(m).__name__ for m in mlp]
    assert kinds == ["Linear", "ReLU", "BatchNorm1d", "Linear", "ReLU", "BatchNorm1d", "Linear"]
    assert MLPEnsemble(10, 40, 3).hidden == (256, 128)


def test_ensemble_equals_independent_mlps_outputs_grads_and_adam_updates():
    e, d, k, b = 4, 12, 5, 16
    torch.set_default_dtype(torch.float64)  # float64 so the comparison is exact up to summation order
    try:
        _check_equivalence(e, d, k, b)
    finally:
        torch.set_default_dtype(torch.float32)


def _check_equivalence(e, d, k, b):
    mlps = _members(e, d, k)
    ens = MLPEnsemble.from_members(mlps)
    ref = [copy.deepcopy(m) for m in mlps]
    opts = [torch.optim.Adam(m.parameters(), lr=1e-3) for m in ref]
    opt = make_optimizer(ens.parameters(), 1e-3)  # fused when available; the references use plain Adam
    g = torch.Generator().manual_seed(1)
    for _step in range(5):
        x = torch.randn(e, b, d, generator=g)  # each member its own batch
        y = torch.randint(0, k, (e, b), generator=g)
        # outputs before the step (train-mode BN)
        out_ens = ens(x)
        for i, m in enumerate(ref):
            torch.testing.assert_close(out_ens[i], m(x[i]), rtol=1e-9, atol=1e-12)
        # gradients
        ens.zero_grad()
        F.cross_entropy(ens(x).transpose(1, 2), y, reduction="none").mean(1).sum().backward()
        for i, m in enumerate(ref):
            m.zero_grad()
            F.cross_entropy(m(x[i]), y[i]).backward()
            torch.testing.assert_close(ens.layers[0].weight.grad[i], m[0].weight.grad.t(), rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(ens.layers[-1].bias.grad[i], m[-1].bias.grad, rtol=1e-9, atol=1e-12)
        # one training step on both sides (running BN statistics were updated twice above on both sides, too)
        losses = ensemble_train_step(ens, opt, x, y)
        for i, (m, o) in enumerate(zip(ref, opts)):
            loss = F.cross_entropy(m(x[i]), y[i])
            o.zero_grad()
            loss.backward()
            o.step()
            assert math.isclose(losses[i].item(), loss.item(), rel_tol=1e-9)
    for i, m in enumerate(ref):
        mine = ens.member(i)
        theirs = m.state_dict()
        for name, a in mine.state_dict().items():
            if not name.endswith("num_batches_tracked"):  # a counter, unused with a fixed momentum
                torch.testing.assert_close(a, theirs[name], rtol=1e-8, atol=1e-10)
    # eval mode (running statistics) agrees too
    ens.eval()
    xt = torch.randn(7, d, generator=g)
    for i, m in enumerate(ref):
        torch.testing.assert_close(ens(xt)[i], m.eval()(xt), rtol=1e-8, atol=1e-10)


def test_uncertainty_hand_cases():
    # all members certain and agreeing -> 0; members certain but disagreeing 50/50 -> log 2
    big = 50.0
    agree = torch.tensor([[[big, 0.0]], [[big, 0.0]]])  # (E=2, N=1, K=2)
    lab, u, p = vote_and_uncertainty(agree)
    assert lab.item() == 0 and u.item() == pytest.approx(0.0, abs=1e-6)
    disagree = torch.tensor([[[big, 0.0]], [[0.0, big]]])
    lab, u, _ = vote_and_uncertainty(disagree)
    assert u.item() == pytest.approx(math.log(2), abs=1e-5)
    assert lab.item() == 0  # tie -> lower index, as torch.mode
    # all members equally unsure (uniform): entropy of mean = mean entropy -> 0 mutual information
    _, u, _ = vote_and_uncertainty(torch.zeros(3, 1, 4))
    assert u.item() == pytest.approx(0.0, abs=1e-6)
    # majority vote: 2 of 3 say class 2
    logits = torch.tensor([[[0.0, 0.0, 5.0]], [[0.0, 0.0, 5.0]], [[9.0, 0.0, 0.0]]])
    assert vote_and_uncertainty(logits)[0].item() == 2
    # per-image score = mean of the top 10 %
    u = torch.arange(100.0)
    assert image_score(u) == pytest.approx(np.mean(np.arange(90, 100)))


def _write_toy_shards(root, n_shards=4, rows=300, d=6, k=3, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 3, (k, d))
    meta = FeatureMeta(blocks=["dec.1"], timesteps=[5], feature_dim=d, image_size=10, num_classes=k, backbone="toy")
    begin_shard_set(root, [f"img{s}" for s in range(n_shards)])
    for s in range(n_shards):
        y = rng.integers(0, k, rows)
        x = centers[y] + rng.normal(0, 0.5, (rows, d))
        write_shard(root / f"s{s}.parquet", x, y, [f"img{s}"] * rows, np.arange(rows) // 10, np.arange(rows) % 10, meta)
    end_shard_set(root)
    return ShardSet(root), centers


def _mb(rows: int, d: int) -> float:
    """shuffle_buffer_mb that holds exactly `rows` rows of d float16 features."""
    return rows * 2 * d / 2**20


def test_streaming_training_learns_and_holds_one_window(tmp_path, monkeypatch):
    ss, centers = _write_toy_shards(tmp_path)  # 4 shards x 300 rows
    live: list[weakref.ref] = []
    max_live = [0]
    real_windows = ShardSet.iter_windows

    def tracking_windows(self, max_rows, seed=0):
        for window in real_windows(self, max_rows, seed):
            gc.collect()
            max_live[0] = max(max_live[0], sum(r() is not None for r in live))
            live.append(weakref.ref(window.features))
            yield window
            del window

    monkeypatch.setattr(ShardSet, "iter_windows", tracking_windows)
    cfg = PixelTrainConfig(members=3, max_epochs=4, batch_size=32, patience=5, shuffle_buffer_mb=_mb(600, 6))
    ens, res = train_ensemble(ss, 3, cfg)
    assert max_live[0] == 0  # when a window is read, no earlier window's features are still alive
    assert res.peak_rows_in_memory == 600 and res.windows_per_epoch == 2  # bounded by the buffer, not the set
    assert res.iterations > 0 and all(s == -1 or s > 0 for s in res.stopped_at)
    # it learned the blobs
    x = torch.tensor(centers, dtype=torch.float32)
    labels, unc, _ = predict_pixels(ens, x)
    assert labels.tolist() == [0, 1, 2]


@pytest.mark.parametrize("buffer_rows", [1200, 600])  # the whole set in one window; windows of two shards
def test_every_member_mixes_shards_within_the_first_epoch(tmp_path, monkeypatch, buffer_rows):
    """What the ensemble actually trains on (recorded from train_ensemble's stream): within epoch 0, every member's
    batches hold pixels of more than one shard, and the members walk different orders (not lock-step)."""
    ss, _ = _write_toy_shards(tmp_path)  # 4 shards (one image each) x 300 rows
    seen: list[tuple[int, np.ndarray]] = []  # (epoch seed, shard of each row (E, b))
    real = pixel_mod.pixel_batches

    def recording(shards, members, batch_size, max_rows, epoch_seed, rng, member_shuffle=True):
        for batch in real(shards, members, batch_size, max_rows, epoch_seed, rng, member_shuffle):
            seen.append((epoch_seed, batch.shard.copy()))
            yield batch

    monkeypatch.setattr(pixel_mod, "pixel_batches", recording)
    cfg = PixelTrainConfig(members=4, max_epochs=2, batch_size=64, shuffle_buffer_mb=_mb(buffer_rows, 6))
    train_ensemble(ss, 3, cfg)
    first = [sh for seed, sh in seen if seed == seen[0][0]]  # epoch 0
    assert len(first) == (1200 // 64 if buffer_rows == 1200 else 2 * (600 // 64))  # drop_last per window
    for e in range(4):
        mixed = [len(np.unique(sh[e])) > 1 for sh in first]
        assert all(mixed), f"member {e}: a batch of pixels from one shard only"
        assert len(np.unique(np.concatenate([sh[e] for sh in first]))) == 4  # the epoch covers every shard
    assert any(not np.array_equal(first[0][0], first[0][e]) for e in range(1, 4))  # own order per member
    # the old per-shard stream would have fed all members one shard for 300 // 64 = 4 iterations in a row


@torch.no_grad()
def _whole_set_bn_stats(ens, x):
    """Per member: the exact mean and unbiased variance of each BatchNorm input over all rows x (N, D), with the
    trained weights and the earlier BatchNorm layers in eval mode (what they apply at test time)."""
    out = []
    for e in range(ens.members):
        mlp = ens.member(e).eval()
        h, stats = x, []
        for layer in mlp:
            if isinstance(layer, torch.nn.BatchNorm1d):
                stats.append((h.mean(0), h.var(0, unbiased=True), layer.running_mean, layer.running_var))
            h = layer(h)
        out.append(stats)
    return out


def _shifted_shards(root, n_shards=4, rows=400, d=6, k=3, seed=0):
    """Shards whose pixels differ in distribution (shard s is shifted by 10 s): last-shard statistics are wrong."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 2, (k, d))
    meta = FeatureMeta(blocks=["dec.1"], timesteps=[5], feature_dim=d, image_size=20, num_classes=k, backbone="toy")
    xs = []
    begin_shard_set(root, [f"img{s}" for s in range(n_shards)])
    for s in range(n_shards):
        y = rng.integers(0, k, rows)
        x = (centers[y] + rng.normal(0, 0.5, (rows, d)) + 10.0 * s).astype(np.float16)
        xs.append(x)
        write_shard(root / f"s{s}.parquet", x, y, [f"img{s}"] * rows, np.arange(rows) // 20, np.arange(rows) % 20, meta)
    end_shard_set(root)
    return (
        ShardSet(root),
        torch.from_numpy(np.concatenate(xs).astype(np.float32)),
        torch.from_numpy(xs[-1].astype(np.float32)),
    )


def test_batchnorm_statistics_match_the_whole_labelled_set(tmp_path):
    ss, x_all, x_last = _shifted_shards(tmp_path)
    # 1. windows of one shard (the set does not fit): "auto" recomputes; the statistics are the whole set's, exactly
    cfg = PixelTrainConfig(members=3, max_epochs=6, batch_size=64, patience=10, shuffle_buffer_mb=_mb(400, 6))
    ens, res = train_ensemble(ss, 3, cfg)
    assert res.windows_per_epoch == 4 and res.bn_stats == "recompute"
    for member in _whole_set_bn_stats(ens, x_all):
        for mean, var, running_mean, running_var in member:
            torch.testing.assert_close(running_mean, mean, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(running_var, var, rtol=1e-4, atol=1e-4)
    # 2. the whole set in one window (the reference's stream): the running averages of shuffled batches estimate the
    #    whole set's statistics; those of the last shard alone (what a per-shard stream left behind) are far off.
    #    Checked on the first BatchNorm layer, whose input follows the pixels' distribution most directly.
    cfg = dataclasses.replace(cfg, shuffle_buffer_mb=_mb(1600, 6), max_epochs=20, patience=1000)
    ens, res = train_ensemble(ss, 3, cfg)
    assert res.windows_per_epoch == 1 and res.bn_stats == "running"
    last = _whole_set_bn_stats(ens, x_last)
    for e, member in enumerate(_whole_set_bn_stats(ens, x_all)):
        mean, var, running_mean, running_var = member[0]
        last_mean, last_var = last[e][0][:2]
        alive = var > 1e-6  # ReLU units that never fire have no statistics to match
        sd = var[alive].sqrt()
        # medians over units: a sampled estimate is loose on the odd nearly-dead unit, not on the typical one
        err = ((running_mean - mean)[alive].abs() / sd).median()
        err_last = ((last_mean - mean)[alive].abs() / sd).median()
        assert err < 0.2 and err_last > 3 * err, (e, float(err), float(err_last))
        var_ratio, last_ratio = (running_var / var)[alive].median(), (last_var / var)[alive].median()
        assert abs(var_ratio - 1) < 0.15 and abs(last_ratio - 1) > 0.5, (e, float(var_ratio), float(last_ratio))


def test_stopping_rule_freezes_members(tmp_path):
    ss, _ = _write_toy_shards(tmp_path, n_shards=2, rows=200)
    cfg = PixelTrainConfig(members=2, max_epochs=100, batch_size=16, patience=3, check_after_epoch=0)
    ens, res = train_ensemble(ss, 3, cfg)
    assert all(s > 0 for s in res.stopped_at)  # with a short patience both members stop well before 100 epochs
    assert res.epochs < 100


@pytest.mark.parametrize("hidden", [(), (16,), (64, 16), (512, 256)])  # the paper's default, narrower, wider
def test_hidden_widths_and_members_reach_the_ensemble_and_its_bundle(tmp_path, hidden):
    """`pixel.hidden` and `pixel.members` (what a recipe sweep searches) build the ensemble they name; the bundle
    rebuilds it with the same widths; () is the paper's choice by the number of classes."""
    ss, _ = _write_toy_shards(tmp_path, n_shards=2, rows=64)
    cfg = PixelTrainConfig(members=3, hidden=hidden, max_epochs=1, batch_size=16)
    ens, _ = train_ensemble(ss, 3, cfg)
    widths = hidden or paper_hidden(3)
    assert ens.hidden == widths and ens.members == 3
    linear = [m for m in ens.member(0) if isinstance(m, torch.nn.Linear)]
    assert [m.out_features for m in linear] == [*widths, 3] and linear[0].in_features == 6
    seg = PixelSegmenter(ens, FeatureConfig(backbone="rgb"), ["a", "b", "c"], image_size=8, device="cpu")
    back = PixelSegmenter.load(seg.save(tmp_path / "seg.pt"), device="cpu").ensemble
    assert back.hidden == widths and back.members == 3


def test_bundle_roundtrip_rgb(tmp_path):
    torch.manual_seed(0)
    ens = MLPEnsemble(3, 4, members=3)
    seg = PixelSegmenter(ens, FeatureConfig(backbone="rgb"), ["a", "b", "c", "d"], image_size=8, device="cpu")
    path = seg.save(tmp_path / "seg.pt")
    back = PixelSegmenter.load(path, device="cpu")
    imgs = np.random.default_rng(0).integers(0, 255, (2, 8, 8, 3), dtype=np.uint8)
    l1, u1 = seg.predict(imgs)
    l2, u2 = back.predict(imgs)
    assert l1.shape == (2, 8, 8) and l1.dtype == np.int64 and u1.dtype == np.float32
    np.testing.assert_array_equal(l1, l2)
    np.testing.assert_allclose(u1, u2)
    assert back.class_names == ["a", "b", "c", "d"]
    # another size is resized to the segmenter's
    l3, _ = back.predict(np.zeros((16, 16, 3), np.uint8))
    assert l3.shape == (1, 8, 8)
