"""Whether this run is CI's, where a lane that cannot run fails instead of skipping.

CI systems spell it variously (CI=true on most, CI=True on AppVeyor, CI=1 elsewhere), so any
true-looking value counts: a lane must not quietly skip because of the spelling."""

from __future__ import annotations

import os

TRUE_VALUES = frozenset({"1", "true", "yes", "on", "y", "t"})


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in TRUE_VALUES
