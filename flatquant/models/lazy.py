"""Decoder layers read from safetensors files one layer at a time (memory-mapped, in the file's dtype).

:class:`LazyLayers` stands in for ``ModelWeights.layers``: indexing it opens the files that hold layer ``i``
with safetensors' ``safe_open``, copies out that layer's tensors (cast to the requested dtype/device) and
closes them again, so host memory holds the layer being used, never the model. Iterating it yields the
layers one after the other. Sharded HF folders (``model.safetensors.index.json``) and our own per-layer
conversion caches are read the same way.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

Params = dict[str, Tensor]
#: one tensor of a layer: (our name, file, key in the file)
Entry = tuple[str, str, str]


def safetensors_index(folder: Path) -> dict[str, str]:
    """``{tensor key: file path}`` of a folder of safetensors files (from its index when it has one).

    Raises:
        FileNotFoundError: no ``*.safetensors`` file in ``folder``.
    """
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {k: str(folder / f) for k, f in weight_map.items()}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {folder}")
    out: dict[str, str] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            out.update({k: str(f) for k in h.keys()})
    return out


def read_tensors(entries: Sequence[Entry]) -> Params:
    """Read ``(name, file, key)`` entries, opening each file once; returns ``{name: tensor}``."""
    by_file: dict[str, list[tuple[str, str]]] = {}
    for name, file, key in entries:
        by_file.setdefault(file, []).append((name, key))
    out: Params = {}
    for file, items in by_file.items():
        with safe_open(file, framework="pt", device="cpu") as h:
            for name, key in items:
                out[name] = h.get_tensor(key)
    return out


@dataclass(frozen=True)
class LazyLayers(Sequence[Params]):
    """Decoder-layer parameter dicts loaded from safetensors files on access.

    Attributes:
        entries: per layer, the ``(our name, file, key)`` of each of its tensors.
        device: where accessed layers are put (``None``: CPU).
        dtype: floating dtype of accessed layers (``None``: the file's own).
    """

    entries: tuple[tuple[Entry, ...], ...]
    device: torch.device | str | None = None
    dtype: torch.dtype | None = None

    @classmethod
    def from_index(cls, index: Mapping[str, str], n_layers: int, names: Mapping[str, str],
                   prefix: str = "model.layers.") -> LazyLayers:
        """Layers ``0..n_layers-1`` whose tensors are ``{prefix}{i}.{theirs}`` in ``index``, named by ``names``
        (``{theirs: ours}``); names missing from the index are skipped (e.g. absent biases)."""
        return cls(tuple(tuple((ours, index[f"{prefix}{i}.{theirs}"], f"{prefix}{i}.{theirs}")
                               for theirs, ours in names.items() if f"{prefix}{i}.{theirs}" in index)
                         for i in range(n_layers)))

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i):  # int -> Params; slice -> list[Params]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        raw = read_tensors(self.entries[i])
        return {k: v.to(device=self.device, dtype=self.dtype if v.is_floating_point() else None)
                for k, v in raw.items()}

    def __iter__(self) -> Iterator[Params]:
        for i in range(len(self)):
            yield self[i]

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> LazyLayers:
        """The same layers, put on ``device`` / cast to ``dtype`` when accessed (``None`` keeps the setting)."""
        return replace(self, device=device if device is not None else self.device,
                       dtype=dtype if dtype is not None else self.dtype)
