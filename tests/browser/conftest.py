"""The browser tests run against the same served API and sample hospital as tests/api."""

from __future__ import annotations

from tests.api.conftest import access_log as access_log
from tests.api.conftest import api as api
from tests.api.conftest import connections as connections
from tests.api.conftest import hospital as hospital
from tests.api.conftest import worker as worker
