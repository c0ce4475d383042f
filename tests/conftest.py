import os
import sys
from pathlib import Path

import pytest

# Never reach for the hub: every model and tokenizer here is built inside the tests.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
try:
    # transformers binds its log handler to sys.stderr on first use: inside a capsys test that is a
    # stream closed after the test, and later warnings print "--- Logging error --- Traceback".
    import transformers

    transformers.logging.get_verbosity()
except ImportError:  # the light install: site tests only
    pass
sys.path.insert(0, str(Path(__file__).parent))

OUTPUT = Path(os.environ.get("GLUSCOPE_TEST_OUTPUT", Path(__file__).parent.parent / "test-output"))


@pytest.fixture(scope="session")
def model_factory(tmp_path_factory):
    """Tiny random model folders, one per (architecture, layers), shared by the session."""
    import tiny

    made = {}

    def make(arch: str = "llama", layers: int = 2):
        key = (arch, layers)
        if key not in made:
            made[key] = tiny.make_model_dir(tmp_path_factory.mktemp(f"model-{arch}"), arch, layers=layers)
        return made[key]

    return make


@pytest.fixture(scope="session")
def corpus_files(tmp_path_factory):
    import tiny

    return tiny.write_corpus_files(tmp_path_factory.mktemp("corpus"))


@pytest.fixture
def output_dir(request):
    """A folder kept after the run (screenshots and the like), one per test."""
    folder = OUTPUT / request.node.name.replace("/", "_").replace("[", "-").replace("]", "")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture
def torch_path(monkeypatch):
    """Collection without the CPU kernel (collect/_fused.cpp): the torch code, compiled or eager,
    as on a GPU or where the kernel was not built."""
    from collect import fused

    monkeypatch.setattr(fused, "_fused", None)
