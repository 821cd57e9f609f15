"""The Python client moved to the `rbr_client` package, which installs alone into a trainer's environment.

This module keeps `from service.client import ...` working; new code imports `rbr_client`.
"""

from __future__ import annotations

import rbr_client
from rbr_client import *  # noqa: F403 - the same public names

__all__ = rbr_client.__all__
