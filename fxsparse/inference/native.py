"""The compiled sparse kernels (csrc/): built on first use with torch.utils.cpp_extension, cached, optional.

``kernels()`` returns the extension module, or None when it cannot be had: no C++ compiler (or ninja), a
failed build, or ``FXSPARSE_NO_NATIVE=1`` in the environment. Then fxsparse.accelerate uses its torch-op
kernels (ops.py) and says so once. The build is cached by torch (``TORCH_EXTENSIONS_DIR``, by default
``~/.cache/torch_extensions``) under a name that includes a hash of the sources, so a changed source is
rebuilt and an unchanged one is only loaded (a second or so).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import threading
import warnings
from pathlib import Path
from types import ModuleType

import torch

SOURCES = ("sparse_kernels.cpp", "spmm_simd.h", "attention_simd.h")
CSRC = Path(__file__).with_name("csrc")
DISABLE_VARIABLE = "FXSPARSE_NO_NATIVE"

_module: ModuleType | None = None
_tried = False
_failure = ""
_lock = threading.Lock()  # one build, even when threads ask at once (batch_split.py's workers)


def _build_name() -> str:
    digest = hashlib.sha256(torch.__version__.encode())  # a build links against one torch: one build per version
    for name in SOURCES:
        digest.update((CSRC / name).read_bytes())
    return f"fxsparse_kernels_{digest.hexdigest()[:12]}"


@contextlib.contextmanager
def _quiet_cpp_extension():
    """torch.utils.cpp_extension's log (a note about CUDA on CPU machines at import, a multi-line banner about a
    compiler it does not recognise) held to errors: a failed build is reported in kernels()' one line."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. torch's note about the compiler's ABI
            yield
    finally:
        logger.setLevel(level)


def _build() -> ModuleType:
    with _quiet_cpp_extension():
        import torch.utils.cpp_extension as cpp_extension

        if shutil.which("ninja") is None:  # the ninja wheel (a dependency) puts its binary outside a bare PATH
            try:
                import ninja

                os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
            except ImportError:
                pass
        return cpp_extension.load(
            name=_build_name(),
            sources=[str(CSRC / "sparse_kernels.cpp")],
            extra_include_paths=[str(CSRC)],
            extra_cflags=["-O3", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )


def kernels() -> ModuleType | None:
    """The compiled kernels, built on the first call (None, with a one-line warning, when unavailable)."""
    global _module, _tried
    if _tried:
        return _module
    with _lock:
        if not _tried:
            _module = _load()
            _tried = True
    return _module


def _load() -> ModuleType | None:
    global _failure
    if os.environ.get(DISABLE_VARIABLE, "") not in ("", "0"):
        _failure = f"{DISABLE_VARIABLE} is set"
        warnings.warn(f"fxsparse: {_failure}; using the slower torch-op kernels", stacklevel=3)
        return None
    try:
        return _build()
    except Exception as error:  # no compiler, no ninja, a failed build: the torch-op kernels remain
        _failure = " ".join(str(error).split())[:300] or type(error).__name__
        warnings.warn(
            "fxsparse: the compiled sparse kernels are unavailable (needs a C++ compiler and ninja; "
            f"{type(error).__name__}: {_failure[:160]}); using the slower torch-op kernels",
            stacklevel=3,
        )
        return None


def available() -> bool:
    return kernels() is not None


def failure() -> str:
    """Why the compiled kernels are unavailable ("" when they load or were not asked for yet)."""
    return _failure


def kept_bytes() -> int:
    """The bytes the compiled kernels keep beside the live weights (each conv's offsets, the channel blocks and
    the weights they reorder; docs/INFERENCE.md, "Kept between calls"); 0 without the kernels. A sparse model's
    memory is its tensors plus this."""
    return int(_module.kept_bytes()) if _module is not None else 0


def reset() -> None:
    """Forget the outcome of the first kernels() call (tests: simulate another environment)."""
    global _module, _tried, _failure
    _module, _tried, _failure = None, False, ""


__all__ = ["kernels", "available", "failure", "kept_bytes", "reset", "DISABLE_VARIABLE"]
