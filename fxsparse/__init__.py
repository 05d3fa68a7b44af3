"""fxsparse: make any PyTorch model sparse during training with one torch.fx pass.

model = fxsparse.sparsify(timm.create_model("resnet50"), method="st3sigma", sparsity=0.9,
                          schedule=fxsparse.Cubic(begin=0, end=10_000))
... optimizer.step(); fxsparse.step_(model) ...
dense = fxsparse.fold(model)
"""

from .api import hook_optimizer, refresh_, sparsify, sparsify_, step_
from .export import CsrFormatError, CsrReport, load_csr, load_csr_into_, read_csr_metadata, save_csr
from .flops import FlopReport, LayerMacs, flops
from .fold import fix_mask_, fold, fold_
from .global_threshold import GlobalThreshold
from .inference import accelerate, accelerate_checkpoint, measure_speedup
from .methods import METHODS, Feather, Gmp, Method, St3, St3Sigma, Ste, get_method, register_method
from .pool import get_threshold, is_sparsified, layer_densities, realized_sparsity
from .schedule import Constant, Cubic, cubic, paper_schedule
from .threshold import global_quantile

__version__ = "0.1.0"

__all__ = [
    "sparsify",
    "sparsify_",
    "step_",
    "refresh_",
    "hook_optimizer",
    "fold",
    "fold_",
    "fix_mask_",
    "Cubic",
    "Constant",
    "cubic",
    "paper_schedule",
    "METHODS",
    "Method",
    "register_method",
    "get_method",
    "St3",
    "St3Sigma",
    "Feather",
    "Gmp",
    "Ste",
    "GlobalThreshold",
    "get_threshold",
    "is_sparsified",
    "layer_densities",
    "realized_sparsity",
    "global_quantile",
    "save_csr",
    "load_csr",
    "load_csr_into_",
    "read_csr_metadata",
    "CsrFormatError",
    "CsrReport",
    "flops",
    "FlopReport",
    "LayerMacs",
    "accelerate",
    "accelerate_checkpoint",
    "measure_speedup",
    "__version__",
]
