import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def sdxl():
    from seg_rt.tiny import tiny_pipeline

    return tiny_pipeline("sdxl")


@pytest.fixture(scope="session")
def sd15():
    from seg_rt.tiny import tiny_pipeline

    return tiny_pipeline("sd15")


@pytest.fixture(scope="session")
def sdxl_dir(tmp_path_factory):
    from seg_rt.tiny import save_tiny_pipeline

    return save_tiny_pipeline("sdxl", tmp_path_factory.mktemp("models") / "tiny-sdxl")


@pytest.fixture(scope="session")
def i2v_pipes():
    """Tiny image-to-video pipelines by family (``seg_rt.tiny.tiny_i2v_pipeline``), built on first use."""
    from seg_rt.tiny import tiny_i2v_pipeline

    built: dict = {}

    def get(family: str):
        if family not in built:
            built[family] = tiny_i2v_pipeline(family)
        return built[family]

    return get
