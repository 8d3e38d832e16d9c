"""autopar.runtime_kernels: fused Triton kernels the rewritten graphs call, each with a torch reference.

Every public function has a ``torch.nn.functional``-like signature and is differentiable. It runs
its Triton kernel when the tensors are on CUDA (or on the CPU when ``TRITON_INTERPRET=1`` was set
before import, for tests) and the torch reference otherwise (CPU, meta/fake tensors, shapes a kernel
does not cover). One file per kernel, in the order kernel -> launcher -> torch reference ->
``torch.autograd.Function`` -> public function. Imports nothing of autopar's own (only this
package's modules) and must not run anything at import time.
"""
from autopar.runtime_kernels.add_norm import add_norm
from autopar.runtime_kernels.bias_gelu import bias_gelu
from autopar.runtime_kernels.cross_entropy import cross_entropy, vocab_parallel_cross_entropy
from autopar.runtime_kernels.layer_norm import layer_norm
from autopar.runtime_kernels.rms_norm import rms_norm
from autopar.runtime_kernels.rotary import rotary
from autopar.runtime_kernels.swiglu import swiglu

__all__ = ["layer_norm", "rms_norm", "bias_gelu", "swiglu", "rotary", "add_norm", "cross_entropy",
           "vocab_parallel_cross_entropy"]
