import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")


def _loopback_test_client() -> None:
    """The server answers only trusted ``Host`` names (DNS rebinding guard, docs/security.md);
    Starlette's TestClient speaks as ``http://testserver`` by default: make its default a loopback
    client, as a real local client is. A test that passes ``base_url`` keeps its own."""
    from starlette.testclient import TestClient

    init = TestClient.__init__
    if getattr(init, "loopback_default", False):
        return

    def loopback_init(self, app, base_url="http://127.0.0.1", *args, **kwargs):
        init(self, app, base_url, *args, **kwargs)

    loopback_init.loopback_default = True
    TestClient.__init__ = loopback_init


_loopback_test_client()


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


@pytest.fixture(scope="session")
def demo_video():
    """The bundled demo video model (pixel-space AnimateDiff), loaded once on the CPU."""
    from seg_rt.demo.video_model import video_weights_dir
    from seg_rt.pipeline import load_pipeline

    return load_pipeline(video_weights_dir(), "cpu")
