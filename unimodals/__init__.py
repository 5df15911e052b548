"""Unimodal encoders (MultiBench names): ``from multizoo_ext.unimodals.common_models import MLP``."""
from multizoo_ext.unimodals import common_models  # noqa: F401
from multizoo_ext.unimodals.common_models import GRU, LSTM, MLP, Identity, LeNet, MaxOut_MLP, Maxout  # noqa: F401
