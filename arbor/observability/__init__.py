"""Metrics, traces and logs: `metrics` (Prometheus through Ray), `tracing`, `logs`.

The modules import nothing from Arbor but its settings and errors, so the runtime, the
registry and the gateway can all call them.
"""
