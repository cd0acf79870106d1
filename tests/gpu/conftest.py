"""GPU tests: every GPU op against its CPU reference. Run on a GPU machine: pytest tests/gpu."""

import pytest

torch = pytest.importorskip("torch")


def pytest_collection_modifyitems(config, items):
    import octavo

    reason = None
    if "cuda" not in octavo.backends():
        reason = "octavo was built without the CUDA backend"
    elif not torch.cuda.is_available() or octavo._C.cuda_device_count() == 0:
        reason = "no CUDA GPU"
    for item in items:
        item.add_marker(pytest.mark.gpu)
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))
