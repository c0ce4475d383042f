"""Section 5.1 of the GLUScope paper across every neuron: does the gate/in weight geometry
predict how often a neuron is in the gate-_in- case?"""

import sys

import numpy as np

from mkdocs_gluscope.store import ActivationsFile

path = sys.argv[1] if len(sys.argv) > 1 else "data/demo.h5"
with ActivationsFile(path) as f:
    freq = f.frequency()                       # [layer, neuron, case], shares of all counted tokens
    cos = f.weights("cos_gate_in")             # [layer, neuron]
    rare = freq[..., f.case_index("gate-_in-")]
    r = np.corrcoef(cos.ravel(), rare.ravel())[0, 1]
    print(f"{cos.size} neurons: corr(cos(w_gate, w_in), freq(gate-_in-)) = {r:+.3f}")
    for layer in f.layers[:: max(1, len(f.layers) // 6)]:
        row = f.row(layer)
        print(f"  layer {layer:2d}: r = {np.corrcoef(cos[row], rare[row])[0, 1]:+.3f}")
