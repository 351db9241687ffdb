"""Which device computes and in which dtype: the choices every front door and the planner resolve
the same way, kept apart from the engine so that they cost no more than torch to import."""

from __future__ import annotations

from pathlib import Path

import torch

from flexeval.errors import FlexevalError
from flexeval.models import registry

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
AUTO = "auto"  # the checkpoint's own dtype, where the device computes in it well (`auto_dtype`)


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FlexevalError(f"device {device} requested but CUDA is not available: use device='cpu'")
    return device


def resolve_dtype(dtype: str | torch.dtype, device: torch.device, directory: Path | None = None) -> torch.dtype:
    """The dtype to compute in: a name, or "auto" for the checkpoint in `directory`."""
    if dtype == AUTO:
        if directory is None:
            raise ValueError("dtype='auto' is resolved against a checkpoint directory")
        return auto_dtype(directory, device)
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise FlexevalError(f"unknown dtype {dtype!r}: use one of {AUTO}, {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    if dtype not in DTYPES.values():
        raise FlexevalError(f"unsupported dtype {dtype}: use one of {', '.join(DTYPES)}")
    if dtype == torch.float16 and device.type == "cpu":
        raise FlexevalError("float16 is not supported on CPU (slow and overflow-prone there): use bfloat16")
    return dtype


def auto_dtype(directory: Path, device: torch.device) -> torch.dtype:
    """The checkpoint's own dtype where the device computes in it well: fp32 weights stay fp32;
    16-bit ones, and GGUF blocks (which have no float dtype), take bf16 on a CPU with bf16
    instructions (fp32 on one without: emulated bf16 is several times slower) and on a GPU that
    has it (else fp16), so that a model costs its checkpoint's bytes, not twice as many."""
    declared = registry.declared_dtype(directory)
    if declared == torch.float32:
        return declared
    if device.type == "cuda":
        if declared == torch.float16 or not torch.cuda.is_bf16_supported():
            return torch.float16
        return torch.bfloat16
    return torch.bfloat16 if cpu_has_bf16() else torch.float32


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX): elsewhere torch emulates
    bf16 matrix products several times slower than fp32 ones."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return False
    return bool({"avx512_bf16", "amx_bf16"} & set(flags.split()))
