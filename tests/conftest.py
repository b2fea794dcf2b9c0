"""Simulate an 8-device pod on the CPU: must run before jax is imported anywhere."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def devices():
    import jax

    assert jax.device_count() == 8, "tests expect 8 simulated CPU devices (XLA_FLAGS set too late?)"
    return jax.devices()


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
    """One JAX persistent compilation cache per pytest worker: tests that rebuild the same model and
    step (fresh trainers, resumes, CLI runs in-process) load the executable instead of recompiling
    it. A fresh directory per session, so no test ever sees another run's executables. JAX opens
    the cache at the first compile that finds the directory set (once per process), so a session
    fixture is early enough for every test's compiles."""
    import jax

    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    yield
