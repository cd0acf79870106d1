"""octavo: an LLM inference and serving engine built around PagedAttention."""

__version__ = "0.1.0"


def _configure_logging() -> None:
    # Like vLLM, octavo states what it did at INFO (model, device, KV pool size) unless the
    # application configured the "octavo" logger itself or OCTAVO_CONFIGURE_LOGGING=0.
    import logging
    import os

    logger = logging.getLogger("octavo")
    if os.environ.get("OCTAVO_CONFIGURE_LOGGING", "1") == "0" or logger.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s %(message)s", "%m-%d %H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


_configure_logging()


def _configure_openmp() -> None:
    # The CPU backend's OpenMP threads run on the engine's own thread while Python turns the
    # previous step's tokens into text: spinning idle OpenMP workers would starve it. Set before
    # the compiled module (and libgomp) loads; an explicit setting wins.
    import os

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


_configure_openmp()


def backends() -> list:
    """Backends compiled into this build: always "cpu", plus "cuda" when built with it."""
    from octavo import _C

    return list(_C.backends)


def cmake_prefix() -> str:
    """The prefix to give CMake (CMAKE_PREFIX_PATH) so that find_package(octavo) finds the C++
    package installed inside this Python package."""
    import os

    return os.path.dirname(os.path.abspath(__file__))


from octavo.outputs import (  # noqa: E402
    BeamSearchOutput,
    BeamSearchSequence,
    CompletionOutput,
    Logprob,
    RequestOutput,
)
from octavo.sampling_params import BeamSearchParams, SamplingParams  # noqa: E402


def __getattr__(name):
    # LLM pulls in the compiled module; import it on first use so that the pure-Python parts
    # (SamplingParams, outputs, tokenizer) import without it.
    if name == "LLM":
        from octavo.llm import LLM

        return LLM
    raise AttributeError(f"module 'octavo' has no attribute {name!r}")


__all__ = ["LLM", "SamplingParams", "BeamSearchParams", "RequestOutput", "CompletionOutput",
           "Logprob", "BeamSearchOutput", "BeamSearchSequence", "backends",
           "cmake_prefix", "__version__"]
