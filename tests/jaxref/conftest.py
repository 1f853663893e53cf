"""jaxref tests run fp32 math at full precision: no x64, highest matmul precision (no TF32/bf16 passes).
On a GPU, JAX allocates as it goes instead of reserving most of the device at start-up, which would
leave the torch tests of the other pytest workers out of memory."""

from __future__ import annotations

import os

# Read when JAX first makes its GPU client, so it must be set before any test runs.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax

jax.config.update("jax_enable_x64", False)
jax.config.update("jax_default_matmul_precision", "highest")
