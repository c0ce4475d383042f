"""The activation functions of gated MLPs: the one table that collection and pages both read.

``act(gate)`` is the ``swish`` hook, and ``post = act(gate) * in``. The file records the model's
activation by its Hugging Face name (``act_fn``); pages recompute act(gate) over every example
window from the stored gate values with :func:`activation`, and carry the results to the page's
JavaScript as data, so the browser never needs a formula of its own. Collection refuses a model
whose activation is not in :data:`ACTIVATIONS` (``tests/test_collect.py`` checks every entry
against transformers' own implementation).
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

_SQRT_2_OVER_PI = math.sqrt(2 / math.pi)
_erf = np.frompyfunc(math.erf, 1, 1)


def _silu(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return x / (1 + np.exp(-x))


def _gelu_erf(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1 + _erf(x / math.sqrt(2)).astype(np.float64))


def _gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1 + np.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x**3)))


def _quick_gelu(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return x / (1 + np.exp(-1.702 * x))


def _relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0.0)


def _relu2(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0.0) ** 2


#: Hugging Face activation name (``config.hidden_act`` / ``hidden_activation``) -> act(x) on float64.
ACTIVATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "silu": _silu,
    "swish": _silu,
    "gelu": _gelu_erf,
    "gelu_python": _gelu_erf,
    "gelu_new": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_python_tanh": _gelu_tanh,
    "quick_gelu": _quick_gelu,
    "relu": _relu,
    "relu2": _relu2,
}


class UnknownActivation(ValueError):
    """An activation name that is not in :data:`ACTIVATIONS`."""


def activation(name: str) -> Callable[[np.ndarray], np.ndarray]:
    """The function ``act`` named ``name``; :class:`UnknownActivation` names the accepted ones."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise UnknownActivation(
            f"activation {name!r} is not supported; gluscope knows {', '.join(ACTIVATIONS)}") from None


def act_values(gate: np.ndarray, name: str) -> np.ndarray:
    """``act(gate)`` in float64 (NaN stays NaN) for the activation called ``name``."""
    return np.asarray(activation(name)(np.asarray(gate, dtype=np.float64)), dtype=np.float64)
