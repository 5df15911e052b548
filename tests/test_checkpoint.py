import json

import pytest
import torch
from torch import nn

from multizoo_ext.checkpoint import config_path, load_checkpoint, save_checkpoint


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
    save_checkpoint(tmp_path / "ok.pt", nn.Linear(2, 2))
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
