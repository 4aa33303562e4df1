"""Q-Former attention cases: fused (Triton) vs eager (matmul-softmax-matmul with a materialised
mask, as BERT/LAVIS run it) vs PyTorch SDPA, and the whole Q-Former forward at B = 1.

Shared by the GPU benchmarks (paper shapes) and a CPU smoke test (tiny shapes).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from blip2rt import kernels
from blip2rt.kernels import AttentionMode, qformer_attention_bias

PAPER = dict(heads=12, head_dim=64, queries=32, image_tokens=257, text=32)


def eager_attention(q, k, v, bias=None):
    """(B, L, H, d) in, out; the way BERT computes it, with an explicit (B, 1, L, K) additive mask."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    if bias is not None:
        scores = scores + bias
    return (scores.softmax(-1) @ v).transpose(1, 2)


def sdpa_attention(q, k, v, bias=None):
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias).transpose(1, 2)


def attention_case(kind: str, impl: str, device, dtype, batch: int, heads: int, head_dim: int, queries: int,
                   image_tokens: int, text: int, backward: bool) -> Callable[[], None]:
    """kind: "cross" (queries x image tokens) or "self" (multimodal-causal over [queries ; ragged text])."""
    g = torch.Generator(device="cpu").manual_seed(0)
    lq = queries if kind == "cross" else queries + text
    lk = image_tokens if kind == "cross" else lq
    q, k, v = (torch.randn(batch, n, heads, head_dim, generator=g).to(device, dtype).requires_grad_(backward)
               for n in (lq, lk, lk))
    text_mask = None
    bias = None
    if kind == "self":
        lengths = torch.randint(text // 2, text + 1, (batch,), generator=g)
        text_mask = (torch.arange(text)[None] < lengths[:, None]).long().to(device)
        if impl != "fused":
            bias = qformer_attention_bias(queries, text_mask, AttentionMode.MULTIMODAL_CAUSAL, lq, dtype, batch, device)

    def forward():
        if impl == "fused":
            if kind == "cross":
                return kernels.qformer_cross_attention(q, k, v, backend="triton")
            return kernels.qformer_self_attention(q, k, v, num_queries=queries, text_mask=text_mask,
                                                  mode=AttentionMode.MULTIMODAL_CAUSAL, backend="triton")
        return (eager_attention if impl == "eager" else sdpa_attention)(q, k, v, bias)

    dout = torch.randn(batch, lq, heads, head_dim, generator=g).to(device, dtype)

    def step():
        if backward:
            q.grad = k.grad = v.grad = None
            forward().backward(dout)
        else:
            with torch.no_grad():
                forward()

    return step


def qformer_forward_case(impl: str, device, dtype, preset: str, batch: int, backward: bool = False) -> Callable[[], None]:
    """The Q-Former (queries x image tokens), B images, forward or forward + backward:
    "fused" = packed K/V + fused attention; "torch" = blip2rt's reference path; "compiled" = that path
    under torch.compile (inductor, default mode); "graphed" = the fused path replayed from a CUDA
    graph (blip2rt.cuda_graphs; forward only); "transformers" = transformers' Blip2QFormerModel
    (per-layer K/V, its own attention) at the same shapes.
    Random weights: the time does not depend on them."""
    import dataclasses

    import blip2rt
    from blip2rt.model import Blip2

    cfg = blip2rt.preset_config(preset)
    n = cfg.vision_config.num_patches + 1
    embeds = torch.randn(batch, n, cfg.vision_config.hidden_size, device=device, dtype=dtype)
    if impl == "transformers":
        from transformers import Blip2QFormerConfig, Blip2QFormerModel

        qcfg = Blip2QFormerConfig(**dataclasses.asdict(cfg.qformer_config))
        qformer = Blip2QFormerModel(qcfg).to(device, dtype).train(backward)
        queries = torch.randn(batch, cfg.num_query_tokens, qcfg.hidden_size, device=device, dtype=dtype,
                              requires_grad=backward)
        mask = torch.ones(batch, n, dtype=torch.long, device=device)

        def run():
            return qformer(query_embeds=queries, encoder_hidden_states=embeds, encoder_attention_mask=mask
                           ).last_hidden_state
    else:
        # the Q-Former alone (with its text heads, which these passes never touch): no LLM to build
        qcfg = dataclasses.replace(cfg, text_config=None, with_text_heads=True, bos_before_soft_prompt=False)
        model = Blip2(qcfg).to(device, dtype).train(backward)
        model.set_kernel_backend("triton" if impl in ("fused", "graphed") else "torch")
        query_output = model.query_output
        if impl == "compiled":
            query_output = torch.compile(model.query_output)
        elif impl == "graphed":
            from blip2rt.cuda_graphs import GraphedByBatch

            if backward:
                raise ValueError("graphed: the CUDA-graph path is for inference (forward only)")
            query_output = GraphedByBatch(model.query_output)

        def run():
            return query_output(embeds)

    def step():
        if backward:
            run().float().sum().backward()
        else:
            with torch.no_grad():
                run()

    return step
