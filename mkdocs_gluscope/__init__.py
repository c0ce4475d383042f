"""GLUScope: four-case statistics of gated-MLP neurons, and neuron pages built from them.

This package is the light half (no torch): the activations file (:mod:`.store`), page rendering
(:mod:`.render`), the MkDocs plugin (:mod:`.plugin`) and the ``gluscope`` command (:mod:`.cli`).
The collection run lives in the ``collect`` package, installed with the ``[collect]`` extra.
"""

__version__ = "0.1.0"
