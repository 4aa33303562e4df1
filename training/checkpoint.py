"""Trainer checkpoints: written atomically, loaded without unpickling code.

A checkpoint is a folder `checkpoints/step_00000100/` holding
- `trainable.safetensors`: the trainable weights only (ln_vision, Q-Former, queries, heads,
  projection), in blip2rt / Hugging Face names, so `blip2rt.from_pretrained(..., config=...)`
  and stage-2 initialisation read it directly;
- `state.pt`: optimiser, scheduler, grad scaler, step, data position and RNG states, plain
  tensors and containers only (read back with `torch.load(weights_only=True)`).
It is written to `step_....tmp/`, flushed to disk, then renamed; `checkpoints/latest` names the
newest complete one and is replaced the same way. A kill at any moment leaves the previous
checkpoint intact.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from blip2rt.checkpoint import checkpoint_stage, load_weights, read_tensor_file, stage_metadata
from blip2rt.parts import QUESTION_IN_QFORMER
from blip2rt.errors import CheckpointError
from blip2rt.kernels import dropout_rng

LATEST = "latest"


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    state["dropout"] = dropout_rng.state_dict()  # the fused kernels' seeds, kept on the device
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    dropout_rng.load_state_dict(state.get("dropout", {}))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass  # not every filesystem lets a directory be opened


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def save_checkpoint(out_dir: str | Path, step: int, model: torch.nn.Module, state: dict, keep: int = 2,
                    stage: int | None = None) -> Path:
    """stage: the training stage that wrote it (blip2rt.parts), recorded in the weights' safetensors
    metadata, so that loading them knows what they hold and sets the model's config to match (a
    VQA checkpoint's soft prompt takes the question)."""
    root = Path(out_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f"step_{step:08d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    meta = stage_metadata(stage) if stage is not None else None
    save_file(trainable_state(model), str(tmp / "trainable.safetensors"), metadata=meta)
    torch.save(state, tmp / "state.pt")
    if os.environ.get("BLIP2RT_TEST_SLOW_CHECKPOINT"):  # tests kill the process here, mid-write
        import time

        time.sleep(float(os.environ["BLIP2RT_TEST_SLOW_CHECKPOINT"]))
    for f in tmp.iterdir():
        _fsync_file(f)
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    pointer = root / (LATEST + ".tmp")
    pointer.write_text(final.name)
    _fsync_file(pointer)
    os.replace(pointer, root / LATEST)
    _fsync_dir(root)
    complete = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in complete[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def complete_checkpoints(out_dir: str | Path) -> list[Path]:
    """The complete checkpoints, newest first (the one `latest` names leads). Half-written `*.tmp`
    folders are removed."""
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return []
    for stale in root.glob("*.tmp"):
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    complete = sorted((p for p in root.glob("step_*") if (p / "state.pt").is_file()
                       and (p / "trainable.safetensors").is_file()), reverse=True)
    pointer = root / LATEST
    named = root / pointer.read_text().strip() if pointer.is_file() else None
    return sorted(complete, key=lambda p: p != named)  # stable: the named one first, then newest first


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    complete = complete_checkpoints(out_dir)
    return complete[0] if complete else None


def load_checkpoint(path: str | Path, model: torch.nn.Module) -> dict:
    """Loads the trainable weights into `model` and returns the trainer state. The state is read
    first: a checkpoint that fails leaves the model as it was."""
    path = Path(path)
    try:
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors of many kinds; the reason is in the message
        raise CheckpointError(f"{path / 'state.pt'} could not be read as a trainer state ({e})") from None
    frozen = tuple(n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad)  # not saved
    load_weights(model, read_tensor_file(path / "trainable.safetensors"), str(path), allow_missing_prefixes=frozen)
    if checkpoint_stage(path / "trainable.safetensors") in QUESTION_IN_QFORMER:
        model.config.question_in_qformer = True
    return state
