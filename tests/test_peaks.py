"""Immune-cell peaks: the fast square maximum equals the plain max-pool it replaces, on the CPU path and the
1-D-pass path that other devices take."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nervedet import peaks
from nervedet.peaks import find_peaks, square_max


@pytest.mark.parametrize("radius", [1, 2, 8])
def test_square_max_equals_a_square_max_pool_including_the_borders(radius: int) -> None:
    x = torch.rand(3, 1, 70, 53, generator=torch.Generator().manual_seed(radius)) - 0.5  # negatives at the border
    expected = F.max_pool2d(x, 2 * radius + 1, stride=1, padding=radius)
    assert torch.equal(square_max(x, radius), expected)
    meta = x.to("meta")  # not the CPU: the two 1-D max-pools
    assert square_max(meta, radius).shape == expected.shape
    k = 2 * radius + 1
    rows = F.max_pool2d(x, (1, k), stride=1, padding=(0, radius))
    assert torch.equal(F.max_pool2d(rows, (k, 1), stride=1, padding=(radius, 0)), expected)


def test_peaks_are_the_local_maxima_above_threshold_once_each(monkeypatch) -> None:
    heat = torch.zeros(1, 1, 40, 40)
    heat[0, 0, 10, 12] = 0.9
    heat[0, 0, 11, 13] = 0.7  # within the radius of a stronger one
    heat[0, 0, 30, 30] = 0.6
    heat[0, 0, 30, 5] = 0.4  # under the threshold
    (pts,) = find_peaks(heat, threshold=0.5, radius=3)
    assert torch.allclose(pts, torch.tensor([[12.5, 10.5, 0.9], [30.5, 30.5, 0.6]]))
    monkeypatch.setattr(peaks, "square_max", lambda x, r: F.max_pool2d(x, 2 * r + 1, 1, r))
    (ref,) = find_peaks(heat, threshold=0.5, radius=3)
    assert torch.equal(ref, pts)


def test_peaks_of_logits_are_those_of_their_probabilities() -> None:
    g = torch.Generator().manual_seed(5)
    logits = torch.nn.functional.avg_pool2d(torch.randn(2, 1, 90, 80, generator=g) * 8, 5, 1, 2)  # smooth blobs
    for threshold in (0.3, 0.5, 0.8):
        from_probs = find_peaks(torch.sigmoid(logits), threshold=threshold, radius=4)
        from_logits = find_peaks(logits, threshold=threshold, radius=4, logits=True)
        assert sum(len(p) for p in from_probs) > 5, threshold
        for a, b in zip(from_probs, from_logits):
            torch.testing.assert_close(a, b)  # the same points, p as probabilities


def test_peaks_of_logits_see_maxima_that_saturated_probabilities_tie() -> None:
    logits = torch.full((1, 1, 20, 20), -10.0)
    logits[0, 0, 5, 5], logits[0, 0, 9, 9] = 25.0, 20.0  # both 1.0 as float32 probabilities
    assert torch.sigmoid(logits[0, 0, 9, 9]) == torch.sigmoid(logits[0, 0, 5, 5]) == 1.0
    (pts,) = find_peaks(logits, threshold=0.5, radius=4, logits=True)
    assert pts[:, :2].tolist() == [[5.5, 5.5]]  # the weaker one is within the stronger one's square


def test_a_plateau_gives_one_peak_and_distant_ties_stay_apart() -> None:
    heat = torch.zeros(1, 1, 40, 40)
    heat[0, 0, 10, 10:13] = 0.8  # a plateau three pixels wide: one cell
    heat[0, 0, 11, 11] = 0.8
    heat[0, 0, 30, 30] = 0.8  # the same value far away: another cell
    heat[0, 0, 30, 5] = 0.9
    (pts,) = find_peaks(heat, threshold=0.5, radius=3)
    assert pts.tolist() == [[5.5, 30.5, pytest.approx(0.9)], [10.5, 10.5, pytest.approx(0.8)],
                            [30.5, 30.5, pytest.approx(0.8)]]  # strongest first; ties in reading order
