"""pytest fixtures for the simulated pool (loaded by tests/conftest.py).

- ``sim_pool``: a fresh demo pool per test (keep-alive chunks every 0.5 s),
  stopped afterwards.
- ``xapi``: a ``XenAPI.Session`` logged in to ``sim_pool`` as root, logged out
  afterwards.
"""
import pytest

import xapisim


@pytest.fixture
def sim_pool():
    pool = xapisim.start_pool(keepalive=0.5)
    try:
        yield pool
    finally:
        pool.stop()


@pytest.fixture
def xapi(sim_pool):
    session = sim_pool.session()
    try:
        yield session
    finally:
        try:
            session.xenapi.session.logout()
        except Exception:
            pass
