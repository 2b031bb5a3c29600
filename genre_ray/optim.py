"""Optimisers and learning-rate schedules by the names configs use (`optimizer`,
`scheduler`): what training builds and what search_space accepts, without either
importing the other."""
from __future__ import annotations

import torch

# fused: one kernel per step for all parameters (CPU and CUDA): MLP's 7M-parameter Adam
# step at about 3/4 of the default's time (docs/benchmarks.md)
OPTIMIZERS = {
    "adam": lambda params, lr, wd: torch.optim.Adam(params, lr=lr, weight_decay=wd, fused=True),
    "adamw": lambda params, lr, wd: torch.optim.AdamW(params, lr=lr, weight_decay=wd, fused=True),
    "sgd": lambda params, lr, wd: torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=wd,
                                                  fused=True),
}
SCHEDULERS = {
    "none": lambda opt, epochs: None,
    "plateau": lambda opt, epochs: torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=2),
    "cosine": lambda opt, epochs: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs),
}
