"""`blip2rt export --check`: the exported graphs against the PyTorch model on random inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .ort_runtime import OrtBlip2


@torch.no_grad()
def check_export(model, export_dir: str | Path, batch: int = 2, prompt_len: int = 5, steps: int = 8) -> dict[str, float]:
    """Largest absolute differences: soft prompt, prefill logits, decode logits (decoder-only) or decoder
    logits (T5), and whether greedy tokens agree."""
    rt = OrtBlip2(export_dir, providers=["CPUExecutionProvider"])
    model = model.eval().to("cpu")
    g = torch.Generator().manual_seed(0)
    size = model.config.vision_config.image_size
    px = torch.randn(batch, 3, size, size, generator=g)
    soft_pt = model.image_features(px)
    soft_ort = rt.image_features(px.numpy())
    out = {"soft_prompt": float(np.abs(soft_ort - soft_pt.float().numpy()).max())}
    vocab = rt.cfg["vocab_size"]
    ids = torch.randint(3, min(vocab, 1000), (batch, prompt_len), generator=g)
    embeds = torch.cat([soft_pt, model.language_model.get_input_embeddings()(ids).to(soft_pt.dtype)], 1)
    mask = torch.ones(embeds.shape[:2], dtype=torch.long)
    if rt.cfg["encoder_decoder"]:
        enc = rt.encoder.run({"inputs_embeds": embeds.numpy(), "attention_mask": mask.numpy()})[0]
        dec = torch.zeros(batch, 1, dtype=torch.long)
        want = model.language_model(inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=dec).logits[:, -1]
        got = rt.decoder.run({"decoder_input_ids": dec.numpy(), "encoder_hidden_states": enc,
                              "encoder_attention_mask": mask.numpy()})[0]
        out["decoder_logits"] = float(np.abs(got - want.numpy()).max())
    else:
        from .ort_runtime import _Search

        s = _Search(rt, steps, 0, 1, 1.0)
        logits, state = s._start(embeds.numpy(), mask.numpy())
        lm = model.language_model
        pos = (mask.cumsum(1) - 1)
        ref = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=pos).logits[:, -1]
        out["prefill_logits"] = float(np.abs(logits - ref.numpy()).max())
        worst = 0.0
        seq = embeds
        for _ in range(steps):
            tok = logits.argmax(-1)
            seq = torch.cat([seq, lm.get_input_embeddings()(torch.from_numpy(tok))[:, None].to(seq.dtype)], 1)
            logits, state = s._step(state, tok)
            m2 = torch.ones(seq.shape[:2], dtype=torch.long)
            ref = lm(inputs_embeds=seq, attention_mask=m2, position_ids=m2.cumsum(1) - 1).logits[:, -1]
            worst = max(worst, float(np.abs(logits - ref.numpy()).max()))
        out["decode_logits"] = worst
    got_ids = rt.generate(px.numpy(), max_new_tokens=steps)
    want_ids = model.generate(px, max_new_tokens=steps).numpy()
    out["greedy_tokens_equal"] = float(got_ids.shape == want_ids.shape and bool((got_ids == want_ids).all()))
    return out
