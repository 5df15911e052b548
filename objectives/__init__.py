from multizoo_ext.objectives import refnet_objective  # noqa: F401
from multizoo_ext.objectives import deq_objective  # noqa: F401
from multizoo_ext.objectives import multisimilarity, refiner  # noqa: F401
