"""``torch.autocast("cuda")`` for vGPU tensors.

PyTorch's autocast works on the dispatch key of the CUDA backend, which a meta-backed
tensor never has; so the casting policy is applied here, above autograd, where the casts
are recorded and differentiated exactly like the ones autocast inserts on a real GPU.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from orion_vgpu.client.frontend import RemoteTensor

# Ops autocast runs in the lower precision (torch.amp docs, "CUDA Ops that can autocast to float16").
LOWER = frozenset({
    F.linear, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d,
    F.conv_transpose3d, F.prelu, torch.matmul, torch.mm, torch.bmm, torch.addmm,
    torch.baddbmm, torch.addbmm, torch.addmv, torch.mv, torch.chain_matmul,
    torch.Tensor.matmul, torch.Tensor.__matmul__, torch.Tensor.mm, torch.Tensor.bmm,
    F.scaled_dot_product_attention,
})
# Ops autocast runs in float32 ("CUDA Ops that can autocast to float32").
FLOAT32 = frozenset({
    F.softmax, F.log_softmax, F.cross_entropy, F.nll_loss, F.mse_loss, F.l1_loss,
    F.smooth_l1_loss, F.binary_cross_entropy_with_logits, F.kl_div, F.layer_norm,
    F.group_norm, F.normalize, F.softplus, F.cosine_similarity, torch.exp, torch.log,
    torch.log1p, torch.pow, torch.cumsum, torch.cumprod, torch.prod, torch.norm,
    torch.Tensor.softmax, torch.Tensor.log_softmax, torch.softmax, torch.log_softmax,
    torch.Tensor.exp, torch.Tensor.log, torch.Tensor.pow, torch.Tensor.__pow__,
})


def _cast(a: Any, dtype: torch.dtype) -> Any:
    if isinstance(a, RemoteTensor) and a.is_floating_point() and a.dtype != dtype:
        return a.to(dtype)
    if isinstance(a, (list, tuple)):
        return type(a)(_cast(x, dtype) for x in a)
    return a


def policy_dtype(func: Any) -> torch.dtype | None:
    """The dtype autocast wants for ``func`` now, or None when it leaves it alone."""
    if func in LOWER:
        return torch.get_autocast_dtype("cuda")
    if func in FLOAT32:
        return torch.float32
    return None


def cast_args(args: tuple, kwargs: dict, dtype: torch.dtype) -> tuple[tuple, dict]:
    return (tuple(_cast(a, dtype) for a in args),
            {k: _cast(v, dtype) for k, v in kwargs.items()})
