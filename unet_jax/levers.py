"""The speed settings' names and choices, the default first; plain data with no imports.

Every choice computes the same numbers (tested). `model.UNet`, `step_compilation`, train.py's
config checks and benchmarks/ all read these tables. Importing it loads no JAX (the package's
names load lazily), so benchmarks/compare_pytorch.py's PyTorch worker can read it.
"""

# UNet's speed levers (model attributes).
LEVERS: dict[str, tuple[str, ...]] = {
    'transpose_conv': ('gemm', 'xla'),
    # 'auto': the CPU kernel when JAX's default backend is the CPU, XLA's op elsewhere.
    'conv_weight_grad': ('auto', 'banded', 'xla'),
    'max_pool': ('masks', 'xla'),
    'bn_relu': ('fused', 'xla'),
    'skip_concat': ('split', 'concat'),
    'small_maps': ('gemm', 'xla'),
    'few_channels': ('gemm', 'xla'),
    'wide_convs': ('auto', 'winograd', 'xla'),
}

# Forward-mode autodiff (jax.jvp, jax.jacfwd, jax.hessian, jax.linearize) through the UNet:
# these levers' hand-written choices are custom VJPs, which JAX differentiates in reverse mode
# only; XLA's ops serve both modes. The other levers' choices are plain JAX ops and stay.
# `UNet(..., **FORWARD_MODE)`, or `model.clone(**FORWARD_MODE)`: the same weights and numbers.
FORWARD_MODE: dict[str, str] = {
    'conv_weight_grad': 'xla', 'max_pool': 'xla', 'bn_relu': 'xla', 'wide_convs': 'xla'}

# XLA's CPU op order for the train and eval steps (config.cpu_scheduler; step_compilation.py).
CPU_SCHEDULERS: tuple[str, ...] = ('memory', 'concurrency')
