"""Runs the stage-1 objective on one rank of a gloo group (spawned by test_distributed.py)."""

import faulthandler
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


def leave_group(rank: int, out: str) -> None:
    """Both ranks pass a barrier before either tears the group down (rank 0 hosts the store the other
    rank's teardown still talks to), then mark "done". Should the teardown itself hang, every thread's
    stack goes to rank{r}.stack after 20 s, for the test to show."""
    dist.barrier()
    mark(rank, out, "done")
    stack = open(Path(out).with_name(f"rank{rank}.stack"), "w")
    faulthandler.dump_traceback_later(20, file=stack)
    dist.destroy_process_group()


def mark(rank: int, out: str, stage: str) -> None:
    Path(out).with_name(f"rank{rank}.stage").write_text(stage)


def fail_at(stage: str, rank: int, world: int, port: int, out: str) -> None:
    """A rank that gets as far as `stage` (without a group: only its notes) and then raises."""
    for reached in ("joining", "joined", "done"):
        mark(rank, out, reached)
        if reached == stage:
            break
    raise RuntimeError(f"rank {rank} failed after {stage!r}")


def build(backend: str = "torch"):
    import blip2rt
    from blip2rt.training.stage1 import Stage1Objective
    from blip2rt.training.trainer import set_trainable

    torch.manual_seed(0)
    m = blip2rt.from_pretrained("tiny", device="cpu", kernels=backend)
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


def run_rank(rank: int, world: int, port: int, out: str, backend: str = "torch") -> None:
    from blip2rt.training.stage1 import Stage1Batch

    join_group(rank, world, port, out)
    m, objective, enc, pixels = build(backend)
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
    leave_group(rank, out)


def run_single(backend: str = "torch") -> dict:
    """One process with the whole batch, its ITC "gather" a copy without gradient, as a real
    all-gather's is: the distributed gradient (one process alone keeps the full one, as LAVIS)."""
    from blip2rt.training import distributed as D
    from blip2rt.training.stage1 import Stage1Batch

    m, objective, enc, pixels = build(backend)
    real = D.gather_no_grad
    D.gather_no_grad = lambda x, sizes=None: x.detach().clone()
    try:
        losses = objective(Stage1Batch(enc["input_ids"], enc["attention_mask"], pixel_values=pixels),
                           negatives=(NEG_IMAGE, NEG_TEXT))
    finally:
        D.gather_no_grad = real
    losses["loss"].backward()
    return {"losses": torch.stack([losses[k].detach() for k in ("itc", "itm", "itg")]),
            "grads": {n: p.grad for n, p in m.named_parameters() if p.requires_grad}}


IMAGE_IDS = torch.tensor([0, 1, 2, 0])  # the last caption is of the first image (on the other rank)
UNEQUAL = [3, 1]  # samples per rank
DRAWS = 2000


def negatives_of(objective, batch, rank: int) -> dict:
    """The real objective's forward, with the sampler's inputs captured; then DRAWS draws of the real
    sampler on them, counted per row and column."""
    from blip2rt.training import stage1

    captured = {}
    real = stage1.sample_hard_negatives

    def spy(sim_i2t, sim_t2i, positives, generator=None):
        captured.update(sim_i2t=sim_i2t.detach().clone(), sim_t2i=sim_t2i.detach().clone(), positives=positives.clone())
        return real(sim_i2t, sim_t2i, positives, generator)

    stage1.sample_hard_negatives = spy
    try:
        with torch.no_grad():
            objective(batch)
    finally:
        stage1.sample_hard_negatives = real
    b, width = captured["positives"].shape
    g = torch.Generator().manual_seed(rank)
    captured["counts_img"], captured["counts_txt"] = torch.zeros(b, width), torch.zeros(b, width)
    for _ in range(DRAWS):
        neg_img, neg_txt = real(captured["sim_i2t"], captured["sim_t2i"], captured["positives"], generator=g)
        captured["counts_img"][torch.arange(b), neg_img] += 1
        captured["counts_txt"][torch.arange(b), neg_txt] += 1
    return captured


def negatives_batches(enc, pixels, rows: slice) -> dict:
    from blip2rt.training.stage1 import Stage1Batch

    return {name: Stage1Batch(enc["input_ids"][rows], enc["attention_mask"][rows], pixel_values=pixels[rows],
                              image_ids=ids) for name, ids in (("own pairs", None), ("image ids", IMAGE_IDS[rows]))}


def run_rank_negatives(rank: int, world: int, port: int, out: str) -> None:
    """Unequal shards (3 and 1 samples): the positives mask and the hard negatives the real objective
    draws on each rank, with and without image ids."""
    join_group(rank, world, port, out)
    _, objective, enc, pixels = build()
    start = sum(UNEQUAL[:rank])
    batches = negatives_batches(enc, pixels, slice(start, start + UNEQUAL[rank]))
    torch.save({name: negatives_of(objective, batch, rank) for name, batch in batches.items()},
               Path(out).with_name(f"negatives{rank}.pt"))
    leave_group(rank, out)


def run_single_negatives() -> dict:
    _, objective, enc, pixels = build()
    return {name: negatives_of(objective, batch, 0)
            for name, batch in negatives_batches(enc, pixels, slice(0, len(CAPTIONS))).items()}


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
    leave_group(rank, out)


def run_single_stage2() -> dict:
    from blip2rt.training.stage2 import Stage2Batch

    m, objective, enc, pixels = stage2_inputs()
    ids = enc["input_ids"]
    out = objective(Stage2Batch(ids, enc["attention_mask"], ids, pixel_values=pixels))
    out["loss"].backward()
    return {"loss": out["loss"].detach(), "grads": {n: p.grad for n, p in m.named_parameters() if p.requires_grad}}
