"""The numpy searches of `OrtBlip2`, greedy and beam, token for token as transformers' generate:

- greedy: argmax; finished rows are padded; over `static_lm.onnx` where the export has it (the
  graph takes the argmax, the KV buffers are bound in and out), else over the prefill/decode graphs;
- beam: log-softmax, then 2 x beams candidates per step; a candidate ending in EOS (or at the
  length limit) joins the finished pool scored by log-prob / generated_length ** length_penalty;
  the search stops by transformers' default heuristic (early_stopping=False).
"""

from __future__ import annotations

import numpy as np

from blip2rt.front_end import static_cache_length

NEG = -1.0e9


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


class Search:
    """Greedy or beam search over the prefill/decode graphs (or the T5 encoder/decoder) of `rt`.

    `run` does a whole search. The model steps are public for callers that drive their own loop
    (the export check compares each step with PyTorch): `start` runs the prompt and returns the last
    position's logits and a state, `step` feeds one token per row, `reorder` picks the rows of the
    state (beams) that continue.
    """

    def __init__(self, rt, max_new: int, min_new: int, num_beams: int, length_penalty: float):
        self.rt, self.max_new, self.min_new = rt, max_new, min_new
        self.num_beams, self.length_penalty = max(1, num_beams), length_penalty

    # -- model steps --------------------------------------------------------------------------
    # state = (self-attention KV, fixed feeds). The KV is a list of arrays, or of OrtValues on the
    # device under IO binding. The fixed feeds (mask, position, cross KV) are equal across the beams
    # of one image, so reordering beams touches only the KV.

    def start(self, embeds, mask):
        rt = self.rt
        if rt.cfg["encoder_decoder"]:
            hidden = rt.encoder.run({"inputs_embeds": embeds, "attention_mask": mask}, host=0)[0]
            start = rt.cfg["decoder_start_token_id"] or 0
            dec = np.full((embeds.shape[0], 1), start, dtype=np.int64)
            out = rt.decoder.run({"decoder_input_ids": dec, "encoder_hidden_states": hidden,
                                  "encoder_attention_mask": mask}, host=1)
            n = len(rt.past_names)
            cross = dict(zip(rt.cross_names, out[1 + n:]))
            return out[0], (out[1:1 + n], {"encoder_attention_mask": mask, **cross})
        pos = np.cumsum(mask, axis=1) - 1
        pos[mask == 0] = 1  # transformers' position ids for left padding
        out = rt.prefill.run({"inputs_embeds": embeds, "attention_mask": mask, "position_ids": pos}, host=1)
        return out[0], (out[1:], {"attention_mask": mask, "position_ids": pos[:, -1:]})

    def step(self, state, tokens):
        rt = self.rt
        kv, fixed = state
        feeds = {"input_ids": tokens[:, None].astype(np.int64), **dict(zip(rt.past_names, kv))}
        if rt.cfg["encoder_decoder"]:
            out = rt.decoder_with_past.run({**feeds, **fixed}, host=1)
            return out[0], (out[1:], fixed)
        mask = fixed["attention_mask"]
        fixed = {"attention_mask": np.concatenate([mask, np.ones((mask.shape[0], 1), np.int64)], axis=1),
                 "position_ids": fixed["position_ids"] + 1}
        out = rt.decode.run({**feeds, **fixed}, host=1)
        return out[0], (out[1:], fixed)

    def reorder(self, state, rows: np.ndarray):
        kv, fixed = state
        if self.rt.reorder is None:
            return [t[rows] for t in kv], fixed
        feeds = {"beam_idx": rows.astype(np.int64), **{f"in.{j}": t for j, t in enumerate(kv)}}
        return self.rt.reorder.run(feeds, host=0), fixed

    def _block_eos(self, scores: np.ndarray, generated: int) -> None:
        if generated < self.min_new:
            scores[:, self.rt.eos] = -np.inf

    # -- searches -----------------------------------------------------------------------------

    def run(self, embeds: np.ndarray, mask: np.ndarray) -> np.ndarray:
        if self.num_beams > 1:
            return self._beam(embeds, mask)
        return self._static_greedy(embeds, mask) if self.rt.use_static else self._greedy(embeds, mask)

    def _greedy(self, embeds, mask) -> np.ndarray:
        b = embeds.shape[0]
        pad = self.rt.cfg["pad_token_id"]
        logits, state = self.start(embeds, mask)
        out = []
        unfinished = np.ones(b, dtype=bool)
        for t in range(self.max_new):
            scores = logits.astype(np.float32).copy()
            self._block_eos(scores, t)
            tokens = np.where(unfinished, scores.argmax(axis=-1), pad)
            out.append(tokens)
            unfinished &= ~np.isin(tokens, self.rt.eos)
            if not unfinished.any() or t + 1 == self.max_new:
                break
            logits, state = self.step(state, tokens)
        return np.stack(out, axis=1) if out else np.zeros((b, 0), np.int64)

    def _static_greedy(self, embeds, mask) -> np.ndarray:
        """Greedy search over static_lm.onnx: the KV buffers are bound as both the graph's past
        and present (updated in place), the graph picks the token, and per step only the B ids
        come back; the host embeds them for the next step."""
        rt = self.rt
        b, p, _ = embeds.shape
        pad = rt.cfg["pad_token_id"]
        if self.max_new < 1:
            return np.zeros((b, 0), np.int64)
        buf = rt.static_buffers(b, static_cache_length(p, self.max_new))
        length = buf.mask.shape()[1]
        buf.mask.update_inplace(np.concatenate([mask, np.ones((b, length - p), np.int64)], axis=1))
        free = np.zeros((1, rt.cfg["vocab_size"]), np.float32)
        blocked = free.copy()
        blocked[:, rt.eos] = -np.inf
        buf.bias.update_inplace(blocked if self.min_new > 0 else free)
        pos = np.cumsum(mask, axis=1) - 1
        pos[mask == 0] = 1  # transformers' position ids for left padding
        present = ["present." + name.split(".", 1)[1] for name in rt.past_names]
        outputs = {"logits": buf.logits, "next_ids": buf.next_ids, **dict(zip(present, buf.kv))}
        kv = dict(zip(rt.past_names, buf.kv))
        graphed = rt.cuda_graph
        rt.static.run_bound({"inputs_embeds": embeds, "attention_mask": buf.mask, "position_ids": pos,
                             "write_at": np.zeros((), np.int64), "token_bias": buf.bias, **kv}, outputs,
                            -1 if graphed else None)  # the prefill's shape is not the step's: never captured
        step = {"inputs_embeds": buf.embeds, "attention_mask": buf.mask, "position_ids": buf.position,
                "write_at": buf.write_at, "token_bias": buf.bias, **kv}
        out = []
        unfinished = np.ones(b, dtype=bool)
        for t in range(self.max_new):
            tokens = np.where(unfinished, buf.next_ids.numpy(), pad)
            out.append(tokens)
            unfinished &= ~np.isin(tokens, rt.eos)
            if not unfinished.any() or t + 1 == self.max_new:
                break
            buf.embeds.update_inplace(np.ascontiguousarray(rt.embed[tokens][:, None].astype(rt.float)))
            buf.position.update_inplace(pos[:, -1:] + 1 + t)
            buf.write_at.update_inplace(np.array(p + t, np.int64))
            if t + 1 == self.min_new:
                buf.bias.update_inplace(free)
            rt.static.run_bound(step, outputs, buf.graph_id if graphed else None)
        return np.stack(out, axis=1)

    def _beam(self, embeds, mask) -> np.ndarray:
        nb, lp = self.num_beams, self.length_penalty
        b = embeds.shape[0]
        pad = self.rt.cfg["pad_token_id"]
        fill = pad if pad else (self.rt.eos[0] if self.rt.eos else -1)  # transformers: pad_token_id or eos[0]
        keep = max(2, 1 + len(self.rt.eos)) * nb
        # every beam starts from the same prompt (transformers expands the inputs before the prefill)
        logits, state = self.start(np.repeat(embeds, nb, axis=0), np.repeat(mask, nb, axis=0))
        run_seq = np.full((b, nb, self.max_new), fill, dtype=np.int64)
        run_scores = np.zeros((b, nb), np.float32)
        run_scores[:, 1:] = NEG
        fin_seq = run_seq.copy()
        fin_len = np.zeros((b, nb), np.int64)
        fin_scores = np.full((b, nb), NEG, np.float32)
        fin_done = np.zeros((b, nb), dtype=bool)
        improvable = np.ones((b, 1), dtype=bool)
        for t in range(self.max_new):
            logp = _log_softmax(logits)
            self._block_eos(logp, t)
            v = logp.shape[-1]
            cand = (logp.reshape(b, nb, v) + run_scores[:, :, None]).reshape(b, nb * v)
            top = np.argsort(-cand, axis=1, kind="stable")[:, :keep]  # (b, keep), best first
            top_scores = np.take_along_axis(cand, top, axis=1)
            src, tok = top // v, top % v
            seqs = np.take_along_axis(run_seq, src[:, :, None], axis=1)
            seqs[:, :, t] = tok
            hits = np.isin(tok, self.rt.eos) | (t + 1 >= self.max_new)
            # the best unfinished candidates continue
            cont = np.argsort(-(top_scores + hits * NEG), axis=1, kind="stable")[:, :nb]
            run_seq = np.take_along_axis(seqs, cont[:, :, None], axis=1)
            run_scores = np.take_along_axis(top_scores + hits * NEG, cont, axis=1).astype(np.float32)
            # candidates among the top nb that just finished join the finished pool
            just = hits & (np.arange(keep) < nb)[None, :]
            scored = top_scores / float(t + 1) ** lp
            scored = scored + (~improvable) * NEG + (~just) * NEG
            all_seq = np.concatenate([fin_seq, seqs], axis=1)
            all_scores = np.concatenate([fin_scores, scored], axis=1)
            all_len = np.concatenate([fin_len, np.full((b, keep), t + 1)], axis=1)
            all_done = np.concatenate([fin_done, just], axis=1)
            best = np.argsort(-all_scores, axis=1, kind="stable")[:, :nb]
            fin_seq = np.take_along_axis(all_seq, best[:, :, None], axis=1)
            fin_scores = np.take_along_axis(all_scores, best, axis=1)
            fin_len = np.take_along_axis(all_len, best, axis=1)
            fin_done = np.take_along_axis(all_done, best, axis=1)
            # transformers' early-stop heuristic (early_stopping=False): stop once no running beam can win
            best_running = run_scores[:, :1] / float(t + 1) ** lp
            worst_done = np.where(fin_done, fin_scores.min(axis=1, keepdims=True), NEG)
            improvable = improvable & (best_running > worst_done).any(axis=1, keepdims=True)
            if not improvable.any() or hits.all() or t + 1 == self.max_new:
                break
            rows = (np.arange(b)[:, None] * nb + np.take_along_axis(src, cont, axis=1)).reshape(-1)
            state = self.reorder(state, rows)
            logits, state = self.step(state, run_seq[:, :, t].reshape(-1))
        best_seq, best_len = fin_seq[:, 0], fin_len[:, 0]
        width = int(best_len.max()) if best_len.size else 0
        out = best_seq[:, :width].copy()
        for i, n in enumerate(best_len):
            out[i, n:] = fill
        return out
