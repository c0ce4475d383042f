"""Neurons whose rare gate-_in- activations come in two separate sizes: a histogram with two
peaks, across every neuron of the model (stats/hist, one read)."""

import sys

import numpy as np

from mkdocs_gluscope.store import ActivationsFile

path = sys.argv[1] if len(sys.argv) > 1 else "data/demo.h5"
with ActivationsFile(path) as f:
    hist = f.hist("gate-_in-", "hook_post").astype(np.float64)   # [layer, neuron, bin] counts of |post|
    edges = f.hist_edges                                            # bin j: edges[j] <= |post| < edges[j+1]
    total = hist.sum(-1, keepdims=True)
    # A dip at bin j: the tallest bins on either side are each >= 5% of the case and at least twice
    # as tall as the dip.
    left = np.maximum.accumulate(hist, axis=-1)[..., :-2]
    right = np.maximum.accumulate(hist[..., ::-1], axis=-1)[..., ::-1][..., 2:]
    dip = hist[..., 1:-1]
    lower = np.minimum(left, right)
    depth = np.where((lower >= 0.05 * total) & (total >= 100), lower / np.maximum(dip, 1), 0).max(-1)
    bimodal = depth >= 2
    print(f"{bimodal.sum()} of {bimodal.size} neurons have a two-peaked gate-_in- histogram of |post|")
    for row, neuron in sorted(zip(*np.nonzero(bimodal)), key=lambda rn: -depth[rn])[:10]:
        peaks = [j for j in range(1, len(edges) - 2) if hist[row, neuron, j] >= 0.05 * total[row, neuron, 0]
                 and hist[row, neuron, j] >= hist[row, neuron, j - 1] and hist[row, neuron, j] >= hist[row, neuron, j + 1]]
        sizes = ", ".join(f"{edges[j]:.3g}-{edges[j + 1]:.3g}" for j in peaks)
        print(f"  {f.layers[row]}.{neuron}: {int(total[row, neuron, 0])} tokens, peaks at |post| {sizes}")
