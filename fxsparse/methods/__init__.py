"""Sparse training methods; importing this package fills the registry (one import line per method)."""

from .base import METHODS, Method, get_method, register_method
from .baselines import Gmp, Ste
from .feather import Feather
from .st3 import St3, St3Sigma

__all__ = ["METHODS", "Method", "get_method", "register_method", "St3", "St3Sigma", "Feather", "Gmp", "Ste"]
