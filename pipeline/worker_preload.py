"""What every build worker needs loaded, imported once by the local fork server so forked workers start warm.

Importing this module imports torch and the shard task and loads numba's compiled statistics kernel (about
0.5 s per process, even from numba's on-disk cache). Forked workers inherit all of it. The kernel is not
parallel, so numba has started no threads and forking after it is safe.
"""

from __future__ import annotations

import torch

import flexast.pipeline.shard_task  # noqa: F401  (the task module, with torch and the fbank)
from flexast.pipeline.stats import row_moments

row_moments(torch.zeros(1, 2, dtype=torch.float16))  # loads (or compiles) the numba kernel
