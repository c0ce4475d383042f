"""Neuron ids as users write them: ``"29.1034"`` (LAYER.NEURON, zero-based), ``"3.*"``, ``"all"``."""

from __future__ import annotations

import re
from typing import Iterable, Sequence

_ID = re.compile(r"^\s*(\d+)\s*\.\s*(\d+|\*)\s*$")


class NeuronSpecError(ValueError):
    """A neuron id that is malformed or outside the file's range."""


def neuron_specs(specs: object) -> list[str]:
    """``specs`` as a list of id strings: one string or a list of strings.

    Numbers are refused, never reinterpreted: unquoted in YAML, ``1.10`` is the float 1.1 and
    ``3.0`` the float 3.0, so the neuron a reader meant is already lost.
    """
    items = [specs] if isinstance(specs, (str, int, float)) else specs
    if not isinstance(items, (list, tuple)):
        raise NeuronSpecError(f"neurons: {specs!r}; expected a list of quoted ids like \"1.10\", or 'all'")
    for spec in items:
        if isinstance(spec, (bool, int, float)):
            kind = "boolean" if isinstance(spec, bool) else "number"
            raise NeuronSpecError(
                f"neuron id {spec!r} is a YAML {kind}: quote neuron ids so they stay as written, "
                f"e.g. \"1.10\" (unquoted, 1.10 reads as 1.1)")
        if not isinstance(spec, str):
            raise NeuronSpecError(f"neuron id {spec!r}; expected a quoted string like \"1.10\", \"3.*\" or 'all'")
    return list(items)


def parse_neuron_ids(specs: str | Iterable[str], layers: Sequence[int], d_mlp: int) -> list[tuple[int, int]]:
    """``(layer, neuron)`` pairs in the order given, without repeats.

    ``layers`` are the model layers the file holds; ``d_mlp`` its neurons per layer.
    """
    valid_layers = _describe(layers)
    out: dict[tuple[int, int], None] = {}
    for spec in neuron_specs(specs):
        text = spec.strip()
        if text == "all":
            out.update(((layer, n), None) for layer in layers for n in range(d_mlp))
            continue
        match = _ID.match(text)
        if not match:
            raise NeuronSpecError(
                f"neuron id {spec!r} is malformed; expected LAYER.NEURON (e.g. '3.77'), "
                f"a whole layer 'LAYER.*', or 'all' (layers {valid_layers}, neurons 0..{d_mlp - 1})")
        layer = int(match.group(1))
        if layer not in layers:
            raise NeuronSpecError(f"neuron id {spec!r}: layer {layer} is out of range; the file has layers {valid_layers}")
        if match.group(2) == "*":
            out.update(((layer, n), None) for n in range(d_mlp))
            continue
        neuron = int(match.group(2))
        if not 0 <= neuron < d_mlp:
            raise NeuronSpecError(f"neuron id {spec!r}: neuron {neuron} is out of range; layers have neurons 0..{d_mlp - 1}")
        out[(layer, neuron)] = None
    return list(out)


def _describe(layers: Sequence[int]) -> str:
    layers = list(layers)
    if layers and layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}..{layers[-1]}"
    return ", ".join(map(str, layers))
