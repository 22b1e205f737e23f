"""A cohort over several ranks: ranks from torchrun's and srun's environment, each rank's share, and two CPU
ranks through the real CLI giving the same outputs as one process, with one cohort.csv, also when a rank is
killed mid-run and the command is run again."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import nervedet
from nervedet.results import CohortRow
from nervedet.shards import RANKS_DIR, Rank, gather, rank_from_env, run_key

SEEDS = (60, 61, 62, 63, 64, 65)
STEMS = [f"synth_{s}" for s in SEEDS]


def test_ranks_come_from_torchrun_or_srun_and_a_batch_script_alone_is_one_process() -> None:
    torchrun = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                "TORCHELASTIC_RUN_ID": "abc"}
    assert rank_from_env(torchrun) == Rank(3, 8, 1, 2, "torchrun", "abc")
    srun = {"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1",
            "SLURM_STEP_TASKS_PER_NODE": "4(x2)", "SLURM_JOB_ID": "77", "SLURM_STEP_ID": "0"}
    assert rank_from_env(srun) == Rank(5, 8, 1, 4, "slurm", "77.0")
    batch_script = {"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_JOB_ID": "77"}  # no srun: one process
    assert rank_from_env(batch_script) == Rank()
    assert rank_from_env({}) == Rank()
    with pytest.raises(ValueError, match="RANK"):
        rank_from_env({"RANK": "x", "WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="rank 2 of 2"):
        rank_from_env({"RANK": "2", "WORLD_SIZE": "2"})


def test_the_shares_of_all_ranks_hold_every_slide_once() -> None:
    items = list(range(11))
    shares = [Rank(r, 4, r, 4).share(items) for r in range(4)]
    assert sorted(x for s in shares for x in s) == items
    assert shares[1] == [1, 5, 9]


def test_cohort_csv_waits_for_every_rank_and_ignores_a_killed_run_of_the_same_slides(tmp_path: Path) -> None:
    plan = [(tmp_path / f"s{i}.svs", "") for i in range(3)]
    this, old = Rank(0, 2, run_id="now"), Rank(0, 2, run_id="before")
    key, old_key = run_key(plan, this), run_key(plan, old)
    assert key != old_key
    folder = tmp_path / RANKS_DIR

    def rank_file(k: str, r: int, finished: bool, rows: list[CohortRow]) -> None:
        (folder / k).mkdir(parents=True, exist_ok=True)
        (folder / k / f"rank-{r:05d}.json").write_text(json.dumps(
            {"finished": finished, "rows": [vars(x) for x in rows]}))

    err = [CohortRow(str(plan[1][0]), "error", "", "bad slide")]
    rank_file(old_key, 0, True, [CohortRow(str(plan[0][0]), "error", "", "stale")])
    rank_file(key, 1, True, err)
    assert gather(tmp_path, plan, 2, key) is None  # rank 0 of this run has not finished: nothing written
    assert not (tmp_path / "cohort.csv").exists()
    rank_file(key, 0, True, [CohortRow(str(plan[0][0]), "error", "", "now"), CohortRow(str(plan[2][0]), "error",
                                                                                     "", "also now")])
    rows = gather(tmp_path, plan, 2, key)
    assert [r.error for r in rows] == ["now", "bad slide", "also now"]  # the plan's order, this run's rows
    with open(tmp_path / "cohort.csv", newline="") as f:
        assert [r["error"] for r in csv.DictReader(f)] == ["now", "bad slide", "also now"]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("shards")
    for seed in SEEDS:  # 0.3 x 0.3 mm at 0.5 µm/px: 4 tiles, a second or two each with the bundled weights
        nervedet.make_synthetic_slide(folder, nervedet.SynthSettings(seed=seed, width_mm=0.3, height_mm=0.3, mpp=0.5))
    return folder


def _infer(slides: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "nervedet.cli", "infer", str(slides), "--out", str(out), "--no-progress", *extra]


def _outputs(out: Path) -> dict[str, object]:
    """Every slide's GeoJSON byte for byte and its metrics (without the time it took)."""
    got: dict[str, object] = {}
    for stem in STEMS:
        got[f"{stem}.geojson"] = (out / stem / f"{stem}.geojson").read_bytes()
        metrics = json.loads((out / stem / "metrics.json").read_text())
        metrics.pop("runtime_s")
        got[f"{stem}/metrics.json"] = metrics
    return got


def _cohort_slides(out: Path) -> list[str]:
    with open(out / "cohort.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert all(r["status"] in ("done", "skipped") for r in rows), rows
    return sorted(Path(r["slide"]).stem for r in rows)


@pytest.fixture(scope="module")
def reference(cohort: Path, tmp_path_factory) -> dict[str, object]:
    out = tmp_path_factory.mktemp("one-process")
    r = subprocess.run(_infer(cohort, out), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return _outputs(out)


def test_two_ranks_started_by_devices_write_what_one_process_writes(cohort: Path, reference, tmp_path) -> None:
    r = subprocess.run(_infer(cohort, tmp_path, "--devices", "2"), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    assert {line.split("]")[0] for line in r.stderr.splitlines() if line.startswith("[rank")} == {
        "[rank 0: 1/3", "[rank 0: 2/3", "[rank 0: 3/3", "[rank 1: 1/3", "[rank 1: 2/3", "[rank 1: 3/3"}
    assert _outputs(tmp_path) == reference
    assert _cohort_slides(tmp_path) == STEMS  # every slide once
    assert not (tmp_path / RANKS_DIR).exists()


def test_a_rank_killed_mid_run_loses_no_finished_slide_and_the_rerun_completes_the_cohort(
        cohort: Path, reference, tmp_path: Path) -> None:
    def start(rank: int, run: str) -> subprocess.Popen:
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2",
               "NERVEDET_RUN_ID": run}  # as torchrun starts them
        return subprocess.Popen(_infer(cohort, tmp_path), env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)

    ranks = [start(0, "first"), start(1, "first")]
    first_of_rank1 = tmp_path / STEMS[1] / "run.json"
    deadline = time.monotonic() + 300
    while not first_of_rank1.exists() and ranks[1].poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    ranks[1].send_signal(signal.SIGKILL)
    assert ranks[1].wait(timeout=60) == -signal.SIGKILL
    assert ranks[0].wait(timeout=600) == 0, ranks[0].stderr.read()
    assert first_of_rank1.exists()
    kept = first_of_rank1.stat().st_mtime_ns
    assert not (tmp_path / "cohort.csv").exists()  # rank 1 never finished: no cohort.csv claims to be complete

    again = [start(0, "second"), start(1, "second")]
    errs = [p.communicate(timeout=600)[1] for p in again]
    assert [p.returncode for p in again] == [0, 0], errs
    assert f"{STEMS[1]}.svs: skipped" in errs[1]
    assert first_of_rank1.stat().st_mtime_ns == kept  # the finished slide was not redone
    assert _outputs(tmp_path) == reference
    assert _cohort_slides(tmp_path) == STEMS
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no partial folder, no rank files


@pytest.mark.parametrize("device,message", [("cuda:1", "names one GPU for 2 ranks"),
                                            ("cuda", "CUDA is not available")])
def test_devices_with_a_device_they_cannot_share_or_do_not_have_is_one_line_before_any_rank(
        cohort: Path, tmp_path: Path, capsys, device: str, message: str) -> None:
    import torch

    from nervedet.cli import main

    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = tmp_path / "out"
    assert main(["infer", str(cohort), "--out", str(out), "--devices", "2", "--device", device]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and message in err and "Traceback" not in err
    assert not out.exists()
