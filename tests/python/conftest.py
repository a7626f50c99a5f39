import os
import random

# Every output the extension allocates starts as NaN, so an element a kernel forgets to write
# shows up. Must be set before the extension loads.
os.environ.setdefault("MODNORM_POISON_OUTPUTS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + ([pytest.param("cuda", marks=pytest.mark.gpu)] if HAS_CUDA else [])


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def fresh_seed(request):
    """Fresh random inputs every run; the seed is reported so a failure can be replayed."""
    seed = int(os.environ.get("MODNORM_TEST_SEED", random.randrange(2**31)))
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    yield seed


def pytest_runtest_makereport(item, call):
    if call.excinfo is not None:
        for name, value in item.user_properties:
            if name == "seed":
                print(f"\n[modnorm] {item.nodeid} failed with MODNORM_TEST_SEED={value}")
