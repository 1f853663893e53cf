"""jaxref tests run fp32 math at full precision: no x64, highest matmul precision (no TF32/bf16 passes)."""

from __future__ import annotations

import jax

jax.config.update("jax_enable_x64", False)
jax.config.update("jax_default_matmul_precision", "highest")
