"""torch.compile as an option (train.py's and bench.py's --compile): inductor on the CPU, which compiles C++ with
the system's compiler, and Triton on CUDA. Off where neither is found, with one line saying why."""

import importlib.util
import os
import shutil
import warnings

import torch

# the C++ compilers inductor's CPU backend tries (torch._inductor.cpp_builder), CXX first when set
_CXX = ("g++", "clang++", "c++")


def compiler_available(device="cpu"):
    """None when torch.compile can build kernels for `device` here, else one line saying why not."""
    if not hasattr(torch, "compile"):
        return f"--compile: torch {torch.__version__} has no torch.compile"
    if device == "cuda":
        if importlib.util.find_spec("triton") is None:
            return "--compile: no Triton (torch.compile's CUDA backend); install the triton package"
        return None
    cxx = [os.environ["CXX"]] if os.environ.get("CXX") else list(_CXX)
    if not any(shutil.which(c) for c in cxx):
        return f"--compile: no C++ compiler found ({', '.join(cxx)}); inductor's CPU backend needs one"
    return None


def compile_objective(fn, device="cpu", mode=None):
    """`fn` (e.g. orthcr.objective) compiled by torch.compile for `device`; the first calls compile (minutes
    for a ViT-B/16 on a small CPU), later calls with the same shapes reuse the kernels. Raises RuntimeError with
    compiler_available's line where it cannot run."""
    why = compiler_available(device)
    if why is not None:
        raise RuntimeError(why)
    # dynamic=False: a training run's shapes are fixed (a last smaller batch compiles once more)
    return torch.compile(fn, mode=mode, dynamic=False)


def objective_or_eager(fn, device):
    """--compile: `fn` (orthcr.objective) through torch.compile for `device` (tests/test_compiled.py: the same loss
    and gradients within 1e-4), or, where no compiler is found, `fn` itself and a warning saying why."""
    device = torch.device(device).type
    why = compiler_available(device)
    if why:
        warnings.warn(f"{why}; running eagerly")
        return fn
    return compile_objective(fn, device)
