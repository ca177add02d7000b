"""Tolerances for two fp32 computations that differ only in the order of their sums.

DDP or FSDP against one process, a sharded model against the whole one, fused against unfused kernels, a batched
CFG pass against two passes, recomputed (checkpointed) activations against stored ones: the arithmetic is the same,
the order of the additions is not, and an fp32 sum's rounding depends on its order. One machine's measured
difference says nothing about the next CPU (another SIMD width, another BLAS blocking): the suite went red on a
fresh machine of the same kind at 2.3e-5 against an allowed 1e-5 "measured bit-identical". So the tolerances here
come from the arithmetic, never from a measurement.

The bound. A sum of n fp32 terms, in any order, is off the exact sum by at most gamma_(n-1) * sum |x_i|, with
gamma_k ~ k * u and u = eps / 2 (Higham, *Accuracy and Stability of Numerical Algorithms*, eq. 4.4). That
worst case assumes every rounding goes the same way; rounding errors of a long sum behave like independent
zero-mean variables, and the probabilistic bound of Higham & Mary (SIAM J. Sci. Comput. 41, 2019, Thm 3.1)
replaces n * u by lambda * sqrt(n) * u, failing with probability at most 2 * n * exp(-lambda^2 / 2) (lambda = 6:
below 2e-8 per term). Two evaluation orders each satisfy it, so they differ by twice that: lambda * sqrt(n) * eps.
A chain of reductions (layer after layer) adds its lengths: ``n`` below is the depth of the whole chain.

``TRAIN_STEP_DEPTH`` is that depth for one training step of the tiny demo transformer at the tests' 64x64 areas
(firered_core/demo_models.py: 2 blocks, inner 64 = 4 heads x 16, MLP 256, text 64; at most 128 joint tokens):
per block the modulation, QKV, attention-out and MLP-in linears reduce over 64 each, the MLP-out over 256, the
attention scores over 16 and the attention-weighted sum over <= 128 tokens: 4 * 64 + 256 + 16 + 128 = 656; two
blocks, img_in and proj_out (64 each) and the timestep MLP (256): 1,696 forward. The backward runs the same chain
once more and reduces each weight gradient over the tokens of the rows summed (<= 2 x 128), and DDP / FSDP add the
processes' gradients (2): 1,696 + 1,696 + 256 + 2 = 3,650, rounded up to 4,096. That gives ``step_rtol()`` =
6 * 64 * eps = 4.6e-5 per step.

A later step's loss carries the earlier steps' differences: Adam's update lr * m / (sqrt(v) + eps_adam) moves each
weight by at most lr, and its rounding difference is the gradient's relative difference (where a gradient sits
near zero, the whole step may flip, but that weight's gradient, hence its effect on the loss, is itself as small as
the rounding). To first order, the loss of step s is off by s step bounds: ``trained_rtol(s)``.
"""

from __future__ import annotations

import math

import torch

EPS32 = float(torch.finfo(torch.float32).eps)  # 2 ** -23 = 1.19e-7; one rounding is at most eps / 2 relative
LAMBDA = 6.0  # Higham & Mary's confidence parameter: failure probability <= 2 n exp(-18) per quantity
TRAIN_STEP_DEPTH = 4096  # one forward + backward + all-reduce of the tiny transformer (derivation above)
SAMPLE_STEP_DEPTH = 2048  # one forward of the tiny transformer (1,696, rounded up): a sampling step


def order_rtol(depth: int) -> float:
    """Relative bound for one fp32 quantity computed in two summation orders through a chain of ``depth`` additions
    (no cancellation: the result is of the size of its terms)."""
    return LAMBDA * math.sqrt(depth) * EPS32


def step_rtol() -> float:
    """One training step of the tiny transformer: losses and gradients in two summation orders."""
    return order_rtol(TRAIN_STEP_DEPTH)


def trained_rtol(step: int, condition: float = 1.0) -> float:
    """Relative bound for the loss (or a trained tensor) after ``step`` steps in two summation orders; ``condition``
    is how much the objective amplifies a relative difference of its inputs (1 for a mean squared error; DPO's
    beta / 2 on a difference of errors is stated by its test)."""
    return step * step_rtol() * condition


def sampled_atol(steps: int, scale: float = 1.0) -> float:
    """Absolute bound for latents of size ``scale`` after ``steps`` Euler steps of the tiny transformer whose
    forward passes sum in two orders (each step adds its forward's bound; CFG's combination is elementwise)."""
    return steps * order_rtol(SAMPLE_STEP_DEPTH) * scale


def dpo_margin_atol(step: int, beta: float, error: float = 2.0) -> float:
    """Absolute bound for Diffusion-DPO's logged margin -beta / 2 * ((e_w - r_w) - (e_l - r_l)) after ``step`` steps:
    four per-row errors of size ``error`` (mean squares of unit-variance flow-matching targets: ~1.6 for the tiny
    model on the synthetic pairs, bounded by 2), each within ``trained_rtol(step)``, times beta / 2."""
    return beta / 2 * 4 * error * trained_rtol(step)

