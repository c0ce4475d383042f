"""The Parquet reader a light site's pages use: hyparquet (and fzstd for its ZSTD pages), from npm.

Both are pinned and checked against the registry's integrity by :mod:`mkdocs_gluscope.npm`, fetched
once into the cache, and written into the site as ES modules under ``assets/gluscope/vendor/`` with
their licences; nothing of theirs is kept in this repository.
"""

from __future__ import annotations

from mkdocs_gluscope.npm import PACKAGES, package_files

VENDOR_DIR = "vendor"


def vendor_files() -> dict[str, bytes]:
    """Site files (relative to ``assets/gluscope/``) of the browser's Parquet reader."""
    out: dict[str, bytes] = {}
    hyparquet = PACKAGES["hyparquet"]
    for name, data in package_files(hyparquet, "src/").items():
        if name != "node.js":  # the Node.js entry point (files, not HTTP)
            out[f"{VENDOR_DIR}/hyparquet/{name}"] = data
    fzstd = PACKAGES["fzstd"]
    files = package_files(fzstd, "esm/", suffix=".mjs")
    out[f"{VENDOR_DIR}/fzstd.js"] = files["index.mjs"]
    out[f"{VENDOR_DIR}/fzstd.LICENSE"] = files["LICENSE"]
    out[f"{VENDOR_DIR}/README.txt"] = (
        f"hyparquet {hyparquet.version} ({hyparquet.license}, hyparquet/LICENSE) and fzstd {fzstd.version} "
        f"({fzstd.license}, fzstd.LICENSE), from the npm registry, checked against their published integrity "
        "by gluscope.\n").encode()
    return out
