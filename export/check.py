"""`blip2rt export --check`: the exported graphs against the PyTorch model on random inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from blip2rt.front_end import PromptLayout

from .ort_runtime import OrtBlip2


@torch.no_grad()
def check_export(model, export_dir: str | Path, batch: int = 4, prompt_len: int = 5, steps: int = 8) -> dict[str, float]:
    """Largest absolute differences: the soft prompt, the first logits (prefill, or T5's first decoder
    step), the logits of `steps` cached decode steps, the static graph's logits over its prefill and
    `steps` steps; whether greedy tokens agree (1.0 / 0.0), and the share of rows that do.

    The yardstick for an export with quantised LLM weights is not the logits' difference (a few
    percent of their range by construction) but agreement: `top1_agreement`, the share of the
    (batch x (1 + steps)) next-token positions, fed the same tokens, where the graphs' argmax is
    PyTorch's; and `greedy_rows_equal`, the share of rows whose greedy tokens are PyTorch's.
    Inputs are fixed (seeded): random pixels and random prompt ids, and random Q-Former ids for a
    model whose soft prompt reads the question (InstructBLIP, VQA fine-tuning)."""
    rt = OrtBlip2(export_dir, providers=["CPUExecutionProvider"])
    cfg, graphs = rt.cfg, rt.graphs
    model = model.eval().to("cpu")
    g = torch.Generator().manual_seed(0)
    size = model.config.vision_config.image_size
    px = torch.randn(batch, 3, size, size, generator=g)
    question = {}
    if model.config.question_in_qformer:  # [CLS] and random WordPiece ids, rows of unequal length
        qids = torch.randint(5, min(model.config.qformer_config.vocab_size, 1000), (batch, 6), generator=g)
        qids[:, 0] = 1
        qmask = torch.ones_like(qids)
        qmask[1:, 4:] = 0
        question = {"qformer_input_ids": qids, "qformer_attention_mask": qmask}
    question_np = {k: v.numpy() for k, v in question.items()}
    soft_pt = model.image_features(px, *question.values())
    soft_ort = rt.image_features(px.numpy(), *question_np.values()).astype(np.float32)
    out = {"soft_prompt": float(np.abs(soft_ort - soft_pt.float().numpy()).max())}
    ids = torch.randint(3, min(cfg.vocab_size, 1000), (batch, prompt_len), generator=g)
    embeds = torch.cat([soft_pt, model.language_model.get_input_embeddings()(ids).to(soft_pt.dtype)], 1)
    mask = torch.ones(embeds.shape[:2], dtype=torch.long)
    lm = model.language_model
    logits, state = graphs.start(embeds.numpy().astype(rt.float), mask.numpy())
    if cfg.encoder_decoder:
        dec = torch.full((batch, 1), cfg.decoder_start_token_id or 0, dtype=torch.long)

        def reference(tokens):
            return lm(inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=tokens).logits[:, -1]
    else:
        dec = torch.zeros(batch, 0, dtype=torch.long)

        def reference(tokens):
            seq = torch.cat([embeds, lm.get_input_embeddings()(tokens).to(embeds.dtype)], 1)
            m = torch.ones(seq.shape[:2], dtype=torch.long)
            return lm(inputs_embeds=seq, attention_mask=m, position_ids=PromptLayout.positions(m)).logits[:, -1]
    want = reference(dec).float().numpy()
    out["first_logits"] = float(np.abs(logits - want).max())
    agree = [logits.argmax(-1) == want.argmax(-1)]
    worst = 0.0
    for _ in range(steps):
        tok = logits.argmax(-1)
        dec = torch.cat([dec, torch.from_numpy(tok)[:, None]], 1)
        logits, state = graphs.step(state, tok)
        want = reference(dec).float().numpy()
        worst = max(worst, float(np.abs(logits - want).max()))
        agree.append(logits.argmax(-1) == want.argmax(-1))
    out["decode_logits"] = worst
    out["top1_agreement"] = float(np.mean(agree))
    if "static_lm" in cfg.graphs:  # checked whether or not this provider's default search uses it
        out["static_logits"] = _static_logits(graphs, embeds.numpy().astype(rt.float), steps, reference, dec[:, :0])
    got_ids = rt.generate(px.numpy(), max_new_tokens=steps, **question_np)
    want_ids = model.generate(px, max_new_tokens=steps, **question).numpy()
    out["greedy_tokens_equal"] = float(got_ids.shape == want_ids.shape and bool((got_ids == want_ids).all()))
    out["greedy_rows_equal"] = _rows_equal(got_ids, want_ids)
    return out


def _rows_equal(got: np.ndarray, want: np.ndarray) -> float:
    """The share of rows with the same tokens (a shorter row padded with its pad: an EOS's tail)."""
    width = max(got.shape[1], want.shape[1])
    pad = [np.pad(a, ((0, 0), (0, width - a.shape[1])), constant_values=-1) for a in (got, want)]
    return float(np.mean([np.array_equal(a, b) for a, b in zip(*pad)]))


def _static_logits(graphs, embeds: np.ndarray, steps: int, reference, dec: torch.Tensor) -> float:
    """static_lm.onnx's prefill and `steps` greedy steps (the graph's own choices fed back) against
    the PyTorch reference: the largest logit difference."""
    run = graphs.static_run(embeds, np.ones(embeds.shape[:2], np.int64), steps + 1, 0)
    worst = 0.0
    for t in range(steps + 1):
        worst = max(worst, float(np.abs(run.logits() - reference(dec).float().numpy()).max()))
        ids = run.next_ids()
        dec = torch.cat([dec, torch.from_numpy(ids)[:, None]], 1)
        if t < steps:
            run.advance(ids, t)
    return worst
