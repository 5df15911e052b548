"""The CLI as a user types it: runs you can reuse, one-line errors, -v anywhere, list == train."""
import json

import pytest

from multizoo_ext.builder import ENCODER_CHOICES
from multizoo_ext.cli import main
from multizoo_ext.runs import evaluate_run, load_model

SMALL = ["--dataset", "synthetic", "--data-arg", "n_samples=240", "--epochs", "1", "--quiet"]


def test_saved_run_is_rebuilt_and_scores_its_recorded_metric(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *SMALL, "--fusion", "refnet", "--hidden", "24", "--embed-dim", "12",
                 "--output", str(out)]) == 0
    recorded = json.loads((out / "results.json").read_text())["test"]
    assert evaluate_run(out)["accuracy"] == pytest.approx(recorded["accuracy"], abs=1e-12)
    run = load_model(out)
    assert run.config["method"]["hidden"] == 24 and not run.model.training
    capsys.readouterr()
    assert main(["evaluate", str(out)]) == 0
    assert f"{recorded['accuracy']:.4f}" in capsys.readouterr().out


def test_train_never_overwrites_a_run_unless_asked(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert main(["train", *SMALL, "--output", str(out)]) == 0
    capsys.readouterr()
    assert main(["train", *SMALL, "--output", str(out)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main(["train", *SMALL, "--output", str(out), "--overwrite"]) == 0
    monkeypatch.chdir(tmp_path)  # without --output: a new folder per run
    assert main(["train", *SMALL]) == 0 and main(["train", *SMALL]) == 0
    assert len(list((tmp_path / "runs" / "train").iterdir())) == 2


@pytest.mark.parametrize("argv,expected", [
    (["--fusion", "lowrank", "--fusion-arg", "rnak=3"], "valid arguments: input_dims, output_dim, rank"),
    (["--device", "mps"], "device 'mps' is not usable"),
    (["--dataset", "mogonet"], "path"),
    (["--fusion-lr-mult", "-1"], "fusion_lr_mult must be a finite number > 0"),
    (["--hidden", "0"], "hidden must be an integer >= 1"),
    (["--objective-arg", "ms_wieght=1", "--fusion", "refnet"], "valid arguments"),
])
def test_user_errors_are_one_line_with_exit_2(argv, expected, tmp_path, capsys):
    assert main(["train", *SMALL, "--output", str(tmp_path / "o"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and expected in err and "Traceback" not in err and len(err.splitlines()) == 1


def test_output_naming_a_file_is_an_error(tmp_path, capsys):
    target = tmp_path / "file.txt"
    target.write_text("x")
    assert main(["train", *SMALL, "--output", str(target)]) == 2
    assert "is a file" in capsys.readouterr().err


def test_verbose_works_after_the_subcommand(tmp_path, caplog):
    with caplog.at_level("INFO"):
        assert main(["train", *SMALL, "--output", str(tmp_path / "o"), "-v"]) == 0
    assert any("epoch" in r.getMessage() for r in caplog.records)


def test_every_encoder_and_objective_list_shows_is_accepted_by_train(tmp_path, capsys):
    assert main(["list"]) == 0
    lines = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines() if ": " in line
                 and not line.startswith("("))
    encoders = lines["encoders"].split(", ")
    assert tuple(encoders) == ENCODER_CHOICES
    for enc in encoders:
        assert main(["train", *SMALL, "--encoder", enc, "--output", str(tmp_path / enc)]) == 0
    for obj in lines["objectives"].split(", "):
        fusion = "deq" if obj == "deq" else "refnet"
        assert main(["train", *SMALL, "--fusion", fusion, "--objective", obj, "--output",
                     str(tmp_path / f"obj-{obj}")]) == 0, obj


def test_benchmark_says_how_to_get_figures_without_matplotlib(tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    argv = ["benchmark", "--datasets", "synthetic", "--data-arg", "synthetic:n_samples=200", "--fusions", "concat",
            "--seeds", "0", "--epochs", "1", "--no-baselines", "--output", str(tmp_path / "b")]
    assert main(argv) == 0
    assert "pip install 'multizoo-ext[plot]'" in capsys.readouterr().out
    assert main(["benchmark", "--epochs", "0", "--output", str(tmp_path / "c")]) == 2
    assert capsys.readouterr().err.startswith("error: ")
