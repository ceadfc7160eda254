import os

from hypothesis import settings

# Hypothesis: deterministic in CI so a red run can be reproduced from the log.
settings.register_profile("ci", derandomize=True, deadline=None, max_examples=60)
settings.register_profile("dev", deadline=None, max_examples=60)
settings.load_profile("ci" if os.environ.get("CI") else "dev")
