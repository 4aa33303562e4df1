"""What `blip2rt serve PATH` serves, behind one face for the app: an export folder run by ONNX
Runtime (torch-free), or a model (a folder, a LAVIS file with a config, a preset) run by PyTorch."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from blip2rt.front_end import PromptLayout, TextInputs
from blip2rt.images import pixel_array

from .engine import Engine, InflightEngine, SequentialEngine
from .metrics import Metrics
from .settings import ServerSettings

log = logging.getLogger("blip2rt.server")


@dataclass
class ServedModel:
    name: str
    backend: str  # "onnxruntime" or "pytorch"
    runtime: object  # OrtBlip2 or Blip2
    layout: PromptLayout
    num_query_tokens: int
    image_size: int
    image_mean: list[float]
    image_std: list[float]
    tokenizer: object  # .decode(ids, skip_special_tokens=True)
    providers: list[str]

    def text_inputs(self, *args) -> TextInputs:
        return self.runtime.text_inputs(*args)

    def pixels(self, images) -> np.ndarray:
        return pixel_array(images, self.image_size, self.image_mean, self.image_std)

    def prompt_positions(self, text: TextInputs) -> int:
        return self.layout.full_mask(self.num_query_tokens, text.attention_mask).shape[1]


def is_export(path: Path) -> bool:
    from blip2rt.export.export_config import CONFIG_FILE

    return (path / CONFIG_FILE).is_file()


def load(path: str, settings: ServerSettings, provider: str | None = None, config: str | None = None,
         device: str | None = None, dtype: str | None = None) -> tuple[ServedModel, Engine, Metrics]:
    """The model at `path` and the engine that serves it."""
    metrics = Metrics()
    p = Path(path)
    if p.is_dir() and is_export(p):
        from blip2rt.export import OrtBlip2

        providers = None if provider is None else [f"{provider.upper()}ExecutionProvider"]
        if provider == "cpu":
            providers = ["CPUExecutionProvider"]
        elif provider == "cuda":
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        rt = OrtBlip2(p, providers=providers, static_cache=True)
        c = rt.cfg
        if c.max_positions is not None and settings.context > c.max_positions:
            log.info("--context %d is more than the LLM's %d positions: using %d", settings.context, c.max_positions,
                     c.max_positions)
            settings.context = c.max_positions
        served = ServedModel(settings.model_name or p.resolve().name, "onnxruntime", rt, rt.layout, c.num_query_tokens,
                             c.image_size, c.image_mean, c.image_std, rt.tokenizer, list(rt.providers))
        inflight = (not rt.graphs.on_cuda and "static_lm" in c.graphs and not c.encoder_decoder)
        if inflight:
            engine = InflightEngine(rt, settings, metrics)
        else:
            log.warning("serving one request at a time: in-flight batching needs the CPU provider and a "
                        "decoder-only export with its static graph")
            engine = SequentialEngine(rt, settings, metrics, set(c.eos_ids))
        return served, engine, metrics
    import blip2rt
    from blip2rt.llm import position_limit

    model = blip2rt.from_pretrained(path, config=config, device=device, dtype=dtype)
    model.eval()
    lm = model.language_model
    eos = getattr(lm.generation_config, "eos_token_id", None) or lm.config.eos_token_id
    eos = {eos} if isinstance(eos, int) else set(eos or [])
    limit = position_limit(lm.config)
    if limit is not None:
        settings.context = min(settings.context, limit)
    vc = model.config.vision_config
    served = ServedModel(settings.model_name or p.name or str(path), "pytorch", model, model.prompt_layout,
                         model.config.num_query_tokens, vc.image_size, vc.image_mean, vc.image_std,
                         model._need_tokenizer(), [str(model.device)])
    return served, SequentialEngine(model, settings, metrics, eos, torch_model=True), metrics
