"""What every benchmark prints beside its ratio: the run's context."""
from __future__ import annotations

import os
import platform

import torch
import torchaudio


def context() -> str:
    """Hardware and library versions, so a figure is never read without them."""
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU found, CPU"
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"{torch.get_num_threads()} torch threads, {device}; torch {torch.__version__}, "
            f"torchaudio {torchaudio.__version__}, python {platform.python_version()}")
