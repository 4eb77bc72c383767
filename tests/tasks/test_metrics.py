"""Explanation-quality metrics on cases with known answers."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import scipy.stats
import torch
import torch.nn.functional as F

from tasks.algorithms.metrics import (
    accuracy,
    average_ranks,
    cell_masks_to_pixels,
    cells_touching_mask,
    explanation_quality,
    insertion_deletion_auc,
    pearson,
    pointing_game,
    spearman,
    topk_overlap,
)

GRID = (4, 4)
SIZE = 16


class CellLinearModel:
    """Two classes; the class-0 logit is a weighted sum of cell means, class 1 is its negative.

    The output is additive over cells, so the exact attribution of cell c is
    ``w_c * (mean_c(image) - mean_c(baseline))`` and the best insertion order is known.
    """

    def __init__(self, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.weights = torch.randn(GRID, generator=gen, dtype=torch.float64)
        self.calls = 0

    def cell_means(self, images: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(images.double().mean(dim=1, keepdim=True), SIZE // GRID[0])[:, 0]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        g = (self.cell_means(images) * self.weights).sum(dim=(1, 2))
        return torch.stack([g, -g], dim=1) / 4


@pytest.fixture
def additive_case():
    gen = torch.Generator().manual_seed(1)
    model = CellLinearModel()
    images = torch.rand(3, 3, SIZE, SIZE, generator=gen)
    baseline = torch.full((3, 1, 1), 0.5)
    exact = model.weights * (
        model.cell_means(images) - model.cell_means(baseline[None].expand(1, 3, SIZE, SIZE))
    )
    classes = torch.zeros(3, dtype=torch.long)
    return model, images, baseline, exact.float(), classes


def _auc(model, images, attributions, classes, baseline, **kwargs):
    return insertion_deletion_auc(
        model, images, attributions, classes, grid=GRID, baseline=baseline, **kwargs
    )


def test_exact_attribution_is_best_and_reversed_is_worst(additive_case):
    model, images, baseline, exact, classes = additive_case
    assert torch.allclose(pearson(exact, exact), torch.ones(3, dtype=torch.float64))

    best_ins, best_del = _auc(model, images, exact, classes, baseline)
    worst_ins, worst_del = _auc(model, images, -exact, classes, baseline)
    gen = torch.Generator().manual_seed(2)
    for _ in range(20):
        perm = torch.randperm(16, generator=gen)
        shuffled = exact.reshape(3, -1)[:, perm].reshape(exact.shape)
        ins, dele = _auc(model, images, shuffled, classes, baseline)
        assert torch.all(ins <= best_ins + 1e-12) and torch.all(ins >= worst_ins - 1e-12)
        assert torch.all(dele >= best_del - 1e-12) and torch.all(dele <= worst_del + 1e-12)
    assert torch.all(best_ins > worst_ins) and torch.all(best_del < worst_del)
    assert torch.all((0 <= best_ins) & (best_ins <= 1))


def test_auc_matches_a_hand_computed_curve(additive_case):
    model, images, baseline, exact, classes = additive_case
    ins, dele = _auc(model, images, exact, classes, baseline, output="logit")
    full = model(images)[:, 0]
    empty = model(baseline[None].expand(1, 3, SIZE, SIZE))[:, 0]
    for i in range(3):
        contributions = np.sort(exact[i].double().numpy().ravel() / 4)[::-1]
        inserted = np.concatenate([[0.0], np.cumsum(contributions)]) + float(empty)
        deleted = float(full[i]) - np.concatenate([[0.0], np.cumsum(contributions)])
        x = np.linspace(0, 1, 17)
        assert float(ins[i]) == pytest.approx(np.trapezoid(inserted, x), abs=1e-6)
        assert float(dele[i]) == pytest.approx(np.trapezoid(deleted, x), abs=1e-6)


def test_batching_and_steps_do_not_change_the_result(additive_case):
    model, images, baseline, exact, classes = additive_case
    big = _auc(model, images, exact, classes, baseline, batch_size=1000)
    model.calls = 0
    small = _auc(model, images, exact, classes, baseline, batch_size=5)
    assert model.calls > 3
    for a, b in zip(big, small, strict=True):
        assert torch.allclose(a, b, atol=1e-12)
    # With one step per 4 cells the curve is a coarser sampling of the same function.
    ins4, _ = _auc(model, images, exact, classes, baseline, steps=4, output="logit")
    full_ins, _ = _auc(model, images, exact, classes, baseline, output="logit")
    assert torch.all(ins4 <= full_ins + 1e-9)  # the insertion curve is concave here
    with pytest.raises(ValueError):
        _auc(model, images, exact, classes, baseline, steps=17)


def test_spearman_matches_scipy_with_ties():
    gen = torch.Generator().manual_seed(3)
    a = torch.randint(0, 5, (6, 4, 4), generator=gen).float()
    b = torch.randn(6, 4, 4, generator=gen)
    b[:, 0, :2] = 0.0
    ours = spearman(a, b)
    for i in range(6):
        ref = scipy.stats.spearmanr(a[i].ravel().numpy(), b[i].ravel().numpy()).statistic
        assert float(ours[i]) == pytest.approx(ref, abs=1e-12)
        ranks = scipy.stats.rankdata(a[i].ravel().numpy())
        assert np.allclose(average_ranks(a[i].reshape(1, -1).double())[0].numpy(), ranks)
        p_ref = np.corrcoef(a[i].ravel().numpy(), b[i].ravel().numpy())[0, 1]
        assert float(pearson(a, b)[i]) == pytest.approx(p_ref, abs=1e-6)


def test_correlations_of_monotone_and_constant_maps():
    a = torch.randn(2, 4, 4)
    assert torch.allclose(spearman(a, a.exp()), torch.ones(2, dtype=torch.float64))
    assert torch.allclose(pearson(a, -3 * a + 1), -torch.ones(2, dtype=torch.float64))
    assert torch.isnan(pearson(a, torch.zeros_like(a))).all()


def test_topk_overlap():
    a = torch.arange(16.0).reshape(1, 4, 4)
    assert float(topk_overlap(a, a, 3)) == 1.0
    assert float(topk_overlap(a, -a, 3)) == 0.0
    b = a.clone()
    b[0, 3, 3] = -1.0  # a's best cell drops out of b's top 4: 3 of 4 shared
    assert float(topk_overlap(a, b, 4)) == 0.75
    with pytest.raises(ValueError):
        topk_overlap(a, a, 0)


def test_pointing_game_hits_misses_and_tolerance():
    masks = torch.zeros(3, SIZE, SIZE, dtype=torch.bool)
    masks[:, 4:8, 4:8] = True  # exactly cell (1, 1) of the 4x4 grid
    attributions = torch.zeros(3, *GRID)
    attributions[0, 1, 1] = 1.0  # on the object
    attributions[1, 3, 3] = 1.0  # far away
    attributions[2, 1, 2] = 1.0  # the neighbouring cell
    assert pointing_game(attributions, masks).tolist() == [True, False, False]
    assert pointing_game(attributions, masks, tolerance=1).tolist() == [True, False, True]


def test_cell_pixel_mapping_is_consistent_for_uneven_sizes():
    for cell in itertools.product(range(3), range(3)):
        cells = torch.zeros(1, 3, 3, dtype=torch.bool)
        cells[0, cell[0], cell[1]] = True
        pixels = cell_masks_to_pixels(cells, (17, 20))
        assert pixels.any()
        assert torch.equal(cells_touching_mask(pixels, (3, 3)), cells)


def test_accuracy_and_quality_summary(additive_case):
    model, images, baseline, exact, classes = additive_case
    logits = torch.tensor([[2.0, 1.0], [0.0, 1.0], [3.0, -1.0]])
    assert accuracy(logits, torch.tensor([0, 0, 0])) == pytest.approx(2 / 3)
    masks = torch.ones(3, SIZE, SIZE, dtype=torch.bool)
    summary = explanation_quality(
        exact,
        reference=exact,
        k=4,
        model_fn=model,
        images=images,
        classes=classes,
        baseline=baseline,
        masks=masks,
        logits=logits,
        labels=torch.zeros(3, dtype=torch.long),
    )
    assert summary["pearson"] == pytest.approx(1.0)
    assert summary["spearman"] == pytest.approx(1.0)
    assert summary["topk"] == 1.0 and summary["pointing"] == 1.0
    ins, dele = _auc(model, images, exact, classes, baseline)
    assert summary["insertion_auc"] == pytest.approx(float(ins.mean()))
    assert summary["deletion_auc"] == pytest.approx(float(dele.mean()))
    assert summary["accuracy"] == pytest.approx(2 / 3) and summary["n"] == 3
    per_image = explanation_quality(exact, reference=-exact, reduce=False)
    assert set(per_image) == {"pearson", "spearman", "topk"}
    assert per_image["pearson"].shape == (3,)
    with pytest.raises(ValueError, match="needs"):
        explanation_quality(exact, model_fn=model)


def test_pointing_chance_energy_and_off_evidence():
    from tasks.algorithms.metrics import (
        cell_coverage,
        energy_pointing,
        pointing_chance,
        topk_off_evidence,
    )

    masks = torch.zeros(2, 8, 8, dtype=torch.bool)
    masks[:, :4, :4] = True  # the top-left cell of a 2x2 grid
    assert torch.equal(cell_coverage(masks, (2, 2))[0], torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    assert torch.allclose(pointing_chance(masks, (2, 2)), torch.tensor([0.25, 0.25]))
    maps = torch.tensor([[[3.0, 1.0], [0.0, -5.0]], [[0.0, 1.0], [1.0, 2.0]]])
    energy = energy_pointing(maps, masks)
    assert torch.allclose(energy, torch.tensor([0.75, 0.0]))
    assert torch.isnan(energy_pointing(-maps.abs(), masks)).all()
    off = topk_off_evidence(maps, masks, k=2)
    assert torch.allclose(off, torch.tensor([0.5, 1.0]))


def test_deletion_normalised_by_the_full_image(additive_case):
    model, images, baseline, exact, _ = additive_case
    classes = torch.ones(3, dtype=torch.long)  # the class this model gives more than chance
    per_image = explanation_quality(
        exact, model_fn=model, images=images, classes=classes, baseline=baseline, reduce=False
    )
    full = model(images).softmax(dim=-1).gather(1, classes[:, None]).squeeze(1)
    assert torch.all(full > 0.5)
    assert torch.allclose(per_image["deletion_normalised"], per_image["deletion_auc"] / full)


def test_deletion_normalised_is_not_measured_below_chance():
    """An image the model gives its class less than chance has no confidence to lose: dividing
    by its probability (4e-4 in a real sweep) would swamp the mean, so it is NaN and the mean
    is over the other images."""

    def model(x):
        # Three classes; class 0's logit grows with the image's brightness.
        brightness = x.mean(dim=(1, 2, 3))
        zeros = torch.zeros_like(brightness)
        return torch.stack([20.0 * (brightness - 0.5), zeros, zeros], dim=1)

    images = torch.stack([torch.full((3, SIZE, SIZE), 0.9), torch.full((3, SIZE, SIZE), 0.05)])
    maps = torch.rand(2, *GRID, generator=torch.Generator().manual_seed(0))
    classes = torch.zeros(2, dtype=torch.long)
    kwargs = dict(model_fn=model, images=images, classes=classes, baseline=0.0)
    per_image = explanation_quality(maps, reduce=False, **kwargs)
    full = model(images).softmax(dim=-1)[:, 0]
    assert full[1] < 1e-3 < 1 / 3 < full[0]
    normalised = per_image["deletion_normalised"]
    assert torch.isnan(normalised[1])
    assert torch.isclose(normalised[0], per_image["deletion_auc"][0] / full[0].double(), rtol=1e-5)
    means = explanation_quality(maps, **kwargs)
    assert means["deletion_normalised"] == pytest.approx(float(normalised[0]))
