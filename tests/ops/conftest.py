"""ops tests: a bounded hypothesis profile (the whole ops suite stays within a few minutes on 2 CPU cores).

The Triton kernels are exercised on CPU tensors through Triton's interpreter by the launchers themselves
(``flatquant.ops._launch.cpu_kernel``), whatever ``TRITON_INTERPRET`` says and whichever test imported triton first.
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ops", deadline=None, max_examples=25, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
