"""Fused Triton kernels for SSL losses and token selection, each beside its pure-PyTorch `*_ref`.

Modules: ntxent (NT-Xent; also re-exports clip_loss), clip, contrastive (the shared row-vs-columns core), dino_loss
(DINO + iBOT patch loss), masked_gather (MAE gather, mask-token replace, packed gather), utils, testing, aot_check.
Import from the modules (`from kernels.ntxent import ntxent_loss`); nothing is re-exported here because several
functions share their module's name (kernels.dino_loss.dino_loss).

Every public op takes `impl="auto" | "triton" | "ref"` (NT-Xent / CLIP also "chunked"): "auto" is Triton on CUDA
tensors and the chunked (NT-Xent / CLIP) or reference path elsewhere. Triton is imported only inside this package.

The Triton launches are registered as custom ops (`torch.ops.ssl_pretrain.*`, with fake implementations) and wrapped
in autograd.Functions, so `torch.compile(fullgraph=True)` of a step that calls them keeps one graph.
"""
