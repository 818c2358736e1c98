"""The platform's own protobuf messages: ``umbel/v1/monitor.proto`` (the run's events and the
live ``Monitor`` service). The ``*_pb2*.py`` modules are generated from it (``make proto``)
and committed; a test fails when they no longer match the ``.proto``.

Importing ``proto`` (every process that computes results does: clients, servers and
strategies read the wire format) also fixes the BLAS thread count at one, so that results
do not depend on it: through the environment before numpy loads (and in every process this
one starts), and through ``threadpoolctl`` when numpy was loaded first.
"""

import os
import sys

BLAS_THREADS = "1"
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = BLAS_THREADS

if "numpy" in sys.modules:  # too late for the environment: limit the loaded library itself
    from threadpoolctl import threadpool_limits

    threadpool_limits(int(BLAS_THREADS), user_api="blas")
