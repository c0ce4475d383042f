"""Neuron ids as users write them: ``"29.1034"`` (LAYER.NEURON, zero-based), ``"3.*"``, ``"all"``;
in a mixture-of-experts layer ``"3.e5.17"`` (LAYER.eEXPERT.NEURON), ``"3.e5.*"``, and ``"3.s.17"`` for
its shared expert.

Keys are ``(layer, neuron)`` for a dense layer's neuron and ``(layer, neuron, expert)`` for an
expert's (``expert`` an int, or ``"s"`` for the shared expert), so code that handles dense
neurons takes expert neurons as ``*key`` with one more argument.
"""

from __future__ import annotations

import re
from typing import Iterable, Mapping, Sequence

from mkdocs_gluscope.errors import GluscopeError

_ID = re.compile(r"^\s*(\d+)\s*\.\s*(?:(e\d+|s)\s*\.\s*)?(\d+|\*)\s*$")
SHARED = "s"  # as in mkdocs_gluscope.store

#: layer -> {expert: neurons}: the experts a file holds.
Experts = Mapping[int, Mapping[object, int]]


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


def parse_neuron_ids(specs: str | Iterable[str], layers: Sequence[int], d_mlp: int,
                     experts: Experts | None = None) -> list[tuple]:
    """Keys (see the module docstring) in the order given, without repeats.

    ``layers`` are the dense model layers the file holds, ``d_mlp`` their neurons per layer;
    ``experts`` its expert layers (layer -> {expert: neurons per expert}).
    """
    experts = experts or {}
    valid_layers = _describe(sorted(set(layers) | set(experts)))
    out: dict[tuple, None] = {}

    def expert_keys(layer: int, expert: object) -> list[tuple]:
        return [(layer, n, expert) for n in range(experts[layer][expert])]

    for spec in neuron_specs(specs):
        text = spec.strip()
        if text == "all":
            out.update(((layer, n), None) for layer in layers for n in range(d_mlp))
            out.update((key, None) for layer in experts for e in experts[layer] for key in expert_keys(layer, e))
            continue
        match = _ID.match(text)
        if not match:
            raise NeuronSpecError(
                f"neuron id {spec!r} is malformed; expected LAYER.NEURON (e.g. '3.77'), a whole layer 'LAYER.*', "
                f"an expert's neuron LAYER.eEXPERT.NEURON or LAYER.s.NEURON (shared expert), or 'all' "
                f"(layers {valid_layers}, neurons 0..{d_mlp - 1})")
        layer = int(match.group(1))
        label, last = match.group(2), match.group(3)
        if layer not in layers and layer not in experts:
            raise NeuronSpecError(f"neuron id {spec!r}: layer {layer} is out of range; the file has layers {valid_layers}")
        if label is None and layer in experts and layer not in layers:
            if last != "*":
                have = ", ".join(SHARED if e == SHARED else f"e{e}" for e in experts[layer])
                raise NeuronSpecError(f"neuron id {spec!r}: layer {layer} is a mixture-of-experts layer; name an "
                                      f"expert, e.g. '{layer}.e0.{last}' (experts {have})")
            out.update((key, None) for e in experts[layer] for key in expert_keys(layer, e))
            continue
        if label is not None:
            expert: object = SHARED if label == SHARED else int(label[1:])
            if layer not in experts or expert not in experts[layer]:
                have = ", ".join(SHARED if e == SHARED else f"e{e}" for e in experts.get(layer, {})) or "none"
                raise NeuronSpecError(f"neuron id {spec!r}: layer {layer} has no expert {label} in the file "
                                      f"(experts: {have})")
            if last == "*":
                out.update((key, None) for key in expert_keys(layer, expert))
                continue
            neuron, size = int(last), experts[layer][expert]
            if not 0 <= neuron < size:
                raise NeuronSpecError(f"neuron id {spec!r}: neuron {neuron} is out of range; expert {label} has "
                                      f"neurons 0..{size - 1}")
            out[(layer, neuron, expert)] = None
            continue
        if last == "*":
            out.update(((layer, n), None) for n in range(d_mlp))
            continue
        neuron = int(last)
        if not 0 <= neuron < d_mlp:
            raise NeuronSpecError(f"neuron id {spec!r}: neuron {neuron} is out of range; layers have neurons 0..{d_mlp - 1}")
        out[(layer, neuron)] = None
    return list(out)


def _describe(layers: Sequence[int]) -> str:
    layers = list(layers)
    if layers and layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}..{layers[-1]}"
    return ", ".join(map(str, layers))


def parse_shard(shard: str | None) -> tuple[int, int]:
    """``--shard "I/N"`` (collect, explain) as (I, N); no shard is (0, 1)."""
    if shard is None:
        return 0, 1
    try:
        index, count = (int(x) for x in shard.split("/"))
    except ValueError:
        raise GluscopeError(f"--shard {shard!r}; expected I/N such as 0/4") from None
    if not 0 <= index < count:
        raise GluscopeError(f"--shard {shard!r}; expected 0 <= I < N")
    return index, count
