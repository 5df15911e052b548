import json
import os
import stat

import pytest
import torch
from torch import nn

from multizoo_ext.checkpoint import FORMAT, config_path, load_checkpoint, save_checkpoint


def test_round_trip_reproduces_outputs(tmp_path):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    m.train()(torch.randn(16, 3))  # move BN running stats
    save_checkpoint(tmp_path / "m.pt", m, {"width": 4})
    m2 = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    sd, cfg = load_checkpoint(tmp_path / "m.pt", m2)
    x = torch.randn(5, 3)
    torch.testing.assert_close(m.eval()(x), m2.eval()(x))
    assert cfg == {"width": 4}
    assert json.loads(config_path(tmp_path / "m.pt").read_text()) == {"width": 4}
    assert not list(tmp_path.glob(".*tmp"))  # no temp files left behind


def test_rejects_pickled_module_and_missing_and_malformed(tmp_path):
    torch.save(nn.Linear(2, 2), tmp_path / "whole.pt")  # what MultiBench writes
    with pytest.raises(ValueError, match="not a state_dict checkpoint readable with weights_only=True"):
        load_checkpoint(tmp_path / "whole.pt")
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "absent.pt")
    torch.save(nn.Linear(2, 2).state_dict(), tmp_path / "ok.pt")  # an older checkpoint: config in the JSON
    (tmp_path / "ok.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        load_checkpoint(tmp_path / "ok.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="holds a list, expected a state_dict"):
        load_checkpoint(tmp_path / "list.pt")


def test_failed_write_keeps_previous_file(tmp_path, monkeypatch):
    save_checkpoint(tmp_path / "m.pt", {"w": torch.ones(2)})

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path / "m.pt", {"w": torch.zeros(2)})
    sd, _ = load_checkpoint(tmp_path / "m.pt")
    assert torch.equal(sd["w"], torch.ones(2))
    assert not list(tmp_path.glob(".*tmp"))


def test_weights_and_config_are_one_file_and_cannot_disagree(tmp_path):
    path = tmp_path / "best.pt"
    save_checkpoint(path, {"w": torch.ones(2)}, {"epoch": 1, "where": tmp_path})  # a Path: stored as str
    save_checkpoint(path, {"w": torch.full((2,), 2.0)}, {"epoch": 2})
    blob = torch.load(path, weights_only=True)
    assert blob["format"] == FORMAT and blob["config"] == {"epoch": 2} and torch.equal(blob["state_dict"]["w"],
                                                                                        torch.full((2,), 2.0))
    # a crash between the two files leaves an old JSON copy: the weights' own config still wins
    (tmp_path / "best.json").write_text(json.dumps({"epoch": 1}))
    sd, cfg = load_checkpoint(path)
    assert cfg == {"epoch": 2} and torch.equal(sd["w"], torch.full((2,), 2.0))
    save_checkpoint(path, {"w": torch.ones(2)}, {"where": tmp_path})
    assert load_checkpoint(path)[1] == {"where": str(tmp_path)} == json.loads((tmp_path / "best.json").read_text())


def test_older_bare_state_dict_checkpoints_still_load(tmp_path):
    torch.save({"w": torch.ones(3)}, tmp_path / "old.pt")
    (tmp_path / "old.json").write_text(json.dumps({"width": 3}))
    sd, cfg = load_checkpoint(tmp_path / "old.pt")
    assert cfg == {"width": 3} and torch.equal(sd["w"], torch.ones(3))
    torch.save({"format": FORMAT, "state_dict": [1], "config": {}}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="damaged checkpoint"):
        load_checkpoint(tmp_path / "bad.pt")


def test_json_save_path_is_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"ends in \.json, the name of its config file"):
        save_checkpoint(tmp_path / "best.json", {"w": torch.ones(1)})
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="is a checkpoint's JSON config"):
        load_checkpoint(tmp_path / "best.JSON")
    with pytest.raises(TypeError, match="config must be a dict, got list"):
        save_checkpoint(tmp_path / "best.pt", {"w": torch.ones(1)}, [1])


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_written_files_get_the_usual_permissions(tmp_path, umask):
    old = os.umask(umask)
    try:
        save_checkpoint(tmp_path / "best.pt", {"w": torch.ones(1)}, {"a": 1})
    finally:
        os.umask(old)
    for name in ("best.pt", "best.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask
