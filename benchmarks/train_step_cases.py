"""One optimiser step of each stage, for throughput: blip2rt with kernels="triton" / "torch", the torch
path under torch.compile ("compiled": the objective's forward and backward, inductor's default mode,
as the trainer's `compile: default` runs it), and a LAVIS-style eager stage-1 step (fp16 autocast, per-sample negative sampling with a Python loop,
image K/V recomputed for all 3B ITM pairs) as the baseline the paper's code sets.

Inputs are random token ids and pixels at the model's shapes: throughput does not depend on content.
Each step trains in the precision `blip2rt.precision` picks for the device (bf16 autocast on CUDA and on
CPUs with native bf16), or in fp32 when the case asks for it (`bf16=False`), as the trainer would.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from blip2rt.model import Blip2
from blip2rt.precision import Precision, training_precision
from blip2rt.presets import preset_config
from blip2rt.kernels import AttentionMode
from blip2rt.training.stage1 import Stage1Batch, Stage1Objective
from blip2rt.training.stage2 import Stage2Batch, Stage2Objective
from blip2rt.training.trainer import param_groups, set_trainable


# What a triton step must launch (the benchmarks check it before timing)
FUSED_STAGE2 = ("fused_attention._fwd_kernel", "fused_attention._bwd_kernel", "post_ln_residual._fwd_kernel",
                "post_ln_residual._bwd_kernel")
FUSED_STAGE1 = FUSED_STAGE2 + ("itc._qmax_fwd_kernel", "chunked_cross_entropy._ce_rows_kernel")


def check_attention_dropout(benchmark, launches) -> None:
    """The steps train with the paper's attention dropout (0.1), inside the fused attention."""
    attention = [one for one in launches if one.name.startswith("fused_attention.")]
    assert attention and all(one.kwargs.get("DROPOUT") for one in attention), "the fused attention ran without dropout"
    benchmark.extra_info["attention_dropout"] = True


def _model(preset: str, device, impl: str, stage: int):
    """Random weights at the preset's shapes (blip2-mini too: the step time does not depend on them)."""
    frozen = torch.bfloat16 if device.type == "cuda" else torch.float32
    with device:
        m = Blip2(preset_config(preset), frozen)
    m.set_kernel_backend("torch" if impl != "triton" else "triton")
    set_trainable(m, stage)
    return m.train()


def lavis_style_stage1_loss(obj: Stage1Objective, batch: Stage1Batch) -> torch.Tensor:
    """LAVIS's Blip2Qformer.forward, as it runs: reference attention with materialised masks,
    a negative drawn per sample with .item(), and the Q-Former recomputing image K/V for 3B pairs."""
    m = obj.model
    embeds = m.image_embeds(batch.pixel_values)
    b, nq = embeds.shape[0], m.config.num_query_tokens
    q_out, past = m.qformer(m.query_tokens.expand(b, -1, -1), num_queries=nq, image_embeds=embeds)
    img = F.normalize(m.vision_projection(q_out), dim=-1)
    t_out, _ = m.qformer(m.embeddings(batch.input_ids), num_queries=0, text_mask=batch.attention_mask)
    txt = F.normalize(m.text_projection(t_out[:, 0]), dim=-1)
    sim = torch.einsum("iqd,td->itq", img, txt).max(-1).values / m.temp  # (B, B, Q) materialised
    targets = torch.arange(b, device=sim.device)
    itc = (F.cross_entropy(sim, targets, label_smoothing=0.1) + F.cross_entropy(sim.t(), targets, label_smoothing=0.1)) / 2
    with torch.no_grad():
        w_t2i = F.softmax(sim.t().float(), dim=1).fill_diagonal_(0)
        w_i2t = F.softmax(sim.float(), dim=1).fill_diagonal_(0)
    neg_img = torch.stack([embeds[torch.multinomial(w_t2i[i], 1).item()] for i in range(b)])
    neg_txt = [torch.multinomial(w_i2t[i], 1).item() for i in range(b)]
    ids = torch.cat([batch.input_ids, batch.input_ids, batch.input_ids[neg_txt]])
    mask = torch.cat([batch.attention_mask, batch.attention_mask, batch.attention_mask[neg_txt]])
    itm = F.cross_entropy(m.itm_logits(torch.cat([embeds, neg_img, embeds]), ids, mask).float(),
                          torch.cat([torch.ones(b), torch.zeros(2 * b)]).long().to(sim.device))
    dec = batch.input_ids.clone()
    dec[:, 0] = obj.dec_token_id
    labels = dec.masked_fill(dec == obj.pad_token_id, -100)
    g_out, _ = m.qformer(m.embeddings(dec), num_queries=nq, text_mask=batch.attention_mask,
                         mode=AttentionMode.MULTIMODAL_CAUSAL, past=past)
    logits = m.itg_head(g_out[:, :-1])
    itg = F.cross_entropy(logits.flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100, label_smoothing=0.1)
    return itc + itm + itg


def step_precision(device, bf16: bool = True) -> Precision:
    """The training precision of a step case: the trainer's `amp: auto` rule, or fp32 (bf16=False)."""
    return training_precision(device, allow_bf16=bf16)


def stage1_step(impl: str, device, preset: str, batch: int, text_len: int = 32,
                bf16: bool = True) -> tuple[Callable[[], None], float]:
    """impl: "triton" | "torch" | "compiled" | "lavis". Returns (step, forward+backward FLOPs per step, approx).
    The LAVIS-style step autocasts to fp16 on CUDA, as LAVIS does; every other step as the trainer."""
    m = _model(preset, device, impl, 1)
    obj = Stage1Objective(m, dec_token_id=1, pad_token_id=0)
    run = torch.compile(obj) if impl == "compiled" else obj
    opt = torch.optim.AdamW(param_groups(m, 0.05, 1e-5), lr=1e-5)
    g = torch.Generator().manual_seed(0)
    size = m.config.vision_config.image_size
    ids = torch.randint(5, m.config.qformer_config.vocab_size, (batch, text_len), generator=g).to(device)
    ids[:, 0] = 101 % m.config.qformer_config.vocab_size
    data = Stage1Batch(ids, torch.ones_like(ids), pixel_values=torch.randn(batch, 3, size, size, generator=g).to(device))
    precision = step_precision(device, bf16)
    amp = torch.float16 if impl == "lavis" and device.type == "cuda" and bf16 else precision.dtype
    use_amp = amp is not None
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp and amp == torch.float16)

    def step():
        with torch.autocast(device.type, dtype=amp, enabled=use_amp):
            loss = lavis_style_stage1_loss(obj, data) if impl == "lavis" else run(data)["loss"]
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    vit = sum(p.numel() for p in m.vision_model.parameters())
    qf = sum(p.numel() for p in m.qformer.parameters())
    tokens = m.config.vision_config.num_patches + 1
    # frozen ViT forward (2 FLOPs/param/token) + Q-Former passes (~5 of ~(Q + T) tokens) x 3 for fwd+bwd
    flops = 2 * vit * tokens * batch + 3 * 2 * qf * batch * 5 * (m.config.num_query_tokens + text_len)
    return step, float(flops)


def stage2_step(impl: str, device, preset: str, batch: int, text_len: int = 32,
                bf16: bool = True) -> tuple[Callable[[], None], float]:
    m = _model(preset, device, impl, 2)
    amp = step_precision(device, bf16).dtype
    obj = Stage2Objective(m)
    run = torch.compile(obj) if impl == "compiled" else obj
    opt = torch.optim.AdamW(param_groups(m, 0.05, 1e-5), lr=1e-5)
    g = torch.Generator().manual_seed(0)
    size = m.config.vision_config.image_size
    vocab = m.language_model.get_input_embeddings().num_embeddings
    ids = torch.randint(3, vocab, (batch, text_len), generator=g).to(device)
    data = Stage2Batch(ids, torch.ones_like(ids), ids, pixel_values=torch.randn(batch, 3, size, size, generator=g).to(device))

    def step():
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = run(data)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    llm = sum(p.numel() for p in m.language_model.parameters())
    vit = sum(p.numel() for p in m.vision_model.parameters())
    tokens = m.config.num_query_tokens + text_len
    # LLM forward + backward to its inputs (~2x forward), frozen ViT forward
    flops = 3 * 2 * llm * tokens * batch + 2 * vit * (m.config.vision_config.num_patches + 1) * batch
    return step, float(flops)
