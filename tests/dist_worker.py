"""Runs the stage-1 objective on one rank of a gloo group (spawned by test_distributed.py)."""

import os
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

CAPTIONS = ["a red circle", "a big square", "two grey dot", "a black line"]  # 12 characters each: equal ITG token counts
NEG_IMAGE = torch.tensor([2, 3, 0, 1])  # global indices, fixed for every run
NEG_TEXT = torch.tensor([1, 0, 3, 2])


def join_group(rank: int, world: int, port: int, out: str) -> None:
    """Joins a gloo group over loopback, leaving a note of how far this rank got beside `out`.

    GLOO_SOCKET_IFNAME=lo keeps gloo off the machine's hostname, whose address may not route.
    """
    mark(rank, out, "joining")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    mark(rank, out, "joined")


def mark(rank: int, out: str, stage: str) -> None:
    Path(out).with_name(f"rank{rank}.stage").write_text(stage)


def build():
    import blip2rt
    from blip2rt.training.stage1 import Stage1Objective
    from blip2rt.training.trainer import set_trainable

    torch.manual_seed(0)
    m = blip2rt.from_pretrained("tiny", device="cpu", kernels="torch")
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" not in name.lower():
                p.add_(0.05 * torch.randn_like(p))
    set_trainable(m, 1)
    m.eval()  # no dropout: the two runs must see the same function
    tok = m.qformer_tokenizer
    enc = tok(CAPTIONS, padding="max_length", max_length=16, return_tensors="pt")
    pixels = torch.randn(len(CAPTIONS), 3, 56, 56, generator=torch.Generator().manual_seed(1))
    return m, Stage1Objective(m, tok.convert_tokens_to_ids("[DEC]"), tok.pad_token_id), enc, pixels


def run_rank(rank: int, world: int, port: int, out: str) -> None:
    from blip2rt.training.stage1 import Stage1Batch

    join_group(rank, world, port, out)
    m, objective, enc, pixels = build()
    ddp = torch.nn.parallel.DistributedDataParallel(objective)
    b = len(CAPTIONS) // world
    mine = slice(rank * b, (rank + 1) * b)
    batch = Stage1Batch(enc["input_ids"][mine], enc["attention_mask"][mine], pixel_values=pixels[mine])
    losses = ddp(batch, negatives=(NEG_IMAGE[mine], NEG_TEXT[mine]))
    losses["loss"].backward()  # DDP averages the grads over the ranks
    summary = torch.stack([losses[k].detach() for k in ("itc", "itm", "itg")])
    dist.all_reduce(summary)
    if rank == 0:
        grads = {n: p.grad for n, p in m.named_parameters() if p.requires_grad}
        torch.save({"losses": summary / world, "grads": grads}, out)
    mark(rank, out, "done")
    dist.destroy_process_group()


def run_single() -> dict:
    from blip2rt.training.stage1 import Stage1Batch

    m, objective, enc, pixels = build()
    losses = objective(Stage1Batch(enc["input_ids"], enc["attention_mask"], pixel_values=pixels),
                       negatives=(NEG_IMAGE, NEG_TEXT))
    losses["loss"].backward()
    return {"losses": torch.stack([losses[k].detach() for k in ("itc", "itm", "itg")]),
            "grads": {n: p.grad for n, p in m.named_parameters() if p.requires_grad}}


def stage2_inputs():
    import blip2rt
    from blip2rt.training.stage2 import Stage2Objective
    from blip2rt.training.trainer import set_trainable

    torch.manual_seed(0)
    m = blip2rt.from_pretrained("tiny", device="cpu", kernels="torch")
    set_trainable(m, 2)
    m.eval()
    enc = m.tokenizer(CAPTIONS, return_tensors="pt")  # equal lengths: no padding
    pixels = torch.randn(len(CAPTIONS), 3, 56, 56, generator=torch.Generator().manual_seed(1))
    return m, Stage2Objective(m), enc, pixels


def run_rank_fsdp(rank: int, world: int, port: int, out: str) -> None:
    """Stage 2 with the frozen LLM's layers sharded (FSDP2), the trainable part under DDP."""
    from blip2rt.training import distributed as D
    from blip2rt.training.stage2 import Stage2Batch

    join_group(rank, world, port, out)
    m, objective, enc, pixels = stage2_inputs()
    assert D.shard_llm_layers(m.language_model) == 2
    frozen = [n for n, _ in objective.named_parameters() if n.startswith("model.language_model.")]
    torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(objective, frozen)
    ddp = torch.nn.parallel.DistributedDataParallel(objective)
    b = len(CAPTIONS) // world
    mine = slice(rank * b, (rank + 1) * b)
    ids = enc["input_ids"][mine]
    out_ = ddp(Stage2Batch(ids, enc["attention_mask"][mine], ids, pixel_values=pixels[mine]))
    out_["loss"].backward()
    loss = out_["loss"].detach().clone()
    dist.all_reduce(loss)
    if rank == 0:
        torch.save({"loss": loss / world, "grads": {n: p.grad for n, p in m.named_parameters() if p.requires_grad}}, out)
    mark(rank, out, "done")
    dist.destroy_process_group()


def run_single_stage2() -> dict:
    from blip2rt.training.stage2 import Stage2Batch

    m, objective, enc, pixels = stage2_inputs()
    ids = enc["input_ids"]
    out = objective(Stage2Batch(ids, enc["attention_mask"], ids, pixel_values=pixels))
    out["loss"].backward()
    return {"loss": out["loss"].detach(), "grads": {n: p.grad for n, p in m.named_parameters() if p.requires_grad}}
