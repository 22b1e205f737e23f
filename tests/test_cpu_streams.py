"""CPU streams: tiles run by several threads at once come back in tile order, errors stop the run cleanly."""

from __future__ import annotations

import time

import pytest
import torch

from nervedet.cpu_streams import stream_count, stream_results
from nervedet.slide import SlideError


def _read(i: int) -> tuple[torch.Tensor, int, str]:
    return torch.full((3, 4, 4), i, dtype=torch.uint8), i, ""


def test_results_come_back_in_run_order_whichever_stream_finishes_first() -> None:
    runs = [[0, 1], [2], [3, 4], [5], [6], [7]]
    seen_threads = set()

    def predict(tiles):
        seen_threads.add(torch.get_num_threads())
        first = int(tiles[0][0, 0, 0])
        time.sleep(0.02 if first % 2 == 0 else 0.0)  # even runs finish later
        return torch.stack(tiles).float(), [t[0, 0, 0].reshape(1) for t in tiles]

    out = list(stream_results(runs, _read, predict, 2))
    assert [r for r, _, _ in out] == runs
    for run, probs, peaks in out:
        assert probs[:, 0, 0, 0].tolist() == run and [int(p) for p in peaks] == run
    assert seen_threads == {max(1, torch.get_num_threads() // 2)}


def test_a_tile_that_cannot_be_read_raises_its_message_and_torch_threads_are_restored() -> None:
    before = torch.get_num_threads()

    def read(i: int):
        return (torch.zeros((3, 4, 4), dtype=torch.uint8), i, "slide.svs: cannot read tile 3" if i == 3 else "")

    ran = []

    def predict(tiles):
        ran.append(len(tiles))
        return torch.zeros((len(tiles), 1, 4, 4)), [torch.zeros((0, 3))] * len(tiles)

    with pytest.raises(SlideError, match="slide.svs: cannot read tile 3"):
        for _ in stream_results([[i] for i in range(40)], read, predict, 2):
            pass
    assert torch.get_num_threads() == before
    assert len(ran) < 40  # the runs after the error are not all run


def test_one_stream_per_core_up_to_four() -> None:
    assert [stream_count(c) for c in (1, 2, 3, 8, 64)] == [1, 2, 3, 4, 4]
