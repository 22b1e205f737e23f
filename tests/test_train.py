"""Training: the loss falls, resume continues at the checkpoint's step, exported weights equal the module,
a Region bound really masks the loss, negatives only penalise nerve."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
import yaml

from nervedet.cli import main
from nervedet.model import ModelConfig
from nervedet.train.losses import IGNORE, NOT_NERVE, class_loss, heatmap_loss
from nervedet.train.module import NerveSegmenter
from nervedet.weights import load_model

TINY = ModelConfig(decoder_channels=(32, 16, 16, 8, 8), tile_size=64)


@pytest.fixture(scope="module")
def tiny_model_yaml(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY.to_dict()))
    return path


def _batch(n: int = 4, size: int = 64, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(n, 3, size, size, generator=g)
    mask = torch.zeros(n, size, size, dtype=torch.long)
    mask[:, 10:30, 10:30] = 2  # a "nerve" square
    mask[:, 40:60, 5:25] = 1  # a "tumour" square
    image[:, 0, 10:30, 10:30] += 2.0  # make them learnable
    image[:, 1, 40:60, 5:25] -= 2.0
    heat = torch.zeros(n, 1, size, size)
    heat[:, 0, 50, 50] = 1.0
    image[:, 2, 48:53, 48:53] += 3.0
    return {"image": image, "mask": mask, "heatmap": heat, "heat_valid": torch.ones(n, 1, size, size),
            "points": torch.full((n, 4, 2), -1.0), "n_points": torch.zeros(n, dtype=torch.long)}


def test_a_few_training_steps_lower_the_loss() -> None:
    torch.manual_seed(0)
    module = NerveSegmenter(TINY.to_dict(), lr=3e-3, max_steps=30)
    opt = torch.optim.AdamW(module.parameters(), lr=3e-3)
    batch = _batch()
    losses = []
    for _ in range(12):
        _, lc, lh = module._losses(batch)
        loss = lc + 10 * lh
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0], losses


def test_labels_outside_the_region_change_nothing() -> None:
    torch.manual_seed(1)
    logits = torch.randn(2, 3, 32, 32, requires_grad=True)
    right = torch.zeros(2, 32, 32, dtype=torch.long)
    right[:, 4:12, 4:12] = 2
    wrong = right.clone()
    wrong[:, 20:30, 20:30] = 1  # a wrong tumour label ...
    for m in (right, wrong):
        m[:, 16:, :] = IGNORE  # ... outside the region, so both masks carry IGNORE there
    assert torch.equal(right, wrong)
    unmasked = right.clone()
    unmasked[:, 20:30, 20:30] = 1
    unmasked[:, 16:, :][unmasked[:, 16:, :] == IGNORE] = 0
    assert class_loss(logits, right, 2) != class_loss(logits, unmasked, 2)
    # and the gradient outside the region is exactly zero
    class_loss(logits, right, 2).backward()
    assert torch.count_nonzero(logits.grad[:, :, 16:, :]) == 0


def test_a_missed_small_nerve_costs_as_much_dice_as_a_missed_large_one() -> None:
    """Dice is taken per patch: a small nerve missed in one patch is not drowned by a large nerve found in
    another patch of the batch."""
    mask = torch.zeros(2, 64, 64, dtype=torch.long)
    mask[0, 4:60, 4:60] = 2  # a large nerve, found
    mask[1, 30:34, 30:34] = 2  # a small nerve, missed
    logits = torch.full((2, 3, 64, 64), -10.0)
    logits[:, 0] = 10.0
    logits[0, 2, 4:60, 4:60], logits[0, 0, 4:60, 4:60] = 10.0, -10.0
    both_found = logits.clone()
    both_found[1, 2, 30:34, 30:34], both_found[1, 0, 30:34, 30:34] = 10.0, -10.0
    small_missed = class_loss(logits, mask, 2) - class_loss(both_found, mask, 2)
    large_missed_logits = both_found.clone()
    large_missed_logits[0, 2], large_missed_logits[0, 0] = -10.0, 10.0
    large_missed = class_loss(large_missed_logits, mask, 2) - class_loss(both_found, mask, 2)
    # the Dice terms of the two misses are alike (only their cross-entropy differs by the pixels missed)
    assert small_missed > 0.25
    assert large_missed > small_missed


def test_not_nerve_pixels_only_penalise_the_nerve_class() -> None:
    logits = torch.zeros(1, 3, 8, 8)
    neg = torch.full((1, 8, 8), NOT_NERVE, dtype=torch.long)
    base = class_loss(logits, neg, 2)
    tumour_high = logits.clone()
    tumour_high[:, 1] = 5.0
    nerve_high = logits.clone()
    nerve_high[:, 2] = 5.0
    assert class_loss(tumour_high, neg, 2) < base < class_loss(nerve_high, neg, 2)


def test_heatmap_loss_ignores_invalid_pixels() -> None:
    logit = torch.zeros(1, 1, 8, 8)
    target = torch.zeros(1, 1, 8, 8)
    target[0, 0, 2, 2] = 1.0
    valid = torch.ones_like(target)
    valid[0, 0, 2, 2] = 0.0
    other = target.clone()
    other[0, 0, 2, 2] = 0.0
    assert heatmap_loss(logit, target, valid) == heatmap_loss(logit, other, valid)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_model_yaml: Path) -> dict:
    root = tmp_path_factory.mktemp("train")
    cfg = {
        "model": str(tiny_model_yaml),
        "data": {"synthetic": {"count": 3, "seed": 500, "width_mm": 0.5, "height_mm": 0.5, "mpp": 0.5,
                               "cache": str(root / "synth")}, "val_fraction": 0.34},
        "train": {"max_steps": 4, "batch_size": 2, "patches_per_epoch": 4, "val_patches": 2, "workers": 0,
                  "patience": 50, "precision": "32"},
        "out_dir": str(root / "run"),
    }
    path = root / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", "--config", str(path)]) == 0
    first = sorted((root / "run" / "checkpoints").glob("*.ckpt"))
    first_step = torch.load(root / "run" / "checkpoints" / "last.ckpt", map_location="cpu",
                            weights_only=True)["global_step"]
    assert main(["train", "--config", str(path), "--set", "train.max_steps=8"]) == 0
    return {"root": root, "config": path, "first": first, "first_step": first_step}


def test_training_resumes_at_the_checkpoints_step(tiny_run: dict) -> None:
    root = tiny_run["root"]
    assert (root / "run" / "checkpoints" / "last.ckpt") in tiny_run["first"]
    steps = []
    for log in sorted((root / "run" / "logs").glob("version_*/metrics.csv")):
        with log.open() as f:
            steps.append([int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")])
    assert len(steps) == 2, "a second logger version for the resumed run"
    # the second run starts where the checkpoint stopped, not at step 0, and ends at the new max_steps
    assert tiny_run["first_step"] >= 3
    assert min(steps[1]) >= tiny_run["first_step"] - 1 and min(steps[1]) >= max(steps[0])
    final = torch.load(root / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert final["global_step"] == 8


def test_exported_weights_give_the_modules_outputs(tiny_run: dict) -> None:
    weights = tiny_run["root"] / "run" / "model.safetensors"
    model = load_model(weights)
    assert model.config == ModelConfig.from_dict(TINY.to_dict())
    assert model.metadata["training"]["steps"] == 8
    # the Lightning module as the last checkpoint holds it (our own training state, read as plain tensors)
    state = torch.load(tiny_run["root"] / "run" / "checkpoints" / "last.ckpt", map_location="cpu",
                       weights_only=True)
    assert state["global_step"] == 8
    module = NerveSegmenter(TINY.to_dict())
    module.load_state_dict(state["state_dict"])
    module.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(module(x), model.network(x), atol=1e-5)
        fresh = NerveSegmenter(TINY.to_dict()).eval()  # and the weights are not the random start
        assert not torch.allclose(fresh(x), model.network(x), atol=1e-3)


def test_tile_scores_are_perfect_for_the_truth_and_miss_a_cell_moved_by_4_um() -> None:
    from nervedet.train.dataset import render_heatmap
    from nervedet.train.metrics import TileScores

    cfg = ModelConfig()
    batch = _batch(n=1, size=64)
    pts = torch.tensor([[[20.5, 20.5], [40.5, 12.5]]])
    batch["points"], batch["n_points"] = pts, torch.tensor([2])
    logits = torch.nn.functional.one_hot(batch["mask"], 3).permute(0, 3, 1, 2).float() * 10
    heat = torch.from_numpy(render_heatmap(pts[0].numpy(), (64, 64), 2.0))
    out = torch.cat([logits, (heat * 20 - 10)[None, None]], dim=1)
    perfect = TileScores(cfg)
    perfect.update(out, batch)
    assert perfect.dice == {"Background": 1.0, "Tumor": 1.0, "Nerve": 1.0}
    assert perfect.immune == (1.0, 1.0, 1.0)
    moved = TileScores(cfg)
    # one cell moved by 8 px = 4 µm at 0.5 µm/px, and one more cell the heatmap does not show
    batch["points"] = torch.cat([pts + torch.tensor([[8.0, 0.0], [0.0, 0.0]]), torch.tensor([[[55.5, 55.5]]])], 1)
    batch["n_points"] = torch.tensor([3])
    moved.update(out, batch)
    assert (moved.tp, moved.fp, moved.fn) == (1, 1, 2)


def test_fine_tuning_may_change_the_patch_size_but_not_the_network(tmp_path: Path) -> None:
    from dataclasses import replace

    from nervedet.train.run import _init_from
    from nervedet.weights import WeightsError, save_weights

    source = NerveSegmenter(TINY.to_dict())
    path = save_weights(tmp_path / "tiny.safetensors", source.network, TINY)
    larger = replace(TINY, tile_size=128)  # the training patch size only: the network is the same
    target = NerveSegmenter(larger.to_dict())
    _init_from(target, str(path), larger)
    for name, value in source.network.state_dict().items():
        assert torch.equal(target.network.state_dict()[name], value), name
    wider = replace(TINY, decoder_channels=(32, 16, 16, 8, 4))
    with pytest.raises(WeightsError, match="differs from the training's in architecture"):
        _init_from(NerveSegmenter(wider.to_dict()), str(path), wider)
