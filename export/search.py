"""The numpy searches of `OrtBlip2`, greedy and beam, token for token as transformers' generate:

- greedy: argmax; finished rows are padded; over `static_lm.onnx` where the export has it (the
  graph takes the argmax, the KV buffers are bound in and out), else over the prefill/decode graphs;
- beam: log-softmax, then 2 x beams candidates per step; a candidate ending in EOS (or at the
  length limit) joins the finished pool scored by log-prob / generated_length ** length_penalty;
  the search stops by transformers' default heuristic (early_stopping=False).
"""

from __future__ import annotations

import numpy as np


NEG = -1.0e9


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


class Search:
    """Greedy or beam search over an export's LLM graphs (`graph_runner.GraphRunner`: its `start`,
    `step`, `reorder` and `static_run` are all a search asks of the graphs).

    `run` does a whole search; `start`, `step` and `reorder` are the runner's, for callers that
    drive their own loop (the export check compares each step with PyTorch).
    """

    def __init__(self, graphs, max_new: int, min_new: int, num_beams: int, length_penalty: float):
        self.graphs, self.max_new, self.min_new = graphs, max_new, min_new
        self.num_beams, self.length_penalty = max(1, num_beams), length_penalty
        self.start, self.step, self.reorder = graphs.start, graphs.step, graphs.reorder

    def _block_eos(self, scores: np.ndarray, generated: int) -> None:
        if generated < self.min_new:
            scores[:, self.graphs.eos] = -np.inf

    # -- searches -----------------------------------------------------------------------------

    def run(self, embeds: np.ndarray, mask: np.ndarray) -> np.ndarray:
        if self.num_beams > 1:
            return self._beam(embeds, mask)
        return self._static_greedy(embeds, mask) if self.graphs.use_static else self._greedy(embeds, mask)

    def _greedy(self, embeds, mask) -> np.ndarray:
        b = embeds.shape[0]
        pad = self.graphs.pad_token_id
        logits, state = self.start(embeds, mask)
        out = []
        unfinished = np.ones(b, dtype=bool)
        for t in range(self.max_new):
            scores = logits.astype(np.float32).copy()
            self._block_eos(scores, t)
            tokens = np.where(unfinished, scores.argmax(axis=-1), pad)
            out.append(tokens)
            unfinished &= ~np.isin(tokens, self.graphs.eos)
            if not unfinished.any() or t + 1 == self.max_new:
                break
            logits, state = self.step(state, tokens)
        return np.stack(out, axis=1) if out else np.zeros((b, 0), np.int64)

    def _static_greedy(self, embeds, mask) -> np.ndarray:
        """Greedy search over static_lm.onnx: the graph picks the token, and per step only the B ids
        come back; the host embeds them for the next step."""
        b = embeds.shape[0]
        pad = self.graphs.pad_token_id
        if self.max_new < 1:
            return np.zeros((b, 0), np.int64)
        run = self.graphs.static_run(embeds, mask, self.max_new, self.min_new)
        out = []
        unfinished = np.ones(b, dtype=bool)
        for t in range(self.max_new):
            tokens = np.where(unfinished, run.next_ids(), pad)
            out.append(tokens)
            unfinished &= ~np.isin(tokens, self.graphs.eos)
            if not unfinished.any() or t + 1 == self.max_new:
                break
            run.advance(tokens, t)
        return np.stack(out, axis=1)

    def _beam(self, embeds, mask) -> np.ndarray:
        nb, lp = self.num_beams, self.length_penalty
        b = embeds.shape[0]
        pad = self.graphs.pad_token_id
        eos = self.graphs.eos
        fill = pad if pad else (eos[0] if eos else -1)  # transformers: pad_token_id or eos[0]
        keep = max(2, 1 + len(eos)) * nb
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
            hits = np.isin(tok, eos) | (t + 1 >= self.max_new)
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
