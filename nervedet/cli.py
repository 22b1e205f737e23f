"""The `nervedet` command: a thin layer over the Python API.

Every failure the user can fix (a bad file, a missing pixel size, a wrong option) ends with one line on
stderr naming the file and the problem, and a non-zero exit status; no traceback (``--debug`` shows one).

Exit status: 0 all went well; 1 an input could not be used (a bad file, weights or setting) or, for
``infer``, at least one slide failed; 2 the command line is wrong; 3 an unexpected internal error;
130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import itertools
import logging
import sys
from pathlib import Path

from nervedet import __version__
from nervedet.paths import SLIDE_EXTENSIONS as SLIDE_SUFFIXES

log = logging.getLogger("nervedet")

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 3
EXIT_INTERRUPTED = 130


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value
    return parse


def _workers(text: str) -> int | None:
    if text == "auto":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number or auto: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _fraction(text: str) -> float:
    value = _positive(float)(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nervedet",
        description="Nerves, perineural invasion (PNI) and immune cells in H&E whole-slide images, "
                    "with QuPath GeoJSON in and out.",
    )
    p.add_argument("--version", action="version", version=f"nervedet {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="more logging (-v: info, -vv: debug and tracebacks)")
    p.add_argument("--debug", action="store_true",
                   help="show the traceback of an error instead of its one-line message (and debug logging)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser(
        "synth", help="write synthetic H&E slides with exact ground truth",
        description="Write OUT_DIR/<name>.svs|.tiff, a pyramidal tiled JPEG slide that OpenSlide opens with "
                    "its mpp, and OUT_DIR/<name>.geojson, its ground truth (nerves graded for PNI, tumour, "
                    "immune cells) in QuPath GeoJSON, level-0 pixels.")
    s.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="folder for the slide and its truth")
    s.add_argument("--seed", type=int, default=1, help="random seed; the same seed gives the same slide "
                   "(default 1)")
    s.add_argument("--count", type=_positive(int), default=1,
                   help="make this many slides, seeds SEED, SEED+1, ... (default 1)")
    s.add_argument("--width-mm", type=_positive(float), default=2.0, help="slide width in mm (default 2)")
    s.add_argument("--height-mm", type=_positive(float), default=2.0, help="slide height in mm (default 2)")
    s.add_argument("--mpp", type=_positive(float), default=0.25,
                   help="pixel size in µm: 0.25 is a 40x scan, 0.5 a 20x scan (default 0.25)")
    s.add_argument("--format", choices=("svs", "tiff"), default="svs",
                   help="svs: Aperio SVS; tiff: generic pyramidal TIFF (default svs)")
    s.add_argument("--tissue-fraction", type=_fraction, default=0.7,
                   help="share of the slide covered by tissue, 0-1 (default 0.7)")
    s.add_argument("--stain-jitter", type=float, default=1.0,
                   help="how far the stain colours vary from the reference: 0 none, 1 a usual lab-to-lab "
                        "spread (default 1)")
    s.add_argument("--name", help="file name stem instead of synth_<seed> (only with --count 1)")

    e = sub.add_parser(
        "evaluate", help="compare predicted GeoJSON with ground-truth GeoJSON",
        description="Compare predictions with truth (files, or folders matched by file stem; the inference "
                    "layout PRED/<stem>/<stem>.geojson is found too). Prints a table of dice, detection "
                    "precision/recall/F1 for nerves, PNI and immune cells per slide and pooled over slides.")
    e.add_argument("--pred", type=Path, required=True, help="prediction GeoJSON file or folder")
    e.add_argument("--truth", type=Path, required=True, help="truth GeoJSON file or folder")
    e.add_argument("--out", type=Path, help="write the metrics as JSON: {\"mean\": {...}, \"slides\": {...}}")
    e.add_argument("--mpp", type=_positive(float),
                   help="pixel size (µm) of the slides' level 0; by default read from a slide next to the "
                        "truth file with the same stem, or from the prediction's metrics.json")
    e.add_argument("--analysis-mpp", type=_positive(float), default=0.5,
                   help="pixel size (µm) at which dice is counted (default 0.5)")
    i = sub.add_parser(
        "infer", help="find nerves, PNI, tumour and immune cells on whole slides",
        description="Analyse slides (files, or folders of slides) with a weights file. For each slide writes "
                    "OUT/<stem>/: <stem>.geojson (QuPath: nerves, Nerve: PNI, tumour, immune-cell detections), "
                    "metrics.json (slide metrics), nerves.csv (one row per nerve), overlay.png (the slide with "
                    "the results drawn on it) and run.json (what made them); and OUT/cohort.csv (one row per "
                    "slide). A slide that fails gets an error row and the others go on; the exit status is 1 "
                    "when any failed. Running the same command again skips slides whose outputs are complete "
                    "and were made with the same weights and settings.")
    i.add_argument("inputs", type=Path, nargs="+", metavar="INPUT", help="slide files or folders of slides")
    i.add_argument("--out", type=Path, required=True, help="output folder")
    i.add_argument("--weights", type=Path, help="weights file (default: the bundled default weights)")
    i.add_argument("--device", default="auto",
                   help="auto (CUDA when available, else CPU), cpu, cuda or cuda:N (default auto)")
    i.add_argument("--mpp", type=_positive(float),
                   help="pixel size (µm) of the slides' level 0: needed for images without one (PNG, JPEG), "
                        "overrides the file's value otherwise")
    i.add_argument("--batch-size", type=_positive(int), default=None,
                   help="tiles per batch (default: the pixels of 8 tiles of 512 px on a GPU, 2 on the CPU, where a "
                        "bigger batch is slower per pixel and takes more memory; with 768-px tiles 4 and 1)")
    i.add_argument("--workers", type=_workers, default=None, metavar="N|auto",
                   help="processes reading tiles while the model runs; 0 reads in the main process. auto: up to 4 "
                        "with a GPU; on the CPU 1 where tiles are decoded in full and shrunk from a finer level "
                        "(40x scans whose tiles are not JPEG), else 0 "
                        "(default auto)")
    i.add_argument("--tile-size", type=_positive(int), default=768,
                   help="tile size in px at the model's mpp, a multiple of 32; larger tiles give the network more "
                        "context around large nerves and less overlap to compute twice "
                        "(default 768)")
    i.add_argument("--overlap", type=int, default=64,
                   help="px shared by neighbouring tiles, blended (default 64)")
    i.add_argument("--whole-tiles", action="store_true",
                   help="run every tile whole; by default a tile is run only over the part that holds tissue (as "
                        "the tissue mask sees it) and 128 px around it, so the time follows the tissue area on "
                        "sparse slides (objects agree with whole tiles; pixels near the tissue's edge may differ)")
    i.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                   help="auto: fp16 on CUDA, bf16 on the CPU when it agrees with fp32, else fp32 (default auto)")
    i.add_argument("--compile", action="store_true",
                   help="run the network through torch.compile: about a minute of compiling per process, then "
                        "faster kernels; worth it on a GPU for a cohort, rarely on the CPU (default off)")
    i.add_argument("--device-decode", choices=("auto", "on", "off"), default="auto",
                   help="decode the JPEG tiles of TIFF/SVS slides on the model's device (nvJPEG on CUDA, a batch at "
                        "a time) instead of in the tile readers, which then only read bytes: frees the CPU beside a "
                        "fast GPU. Used per slide only where one decoded tile agrees with OpenSlide's (else a "
                        "warning and the normal path); slides whose tiles are not JPEG use the normal path. auto: on "
                        "with CUDA, off otherwise; on: also on the CPU (default auto)")
    i.add_argument("--devices", type=_positive(int), default=1, metavar="N",
                   help="ranks on this machine, each analysing every N-th slide on its own device: GPU 0..N-1, or "
                        "sharing the CPU's cores. Under torchrun or srun leave it out: each process started there "
                        "is a rank already (RANK/WORLD_SIZE or SLURM_PROCID/SLURM_STEP_NUM_TASKS). The ranks' rows "
                        "are gathered into one cohort.csv (default 1)")
    i.add_argument("--overwrite", "--force", dest="force", action="store_true",
                   help="analyse again even slides whose outputs are complete (they are replaced only once the "
                        "new ones are)")
    i.add_argument("--no-progress", action="store_true", help="no progress bars")

    t = sub.add_parser(
        "train", help="train the model on slides with QuPath GeoJSON annotations",
        description="Train the U-Net on slides and their QuPath GeoJSON (Nerve, Nerve: *, Tumor polygons; Immune "
                    "cells points or detections; Region* annotations bound the labelled area) and write a "
                    "weights file (safetensors with its configuration). Checkpoints go to OUT_DIR/checkpoints; "
                    "running the same command again resumes from the last one. Several GPUs or nodes: "
                    "--set train.devices=N (processes per node), train.num_nodes=M, train.strategy=ddp "
                    "(Lightning DDP; gloo on the CPU); train.batch_size is per process.")
    t.add_argument("--config", type=Path, required=True,
                   help="training YAML (see configs/train.yaml and configs/quick.yaml)")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting of the YAML, e.g. --set train.max_steps=100 (repeatable)")
    t.add_argument("--out", help="output folder for checkpoints, logs and weights (overrides out_dir)")
    t.add_argument("--weights-out", help="where to write the weights file (default OUT_DIR/model.safetensors)")
    t.add_argument("--no-resume", action="store_true",
                   help="start afresh even when OUT_DIR/checkpoints/last.ckpt exists")
    return p


def _train(args: argparse.Namespace) -> int:
    from nervedet.train.config import load_train_config
    from nervedet.train.run import train

    overrides = list(args.overrides)
    if args.out:
        overrides.append(f"out_dir={args.out}")
    if args.weights_out:
        overrides.append(f"weights_out={args.weights_out}")
    if args.no_resume:
        overrides.append("resume=false")
    result = train(load_train_config(args.config, overrides))
    if result.rank != 0:  # the other DDP processes: rank 0 tells the result
        return 0
    rows = [("weights", str(result.weights_path)), ("steps", result.steps), ("epochs", result.epochs),
            ("minutes", f"{result.minutes:.1f}")]
    rows += [(k, f"{v:.3f}") for k, v in sorted(result.metrics.items())]
    _print_table(("result", "value"), rows)
    return 0


def _infer(args: argparse.Namespace) -> int:
    from nervedet.analyze import AnalysisSettings
    from nervedet.cohort import COHORT_CSV, run_cohort
    from nervedet.infer import InferSettings, check_batch_fits
    from nervedet.paths import find_slides
    from nervedet.report import summary_table
    from nervedet.weights import load_model

    settings = AnalysisSettings(infer=InferSettings(
        tile_size=args.tile_size, overlap=args.overlap, batch_size=args.batch_size, workers=args.workers,
        precision=args.precision, compile=args.compile, device_decode=args.device_decode,
        crop_to_tissue=not args.whole_tiles, progress=not args.no_progress))
    if not any(p.exists() for p in args.inputs):
        raise ValueError(f"{args.inputs[0]}: no such file or folder")
    slides = find_slides(args.inputs)
    if not slides:  # before the model is loaded or any output folder made
        raise ValueError(f"no slide found in {', '.join(map(str, args.inputs))} (slides are "
                         f"{', '.join(SLIDE_SUFFIXES)}; plain .png/.jpg images need --mpp)")
    if args.out.exists() and not args.out.is_dir():
        raise ValueError(f"{args.out}: --out must be a folder, and this is a file")
    from nervedet.cohort import plan_slides
    from nervedet.shards import DeviceJob, Rank, rank_device, rank_from_env, run_devices, run_rank
    from nervedet.weights import resolve_device

    rank, plan = rank_from_env(), plan_slides(slides)
    if args.devices > 1 and rank.world_size > 1:
        raise ValueError(f"--devices {args.devices} under {rank.launcher} (rank {rank.rank} of {rank.world_size}): "
                         "the launcher starts the ranks already, one per device; leave --devices out")
    if args.devices > 1:
        rank_device(args.device, Rank(0, args.devices, 0, args.devices))  # --device cuda:3 with 2 ranks: refused
        resolve_device(args.device)  # no CUDA for --device cuda: one line here, not one per rank
        job = DeviceJob(plan, args.out, args.weights, args.device, settings, args.mpp, args.force,
                        logging.getLogger().level)
        load_model(args.weights, device="cpu")  # a bad weights file is one line here, not one per rank
        rows, codes = run_devices(args.devices, job)
        print(summary_table(rows))
        print(f"outputs in {args.out}/<slide>/, table of all slides in {args.out / COHORT_CSV}")
        failed = any(r.status == "error" for r in rows) or any(c not in (0, 1) for c in codes.values())
        return EXIT_ERROR if failed else 0
    model = load_model(args.weights, device=rank_device(args.device, rank))
    check_batch_fits(settings.infer, model.device)
    numbers = itertools.count(1)
    total = len(rank.share(plan))
    where = f"rank {rank.rank}: " if rank.world_size > 1 else ""

    def tell(row) -> None:  # errors are told by the cohort's log line already
        n = next(numbers)
        if row.status != "error":
            what = "done" if row.status == "done" else "skipped: outputs complete, same weights and settings"
            print(f"[{where}{n}/{total}] {Path(row.slide).name}: {what}", file=sys.stderr)

    if rank.world_size > 1:
        rows = run_rank(plan, args.out, model, settings, rank, args.mpp, args.force, on_row=tell)
    else:
        rows = run_cohort(slides, args.out, model, settings, mpp=args.mpp, force=args.force, on_row=tell)
    print(summary_table(rows))
    print(f"outputs in {args.out}/<slide>/, table of all slides in {args.out / COHORT_CSV}")
    return EXIT_ERROR if any(r.status == "error" for r in rows) else 0


def _synth(args: argparse.Namespace) -> int:
    from nervedet.synth import SynthSettings, make_synthetic_slide

    if args.name and args.count > 1:
        raise ValueError("--name names one slide; leave it out with --count")
    rows = []
    for seed in range(args.seed, args.seed + args.count):
        settings = SynthSettings(seed=seed, width_mm=args.width_mm, height_mm=args.height_mm, mpp=args.mpp,
                                 fmt=args.format, tissue_fraction=args.tissue_fraction,
                                 stain_jitter=args.stain_jitter, name=args.name)
        r = make_synthetic_slide(args.out_dir, settings, progress=True)
        rows.append((r.slide_path.name, f"{r.width}x{r.height}", len(r.level_sizes), f"{r.tissue_area_mm2:.2f}",
                     r.nerve_count, r.pni_count, r.tumor_count, r.immune_count))
    head = ("slide", "size px", "levels", "tissue mm²", "nerves", "PNI", "tumour", "immune cells")
    _print_table(head, rows)
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from nervedet.evaluate import evaluate_paths, format_table, write_report

    report = evaluate_paths(args.pred, args.truth, mpp=args.mpp, analysis_mpp=args.analysis_mpp)
    print(format_table(report))
    if args.out:
        write_report(report, args.out)
        print(f"metrics written to {args.out}")
    return 0


def _print_table(head: tuple, rows: list[tuple]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    print("  ".join(str(h).ljust(w) for h, w in zip(head, widths)))
    for row in rows:
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths)))


COMMANDS = {"synth": _synth, "infer": _infer, "evaluate": _evaluate, "train": _train}


class _Format(logging.Formatter):
    """``nervedet: error: message`` for the user; the logger's name too with --debug or -v."""

    def __init__(self, detailed: bool) -> None:
        super().__init__()
        self.detailed = detailed

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        where = f" ({record.name})" if self.detailed else ""
        return f"nervedet: {record.levelname.lower()}{where}: {text}"


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    debug = args.debug or args.verbose >= 2
    level = logging.DEBUG if debug else logging.INFO if args.verbose == 1 else logging.WARNING
    handler = logging.StreamHandler()
    handler.setFormatter(_Format(debug))
    logging.basicConfig(level=level, handlers=[handler])
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("nervedet: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ValueError, OSError) as exc:  # SlideError, GeoJSONError, WeightsError, EvaluationError: ValueErrors
        if debug:
            raise
        print(f"nervedet: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as exc:  # noqa: BLE001 - a bug of ours: still one line, the traceback with --debug
        if debug:
            raise
        print(f"nervedet: internal error: {type(exc).__name__}: {_one_line(exc)} (run again with --debug for the "
              "traceback, and please report it)", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
