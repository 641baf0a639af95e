import os
import tempfile
from pathlib import Path

# Tests never reach a model hub: everything they load ships in a package or is built here.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One converted copy of the embedded chat model serves every test that needs it
# (the GGUF → safetensors conversion takes ~20 s), kept apart from the user's cache.
os.environ.setdefault("LORAKIT_CACHE", str(Path(tempfile.gettempdir()) / "lorakit-test-cache"))


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` need a CUDA GPU; elsewhere they are skipped, saying so."""
    import pytest
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run benchmarks/gpu.sh on one)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
