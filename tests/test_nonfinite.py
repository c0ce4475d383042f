"""Non-finite activations (float16 overflow, silu(-inf)) in a real collection run."""

from __future__ import annotations

import h5py
import numpy as np
import torch

from collect.run import collect
from mkdocs_gluscope.cli import main
from test_collect import small_config


def test_overflowing_neuron_counts_its_nonfinite_positions_and_keeps_the_rest(model_factory, corpus_files,
                                                                              tmp_path, capsys):
    import transformers

    folder = tmp_path / "overflow-model"
    model = transformers.AutoModelForCausalLM.from_pretrained(model_factory("llama"))
    with torch.no_grad():
        # Neuron 0 of layer 0: gate overflows float32 on most tokens, to +inf or -inf by sign.
        model.model.layers[0].mlp.gate_proj.weight[0] *= 1e38
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (model_factory("llama") / name).exists():
            (folder / name).write_bytes((model_factory("llama") / name).read_bytes())
    out = collect(small_config(folder, corpus_files, tmp_path / "run.h5", layers=[0], refactor_glu=False))
    with h5py.File(out) as f:
        n_tokens = int(f.attrs["n_tokens"])
        count, nonfinite = f["stats/count"][0], f["stats/nonfinite"][0]
        assert nonfinite.shape == (count.shape[0], 5)
        assert nonfinite[0].sum() > n_tokens // 2  # the overflowing neuron
        assert (nonfinite[1:] == 0).all()  # every other neuron is untouched
        # Each counted position is either in a case or counted as non-finite (or has an exact zero).
        assert count[0].sum() + nonfinite[0].sum() <= n_tokens
        assert (count[1:].sum(axis=-1) <= n_tokens).all()
        for name in ("stats/min", "stats/max", "top/value"):
            values = f[name][0]
            assert not np.isinf(values).any(), name  # NaN marks an empty case or slot, never inf
        filled = f["top/doc"][0] >= 0
        assert np.isfinite(f["top/value"][0][filled]).all()
    assert main(["info", str(out)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if "non-finite" in x)
    assert f"{int(nonfinite.sum()):,} positions in 1 neuron " in line
