"""Benchmarks that compare Arbor with raw Ray on the same machine; see docs/benchmarks.md.

Importing this package prepares the environment before any script imports Ray, because
``python -m benchmarks.<script>`` runs this file first.
"""

import os as _os

_ROOT = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))

# Ray reads this when it is first imported; 0 makes every Ray process listen on 127.0.0.1.
_os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
# Ray workers inherit the environment of the process that starts Ray, and they must import
# `benchmarks.bench_agents` from this checkout.
_os.environ["PYTHONPATH"] = _os.pathsep.join(
    path for path in (_ROOT, _os.environ.get("PYTHONPATH", "")) if path
)
# The dashboard costs CPU that the measured processes would otherwise get.
_os.environ.setdefault("ARBOR_DASHBOARD", "false")
