"""Memory preflight: do the feature data and the trials fit the cluster's nodes?

Each node that runs trials holds one copy of every feature's train and val arrays in
its object store, read in place by all its trials (docs/design.md#pitfall-object-store-zero-copy), and each trial
adds its own private memory: its Python, torch and Ray worker, the model, the optimiser
state and a batch (`trial_gb` in defaults.yaml `memory`, measured by bench/memory.py).
Before any trial, per node:

    object store   >= data x store_headroom          (data: train + val of every feature)
    memory         >= trial_gb                       (Ray's `memory` resource: the node's
                                                       memory besides its object store)

Each trial then asks Ray for `trial_gb` of memory beside its CPUs and GPUs, so Ray never
places more trials on a node than its memory holds, and the run's concurrency is what
fits, node by node. Where no node fits, one UserError says what to change, before any
feature is computed. A local Ray is started with an object store sized to the data.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from genre_ray.config import Memory
from genre_ray.errors import UserError

GB = 1 << 30


@dataclass(frozen=True)
class Need:
    """What a run asks of each node: shared data bytes per feature, private bytes per trial."""

    data: dict[str, int]  # feature -> train + val bytes
    trial: int
    cpus: float
    gpus: float
    store: int  # object-store bytes a node needs for the data


def need(sizes: dict[str, dict[str, int]], cpus: float, gpus: float, memory: Memory) -> Need:
    """The Need of a run over features of `sizes` (features.estimated_bytes)."""
    trial = max(memory.trial_gb[f] for f in sizes) * GB
    data = {f: s["train"] + s["val"] for f, s in sizes.items()}
    return Need(data, int(trial), cpus, gpus, int(sum(data.values()) * memory.store_headroom))


def local_store_bytes(want: Need, memory: Memory) -> int:
    """The object store a new local Ray gets: the data plus headroom, at least Ray's minimum;
    UserError when this machine cannot hold it beside the driver and one trial."""
    store = max(want.store + int(memory.store_extra_gb * GB), int(memory.store_min_gb * GB))
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if store + want.trial + memory.driver_gb * GB > total:
        raise UserError(_too_big(want, f"this machine has {total / GB:.1f} GB of memory"))
    return store


def slots(want: Need, nodes: list[dict[str, Any]]) -> int:
    """Trials that fit at once, node by node (alive nodes as `ray.nodes()` gives them);
    UserError when no node has a trial's CPUs and GPUs together (Tune would wait for them
    forever), when a node that could run trials cannot hold the data, or none fits one."""
    alive = [n["Resources"] for n in nodes if n["Alive"]]
    if not any(_fit(node, want, ("CPU", "GPU")) for node in alive):
        raise UserError(_no_node(want, alive))
    counts = []
    for node in alive:
        fit = _fit(node, want)
        if fit and node.get("object_store_memory", 0) < want.store:
            raise UserError(_too_big(want, f"a node of the cluster has an object store of "
                                           f"{node.get('object_store_memory', 0) / GB:.1f} GB") +
                            f"; or start its nodes with `ray start --object-store-memory "
                            f"{want.store}`")
        counts.append(fit)
    if not any(counts):
        raise UserError(f"no node of the Ray cluster has {want.trial / GB:.1f} GB of memory free "
                        f"for a trial beside {want.cpus:g} CPU(s) and {want.gpus:g} GPU(s); lower "
                        "--cpus-per-trial or --gpus-per-trial, or use bigger nodes")
    return sum(counts)


def _fit(node: dict[str, float], want: Need, kinds: tuple[str, ...] = ("CPU", "GPU", "memory")) -> int:
    """Trials of `want` that one node's `kinds` of resources hold at once. Ray counts
    fractions in 1/10,000ths, so 1 GPU holds ten trials at 0.1 (float `1 // 0.1` is 9)."""
    asked = {"CPU": want.cpus, "GPU": want.gpus, "memory": want.trial}
    fits = [round(node.get(kind, 0) * 10_000) // round(asked[kind] * 10_000)
            for kind in kinds if asked[kind]]
    return int(min(fits))


def _no_node(want: Need, nodes: list[dict[str, float]]) -> str:
    shapes = ", ".join(sorted({f"{n.get('CPU', 0):g} CPUs + {n.get('GPU', 0):g} GPUs" for n in nodes}))
    flag = "--gpus-per-trial" if want.gpus and not any(_fit(n, want, ("GPU",)) for n in nodes) \
        else "--cpus-per-trial"
    return (f"{flag}: no node of the Ray cluster has {want.cpus:g} CPU(s) and {want.gpus:g} "
            f"GPU(s) together for a trial (--cpus-per-trial {want.cpus:g} --gpus-per-trial "
            f"{want.gpus:g}; its nodes have {shapes}); lower {flag}, or join a cluster with "
            "--address whose nodes have them")


def _too_big(want: Need, have: str) -> str:
    sizes = ", ".join(f"{f} {b / GB:.1f} GB" for f, b in want.data.items())
    return (f"the features to tune on need {want.store / GB:.1f} GB of shared memory on every "
            f"node that runs trials ({sizes} of train + val segments with their augmented "
            f"copies, plus headroom), beside {want.trial / GB:.1f} GB per trial, but {have}; "
            "tune fewer features (--features spectrogram needs far less than waveform) or use "
            "nodes with more memory")
