"""`blip2rt demo`: BLIP-2 trained and run end to end on the embedded default, on a CPU.

blip2-mini (DINOv2-S/14 frozen, a MiniLM-initialised Q-Former, SmolLM2-135M frozen) learns
easy-vqa's captions ("a {color} {shape}"):
1. the frozen ViT features of the training images are cached;
2. stage 1 (ITC + ITM + ITG), then image->text retrieval among the distinct test captions;
3. stage 2 through the frozen LLM, then captions of the test images (colour and shape scored
   apart) and zero-shot VQA on their questions, next to the majority-answer baseline;
4. export to ONNX; ONNX Runtime captions test images (compared with PyTorch's) and real photos;
5. caption latency at batch 1: eager PyTorch, the fused Triton path (GPU only), ONNX Runtime.

Everything goes under one folder. A rerun resumes: training continues from its last checkpoint
and the phases already finished (recorded in `demo_state.json`) are not redone.
"""

from __future__ import annotations

import json
import os
import platform
import random
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from blip2rt.errors import Blip2rtError

from . import assets
from .easy_vqa import COLORS, SHAPES, EasyVqaImage, load_split, annotation_rows, majority_answer, write_annotations

# Real photos shipped in scikit-image's wheel (skimage/data), with captions written by hand.
PHOTOS = {
    "astronaut.png": "an astronaut in a white spacesuit in front of an american flag",
    "chelsea.png": "a tabby cat looking to the side",
    "coffee.png": "a cup of coffee on a saucer",
    "rocket.jpg": "a rocket standing on its launch pad",
    "camera.png": "a man with a camera on a tripod, in black and white",
    "horse.png": "the black silhouette of a horse",
}
CAPTION_GEN = dict(num_beams=1, max_new_tokens=8, min_new_tokens=1)  # captions are 3-4 tokens and EOS
VQA_GEN = dict(num_beams=1, max_new_tokens=4, min_new_tokens=1)
VQA_PROMPTS = ("Question: {} Answer:", "Question: {} Short answer:")  # the paper's OPT and FlanT5 prompts


@dataclass(frozen=True)
class DemoPlan:
    train_images: int
    test_images: int
    stage1_steps: int
    stage1_batch: int
    stage2_steps: int
    stage2_batch: int
    vqa_questions: int
    # Higher than the paper's 1e-4 (tuned for 250k steps): this run has a few hundred, and the
    # cross-attention (stage 1) and the LLM projection (stage 2) start from random. In stage 2
    # the Q-Former arrives trained, so it keeps a gentle 3e-4 while the fresh projection gets
    # 1e-2: with 3e-3 for both, no caption depended on the image; with 3e-4 / 1e-2 (and the BOS
    # before the soft prompt, see Blip2Config) 250 steps of 12 gave 97% colour-and-shape.
    stage1_lr: float = 5e-4
    stage2_lr: float = 3e-4
    stage2_projection_lr: float = 1e-2
    max_text_len: int = 8  # the longest caption is 7 WordPieces ("teal" is "tea ##l"); stage 1 pads to this
    rerank_k: int = 4  # ITM re-ranks each image's 4 best captions by ITC (the paper: 128 of 25k texts)
    ort_compare_images: int = 16
    latency_repeats: int = 5


FULL = DemoPlan(train_images=1600, test_images=1000, stage1_steps=140, stage1_batch=32, stage2_steps=250,
                stage2_batch=12, vqa_questions=250)
QUICK = DemoPlan(train_images=480, test_images=200, stage1_steps=60, stage1_batch=24, stage2_steps=120,
                 stage2_batch=12, vqa_questions=120, ort_compare_images=8, latency_repeats=3)


class _State:
    """demo_state.json: each finished phase's results, written atomically after it."""

    def __init__(self, path: Path, plan: DemoPlan):
        self.path = path
        self.data = json.loads(path.read_text()) if path.is_file() else {}
        if self.data.get("plan") not in (None, asdict(plan)):
            raise Blip2rtError(f"{path.parent} holds a demo run with another plan (--quick or not); use another "
                               "--out, or --fresh to start over")
        self.data["plan"] = asdict(plan)

    def get(self, key: str):
        return self.data.get(key)

    def put(self, key: str, value) -> None:
        self.data[key] = value
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        tmp.replace(self.path)


def _say(msg: str) -> None:
    print(msg, flush=True)


def caption_parts(caption: str) -> tuple[str | None, str | None]:
    """The first colour word and the first shape word of a generated caption (None if absent)."""
    words = caption.lower().replace(".", " ").split()
    color = next((w for w in words if w in COLORS), None)
    shape = next((w for w in words if w in SHAPES), None)
    return color, shape


def caption_accuracy(images: list[EasyVqaImage], captions: list[str]) -> dict[str, float]:
    parts = [caption_parts(c) for c in captions]
    n = len(images)
    color = sum(p[0] == im.color for im, p in zip(images, parts)) / n
    shape = sum(p[1] == im.shape for im, p in zip(images, parts)) / n
    both = sum(p == (im.color, im.shape) for im, p in zip(images, parts)) / n
    exact = sum(c.strip().lower() == im.caption for im, c in zip(images, captions)) / n
    return {"color": color, "shape": shape, "both": both, "exact": exact}


def _vqa_sample(images: list[EasyVqaImage], n: int, seed: int = 0) -> list[dict]:
    pairs = [{"image": str(im.image), "question": q, "answer": a} for im in images for q, a in im.qa]
    random.Random(seed).shuffle(pairs)
    return pairs[:n]


def _timed(fn, repeats: int) -> float:
    """Median wall time of `fn` in ms, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def run_demo(out_dir: str | Path, quick: bool = False, device: str | None = None, show_progress: bool = True,
             plan: DemoPlan | None = None) -> dict:
    """Runs the whole demo (resuming what `out_dir` already holds); returns the report dict,
    also written to out_dir/report.json and, as text, out_dir/report.txt."""
    from blip2rt.training import evaluate
    from blip2rt.training.config import TrainConfig
    from blip2rt.training.trainer import Trainer

    plan = plan or (QUICK if quick else FULL)
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    state = _State(out / "demo_state.json", plan)
    t_start = time.perf_counter()
    times: dict[str, float] = dict(state.get("times") or {})

    def finish(phase: str, t0: float) -> None:
        times[phase] = round(times.get(phase, 0.0) + time.perf_counter() - t0, 1)
        state.put("times", times)

    # ---- data ---------------------------------------------------------------------------
    t0 = time.perf_counter()
    photos = {name: assets.skimage_photo(name) for name in PHOTOS}  # fail early if an asset is missing
    train = load_split("train")[: plan.train_images]
    test = load_split("test")[: plan.test_images]
    # image_id groups positives: 24 captions over thousands of images, so two images with the same
    # caption are positives of each other for ITC, and never drawn as each other's ITM negative
    train_json = write_annotations(train, out / "data" / "train.json", group_by_caption=True)
    test_records = annotation_rows(test)
    vqa_records = _vqa_sample(test, plan.vqa_questions)
    majority, _ = majority_answer(train)  # the baseline answers what was most common in training
    baseline = sum(r["answer"] == majority for r in vqa_records) / len(vqa_records)
    _say(f"data: easy-vqa, {len(train)} train / {len(test)} test images, captions \"a {{color}} {{shape}}\" "
         f"({len({im.caption for im in test})} distinct in the test images)")

    amp = training_amp(device)
    _say(f"training precision: {'bf16 autocast' if amp == 'bf16' else 'fp32'}"
         + ("" if amp == "bf16" else " (this CPU has no native bf16)"))

    def stage_config(stage: int, steps: int, batch: int, lr: float, projection_lr: float | None = None) -> TrainConfig:
        return TrainConfig(stage=stage, out_dir=str(out / f"stage{stage}"), batch_size=batch, max_steps=steps,
                           warmup_steps=max(1, steps // 10), lr=lr, min_lr=lr / 10, projection_lr=projection_lr,
                           save_every=max(1, steps // 2),
                           model="blip2-mini", annotations=[str(train_json)], image_root="/", augment=False,
                           cache_features=True, feature_cache=str(out / "feature_cache"),
                           max_text_len=plan.max_text_len, weight_decay=0.05, num_workers=0, log_every=5,
                           keep_checkpoints=1, kernels="auto", amp=amp)
    finish("data", t0)

    # ---- stage 1 ------------------------------------------------------------------------
    t0 = time.perf_counter()
    cfg1 = stage_config(1, plan.stage1_steps, plan.stage1_batch, plan.stage1_lr)
    _say(f"stage 1: loading blip2-mini and caching the frozen ViT features -> {cfg1.feature_cache}")
    t1 = Trainer(cfg1, show_progress=show_progress, model=_load_model(device))
    model = t1.model
    finish("load + feature cache", t0)
    t0 = time.perf_counter()
    _say(f"stage 1: ITC + ITM + ITG, {plan.stage1_steps} steps of {plan.stage1_batch}")
    last1 = t1.run() or state.get("stage1_last") or {}
    state.put("stage1_last", last1)
    del t1  # its optimizer state
    model.eval()
    finish("stage 1", t0)

    t0 = time.perf_counter()
    retrieval = state.get("retrieval")
    if retrieval is None:
        retrieval = evaluate.retrieval(model, test_records, "/", k=plan.rerank_k, show_progress=show_progress)
        state.put("retrieval", retrieval)
    _say(f"retrieval: image->text R@1 {retrieval['i2t_r1']:.1%} among {retrieval['texts']} captions "
         f"(chance {1 / retrieval['texts']:.1%})")
    finish("retrieval eval", t0)

    # ---- stage 2 ------------------------------------------------------------------------
    t0 = time.perf_counter()
    cfg2 = stage_config(2, plan.stage2_steps, plan.stage2_batch, plan.stage2_lr, plan.stage2_projection_lr)
    _say(f"stage 2: generative, through the frozen SmolLM2, {plan.stage2_steps} steps of {plan.stage2_batch}")
    t2 = Trainer(cfg2, show_progress=show_progress, model=model)
    last2 = t2.run() or state.get("stage2_last") or {}
    state.put("stage2_last", last2)
    del t2
    model.eval()
    finish("stage 2", t0)

    t0 = time.perf_counter()
    captions = state.get("captions")
    if captions is None:
        result = evaluate.captioning(model, test_records, "/", batch_size=32, show_progress=show_progress,
                                     **CAPTION_GEN)
        captions = [result["captions"][r["image"]] for r in test_records]
        state.put("captions", captions)
    cap_acc = caption_accuracy(test, captions)
    _say(f"captions: colour {cap_acc['color']:.1%}, shape {cap_acc['shape']:.1%}, both {cap_acc['both']:.1%}")
    finish("caption eval", t0)

    t0 = time.perf_counter()
    vqa = state.get("vqa")
    if vqa is None:
        vqa = {}
        for prompt in VQA_PROMPTS:
            r = evaluate.vqa(model, vqa_records, "/", batch_size=32, show_progress=show_progress,
                             prompt_template=prompt, **VQA_GEN)
            vqa[prompt] = {"accuracy": r["accuracy"], "answers": r["answers"][:12]}
        state.put("vqa", vqa)
    _say("vqa: " + ", ".join(f"{p!r} {v['accuracy']:.1%}" for p, v in vqa.items())
         + f"; always {majority!r} {baseline:.1%}")
    finish("vqa eval", t0)

    # ---- export and ONNX Runtime --------------------------------------------------------
    t0 = time.perf_counter()
    export_dir = out / "export"
    if state.get("export") is None:
        from blip2rt.export import export_model

        _say(f"export: ONNX graphs -> {export_dir}")
        if model.device.type != "cpu":
            raise Blip2rtError("the demo exports the CPU model; run it without --device")
        export_model(model, export_dir)
        state.put("export", str(export_dir))
    finish("export", t0)

    t0 = time.perf_counter()
    ort = state.get("ort")
    if ort is None:
        from blip2rt.export import OrtBlip2

        # PyTorch first: onnxruntime's spinning worker threads would slow torch down afterwards
        sample = test[: plan.ort_compare_images]
        torch_caps = captions[: len(sample)]
        photo_torch = model.caption([str(p) for p in photos.values()], **CAPTION_GEN)
        one = [test[0].image]
        latency = {"eager": _timed(lambda: model.caption(one, **CAPTION_GEN), plan.latency_repeats)}
        if model.device.type == "cuda":
            backend = model.kernel_backend
            model.set_kernel_backend("triton")
            latency["fused"] = _timed(lambda: model.caption(one, **CAPTION_GEN), plan.latency_repeats)
            model.set_kernel_backend(backend)
        session = OrtBlip2(export_dir, providers=_ort_providers(model))
        ort_caps = session.caption([im.image for im in sample], **CAPTION_GEN)
        photo_ort = session.caption([str(p) for p in photos.values()], **CAPTION_GEN)
        latency["ort"] = _timed(lambda: session.caption(one, **CAPTION_GEN), plan.latency_repeats)
        ort = {"equal": sum(a == b for a, b in zip(ort_caps, torch_caps)), "compared": len(sample),
               "examples": [{"image": im.image.name, "truth": im.caption, "torch": t, "ort": o}
                            for im, t, o in zip(sample, torch_caps, ort_caps)],
               "photos": [{"image": n, "truth": PHOTOS[n], "torch": t, "ort": o}
                          for n, t, o in zip(photos, photo_torch, photo_ort)],
               "latency_ms": latency, "providers": session.providers}
        state.put("ort", ort)
    finish("onnx runtime", t0)

    report = {
        "plan": "quick" if quick else "full", "out_dir": str(out), "machine": _machine(model),
        "data": {"train_images": len(train), "test_images": len(test), "distinct_captions": retrieval["texts"],
                 "vqa_questions": len(vqa_records)},
        "stage1": last1, "stage2": last2, "retrieval": retrieval,
        "captions": {**cap_acc, "examples": [{"image": im.image.name, "truth": im.caption, "generated": c}
                                            for im, c in list(zip(test, captions))[:6]]},
        "chance": {"retrieval_r1": 1 / retrieval["texts"], "color": 1 / len(COLORS), "shape": 1 / len(SHAPES),
                   "both": 1 / (len(COLORS) * len(SHAPES))},
        "vqa": {"accuracy": {p: v["accuracy"] for p, v in vqa.items()}, "majority_answer": majority,
                "majority_baseline": baseline, "examples": [
                    {**{k: r[k] for k in ("question", "answer")}, "image": Path(r["image"]).name,
                     "generated": vqa[VQA_PROMPTS[0]]["answers"][i]} for i, r in enumerate(vqa_records[:6])]},
        "ort": ort, "times_s": times, "wall_s_this_run": round(time.perf_counter() - t_start, 1),
        "paths": {"stage1": str(out / "stage1" / "checkpoints"), "stage2": str(out / "stage2" / "checkpoints"),
                  "export": str(export_dir), "feature_cache": str(out / "feature_cache")},
    }
    (out / "report.json").write_text(json.dumps(report, indent=1))
    text = format_report(report)
    (out / "report.txt").write_text(text)
    return report


def training_amp(device: str | None) -> str:
    """bf16 autocast where the hardware has it (CUDA, or a CPU with AVX512-BF16/AMX: stage 2 then
    takes 0.78 s a step instead of 1.28 s on this project's CPU); fp32 where bf16 would be emulated."""
    if device is not None and str(device).startswith("cuda"):
        return "bf16"
    return "bf16" if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported() else "none"


def _load_model(device: str | None):
    import blip2rt

    # the demo trains, evaluates and exports one model: the CPU unless a device is asked for
    return blip2rt.from_pretrained("blip2-mini", device=device or "cpu", dtype="fp32")


def _ort_providers(model) -> list[str] | None:
    return None if model.device.type == "cuda" else ["CPUExecutionProvider"]


def _machine(model) -> dict:
    import onnxruntime
    import transformers

    info = {"device": str(model.device), "torch": torch.__version__, "transformers": transformers.__version__,
            "onnxruntime": onnxruntime.__version__, "python": platform.python_version(),
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "kernels": model.kernel_backend}
    if model.device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(model.device)
    return info


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def format_report(r: dict) -> str:
    """The report as the demo prints it."""
    c, ch, ret, v, o = r["captions"], r["chance"], r["retrieval"], r["vqa"], r["ort"]
    lat = o["latency_ms"]
    fused = f"{lat['fused']:.0f} ms" if "fused" in lat else "n/a (the Triton kernels need a GPU)"
    m = r["machine"]
    lines = [
        f"blip2rt demo ({r['plan']}): blip2-mini on easy-vqa, {m['device']}, torch {m['torch']}, "
        f"{m['torch_threads']} threads",
        "",
        f"  data        {r['data']['train_images']} train / {r['data']['test_images']} test images; captions "
        f"\"a {{color}} {{shape}}\", {r['data']['distinct_captions']} distinct",
        f"  stage 1     {r['stage1'].get('step', '?')} steps: loss {r['stage1'].get('loss', float('nan')):.3f} "
        f"(itc {r['stage1'].get('itc', float('nan')):.3f}, itm {r['stage1'].get('itm', float('nan')):.3f}, "
        f"itg {r['stage1'].get('itg', float('nan')):.3f})",
        f"  retrieval   image->text R@1 {_pct(ret['i2t_r1'])} (ITC alone {_pct(ret['itc_i2t_r1'])}), "
        f"text->image R@1 {_pct(ret['t2i_r1'])}; chance {_pct(ch['retrieval_r1'])}",
        f"  stage 2     {r['stage2'].get('step', '?')} steps: LM loss {r['stage2'].get('loss', float('nan')):.3f}",
        f"  captions    colour right {_pct(c['color'])}, shape right {_pct(c['shape'])}, both {_pct(c['both'])} "
        f"(chance {_pct(ch['color'])} / {_pct(ch['shape'])} / {_pct(ch['both'])}), exact {_pct(c['exact'])}",
    ]
    for e in c["examples"][:3]:
        lines.append(f"              {e['image']}: {e['generated']!r} (truth {e['truth']!r})")
    lines.append(f"  VQA         zero-shot on {r['data']['vqa_questions']} test questions: "
                 + ", ".join(f"{p!r} {_pct(a)}" for p, a in v["accuracy"].items())
                 + f"; always answering {v['majority_answer']!r}: {_pct(v['majority_baseline'])}")
    for e in v["examples"][:3]:
        lines.append(f"              {e['question']!r} -> {e['generated']!r} (truth {e['answer']!r})")
    lines += [
        f"  ONNX        ORT captions equal PyTorch's on {o['equal']}/{o['compared']} test images ({o['providers'][0]})",
        "  photos      (skimage.data; the model has only seen coloured shapes)",
    ]
    for e in o["photos"]:
        lines.append(f"              {e['image']}: ORT {e['ort']!r}, PyTorch {e['torch']!r} (by hand: {e['truth']!r})")
    lines += [
        f"  latency     caption, batch 1 (median): eager PyTorch {lat['eager']:.0f} ms, fused {fused}, "
        f"ONNX Runtime {lat['ort']:.0f} ms ({lat['eager'] / lat['ort']:.2f}x eager)",
        "  time        " + ", ".join(f"{k} {v:.0f} s" for k, v in r["times_s"].items())
        + f"; {sum(r['times_s'].values()) / 60:.1f} min in all",
        f"  written     checkpoints {r['paths']['stage1']}, {r['paths']['stage2']}",
        f"              export {r['paths']['export']}",
        f"              report {Path(r['out_dir']) / 'report.txt'} (and report.json)",
    ]
    return "\n".join(lines)
