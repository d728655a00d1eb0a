import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("DITC_NO_PROGRESS", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_addoption(parser):
    parser.addoption("--expensive", action="store_true", default=False,
                     help="also run the tests marked expensive (minutes each on 2 CPU cores)")


def pytest_collection_modifyitems(config, items):
    import pytest

    no_gpu = pytest.mark.skip(reason="needs a CUDA device (tests marked gpu run in benchmarks/gpu_check.sh)")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_gpu)
    if config.getoption("--expensive"):
        return
    skip = pytest.mark.skip(reason="expensive: run with --expensive")
    for item in items:
        if "expensive" in item.keywords:
            item.add_marker(skip)
