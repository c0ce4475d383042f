"""Running ``assets/rules.js`` under node: the browser's rules, called with the inputs a test gives."""

from __future__ import annotations

import json
import shutil
import subprocess
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

from mkdocs_gluscope.words import js_constants

NODE = shutil.which("node")
needs_node = pytest.mark.skipif(NODE is None, reason="node is not installed")

RUNNER = """
import * as rules from "./rules.js";
const calls = JSON.parse(await new Promise(resolve => {
  let text = ""; process.stdin.on("data", d => text += d); process.stdin.on("end", () => resolve(text));
}));
const out = calls.map(([name, args]) => rules[name](...args));
process.stdout.write(JSON.stringify(out));
"""


def run_js(folder: Path, calls: list[tuple[str, list[Any]]]) -> list[Any]:
    """``[rules.NAME(*ARGS) for NAME, ARGS in calls]`` computed by node (JSON in, JSON out)."""
    folder.mkdir(parents=True, exist_ok=True)
    assets = resources.files("mkdocs_gluscope").joinpath("assets")
    for name in ("rules.js", "figures.js"):
        if assets.joinpath(name).is_file():
            (folder / name).write_text(assets.joinpath(name).read_text(encoding="utf-8"), encoding="utf-8")
    (folder / "words-data.js").write_text(js_constants(), encoding="utf-8")
    (folder / "run.mjs").write_text(RUNNER, encoding="utf-8")
    result = subprocess.run([NODE, "run.mjs"], cwd=folder, input=json.dumps(calls), capture_output=True,
                            text=True, encoding="utf-8", timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)
