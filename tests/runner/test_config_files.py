"""``multizoo-ext benchmark --config FILE``: named dataset entries, sweeps, reference rows,
unknown keys; the CSV exports and the figures."""
from __future__ import annotations

import csv
import io
import json
import textwrap
from pathlib import Path

import pytest

from multizoo_ext.cli import main
from multizoo_ext.runner import BenchmarkConfig, expand_runs, load_config_file
from multizoo_ext.runner.report import axis_range

REPO = Path(__file__).resolve().parents[2]

GRID_TOML = textwrap.dedent("""
    fusions = ["concat"]
    seeds = [0, 1]
    epochs = 1
    hidden = 8
    embed_dim = 4
    batch_size = 256
    num_threads = 1
    logreg_cs = [0.05]
    plots = false

    [datasets.digits_std]
    loader = "digits"

    [datasets.digits_mm]
    loader = "digits"
    normalize = "minmax"

    [sweep]
    lr = [1e-3, 3e-3]

    [[references]]
    dataset = "digits_std"
    method = "Published net"
    source = "Some Author 2020, Table 1"
    accuracy = 0.9876
""")


def _csv(path: Path):
    return list(csv.DictReader(io.StringIO(path.read_text())))


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    out = tmp_path_factory.mktemp("cfg")
    path = out / "grid.toml"
    path.write_text(GRID_TOML)
    assert main(["benchmark", "--config", str(path), "--output", str(out / "res"), "--quiet"]) == 0
    return out / "res"


def test_named_entries_sweep_and_references_in_results_md(grid):
    md = (grid / "results.md").read_text()
    # the same loader twice, tables labelled by the entry names
    assert "### digits_std (classification" in md and "### digits_mm (classification" in md
    for lr in ("0.001", "0.003"):
        assert f"| concat [lr={lr}] | 2 |" in md                       # each sweep point is its own row
    assert "| Published net (reference [1]) | reference | 0.9876 |" in md
    assert "[1] Some Author 2020, Table 1" in md and md.count("(reference [") == 1  # only on digits_std
    assert "Sweep: lr in {0.001, 0.003}" in md
    # the two entries really got different loader settings
    runs = json.loads((grid / "results.json").read_text())["runs"]
    kwargs = {r["dataset"]: (r["config"]["loader"], r["config"]["data_kwargs"]) for r in runs}
    assert kwargs == {"digits_std": ("digits", {}), "digits_mm": ("digits", {"normalize": "minmax"})}


def test_config_saved_beside_results(grid):
    assert (grid / "config.source.toml").read_text() == GRID_TOML
    saved = json.loads((grid / "config.json").read_text())
    assert saved["sweep"] == {"lr": [0.001, 0.003]} and saved["datasets"] == ["digits_std", "digits_mm"]
    assert saved["dataset_loaders"] == {"digits_std": "digits", "digits_mm": "digits"}
    assert saved["references"][0]["metrics"] == {"accuracy": 0.9876}


def test_csv_exports(grid):
    rows = _csv(grid / "results.csv")
    # 2 datasets x 2 sweep points x 2 seeds x (concat + 2 baselines)
    assert len(rows) == 24
    assert {r["variant"] for r in rows} == {"lr=0.001", "lr=0.003"}
    runs = json.loads((grid / "results.json").read_text())["runs"]
    by_hash = {(r["config_hash"], r["dataset"], r["method"], r["seed"]): r for r in runs}
    for row in rows:
        entry = by_hash[(row["config_hash"], row["dataset"], row["method"], int(row["seed"]))]
        assert float(row["test_accuracy"]) == entry["test"]["accuracy"]
    concat = [r for r in rows if r["method"] == "concat"]
    assert {r["setting_lr"] for r in concat} == {"0.001", "0.003"}
    summary = _csv(grid / "summary.csv")
    ours = [s for s in summary if s["kind"] != "reference"]
    assert len(ours) == 2 * 2 * 3
    one = next(s for s in ours if s["dataset"] == "digits_mm" and s["method"] == "concat"
               and s["variant"] == "lr=0.003")
    accs = [float(r["test_accuracy"]) for r in concat if r["dataset"] == "digits_mm" and r["variant"] == "lr=0.003"]
    assert float(one["accuracy_mean"]) == pytest.approx(sum(accs) / 2)
    ref = next(s for s in summary if s["kind"] == "reference")
    assert ref["method"] == "Published net" and ref["accuracy_mean"] == "0.9876" and ref["source"]


def test_baselines_are_shared_between_sweep_points_that_do_not_change_them(grid, capsys):
    assert main(["benchmark", "--config", str(grid.parent / "grid.toml"), "--output", str(grid), "--quiet"]) == 0
    assert "0 run(s) computed, 24 reused" in capsys.readouterr().out
    runs = json.loads((grid / "results.json").read_text())["runs"]
    assert len([r for r in runs if r["method"] == "logreg"]) == 4   # 2 entries x 2 seeds: one run per lr point


def test_unknown_key_is_a_one_line_error_listing_valid_keys(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('fusions = ["concat"]\nepoch = 3\n')
    assert main(["benchmark", "--config", str(bad), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("error: bad.toml: unknown key 'epoch'; valid keys: datasets, fusions, seeds, epochs")
    bad.write_text('[sweep]\nlearning_rate = [1, 2]\n')
    assert main(["benchmark", "--config", str(bad), "--output", str(tmp_path / "o")]) == 2
    assert "sweep axis 'learning_rate' is not a setting that can be swept; valid: epochs" in capsys.readouterr().err
    bad.write_text('datasets = ["digits"]\n[[references]]\ndataset = "digits"\nmethod = "x"\naccuracy = 1\n')
    assert main(["benchmark", "--config", str(bad), "--output", str(tmp_path / "o")]) == 2
    assert "lacks source" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_json_config_and_command_line_wins(tmp_path):
    path = tmp_path / "grid.json"
    path.write_text(json.dumps({"datasets": {"d": {"loader": "digits"}}, "fusions": ["concat"], "epochs": 7,
                                "sweep": {"hidden": [8, 16]}}))
    kwargs, text = load_config_file(str(path))
    assert text == path.read_text()
    cfg = BenchmarkConfig(**kwargs).validated()
    assert cfg.datasets == ["d"] and cfg.loader_of("d") == "digits" and cfg.epochs == 7
    runs = expand_runs(cfg)
    assert len(runs) == 2 * 5 * 3 and {r.variant for r in runs} == {"hidden=8", "hidden=16"}
    assert {r.config.hidden for r in runs} == {8, 16}
    from multizoo_ext.cli import build_parser
    from multizoo_ext.runner import config_from_args

    args = build_parser().parse_args(["benchmark", "--config", str(path), "--epochs", "2", "--seeds", "3"])
    cfg = config_from_args(args)
    assert cfg.epochs == 2 and cfg.seeds == [3] and cfg.fusions == ["concat"]


@pytest.mark.parametrize("name", ["benchmark_digits.toml", "sweep_digits.toml", "search_digits.toml"])
def test_example_configs_are_valid(name):
    kwargs, _ = load_config_file(str(REPO / "examples" / name))
    cfg = BenchmarkConfig(**kwargs).validated()
    assert expand_runs(cfg)


def test_axis_range_spans_the_data():
    lo, hi = axis_range([0.90, 0.95], [0.92, 0.97])
    assert lo == pytest.approx(0.90 - 0.12 * 0.07) and hi == pytest.approx(0.97 + 0.24 * 0.07)
    assert axis_range([], []) == (0.0, 1.0)
    lo, hi = axis_range([0.5, float("nan")], [0.5])
    assert lo < 0.5 < hi and hi - lo < 0.1


def test_plot_with_references(grid, tmp_path):
    pytest.importorskip("matplotlib")
    from multizoo_ext.runner import make_plots, summarize

    runs = json.loads((grid / "results.json").read_text())["runs"]
    refs = [{"dataset": "digits_std", "method": "Published net", "source": "s", "metrics": {"accuracy": 0.9876}}]
    paths = make_plots(summarize(runs), tmp_path, refs)
    assert sorted(p.name for p in paths) == ["digits_mm_metrics.png", "digits_std_metrics.png"]
    assert all(p.stat().st_size > 1000 for p in paths)


def test_deq_convergence_figure(tmp_path):
    """A grid with DEQ fusion writes <dataset>_convergence.png from the runs' histories."""
    pytest.importorskip("matplotlib")
    from multizoo_ext.runner import BenchmarkConfig, run_benchmark

    runs = run_benchmark(BenchmarkConfig(datasets=["synthetic"], data_kwargs={"synthetic": {"n_samples": 200}},
                                         fusions=["concat", "deq"], seeds=[0], epochs=2, baselines=False,
                                         output=str(tmp_path / "b")))
    names = sorted(p.name for p in runs.figures)
    assert "synthetic_convergence.png" in names and "synthetic_metrics.png" in names
