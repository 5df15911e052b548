"""Unimodal encoders with MultiBench's names and arguments (installed as
``multizoo_ext.unimodals``): ``from multizoo_ext.unimodals import MLP``."""
from multizoo_ext.unimodals.common_models import GRU, LSTM, MLP, Identity, LeNet, MaxOut_MLP, Maxout

__all__ = ["GRU", "LSTM", "MLP", "Identity", "LeNet", "MaxOut_MLP", "Maxout"]
