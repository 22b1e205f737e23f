"""The `nervedet` command: help for every option, evaluate end to end, one-line errors without output."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from nervedet.cli import _parser, main
from nervedet.geojson import write_geojson
from nervedet.synth.layout import make_layout
from nervedet.synth.truth import truth_features


def test_every_option_of_every_command_has_help() -> None:
    parser = _parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert {"synth", "infer", "evaluate", "train"} <= set(subs.choices)
    for name, sub in subs.choices.items():
        assert sub.description, name
        for action in sub._actions:
            if not isinstance(action, argparse._HelpAction):
                assert action.help and len(action.help) > 10, (name, action.dest)


def test_infer_option_defaults_are_the_engines_defaults() -> None:
    """The CLI spells its defaults out (importing the engine would slow `--help`); they must not drift."""
    from nervedet.infer import InferSettings

    args = _parser().parse_args(["infer", "slide.svs", "--out", "out"])
    engine = InferSettings()
    assert (args.tile_size, args.overlap, args.batch_size) == (engine.tile_size, engine.overlap, engine.batch_size)


@pytest.fixture(scope="module")
def truth_file(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("truth")
    return write_geojson(folder / "case.geojson", truth_features(make_layout(21, 1200.0, 1200.0, 0.8), 0.5))


def test_evaluate_prints_a_table_and_writes_the_report(tmp_path: Path, truth_file: Path, capsys) -> None:
    out = tmp_path / "report" / "metrics.json"
    code = main(["evaluate", "--pred", str(truth_file), "--truth", str(truth_file), "--mpp", "0.5",
                 "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "case" in printed and "mean (pooled)" in printed
    data = json.loads(out.read_text())
    assert set(data) == {"mean", "slides"} and set(data["slides"]) == {"case"}
    assert data["mean"]["nerve_f1"] == 1.0 and data["mean"]["immune_count_truth"] > 50


def test_evaluate_bad_prediction_is_one_line_naming_it_and_writes_nothing(tmp_path: Path, truth_file: Path) -> None:
    bad = tmp_path / "case.geojson"
    bad.write_text("{not json")
    out = tmp_path / "metrics.json"
    proc = subprocess.run([sys.executable, "-m", "nervedet.cli", "evaluate", "--pred", str(bad), "--truth",
                           str(truth_file), "--mpp", "0.5", "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode != 0
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and str(bad) in err and "Traceback" not in err
    assert not out.exists()


def test_evaluate_without_any_pixel_size_asks_for_mpp(tmp_path: Path, truth_file: Path, capsys) -> None:
    assert main(["evaluate", "--pred", str(truth_file), "--truth", str(truth_file)]) != 0
    assert "--mpp" in capsys.readouterr().err


def test_version_is_reported(capsys) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out.startswith("nervedet ")


def test_public_api_names_resolve() -> None:
    import nervedet

    for name in nervedet.__all__:
        assert getattr(nervedet, name) is not None, name
