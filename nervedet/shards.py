"""A cohort over several processes, GPUs or machines: each rank analyses its share of the slides on its own device
(with its own DataLoader and output folders), and the ranks' rows are gathered into one cohort.csv.

Ranks come from the launcher: torchrun (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE), SLURM's srun
(SLURM_PROCID, SLURM_STEP_NUM_TASKS, SLURM_LOCALID, SLURM_STEP_TASKS_PER_NODE), or ``nervedet infer --devices N``,
which starts N ranks on this machine. Rank r takes every world_size-th slide of the planned list, starting at
r; the plan is the same on every rank, so no process group is needed: the ranks share only the output folder
(a shared file system across machines). Each slide keeps the cohort rules (cohort.py): written whole or not at
all, skipped when complete, an error row instead of a stop. Each rank records its rows in
``OUT/.ranks/<run>/rank-<r>.json`` after every slide; the rank that finishes last, seeing every rank's file
finished, writes cohort.csv. A rank that dies loses only the slide it was on: rerun the same command.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from nervedet.atomic import remove_stale, write_text
from nervedet.cohort import COHORT_CSV, cohort_rows, run_planned
from nervedet.report import write_cohort_csv
from nervedet.results import CohortRow
from nervedet.slide import one_line
from nervedet.weights import cpu_threads

log = logging.getLogger(__name__)

RANKS_DIR = ".ranks"


@dataclass(frozen=True)
class Rank:
    """Where this process stands in a sharded run (rank 0 of 1 when run alone)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0  # its index on this machine: which GPU it takes
    local_world_size: int = 1  # ranks on this machine: how the CPU cores are shared
    launcher: str = "none"  # none | torchrun | slurm | devices
    run_id: str = ""  # the launcher's name for this run (SLURM job and step, torchrun's run id), if it has one

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size or not 0 <= self.local_rank < self.local_world_size:
            raise ValueError(f"rank {self.rank} of {self.world_size} (local {self.local_rank} of "
                             f"{self.local_world_size}) from {self.launcher} is not a valid rank")

    def share(self, items: list) -> list:
        """This rank's share: items r, r + world_size, r + 2 world_size, ..."""
        return items[self.rank::self.world_size]


def _int(env: Mapping[str, str], key: str, default: int) -> int:
    text = env.get(key, "")
    digits = text.split("(")[0].split(",")[0]  # SLURM_STEP_TASKS_PER_NODE may read "4(x2)" or "2,1"
    try:
        return int(digits)
    except ValueError:
        if text:
            raise ValueError(f"environment variable {key}={text!r} is not a number") from None
        return default


RUN_ID_ENV = "NERVEDET_RUN_ID"  # set by `--devices N` for its ranks; may be set by hand for any launcher


def rank_from_env(env: Mapping[str, str] | None = None) -> Rank:
    """The rank torchrun or srun gave this process; rank 0 of 1 when neither did. (A SLURM batch script that
    runs nervedet without srun is one process: SLURM_STEP_NUM_TASKS is set by srun only.)"""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        world = _int(env, "WORLD_SIZE", 1)
        run_id = env.get(RUN_ID_ENV) or env.get("TORCHELASTIC_RUN_ID", "")
        return Rank(_int(env, "RANK", 0), world, _int(env, "LOCAL_RANK", 0),
                    _int(env, "LOCAL_WORLD_SIZE", world), "torchrun", "" if run_id == "none" else run_id)
    if "SLURM_PROCID" in env and _int(env, "SLURM_STEP_NUM_TASKS", 1) > 1:
        world = _int(env, "SLURM_STEP_NUM_TASKS", 1)
        run_id = env.get(RUN_ID_ENV) or f"{env.get('SLURM_JOB_ID', '')}.{env.get('SLURM_STEP_ID', '')}"
        return Rank(_int(env, "SLURM_PROCID", 0), world, _int(env, "SLURM_LOCALID", 0),
                    _int(env, "SLURM_STEP_TASKS_PER_NODE", world), "slurm", run_id)
    return Rank()


def rank_device(device: str, rank: Rank) -> str:
    """The device of a rank: with ``auto`` or ``cuda`` and GPUs present, GPU local_rank (modulo their number:
    more ranks than GPUs share them, with a warning); a device with an index is kept as given, which several
    ranks on one machine may not share. On the CPU the ranks of a machine share its cores (torch threads)."""
    if rank.local_world_size > 1 and device.startswith("cuda:"):
        raise ValueError(f"--device {device} names one GPU for {rank.local_world_size} ranks on this machine: "
                         "give --device cuda (or auto) and each rank takes its own")
    gpus = torch.cuda.device_count() if device in ("auto", "cuda") else 0
    if gpus:
        if rank.local_world_size > gpus and rank.local_rank == 0:
            log.warning("%d ranks on this machine share its %d GPUs", rank.local_world_size, gpus)
        return f"cuda:{rank.local_rank % gpus}"
    if device in ("auto", "cpu"):
        cpu_threads(rank.local_world_size)
    return "cpu" if device == "auto" else device


def run_key(plan: list[tuple[Path, str]], rank: Rank) -> str:
    """Names one sharded run: its slides and number of ranks, then the launcher's run id (files of an earlier,
    killed run of the same command are then not mistaken for this run's, and are removed with its own)."""
    slides = hashlib.sha256(json.dumps([rank.world_size, [str(p.resolve()) for p, _ in plan]]).encode())
    return f"{slides.hexdigest()[:16]}-{hashlib.sha256(rank.run_id.encode()).hexdigest()[:8]}"


def _rank_file(out: Path, key: str, rank: int) -> Path:
    return out / RANKS_DIR / key / f"rank-{rank:05d}.json"


def _forget(out: Path, key: str) -> None:
    """Remove a finished run's rank files, and those that killed runs of the same slides left."""
    for folder in (out / RANKS_DIR).glob(f"{key.split('-')[0]}-*"):
        shutil.rmtree(folder, ignore_errors=True)
    try:
        (out / RANKS_DIR).rmdir()
    except OSError:
        pass


def gather(out: Path, plan: list[tuple[Path, str]], world_size: int, key: str,
           require_all: bool = True) -> list[CohortRow] | None:
    """This run's rows from every rank's file, in the plan's order, and cohort.csv written with them (and the
    rows of slides earlier runs analysed into ``out``). None (nothing written) when ``require_all`` and a rank
    has not finished."""
    found: dict[str, CohortRow] = {}
    for r in range(world_size):
        try:
            data = json.loads(_rank_file(out, key, r).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            data = None
        if data is None or not data.get("finished"):
            if require_all:
                return None
            if data is None:
                continue
        for row in data["rows"]:
            found[row["slide"]] = CohortRow(**row)
    rows = [found[str(p)] for p, _ in plan if str(p) in found]
    write_cohort_csv(out / COHORT_CSV, cohort_rows(rows, out))
    return rows


def run_rank(plan: list[tuple[Path, str]], out: Path, model, settings, rank: Rank, mpp: float | None = None,
             force: bool = False, on_row: Callable[[CohortRow], None] | None = None,
             gather_at_end: bool = True) -> list[CohortRow]:
    """Analyse this rank's share of the planned slides into ``out``, recording its rows as it goes; the last
    rank to finish writes cohort.csv (see the module docstring), unless ``gather_at_end`` is False (the
    process that started the ranks gathers)."""
    out.mkdir(parents=True, exist_ok=True)
    key = run_key(plan, rank)
    mine = rank.share(plan)
    rows: list[CohortRow] = []
    record = _rank_file(out, key, rank.rank)
    who = {"rank": rank.rank, "world_size": rank.world_size, "host": socket.gethostname(), "pid": os.getpid(),
           "slides": len(mine)}

    def save(finished: bool) -> None:
        write_text(record, json.dumps({**who, "finished": finished, "rows": [asdict(r) for r in rows]}))

    def told(row: CohortRow) -> None:
        rows.append(row)
        save(False)
        if on_row is not None:
            on_row(row)

    if rank.rank == 0:  # no rank writes cohort.csv before rank 0 has finished: temporary files now are stale
        remove_stale(out / COHORT_CSV)
    save(False)
    log.info("rank %d of %d (%s): %d of %d slides, on %s", rank.rank, rank.world_size, rank.launcher, len(mine),
             len(plan), model.device)
    run_planned(mine, out, model, settings, mpp, force, on_row=told)
    save(True)
    if gather_at_end and gather(out, plan, rank.world_size, key) is not None:
        log.info("rank %d: every rank has finished: %s written", rank.rank, out / COHORT_CSV)
        _forget(out, key)
    return rows


@dataclass(frozen=True)
class DeviceJob:
    """What each rank started by ``--devices N`` needs (picklable: ranks are spawned, not forked)."""

    plan: list[tuple[Path, str]]
    out: Path
    weights: Path | None
    device: str
    settings: object  # AnalysisSettings
    mpp: float | None
    force: bool
    log_level: int


def _device_rank(job: DeviceJob, rank: Rank) -> None:
    """One rank of ``--devices N``: its device, the model, its share. Exit status 1 if a slide of it failed."""
    import sys

    from nervedet.weights import load_model

    logging.basicConfig(level=job.log_level, format=f"nervedet: rank {rank.rank}: %(levelname)s: %(message)s")
    try:
        model = load_model(job.weights, device=rank_device(job.device, rank))
    except Exception as exc:  # noqa: BLE001 - one line, as the command gives for any bad input
        print(f"nervedet: rank {rank.rank}: error: {one_line(exc)}", file=sys.stderr, flush=True)
        sys.exit(1)
    done = iter(range(1, len(rank.share(job.plan)) + 1))

    def tell(row: CohortRow) -> None:
        if row.status != "error":
            what = "done" if row.status == "done" else "skipped: outputs complete, same weights and settings"
            print(f"[rank {rank.rank}: {next(done)}/{len(rank.share(job.plan))}] {Path(row.slide).name}: {what}",
                  file=sys.stderr, flush=True)
        else:
            next(done)

    rows = run_rank(job.plan, job.out, model, job.settings, rank, job.mpp, job.force, on_row=tell,
                    gather_at_end=False)
    sys.exit(1 if any(r.status == "error" for r in rows) else 0)


def run_devices(n: int, job: DeviceJob) -> tuple[list[CohortRow], dict[int, int]]:
    """``nervedet infer --devices N``: N ranks on this machine, one per GPU (or sharing the CPU's cores), each
    taking every N-th slide. Returns the rows gathered from all ranks and each rank's exit status; cohort.csv
    is written even when a rank died (its finished slides are on disk and listed; the rest are not)."""
    import multiprocessing as mp
    import uuid

    ctx = mp.get_context("spawn")  # CUDA cannot be used in forked processes
    run_id = uuid.uuid4().hex
    ranks = [Rank(r, n, r, n, "devices", run_id) for r in range(n)]
    procs = [ctx.Process(target=_device_rank, args=(job, rank), name=f"nervedet-rank-{rank.rank}") for rank in ranks]
    try:
        for p in procs:
            p.start()
        for p in procs:
            p.join()
    finally:
        for p in procs:  # interrupted: no rank outlives the command
            if p.is_alive():
                p.terminate()
                p.join()
    codes = {r: p.exitcode if p.exitcode is not None else -1 for r, p in enumerate(procs)}
    for r, code in codes.items():
        if code not in (0, 1):
            log.error("rank %d of %d stopped with exit status %s before its slides were done: run the same "
                      "command again to finish them (finished slides are kept)", r, n, code)
    key = run_key(job.plan, ranks[0])
    rows = gather(job.out, job.plan, n, key, require_all=False) or []
    _forget(job.out, key)
    return rows, codes
