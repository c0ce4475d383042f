"""Running ``assets/rules.js`` under node: the browser's rules, called with the inputs a test gives."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from mkdocs_gluscope.pages import asset_text

NODE = shutil.which("node")
needs_node = pytest.mark.skipif(NODE is None, reason="node is not installed")

RUNNER = """
import * as rules from "./MODULE";
const calls = JSON.parse(await new Promise(resolve => {
  let text = ""; process.stdin.on("data", d => text += d); process.stdin.on("end", () => resolve(text));
}));
const NUMBERS = { "Infinity": Infinity, "-Infinity": -Infinity, "NaN": NaN };
const revive = x => typeof x === "string" && x in NUMBERS ? NUMBERS[x] : Array.isArray(x) ? x.map(revive) :
  x && typeof x === "object" ? Object.fromEntries(Object.entries(x).map(([k, v]) => [k, revive(v)])) : x;
const out = calls.map(([name, args]) => rules[name](...revive(args)));
process.stdout.write(JSON.stringify(out));
"""


def run_js(folder: Path, calls: list[tuple[str, list[Any]]], module: str = "rules.js") -> list[Any]:
    """``[module.NAME(*ARGS) for NAME, ARGS in calls]`` computed by node (JSON in, JSON out; the strings
    "Infinity", "-Infinity" and "NaN" stand for those numbers: :func:`js_numbers` writes them)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("rules.js", "figures.js", "words-data.js"):  # as the site serves them
        (folder / name).write_text(asset_text(name), encoding="utf-8")
    (folder / "run.mjs").write_text(RUNNER.replace("MODULE", module), encoding="utf-8")
    result = subprocess.run([NODE, "run.mjs"], cwd=folder, input=json.dumps(calls), capture_output=True,
                            text=True, encoding="utf-8", timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def js_numbers(a: Any) -> Any:
    """Numbers (or nested lists of them) as :func:`run_js` passes them: non-finite ones as strings."""
    import numpy as np

    if isinstance(a, np.ndarray):
        a = a.tolist()
    if isinstance(a, list):
        return [js_numbers(x) for x in a]
    if isinstance(a, float) and not np.isfinite(a):
        return "NaN" if np.isnan(a) else "Infinity" if a > 0 else "-Infinity"
    return a
