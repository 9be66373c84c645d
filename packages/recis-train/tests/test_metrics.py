"""Metrics against definitional NumPy references written here (no sklearn)."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st

from recis_train.exceptions import MetricInputError
from recis_train.metrics import AUROC, GAUC, Calibration, LogLoss


def pairwise_auc(preds: np.ndarray, labels: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties counting 1/2, over all pairs."""
    pos, neg = preds[labels == 1], preds[labels == 0]
    if len(pos) == 0 or len(neg) == 0:
        return math.nan
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0) + 0.5 * (diff == 0)).mean())


def tf_auc(preds: np.ndarray, labels: np.ndarray, n: int = 200) -> float:
    """``tf.compat.v1.metrics.auc``: predictions and thresholds compared in float32."""
    thresholds = [-1e-7] + [(i + 1) / (n - 1) for i in range(n - 2)] + [1 + 1e-7]
    preds = preds.astype(np.float32)
    tpr, fpr = [], []
    for t in np.array(thresholds, dtype=np.float32):
        predicted = preds > t
        tp = np.sum(predicted & (labels == 1))
        fp = np.sum(predicted & (labels == 0))
        fn = np.sum(~predicted & (labels == 1))
        tn = np.sum(~predicted & (labels == 0))
        tpr.append((tp + 1e-6) / (tp + fn + 1e-6))
        fpr.append(fp / (fp + tn + 1e-6))
    return sum((fpr[i] - fpr[i + 1]) * (tpr[i] + tpr[i + 1]) / 2 for i in range(n - 1))


def grouped_reference(preds, labels, groups) -> float:
    total, weight = 0.0, 0
    for g in np.unique(groups):
        mask = groups == g
        auc = pairwise_auc(preds[mask], labels[mask])
        if not math.isnan(auc):
            total += auc * mask.sum()
            weight += mask.sum()
    return total / weight if weight else math.nan


def batches(n: int, size: int):
    return [slice(i, i + size) for i in range(0, n, size)]


# Scores drawn from a small grid so ties are frequent.
scores = st.lists(st.integers(0, 12), min_size=1, max_size=120)


@settings(max_examples=60, deadline=None)
@given(raw=scores, data=st.data())
def test_exact_auroc_matches_pairwise_definition(raw, data):
    preds = np.array(raw, dtype=np.float64) / 12
    labels = np.array(data.draw(st.lists(st.integers(0, 1), min_size=len(raw), max_size=len(raw))))
    size = data.draw(st.integers(1, 50))
    metric = AUROC()
    for s in batches(len(preds), size):
        metric.update(torch.tensor(preds[s]), torch.tensor(labels[s]))
    expected = pairwise_auc(preds, labels)
    if math.isnan(expected):
        assert math.isnan(metric.compute())
    else:
        assert metric.compute() == pytest.approx(expected, abs=1e-12)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31), n=st.integers(1, 300), size=st.integers(1, 64))
def test_thresholded_auroc_matches_tf_definition(seed, n, size):
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < 0.3).astype(np.int64)
    # Include values on and next to thresholds: p > t is strict.
    preds = np.where(rng.random(n) < 0.3, rng.integers(0, 200, n) / 199, rng.random(n))
    preds = np.clip(preds + labels * 0.1, 0, 1)
    metric = AUROC("thresholded")
    for s in batches(n, size):
        metric.update(torch.tensor(preds[s]), torch.tensor(labels[s]))
    if labels.min() == labels.max():  # one class: undefined (TF's formula gives 0 or ~1)
        assert math.isnan(metric.compute())
    else:
        assert metric.compute() == pytest.approx(tf_auc(preds, labels), abs=1e-9)


@pytest.mark.parametrize("num_thresholds", [101, 200])
def test_thresholded_auroc_compares_in_float32_like_tf(num_thresholds):
    # Scores rounded to two decimals sit on the thresholds of num_thresholds=101 (0.01 apart):
    # in float32, as TF compares, 0.37 is not above the threshold 0.37; in float64 the float32
    # score 0.37 is 0.3700000048 and would be.
    rng = np.random.default_rng(3)
    labels = (rng.random(400) < 0.4).astype(np.int64)
    preds = np.round(np.clip(rng.random(400) * 0.8 + labels * 0.2, 0, 1), 2).astype(np.float32)
    metric = AUROC("thresholded", num_thresholds=num_thresholds)
    metric.update(torch.from_numpy(preds), torch.tensor(labels))
    assert metric.compute() == pytest.approx(tf_auc(preds, labels, num_thresholds), abs=1e-12)


def test_thresholded_close_to_exact_on_smooth_scores():
    rng = np.random.default_rng(0)
    labels = (rng.random(6_000) < 0.4).astype(np.int64)
    preds = 1 / (1 + np.exp(-(rng.normal(size=6_000) + labels)))
    exact, approx = AUROC(), AUROC("thresholded")
    for m in (exact, approx):
        m.update(torch.tensor(preds), torch.tensor(labels))
    assert abs(exact.compute() - approx.compute()) < 2e-3
    assert exact.compute() == pytest.approx(pairwise_auc(preds, labels), abs=1e-12)


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**31), n=st.integers(1, 200), size=st.integers(1, 40))
def test_gauc_exact_across_batch_boundaries(seed, n, size):
    rng = np.random.default_rng(seed)
    groups = np.sort(rng.integers(-3, 6, n))  # sorted: every group spans batch boundaries
    labels = rng.integers(0, 2, n)
    preds = rng.integers(0, 5, n) / 4
    metric = GAUC()
    for s in batches(n, size):
        metric.update(
            torch.tensor(preds[s]), torch.tensor(labels[s]), groups=torch.tensor(groups[s])
        )
    expected = grouped_reference(preds, labels, groups)
    got = metric.compute()
    assert (math.isnan(got) and math.isnan(expected)) or got == pytest.approx(expected, abs=1e-12)


def test_gauc_skips_single_class_groups_and_weights_by_size():
    metric = GAUC()
    # group 1: 4 rows, AUC 0.75; group 2: 2 rows, AUC 0; group 3: single class, skipped
    metric.update([0.9, 0.2, 0.5, 0.6], [1, 0, 0, 1], groups=[1, 1, 1, 1])
    metric.update([0.1, 0.8, 0.3], [1, 0, 1], groups=[2, 2, 3])
    assert metric.compute() == pytest.approx((4 * 1.0 + 2 * 0.0) / 6)
    metric.reset()
    metric.update([0.3], [1], groups=[5])
    assert math.isnan(metric.compute())


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31), n=st.integers(1, 200), size=st.integers(1, 50))
def test_logloss_and_calibration_streaming(seed, n, size):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n).astype(np.float64)
    preds = rng.random(n)
    preds[:2] = [0.0, 1.0][: min(n, 2)]  # clipped, never infinite
    ll, cal = LogLoss(), Calibration()
    for s in batches(n, size):
        ll.update(torch.tensor(preds[s]), torch.tensor(labels[s]))
        cal.update(torch.tensor(preds[s]), torch.tensor(labels[s]))
    p = np.clip(preds, 1e-7, 1 - 1e-7)
    expected = -np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p))
    assert ll.compute() == pytest.approx(expected, rel=1e-12)
    mean_pred, mean_label = cal.means()
    assert mean_pred == pytest.approx(preds.mean(), rel=1e-12)
    assert mean_label == pytest.approx(labels.mean(), rel=1e-12)
    if labels.sum():
        assert cal.compute() == pytest.approx(preds.mean() / labels.mean(), rel=1e-12)
    else:
        assert math.isnan(cal.compute())


def test_logloss_from_logits_matches_probabilities():
    logits = torch.tensor([-3.0, 0.0, 2.5, 10.0])
    labels = torch.tensor([0.0, 1.0, 1.0, 0.0])
    a, b = LogLoss(from_logits=True), LogLoss()
    a.update(logits, labels)
    b.update(torch.sigmoid(logits.double()), labels)
    assert a.compute() == pytest.approx(b.compute(), rel=1e-6)


@pytest.mark.parametrize(
    ("make", "args", "message"),
    [
        (AUROC, ([0.1, 0.2], [1]), "preds has 2 elements but labels has 1"),
        (AUROC, ([0.1, float("nan")], [1, 0]), "preds contain nan or inf"),
        (AUROC, ([0.1, 0.2], [1, 2]), "labels must be 0 or 1, found 2.0 at 1"),
        (LogLoss, ([1.5], [1]), "preds must be probabilities in [0, 1]"),
        (Calibration, ([0.5], [-1]), "labels must lie in [0, 1]"),
        (lambda: AUROC("thresholded"), ([0.1, 1.5], [1, 0]), "[0, 1], found 1.5 at 1"),
    ],
)
def test_bad_input_is_named(make, args, message):
    with pytest.raises(MetricInputError, match=message.replace("[", r"\[").replace("]", r"\]")):
        make().update(*args)


@pytest.mark.parametrize("source", ["numpy", "tensor"])
def test_metrics_that_keep_rows_copy_them(source):
    """Exact AUROC and GAUC keep every row until compute: a caller refilling its buffers (a
    float64 / int64 batch buffer reused per step, as their dtypes need no conversion) must not
    change what they saw."""
    preds = np.array([0.9, 0.1], dtype=np.float64)
    labels = np.array([1.0, 0.0], dtype=np.float64)
    groups = np.array([7, 7], dtype=np.int64)
    if source == "tensor":
        preds, labels, groups = map(torch.from_numpy, (preds, labels, groups))
    auc, gauc = AUROC(), GAUC()
    for batch in ((0.9, 0.1), (0.8, 0.2)):  # both batches rank the positive first
        preds[:] = torch.tensor(batch) if source == "tensor" else np.array(batch)
        auc.update(preds, labels)
        gauc.update(preds, labels, groups=groups)
    preds[:] = 0.0  # the buffer refilled before compute
    groups[:] = torch.tensor([1, 2]) if source == "tensor" else np.array([1, 2])
    assert auc.compute() == 1.0
    assert gauc.compute() == 1.0


def test_empty_batches_as_lists_are_accepted():
    gauc = GAUC()
    gauc.update([], [], groups=[])
    gauc.update(np.array([]), np.array([]), groups=np.array([]))
    gauc.update([0.2, 0.7], [0, 1], groups=[3, 3])
    assert gauc.compute() == 1.0


def test_a_state_that_is_not_a_mapping_of_tensors_is_named():
    with pytest.raises(MetricInputError, match=r"a state is a mapping .* got NoneType"):
        LogLoss().load_state_dict(None)
    with pytest.raises(MetricInputError, match=r"state 'count' must be a tensor, got str"):
        LogLoss().load_state_dict({"loss_sum": 0.0, "count": "x"})


def test_bad_configuration_and_groups():
    with pytest.raises(MetricInputError, match="mode must be 'exact' or 'thresholded'"):
        AUROC("roc")
    with pytest.raises(MetricInputError, match="groups must be integer ids"):
        GAUC().update([0.1], [1], groups=[0.5])
    with pytest.raises(MetricInputError, match="groups has 1 elements but preds has 2"):
        GAUC().update([0.1, 0.2], [1, 0], groups=[1])


@pytest.mark.parametrize("make", [AUROC, lambda: AUROC("thresholded"), GAUC, LogLoss, Calibration])
def test_state_dict_round_trip_continues_identically(make):
    rng = np.random.default_rng(1)
    preds, labels, groups = rng.random(100), rng.integers(0, 2, 100), rng.integers(0, 9, 100)

    def feed(metric, s):
        extra = {"groups": torch.tensor(groups[s])} if isinstance(metric, GAUC) else {}
        metric.update(torch.tensor(preds[s]), torch.tensor(labels[s]), **extra)

    whole, first = make(), make()
    feed(whole, slice(0, 100))
    feed(first, slice(0, 60))
    second = make()
    second.load_state_dict(first.state_dict())
    feed(second, slice(60, 100))
    assert second.compute() == pytest.approx(whole.compute(), abs=1e-12)
    with pytest.raises(MetricInputError, match="state has keys"):
        second.load_state_dict({"bogus": torch.zeros(1)})


def test_a_state_of_another_configuration_is_refused():
    small = AUROC("thresholded", num_thresholds=10)
    small.update(torch.tensor([0.1, 0.9]), torch.tensor([0, 1]))
    target = AUROC("thresholded", num_thresholds=200)
    with pytest.raises(
        MetricInputError, match=r"state 'pos' has shape \(11,\), expected shape \(201,\)"
    ):
        target.load_state_dict(small.state_dict())
    assert math.isnan(target.compute())  # nothing was loaded
    with pytest.raises(MetricInputError, match="different numbers of rows"):
        AUROC().load_state_dict({"preds": torch.zeros(3), "labels": torch.zeros(2)})
    with pytest.raises(MetricInputError, match="expected 1-d"):
        GAUC().load_state_dict(
            {"preds": torch.zeros(2, 1), "labels": torch.zeros(2), "groups": torch.zeros(2)}
        )
    with pytest.raises(MetricInputError, match=r"state 'count' has shape \(2,\)"):
        LogLoss().load_state_dict({"loss_sum": torch.tensor(1.0), "count": torch.ones(2)})


@pytest.mark.parametrize(
    ("make", "state", "message"),
    [
        (
            AUROC,
            {"preds": torch.tensor([0.2, 0.7]), "labels": torch.tensor([1.0, 5.0])},
            r"AUROC\(mode='exact', num_thresholds=200\): state 'labels' holds 5.0 at 1, "
            r"expected 0 or 1",
        ),
        (
            AUROC,
            {"preds": torch.tensor([0.2, float("nan")]), "labels": torch.tensor([1.0, 0.0])},
            r"state 'preds' holds nan at 1, expected finite values",
        ),
        (
            lambda: AUROC("thresholded", num_thresholds=3),
            {"pos": torch.tensor([0.0, 2.0, -1.0, 0.0]), "neg": torch.zeros(4)},
            r"state 'pos' holds -1.0 at 2, expected counts \(whole numbers >= 0\)",
        ),
        (
            lambda: AUROC("thresholded", num_thresholds=3),
            {"pos": torch.zeros(4), "neg": torch.tensor([0.0, 0.5, 0.0, 0.0])},
            r"state 'neg' holds 0.5 at 1, expected counts",
        ),
        (
            GAUC,
            {
                "preds": torch.tensor([0.1, 0.4]),
                "labels": torch.tensor([0.0, 1.0]),
                "groups": torch.tensor([3.0, 3.5]),
            },
            r"GAUC\(\): state 'groups' holds 3.5 at 1, expected integers",
        ),
        (
            LogLoss,
            {"loss_sum": torch.tensor(-1.0), "count": torch.tensor(4.0)},
            r"state 'loss_sum' holds -1.0, expected a sum of losses",
        ),
        (
            LogLoss,
            {"loss_sum": torch.tensor(5.0), "count": torch.tensor(0.0)},
            r"state 'loss_sum' holds 5.0, expected 0 with a count of 0",
        ),
        (
            LogLoss,
            {"loss_sum": torch.tensor(1.0), "count": torch.tensor(float("inf"))},
            r"state 'count' holds inf, expected finite values",
        ),
        (
            Calibration,
            {"pred_sum": torch.tensor(3.0), "label_sum": torch.tensor(1.0), "count": 2.0},
            r"state 'pred_sum' holds 3.0, expected a sum in \[0, count\]",
        ),
        (
            Calibration,
            {"pred_sum": 1.0, "label_sum": 1.0, "count": torch.tensor(2.5)},
            r"state 'count' holds 2.5, expected counts",
        ),
    ],
)
def test_a_state_update_could_not_have_made_is_refused(make, state, message):
    # update() refuses such values; a corrupt or hand-edited checkpoint must not slip them in.
    metric = make()
    before = metric.state_dict()
    with pytest.raises(MetricInputError, match=message):
        metric.load_state_dict(state)
    assert all(torch.equal(metric.state_dict()[k], v) for k, v in before.items())


def _distributed_worker(rank: int, world: int, init_file: str, queue) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    rng = np.random.default_rng(7)
    n = 90
    preds, labels, groups = rng.random(n), rng.integers(0, 2, n), rng.integers(0, 6, n)
    mine = slice(rank * n // world, (rank + 1) * n // world)
    # Second: rank 0 holds every row, rank 1 only batches with no row (a task that left every
    # row of rank 1 out, e.g. by its mask); the sync must give the same numbers.
    everything = slice(0, n) if rank == 0 else slice(0, 0)
    results = []
    for share in (mine, everything):
        metrics = {
            "auc": AUROC(),
            "tf": AUROC("thresholded"),
            "gauc": GAUC(),
            "ll": LogLoss(),
            "cal": Calibration(),
        }
        for name, m in metrics.items():
            for part in (share, slice(0, 0)):
                extra = {"groups": torch.tensor(groups[part])} if name == "gauc" else {}
                m.update(torch.tensor(preds[part]), torch.tensor(labels[part]), **extra)
        results.append({name: m.compute() for name, m in metrics.items()})
    queue.put((rank, results))
    dist.destroy_process_group()


def test_metrics_sync_across_two_gloo_ranks(tmp_path):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    init_file = str(tmp_path / "store")
    env = dict(os.environ)
    procs = [
        ctx.Process(target=_distributed_worker, args=(r, 2, init_file, queue)) for r in range(2)
    ]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert env == dict(os.environ)
    rng = np.random.default_rng(7)
    preds, labels, groups = rng.random(90), rng.integers(0, 2, 90), rng.integers(0, 6, 90)
    p = np.clip(preds, 1e-7, 1 - 1e-7)
    expected = {
        "auc": pairwise_auc(preds, labels),
        "tf": tf_auc(preds, labels),
        "gauc": grouped_reference(preds, labels, groups),
        "ll": -np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p)),
        "cal": preds.mean() / labels.mean(),
    }
    for rank in (0, 1):
        for split in (0, 1):
            for name, value in expected.items():
                got = results[rank][split][name]
                assert got == pytest.approx(value, abs=1e-9), (rank, split, name)


@pytest.mark.parametrize("score", [-0.5, 1.5, 3.0])
def test_thresholded_auroc_rejects_scores_outside_zero_one(score):
    auc = AUROC("thresholded")
    with pytest.raises(MetricInputError, match=f"needs predictions in \\[0, 1\\], found {score:g}"):
        auc.update(torch.tensor([0.2, score]), torch.tensor([0, 1]))
    assert math.isnan(auc.compute())  # the rejected batch left nothing behind
    exact = AUROC()
    exact.update(torch.tensor([0.2, score]), torch.tensor([0, 1]))
    assert exact.compute() == (1.0 if score > 0.2 else 0.0)  # exact mode takes any real scores


def test_auroc_of_no_data_is_nan_in_both_modes():
    for auc in (AUROC(), AUROC("thresholded")):
        assert math.isnan(auc.compute())
        auc.update(torch.zeros(0), torch.zeros(0))
        assert math.isnan(auc.compute())


def test_inputs_and_options_that_do_not_fit_are_named() -> None:
    calibration = Calibration()
    with pytest.raises(MetricInputError, match=r"Calibration: preds must be probabilities"):
        calibration.update(torch.tensor([2.0, -1.0]), torch.tensor([1.0, 0.0]))  # logits
    gauc = GAUC()
    for groups in (["u1", "u2"], None):
        with pytest.raises(MetricInputError, match="GAUC: groups must be integer ids"):
            gauc.update(torch.tensor([0.2, 0.7]), torch.tensor([0, 1]), groups=groups)
    with pytest.raises(MetricInputError, match="from_logits must be True or False, got 'no'"):
        LogLoss(from_logits="no")
    with pytest.raises(MetricInputError, match=r"eps must be a number in \(0, 0\.5\), got '1e-7'"):
        LogLoss(eps="1e-7")
    # 1 - eps would round to 1: a confident mistake would cost infinity.
    with pytest.raises(MetricInputError, match=r"eps 1e-17 is too small: 1 - eps rounds to 1"):
        LogLoss(eps=1e-17)
    tiny = LogLoss(eps=2.0**-53)
    tiny.update(torch.tensor([1.0]), torch.tensor([0.0]))
    assert math.isfinite(tiny.compute())
    with pytest.raises(MetricInputError, match=r"num_thresholds must be an integer, got 200\.0"):
        AUROC("thresholded", num_thresholds=200.0)
    auc = AUROC("thresholded")
    with pytest.raises(MetricInputError, match=r"found 1\.000000000001 at 0;"):
        auc.update(torch.tensor([1 + 1e-12], dtype=torch.float64), torch.tensor([1]))


def test_the_trainer_gives_float64_predictions_to_the_metrics_unrounded(tmp_path):
    from recis_train import Trainer, TrainingArguments

    class Scores(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, batch):
            # Distinct in float64, all 1.0 in float32.
            preds = 1.0 - torch.tensor([1e-9, 2e-9, 3e-9, 4e-9], dtype=torch.float64)
            return {"loss": self.w.sum(), "predictions": preds, "labels": batch["y"]}

    model = Scores()
    trainer = Trainer(
        model,
        TrainingArguments(output_dir=str(tmp_path), device="cpu"),
        train_data=[],
        dense_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        metrics={"auc": AUROC},
    )
    assert trainer.evaluate([{"y": torch.tensor([1.0, 1.0, 0.0, 0.0])}])["auc"] == 1.0


def test_gauc_takes_unsigned_64_bit_ids_as_python_ints():
    big = [2**64 - 1, 2**63, 2**64 - 1, 2**63]
    metric = GAUC()
    metric.update([0.9, 0.2, 0.1, 0.8], [1, 0, 0, 1], groups=big)
    # Group 2**64-1: AUC 1; group 2**63: AUC 1 (distinct groups, not merged).
    assert metric.compute() == 1.0
    with pytest.raises(MetricInputError, match=r"list of ints in \[-2\*\*63, 2\*\*64\)"):
        GAUC().update([0.5], [1], groups=[2**64])


def test_an_integer_state_beyond_int64_is_refused():
    metric = GAUC()
    metric.update([0.9, 0.1], [1, 0], groups=[1, 1])
    state = metric.state_dict()
    state["groups"] = torch.tensor([1e30, 2e30], dtype=torch.float64)
    with pytest.raises(
        MetricInputError, match=r"state 'groups' holds 1e\+30 at 0, expected integers"
    ):
        GAUC().load_state_dict(state)


def test_logloss_and_calibration_errors_name_the_value_and_where():
    with pytest.raises(
        MetricInputError, match=r"found 3.5 at 1; for logits pass LogLoss\(from_logits=True\)"
    ):
        LogLoss().update([0.5, 3.5], [0, 1])
    with pytest.raises(MetricInputError, match=r"labels must be finite, found nan at 0"):
        Calibration().update([0.5], [float("nan")])
    with pytest.raises(MetricInputError, match=r"labels must lie in \[0, 1\], found 2.0 at 1"):
        LogLoss().update([0.5, 0.5], [0, 2])
    with pytest.raises(MetricInputError, match=r"found -0.5 at 0 \(apply a sigmoid"):
        Calibration().update([-0.5], [0])
