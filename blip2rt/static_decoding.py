"""Decoding over a static KV cache: greedy and sampled captioning for decoder-only LLMs with the
token chosen on the device and one fixed-shape function per decode step.

transformers' `generate` grows its cache and runs the search in Python, with a host sync per
token to test the stopping criteria. Here:
- the KV cache is preallocated: (B, kv heads, L, head dim) per layer and per K/V, with L the
  prompt plus `max_new_tokens`, rounded up (front_end.static_cache_length) so that captions
  of nearby lengths share one compiled step;
- the prefill writes the prompt's K/V at positions 0..P-1; decode step t writes at P + t;
- the attention mask is the prompt's padding mask followed by ones: positions not yet written
  are hidden by the causal mask, which the model builds from the write position;
- each decode step (embedding, LLM, token choice, end-of-text bookkeeping) is one function of
  fixed shapes, `torch.compile`d where asked (`mode="reduce-overhead"` on CUDA, which captures
  it as a CUDA graph);
- whether every row has finished is read back every `SYNC_EVERY` steps only.

The tokens are those of transformers' greedy `generate` on the same inputs (the tests check it).
`StaticLM` is also the module exported as the ONNX Runtime static decoder (`static_lm.onnx`).
Beam search and encoder-decoder LLMs (T5) stay on transformers' `generate`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.cache_utils import Cache, StaticLayer

from .errors import InputError
from .front_end import PromptLayout, static_cache_length

SYNC_EVERY = 8  # decode steps between reads of "has every row finished?"

# generate() arguments the static path honours; anything else needs transformers' generate
STATIC_ARGS = {"max_new_tokens", "min_new_tokens", "do_sample", "temperature", "top_k", "top_p", "num_beams",
               "pad_token_id", "eos_token_id"}


class _BufferLayer(StaticLayer):
    """One layer's K and V buffers (B, H, L, D), written at `offset` + 0..T-1 in place."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, offset: torch.Tensor):
        super().__init__(max_cache_len=keys.shape[2])
        self.keys, self.values = keys, values
        self.dtype, self.device = keys.dtype, keys.device
        self.cumulative_length = offset  # the query offset the causal mask is built from
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        at = torch.arange(key_states.shape[-2], device=key_states.device) + self.cumulative_length
        self.keys.index_copy_(2, at, key_states)
        self.values.index_copy_(2, at, value_states)
        return self.keys, self.values


class BufferCache(Cache):
    """A transformers cache over caller-owned buffers [K0, V0, K1, V1, ...], written at `offset`."""

    def __init__(self, buffers: list[torch.Tensor], offset: torch.Tensor):
        super().__init__(layers=[_BufferLayer(buffers[2 * i], buffers[2 * i + 1], offset)
                                 for i in range(len(buffers) // 2)])


class StaticLM(nn.Module):
    """A decoder-only LLM over static KV buffers. One forward serves the prefill (T = prompt
    length) and a decode step (T = 1):

    inputs_embeds (B, T, W), attention_mask (B, L) int64, position_ids (B, T), write_at () int64:
    where the T new positions start, token_bias (1, V) float32: added to the logits before the
    greedy choice (-inf on EOS while `min_new_tokens` is not reached), kv: 2 x layers buffers
    (B, H, L, D), updated in place.
    Returns the last position's logits (B, V), the greedy choice (B,) and the buffers.
    """

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, inputs_embeds, attention_mask, position_ids, write_at, token_bias, *kv):
        out = self.lm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                      past_key_values=BufferCache(list(kv), write_at), use_cache=True)
        logits = out.logits[:, -1]
        return (logits, (logits.float() + token_bias).argmax(-1), *kv)


@dataclass(frozen=True)
class Sampling:
    """transformers' sampling warpers, in its order: temperature, then top-k, then top-p."""

    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None

    def filtered(self, scores: torch.Tensor) -> torch.Tensor:
        """(B, V) float32 scores -> the same with the filtered-out tokens at -inf."""
        if self.temperature is not None and self.temperature != 1.0:
            scores = scores / self.temperature
        if self.top_k:
            k = min(self.top_k, scores.shape[-1])
            kth = scores.topk(k, dim=-1).values[..., -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if self.top_p is not None and self.top_p < 1.0:
            ascending, order = scores.sort(dim=-1)
            drop = ascending.softmax(-1).cumsum(-1) <= 1 - self.top_p
            drop[..., -1] = False  # the most likely token always stays
            scores = scores.masked_fill(drop.scatter(1, order, drop), float("-inf"))
        return scores


def choose(logits: torch.Tensor, bias: torch.Tensor, sampling: Sampling | None) -> torch.Tensor:
    """The next token per row (B,), on the device: greedy, or a draw from the filtered softmax."""
    scores = logits.float() + bias
    if sampling is None:
        return scores.argmax(-1)
    probs = sampling.filtered(scores).softmax(-1)
    return torch.multinomial(probs, 1).squeeze(1)


@dataclass
class _Request:
    """One generate call's settings, checked."""

    max_new: int
    min_new: int
    eos: list[int]
    pad: int
    sampling: Sampling | None


def _unsupported(gen: dict) -> list[str]:
    return sorted(k for k, v in gen.items() if k not in STATIC_ARGS and v is not None)


def supports(gen: dict) -> bool:
    """Whether the static path can honour generate()'s keyword arguments (no beams, no processors)."""
    return not _unsupported(gen) and gen.get("num_beams", 1) == 1


def request_from(gen: dict, lm: nn.Module, pad: int) -> _Request:
    """generate()'s keyword arguments -> the static path's settings; InputError for what it
    cannot honour (beam search, logits processors, ...), naming the argument."""
    unsupported = _unsupported(gen)
    if not supports(gen):
        what = unsupported or [f"num_beams={gen['num_beams']}"]
        raise InputError(f"static_cache decodes greedily or by sampling (temperature, top_k, top_p); "
                         f"{', '.join(what)} needs static_cache=False")
    cfg = lm.generation_config
    eos = gen.get("eos_token_id", cfg.eos_token_id)
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    sampling = None
    if gen.get("do_sample", False):
        sampling = Sampling(*(gen.get(k, getattr(cfg, k, None)) for k in ("temperature", "top_k", "top_p")))
    max_new = int(gen["max_new_tokens"])
    return _Request(max_new, min(int(gen.get("min_new_tokens") or 0), max_new), eos,
                    gen.get("pad_token_id") if gen.get("pad_token_id") is not None else pad, sampling)


class StaticDecoder:
    """The static-cache decoding of one decoder-only LLM. It keeps its KV buffers (one set per
    batch size, length, dtype and device: fixed addresses, as CUDA graphs need) and its compiled
    steps between calls."""

    def __init__(self, lm: nn.Module):
        if lm.config.is_encoder_decoder:
            raise InputError("static_cache is for decoder-only LLMs; T5 decodes through transformers' generate")
        self.lm = lm
        self.model = StaticLM(lm)
        self._buffers: dict[tuple, list[torch.Tensor]] = {}
        self._steps: dict[tuple, object] = {}

    def buffers(self, batch: int, length: int, dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
        key = (batch, length, dtype, device)
        if key not in self._buffers:
            cfg = self.lm.config
            heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
            head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
            shape = (batch, heads, length, head_dim)
            self._buffers[key] = [torch.zeros(shape, dtype=dtype, device=device)
                                  for _ in range(2 * cfg.num_hidden_layers)]
            for t in self._buffers[key]:
                torch._dynamo.mark_static_address(t)
        return self._buffers[key]

    def step_function(self, sampling: Sampling | None, eos: tuple[int, ...], pad: int, compiled: bool, device: torch.device):
        """tokens (B,), unfinished (B,) bool, write_at (), first_position (B, 1), bias (1, V),
        mask (B, L), kv -> the next tokens (B,) and unfinished (B,)."""
        key = (sampling, eos, pad, compiled, device.type)
        if key not in self._steps:
            table = self.lm.get_input_embeddings()
            model = self.model
            eos_ids = torch.tensor(eos, dtype=torch.long, device=device)

            def step(tokens, unfinished, write_at, first_position, bias, mask, *kv):
                logits = model(table(tokens[:, None]), mask, first_position + write_at, write_at, bias, *kv)[0]
                nxt = torch.where(unfinished, choose(logits, bias, sampling), pad)
                return nxt, unfinished & ~torch.isin(nxt, eos_ids)

            if compiled:
                mode = "reduce-overhead" if device.type == "cuda" else None
                step = torch.compile(step, mode=mode, fullgraph=True, dynamic=False)
            self._steps[key] = step
        return self._steps[key]

    def prefill_function(self, graphed: bool):
        """embeds (B, P, W), mask (B, L), positions (B, P), write_at (), bias (1, V), kv -> the logits
        of the prompt's last position (B, V). graphed: compiled in reduce-overhead mode (a CUDA
        graph per prompt shape; Blip2's cuda_graphs)."""
        key = ("prefill", graphed)
        if key not in self._steps:
            model = self.model

            def prefill(embeds, mask, position, write_at, bias, *kv):
                return model(embeds, mask, position, write_at, bias, *kv)[0]

            if graphed:
                prefill = torch.compile(prefill, mode="reduce-overhead", fullgraph=True, dynamic=False)
            self._steps[key] = prefill
        return self._steps[key]

    @torch.no_grad()
    def generate(self, embeds: torch.Tensor, mask: torch.Tensor, request: _Request, compiled: bool,
                 graph_prefill: bool = False) -> torch.Tensor:
        """embeds (B, P, W) and mask (B, P), left-padded -> the new tokens (B, T), T <= max_new,
        finished rows padded, cut where every row has finished (as transformers' generate).
        graph_prefill: the prefill replays a CUDA graph too (CUDA only)."""
        b, p, _ = embeds.shape
        device = embeds.device
        if request.max_new < 1:
            return torch.zeros(b, 0, dtype=torch.long, device=device)
        length = static_cache_length(p, request.max_new)
        kv = self.buffers(b, length, embeds.dtype, device)
        mask = mask.to(device=device, dtype=torch.long)
        full = torch.cat([mask, torch.ones(b, length - p, dtype=torch.long, device=device)], dim=1)  # (B, L)
        position = PromptLayout.positions(mask)  # transformers' positions under left padding
        vocab = self.lm.get_output_embeddings().weight.shape[0]
        free = torch.zeros(1, vocab, device=device)
        blocked = free.clone()
        blocked[:, request.eos] = float("-inf")
        eos = tuple(request.eos)
        eos_ids = torch.tensor(eos, dtype=torch.long, device=device)
        # the prefill: the prompt's K/V at 0..P-1, and the first token
        graph_prefill = graph_prefill and device.type == "cuda"
        if graph_prefill:
            torch.compiler.cudagraph_mark_step_begin()
        logits = self.prefill_function(graph_prefill)(embeds, full, position,
                                                      torch.zeros((), dtype=torch.long, device=device), free, *kv)
        if graph_prefill:
            logits = logits.clone()  # the graph's output is overwritten by its next replay
        tokens = choose(logits, blocked if request.min_new > 0 else free, request.sampling)
        unfinished = ~torch.isin(tokens, eos_ids)
        out = [tokens]
        first = position[:, -1:] + 1 - p  # position of the token written at P + t: first + P + t
        write_at = torch.arange(p, p + request.max_new, device=device)
        step = self.step_function(request.sampling, eos, request.pad, compiled, device)
        for t in range(1, request.max_new):
            if t % SYNC_EVERY == 0 and not bool(unfinished.any()):
                break
            if compiled and device.type == "cuda":
                torch.compiler.cudagraph_mark_step_begin()
            tokens, unfinished = step(tokens, unfinished, write_at[t - 1], first, blocked if t < request.min_new
                                      else free, full, *kv)
            tokens, unfinished = tokens.clone(), unfinished.clone()  # a CUDA graph reuses its outputs
            out.append(tokens)
        ids = torch.stack(out, dim=1)  # (B, steps)
        # transformers stops at the first step after which every row has finished
        done = torch.isin(ids, eos_ids).cumsum(1) > 0  # (B, steps): finished after step t
        all_done = done.all(0).nonzero()
        return ids[:, :int(all_done[0]) + 1] if len(all_done) else ids
