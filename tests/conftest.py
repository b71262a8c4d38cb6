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


# pytest-xdist (`-n 2`, the README's test command): a module's tests stay on one worker (its module
# fixtures are built once), and the modules that start Ray processes run on one worker, one after
# another, first (their local clusters take fixed worker-port ranges, and a Ray start's timeouts
# assume one Ray starting at a time); the other worker runs the rest meanwhile. (xdist's own
# `--dist loadgroup` marks do not reach its scheduler under pytest 9.2: it renames the node ids it
# would tag, so the grouping is this scheduler's scope function.)
RAY_MODULES = frozenset(
    {
        "test_cluster",
        "test_multinode",
        "test_parallel",
        "test_serve",
        "test_storage",
        "test_hardening",
        "test_hardening3",
    }
)


def _module(nodeid: str) -> str:
    return nodeid.split("::", 1)[0].rsplit("/", 1)[-1].removesuffix(".py")


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: _module(item.nodeid) not in RAY_MODULES)  # stable: the Ray modules first


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class ByModule(LoadScopeScheduling):
        """One scope per module, one for all the Ray modules; scopes in collection order."""

        def _split_scope(self, nodeid: str) -> str:
            return "ray" if _module(nodeid) in RAY_MODULES else _module(nodeid)

    config.option.loadscopereorder = False  # collection order: the long Ray scope starts first
    return ByModule(config, log)
