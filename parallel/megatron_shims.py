"""The CPU compatibility shims megatron-core needs when CUDA is absent, in one place.

    from parallel.megatron_shims import apply_cpu_shims, cuda_typed_parameters
    apply_cpu_shims()               # before building Megatron layers, DDP or optimizers
    cuda_typed_parameters(stage)    # before Megatron's DistributedOptimizer sees the parameters

Megatron-core assumes a GPU in a few call sites that our CPU (gloo) runs reach. Rather than
patching `torch` for the whole process, each affected megatron module gets its own stand-in for
the name `torch` (`_CpuTorch`): it forwards everything to the real torch except the CUDA-only
factories and queries listed below, which it maps to the CPU. Nothing changes when CUDA is
available (`apply_cpu_shims` returns False and patches nothing), and applying twice is a no-op.

Covered call sites (megatron-core 0.16), by module:
- tensor_parallel/layers.py: `torch.cuda.current_device()` as the device of the gathered
  input / weight buffers (VocabParallelEmbedding, the linear layers' autograd functions; with
  sequence parallelism also the reduce-scattered input gradient of ColumnParallelLinear).
- tensor_parallel/mappings.py: `torch.cuda.current_device()` for all-gather / reduce-scatter
  output buffers.
- pipeline_parallel/p2p_communication.py: `torch.cuda.current_device()` for the shape and
  receive buffers, `torch.cuda.synchronize()` after the send/recv of a step.
- pipeline_parallel/schedules.py: `torch.zeros([], ..., device="cuda")`, the token counter of
  every schedule (forward_backward_no_pipelining and the 1F1B ones).
- distributed/param_and_grad_buffer.py: `torch.cuda.current_device()` for the contiguous param
  and grad buffers of DistributedDataParallel.
- distributed/distributed_data_parallel.py: `torch.cuda.current_device()` / synchronize around
  buffer allocation.
- optimizer/optimizer.py: `device='cuda'` scalars (found_inf, the overflow buffer, the loss
  scale); its `clip_grad_by_total_norm_fp32` asserts CUDA gradients and is replaced by
  `_clip_grad_by_total_norm_cpu` (the same rule).
- optimizer/distrib_optimizer.py: `torch.cuda.current_device()` buffers; its constructor accepts
  only parameters whose `.type()` names a CUDA tensor: `cuda_typed_parameters` re-wraps our CPU
  parameters as `CudaTypedParameter`, whose `.type()` answers with the CUDA name.
- optimizer/clip_grads.py: `device='cuda'` norm and overflow buffers of the gradient norm.
- utils.py: `local_multi_tensor_l2_norm` returns its norm with `device="cuda"` (the fallback
  used without Apex / Transformer Engine); `GlobalMemoryBuffer` allocates on
  `torch.cuda.current_device()` (ColumnParallelLinear's sequence-parallel all-gather buffer).
Sequence parallelism needs no shim of its own: gloo has `all_gather_into_tensor` and
`reduce_scatter_tensor` (fp32 and bf16, sync and async) in torch 2.13, the collectives
megatron's mappings and linear layers call.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

import torch

__all__ = ["apply_cpu_shims", "SHIMMED_MODULES", "cuda_absent"]

log = logging.getLogger(__name__)

SHIMMED_MODULES = (
    "megatron.core.tensor_parallel.layers",
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.utils",
)
"""The megatron modules whose global name `torch` is replaced by `_CpuTorch`."""

_FACTORIES = ("zeros", "empty", "ones", "full", "tensor", "arange")


def cuda_absent() -> bool:
    return not torch.cuda.is_available()


class _CpuCuda:
    """`torch.cuda` as seen by a shimmed module: the current device is the CPU and
    synchronisation is a no-op (CPU collectives are synchronous once waited on)."""

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)

    @staticmethod
    def current_device() -> torch.device:
        return torch.device("cpu")

    @staticmethod
    def synchronize(device: Any = None) -> None:
        return None


def _cpu_factory(factory: Any) -> Any:
    def make(*args: Any, **kwargs: Any) -> Any:
        device = kwargs.get("device")
        if device is not None and torch.device(device).type == "cuda":
            kwargs["device"] = "cpu"
        return factory(*args, **kwargs)

    make.__name__ = factory.__name__
    return make


class _CpuTorch:
    """`torch` as seen by a shimmed module: tensor factories with device="cuda" build on the
    CPU, `torch.cuda` is `_CpuCuda`; every other attribute is the real torch one."""

    is_cpu_shim = True

    def __init__(self) -> None:
        self.cuda = _CpuCuda()
        for name in _FACTORIES:
            setattr(self, name, _cpu_factory(getattr(torch, name)))

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


def _clip_grad_by_total_norm_cpu(
    parameters: Any, max_norm: float, total_norm: float, use_decoupled_grad: bool = False
) -> None:
    """optimizer/clip_grads.py's clip_grad_by_total_norm_fp32 without its assertion that every
    gradient is a torch.cuda.FloatTensor: scale the gradients by max_norm / (norm + 1e-6) when
    that is below one."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    coeff = max_norm / (total_norm + 1.0e-6)
    if coeff < 1.0:
        for param in parameters:
            grad = getattr(param, attr, None)
            if grad is not None:
                grad.detach().mul_(coeff)


def apply_cpu_shims(force: bool = False) -> bool:
    """Install the shims in SHIMMED_MODULES when CUDA is absent (or `force`); True if installed
    (now or before)."""
    if not (force or cuda_absent()):
        return False
    shim = _CpuTorch()
    for name in SHIMMED_MODULES:
        module = importlib.import_module(name)
        if getattr(module.torch, "is_cpu_shim", False):
            continue
        module.torch = shim  # type: ignore[attr-defined]
        log.debug("megatron CPU shim installed in %s", name)
    optimizer = importlib.import_module("megatron.core.optimizer.optimizer")
    optimizer.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_cpu  # type: ignore[attr-defined]
    return True


class CudaTypedParameter(torch.nn.Parameter):
    """A CPU parameter whose `.type()` answers with the CUDA type name.

    Covers megatron/core/optimizer/distrib_optimizer.py (`_build_model_and_main_param_groups`,
    the constructor) and optimizer.py (Float16OptimizerWithFloat16Params), which accept only
    parameters whose `param.type()` is 'torch.cuda.FloatTensor' / HalfTensor / BFloat16Tensor.
    Everything else about the tensor (device, dtype, storage) is the CPU parameter's own.
    """

    def type(self, dtype: Any = None, non_blocking: bool = False, **kwargs: Any) -> Any:  # type: ignore[override]
        if dtype is None:
            return super().type().replace("torch.", "torch.cuda.", 1)
        return super().type(dtype, non_blocking, **kwargs)


def cuda_typed_parameters(module: torch.nn.Module) -> None:
    """Re-wrap every parameter of `module` as a CudaTypedParameter (attributes such as
    tensor_model_parallel kept) when CUDA is absent, before Megatron's DistributedOptimizer
    sees them. Shared parameters stay shared."""
    if not cuda_absent():
        return
    replaced: dict[int, CudaTypedParameter] = {}
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is None or isinstance(param, CudaTypedParameter):
                continue
            if id(param) not in replaced:
                new = CudaTypedParameter(param.data, requires_grad=param.requires_grad)
                new.__dict__.update(param.__dict__)
                replaced[id(param)] = new
            sub._parameters[name] = replaced[id(param)]
