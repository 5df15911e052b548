import logging

import pytest
import torch

from multizoo_ext.registry import Registry, create_encoder, create_fusion, list_encoders, list_fusions


def test_unknown_name_lists_known_names():
    with pytest.raises(ValueError, match=r"unknown fusion 'nope'; known fusions: .*concat.*lowrank"):
        create_fusion("nope", input_dims=[3, 4])
    with pytest.raises(ValueError, match=r"unknown encoder 'cnn9'.*mlp"):
        create_encoder("cnn9")


def test_none_kwargs_are_passed_as_given():
    """None is a value (the CLI, not the registry, leaves out flags the user did not give)."""
    with pytest.raises((TypeError, ValueError)):
        create_fusion("lowrank", input_dims=[3, 4], rank=None)
    f = create_fusion("lowrank", input_dims=[3, 4])
    assert f.out_dim == 64 and f.rank == 4


def test_register_and_overwrite_warns(caplog):
    reg = Registry("widget")

    @reg.register("a")
    def make_a(x=1):
        return ("a", x)

    assert reg.create("A", x=None) == ("a", None)  # names are case-insensitive, None passed through
    assert reg.names() == ["a"] and "a" in reg
    with caplog.at_level(logging.WARNING):
        reg.register("a")(lambda: "b")
    assert "registered twice" in caplog.text
    assert reg.create("a") == "b"


def test_builtins_registered():
    assert {"concat", "tensor", "lowrank", "transformer"} <= set(list_fusions())
    assert {"mlp", "maxout_mlp", "gru", "lstm", "lenet", "identity"} <= set(list_encoders())
