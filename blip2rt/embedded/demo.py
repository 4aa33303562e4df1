"""`blip2rt demo`: BLIP-2 trained and run end to end on the embedded default, on a CPU.

blip2-mini (DINOv2-S/14 frozen, a MiniLM-initialised Q-Former, SmolLM2-135M frozen) learns
easy-vqa's captions ("a {color} {shape}"):
1. the frozen ViT features of the training images are cached;
2. stage 1 (ITC + ITM + ITG), then image->text retrieval among the distinct test captions;
3. stage 2 through the frozen LLM, then captions of the test images (colour and shape scored
   apart) and zero-shot VQA on their questions, next to the majority-answer baseline;
4. export to ONNX (the exporter's own output goes to `export.log`); ONNX Runtime captions test
   images (compared with PyTorch's) and real photos;
5. caption latency at batch 1: eager PyTorch, the fused Triton path (GPU only), ONNX Runtime;
6. with `with_vqa`: VQA fine-tuning as BLIP-2 §4.2 (the question into the Q-Former and the
   frozen LLM; the ViT frozen here), scored on the same test questions as zero-shot.

The test images' frozen features are cached once (fp32) for every evaluation. Everything goes
under one folder. A rerun resumes: training continues from its last checkpoint and the phases
already finished (recorded in `demo_state.json`) are not redone.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import random
import statistics
import time
import warnings
from contextlib import contextmanager, redirect_stdout
import dataclasses
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from blip2rt.errors import Blip2rtError
from blip2rt.precision import training_precision

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
    vqa_questions: int  # the test questions every VQA figure is measured on (one sample for all)
    vqa_steps: int  # VQA fine-tuning on the training images' questions
    vqa_batch: int
    # Higher than the paper's 1e-4 (tuned for 250k steps): this run has a few hundred, and the
    # cross-attention (stage 1) and the LLM projection (stage 2) start from random. In stage 2
    # the Q-Former arrives trained, so it keeps a gentle 3e-4 while the fresh projection gets
    # 1e-2: with 3e-3 for both, no caption depended on the image; with 3e-4 / 1e-2 (and the BOS
    # before the soft prompt, see Blip2Config) 250 steps of 12 gave 97% colour-and-shape.
    stage1_lr: float = 5e-4
    stage2_lr: float = 3e-4
    stage2_projection_lr: float = 1e-2
    # VQA fine-tuning keeps stage 2's split: on 500 test questions, 250 steps of 16 reached 92.4% with
    # the projection at 1e-2 (75% to 79% with it at the Q-Former's 3e-4; benchmarks/RESULTS.md).
    vqa_lr: float = 3e-4
    vqa_projection_lr: float = 1e-2
    max_text_len: int = 8  # the longest caption is 7 WordPieces ("teal" is "tea ##l"); stage 1 pads to this
    rerank_k: int = 4  # ITM re-ranks each image's 4 best captions by ITC (the paper: 128 of 25k texts)
    ort_compare_images: int = 16
    int4_compare_images: int = 200  # the int4 export's captions against PyTorch fp32's, on the first test images
    latency_repeats: int = 5
    # Added to every seed the demo uses: the parts no checkpoint fills (from_pretrained's seed) and each
    # trainer's (42 + seed). 0 reproduces the figures in README and the quick test.
    seed: int = 0


FULL = DemoPlan(train_images=1600, test_images=1000, stage1_steps=120, stage1_batch=32, stage2_steps=160,
                stage2_batch=12, vqa_questions=300, vqa_steps=250, vqa_batch=16)
# The quick plan's stage 2 takes more, smaller steps: colour is learnt late, between 110 and 150
# steps (benchmarks/RESULTS.md); at 110 x 12 the caption colour ranged from 22% to 83% run to run.
QUICK = DemoPlan(train_images=480, test_images=200, stage1_steps=60, stage1_batch=24, stage2_steps=200,
                 stage2_batch=8, vqa_questions=120, vqa_steps=60, vqa_batch=16, ort_compare_images=8,
                 latency_repeats=3)


class _State:
    """demo_state.json: each finished phase's results and the time spent in each phase, written
    atomically after it."""

    def __init__(self, path: Path, plan: DemoPlan):
        self.path = path
        self.data = json.loads(path.read_text()) if path.is_file() else {}
        if self.data.get("plan") not in (None, asdict(plan)):
            raise Blip2rtError(f"{path.parent} holds a demo run with another plan (--quick or not, or an older "
                               "blip2rt's); use another --out, or --fresh to start over")
        self.data["plan"] = asdict(plan)
        self.times: dict[str, float] = dict(self.data.get("times") or {})

    def get(self, key: str):
        return self.data.get(key)

    def put(self, key: str, value) -> None:
        self.data[key] = value
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        tmp.replace(self.path)

    def phase(self, name: str, compute, key: str | None = None):
        """Runs one phase and adds its wall time to `name`. With `key`, a result already recorded is
        returned instead of computed again (a rerun resumes), and a new one is recorded."""
        t0 = time.perf_counter()
        value = self.get(key) if key else None
        if value is None:
            value = compute()
            if key:
                self.put(key, value)
        self.times[name] = round(self.times.get(name, 0.0) + time.perf_counter() - t0, 1)
        self.put("times", self.times)
        return value


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


def _qa_records(images: list[EasyVqaImage]) -> list[dict]:
    return [{"image": str(im.image), "question": q, "answer": a} for im in images for q, a in im.qa]


def _vqa_sample(images: list[EasyVqaImage], n: int, seed: int = 0) -> list[dict]:
    pairs = _qa_records(images)
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


# Warnings of these kinds, raised inside the exporter, are about torch's and onnxscript's own code
# (an API they still use is deprecated); they go to the log only. Any other warning is shown.
QUIET_WARNINGS = (FutureWarning, DeprecationWarning, PendingDeprecationWarning)
EXPORT_LOG = "export.log"


@contextmanager
def logged_to(path: Path):
    """Sends what the exporter writes to `path`: its prints (torch.onnx's step lines), every logger's
    records (torch's "torchvision is not installed" among them), and its warnings; afterwards the
    warnings that signal a problem are raised again, so they still reach the terminal."""
    handler = logging.FileHandler(path, mode="a")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    # the root, and every logger of these packages that does not simply hand its records up (torch
    # gives some of its loggers, torch.onnx among them, their own stderr handler)
    owners = ("torch", "onnx", "onnxscript", "onnx_ir", "onnxruntime", "blip2rt")
    names = ["", *owners] + [n for n, lg in logging.root.manager.loggerDict.items()
                             if isinstance(lg, logging.Logger) and n.split(".")[0] in owners and n not in owners
                             and (lg.handlers or not lg.propagate)]
    saved = []
    for name in names:
        lg = logging.getLogger(name)
        saved.append((lg, lg.handlers[:], lg.propagate, lg.level))
        lg.handlers, lg.propagate = [handler], False
        if name == "blip2rt":
            lg.setLevel(logging.INFO)  # the exporter's timings
    try:
        with open(path, "a") as out, redirect_stdout(out), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        for lg, handlers, propagate, level in saved:
            lg.handlers, lg.propagate = handlers, propagate
            lg.setLevel(level)
        handler.close()
    with open(path, "a") as out:
        for w in caught:
            out.write(f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})\n")
    for w in caught:
        if not issubclass(w.category, QUIET_WARNINGS):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def _build_test_features(model, test_records: list[dict], folder: Path, show_progress: bool):
    from blip2rt.training.feature_cache import FeatureCache

    if not FeatureCache.exists(folder):
        FeatureCache.build(model, [r["image"] for r in test_records], "/", folder, show_progress=show_progress,
                           dtype=np.float32)
    return FeatureCache(folder)


@dataclass
class DemoRun:
    """What the phases of one demo run share: the plan, its folder and recorded state, the data, the
    model being trained, and each phase's results (under `results`, by the report's names)."""

    out: Path
    plan: DemoPlan
    state: _State
    device: str | None
    show_progress: bool
    precision: object  # blip2rt.precision.Precision
    data: dict = dataclasses.field(default_factory=dict)  # photos, train, test, train_json, vqa_json, ...
    model: object = None
    test_features: object = None
    results: dict = dataclasses.field(default_factory=dict)

    def stage_config(self, number: int, steps: int, batch: int, lr: float, projection_lr: float | None = None,
                     annotations: Path | None = None):
        from blip2rt.training.config import TrainConfig
        from blip2rt.training.stages import stage

        return TrainConfig(stage=number, out_dir=str(self.out / stage(number).name), batch_size=batch,
                           max_steps=steps, warmup_steps=max(1, steps // 10), lr=lr, min_lr=lr / 10,
                           projection_lr=projection_lr, save_every=max(1, steps // 2), model="blip2-mini",
                           annotations=[str(annotations or self.data["train_json"])], image_root="/", augment=False,
                           cache_features=True, feature_cache=str(self.out / "feature_cache"),
                           max_text_len=self.plan.max_text_len, weight_decay=0.05, num_workers=0, log_every=5,
                           keep_checkpoints=1, kernels="auto", amp=self.precision.amp,
                           question_template=VQA_PROMPTS[0], seed=42 + self.plan.seed)

    def train(self, phase: str, cfg, key: str) -> dict:
        """A training phase on the model (resumed from its checkpoints); its last metrics, recorded
        under `key`, since a run that is already finished returns none."""
        from blip2rt.training.trainer import Trainer

        last = self.state.phase(phase, lambda: Trainer(cfg, show_progress=self.show_progress, model=self.model).run()
                                or self.state.get(key) or {})
        self.state.put(key, last)
        self.model.eval()
        return last

    def vqa_accuracy(self, prompts=VQA_PROMPTS) -> dict:
        from blip2rt.training import evaluate

        vqa = {}
        for prompt in prompts:
            r = evaluate.vqa(self.model, self.data["vqa_records"], "/", batch_size=64, show_progress=self.show_progress,
                             features=self.test_features, prompt_template=prompt, **VQA_GEN)
            vqa[prompt] = {"accuracy": r["accuracy"], "answers": r["answers"][:12], "scored": r["scored"][:12]}
        return vqa


def _data_phase(run: DemoRun) -> None:
    plan, out = run.plan, run.out

    def data():
        photos = {name: assets.skimage_photo(name) for name in PHOTOS}  # fail early if an asset is missing
        train = load_split("train")[: plan.train_images]
        test = load_split("test")[: plan.test_images]
        # image_id groups positives: 24 captions over thousands of images, so two images with the same
        # caption are positives of each other for ITC, and never drawn as each other's ITM negative
        train_json = write_annotations(train, out / "data" / "train.json", group_by_caption=True)
        vqa_json = out / "data" / "vqa_train.json"
        vqa_json.write_text(json.dumps(_qa_records(train)))
        return photos, train, test, train_json, vqa_json

    photos, train, test, train_json, vqa_json = run.state.phase("data", data)
    vqa_records = _vqa_sample(test, plan.vqa_questions)
    majority, _ = majority_answer(train)  # the baseline answers what was most common in training
    run.data = dict(photos=photos, train=train, test=test, train_json=train_json, vqa_json=vqa_json,
                    test_records=annotation_rows(test), vqa_records=vqa_records, majority=majority,
                    baseline=sum(r["answer"] == majority for r in vqa_records) / len(vqa_records))
    _say(f"data: easy-vqa, {len(train)} train / {len(test)} test images, captions \"a {{color}} {{shape}}\" "
         f"({len({im.caption for im in test})} distinct in the test images)")
    _say(f"training precision: {run.precision.describe()}")


def _stage1_phase(run: DemoRun) -> None:
    from blip2rt.training import evaluate
    from blip2rt.training.trainer import Trainer

    plan, state = run.plan, run.state
    cfg = run.stage_config(1, plan.stage1_steps, plan.stage1_batch, plan.stage1_lr)
    _say(f"stage 1: loading blip2-mini and caching the frozen ViT features -> {cfg.feature_cache}")

    def load():
        trainer = Trainer(cfg, show_progress=run.show_progress, model=_load_model(run.device, plan.seed))
        features = _build_test_features(trainer.model, run.data["test_records"], run.out / "test_features",
                                        run.show_progress)
        return trainer, features

    trainer, run.test_features = state.phase("load + feature cache", load)
    run.model = trainer.model
    _say(f"stage 1: ITC + ITM + ITG, {plan.stage1_steps} steps of {plan.stage1_batch}")
    run.results["stage1"] = state.phase("stage 1", lambda: trainer.run() or state.get("stage1_last") or {})
    state.put("stage1_last", run.results["stage1"])
    del trainer  # its optimizer state
    run.model.eval()
    retrieval = state.phase("retrieval eval", lambda: evaluate.retrieval(
        run.model, run.data["test_records"], "/", k=plan.rerank_k, show_progress=run.show_progress,
        features=run.test_features), "retrieval")
    run.results["retrieval"] = retrieval
    _say(f"retrieval: image->text R@1 {retrieval['i2t_r1']:.1%} among {retrieval['texts']} captions "
         f"(chance {1 / retrieval['texts']:.1%})")


def _stage2_phase(run: DemoRun) -> None:
    from blip2rt.training import evaluate

    plan, state, data = run.plan, run.state, run.data
    cfg = run.stage_config(2, plan.stage2_steps, plan.stage2_batch, plan.stage2_lr, plan.stage2_projection_lr)
    _say(f"stage 2: generative, through the frozen SmolLM2, {plan.stage2_steps} steps of {plan.stage2_batch}")
    run.results["stage2"] = run.train("stage 2", cfg, "stage2_last")

    def captioning():
        result = evaluate.captioning(run.model, data["test_records"], "/", batch_size=64,
                                     show_progress=run.show_progress, features=run.test_features, **CAPTION_GEN)
        return [result["captions"][r["image"]] for r in data["test_records"]]

    captions = run.results["caption_list"] = state.phase("caption eval", captioning, "captions")
    acc = run.results["captions"] = caption_accuracy(data["test"], captions)
    _say(f"captions: colour {acc['color']:.1%}, shape {acc['shape']:.1%}, both {acc['both']:.1%}")
    vqa = run.results["vqa"] = state.phase("vqa eval (zero-shot)", run.vqa_accuracy, "vqa")
    _say("vqa, zero-shot: " + ", ".join(f"{p!r} {v['accuracy']:.1%}" for p, v in vqa.items())
         + f"; always {data['majority']!r} {data['baseline']:.1%}")


def _export_phase(run: DemoRun) -> None:
    export_dir = run.out / "export"

    def export():
        from blip2rt.export import export_model

        _say(f"export: ONNX graphs -> {export_dir} (the exporter's log: {run.out / EXPORT_LOG})")
        if run.model.device.type != "cpu":
            raise Blip2rtError("the demo exports the CPU model; run it without --device")
        with logged_to(run.out / EXPORT_LOG):
            export_model(run.model, export_dir)
        return str(export_dir)

    run.state.phase("export", export, "export")
    run.results["ort"] = run.state.phase("onnx runtime", lambda: _onnx_runtime(run, export_dir), "ort")


def _onnx_runtime(run: DemoRun, export_dir: Path) -> dict:
    """ORT's captions of test images and photos beside PyTorch's, and caption latency at batch 1."""
    from blip2rt.export import OrtBlip2

    model, plan, test, photos = run.model, run.plan, run.data["test"], run.data["photos"]
    # PyTorch first: onnxruntime's spinning worker threads would slow torch down afterwards
    sample = test[: plan.ort_compare_images]
    torch_caps = model.caption([im.image for im in sample], **CAPTION_GEN)  # from pixels, as ORT
    static_caps = model.caption([im.image for im in sample], static_cache=True, **CAPTION_GEN)
    photo_torch = model.caption([str(p) for p in photos.values()], **CAPTION_GEN)
    one = [test[0].image]
    latency = {"eager": _timed(lambda: model.caption(one, **CAPTION_GEN), plan.latency_repeats),
               "eager_static_cache": _timed(lambda: model.caption(one, static_cache=True, **CAPTION_GEN),
                                            plan.latency_repeats)}
    if model.device.type == "cuda":
        backend = model.kernel_backend
        model.set_kernel_backend("triton")
        latency["fused"] = _timed(lambda: model.caption(one, **CAPTION_GEN), plan.latency_repeats)
        model.set_kernel_backend(backend)
    session = OrtBlip2(export_dir, providers=_ort_providers(model))
    ort_caps = session.caption([im.image for im in sample], **CAPTION_GEN)
    photo_ort = session.caption([str(p) for p in photos.values()], **CAPTION_GEN)
    latency["ort"] = _timed(lambda: session.caption(one, **CAPTION_GEN), plan.latency_repeats)
    return {"equal": sum(a == b for a, b in zip(ort_caps, torch_caps)), "compared": len(sample),
            "static_cache_equal": sum(a == b for a, b in zip(static_caps, torch_caps)),
            "search": session.last_search,
            "examples": [{"image": im.image.name, "truth": im.caption, "torch": t, "ort": o}
                         for im, t, o in zip(sample, torch_caps, ort_caps)],
            "photos": [{"image": n, "truth": PHOTOS[n], "torch": t, "ort": o}
                       for n, t, o in zip(photos, photo_torch, photo_ort)],
            "latency_ms": latency, "providers": session.providers}


def _int4_phase(run: DemoRun) -> None:
    export_dir, int4_dir = run.out / "export", run.out / "export_int4"

    def int4_export():
        from blip2rt.export import OrtBlip2
        from blip2rt.export.quantize import quantize_export

        _say(f"int4: the export with the LLM's weights in GGUF's 4-bit blocks -> {int4_dir}")
        with logged_to(run.out / EXPORT_LOG):
            manifest = quantize_export(export_dir, "int4", to=int4_dir)
        session = OrtBlip2(int4_dir, providers=_ort_providers(run.model))
        sample = run.data["test"][: run.plan.int4_compare_images]
        caps = []
        for i in range(0, len(sample), 64):
            caps += session.caption([im.image for im in sample[i: i + 64]], **CAPTION_GEN)
        one = [run.data["test"][0].image]
        llm = set(manifest["llm_weights"]["graphs"])  # prefill, decode, static_lm: <key>.onnx (+ .data)
        mb = {name: round(sum(f.stat().st_size for f in folder.iterdir() if f.name.split(".")[0] in llm) / 1e6)
              for name, folder in (("fp32", export_dir), ("int4", int4_dir))}
        return {"captions": caption_accuracy(sample, caps), "compared": len(sample),
                "equal": sum(a == b for a, b in zip(caps, run.results["caption_list"])),  # PyTorch's fp32 captions
                "latency_ms": _timed(lambda: session.caption(one, **CAPTION_GEN), run.plan.latency_repeats),
                "llm_graphs_mb": mb, "search": session.last_search}

    run.results["int4"] = run.state.phase("int4 export", int4_export, "int4")


def _vqa_phase(run: DemoRun) -> None:
    """VQA fine-tuning (BLIP-2 §4.2), then the same test questions as zero-shot."""
    from blip2rt.training.trainer import VQA_STAGE

    plan = run.plan
    cfg = run.stage_config(VQA_STAGE, plan.vqa_steps, plan.vqa_batch, plan.vqa_lr, plan.vqa_projection_lr,
                           annotations=run.data["vqa_json"])
    _say(f"vqa fine-tuning: the question into the Q-Former and the frozen SmolLM2, {plan.vqa_steps} steps of "
         f"{plan.vqa_batch} training questions (ViT frozen)")
    last = run.train("vqa fine-tuning", cfg, "vqa_last")
    tuned = run.state.phase("vqa eval (fine-tuned)", lambda: run.vqa_accuracy(VQA_PROMPTS[:1])[VQA_PROMPTS[0]],
                            "vqa_tuned")
    run.results["vqa_fine_tuned"] = {**tuned, "steps": last.get("step"), "loss": last.get("loss"),
                                     "checkpoints": str(run.out / "vqa" / "checkpoints")}
    _say(f"vqa, fine-tuned: {tuned['accuracy']:.1%}")


PHASES = (_data_phase, _stage1_phase, _stage2_phase, _export_phase, _int4_phase)


def run_demo(out_dir: str | Path, quick: bool = False, device: str | None = None, show_progress: bool = True,
             plan: DemoPlan | None = None, bf16: bool = True, with_vqa: bool = False, seed: int = 0) -> dict:
    """Runs the whole demo (resuming what `out_dir` already holds); returns the report dict,
    also written to out_dir/report.json and, as text, out_dir/report.txt.

    bf16=False trains in fp32 even where the CPU has native bf16 (what a CPU without it runs); by
    default the precision is blip2rt.precision's choice for the device.
    with_vqa: then fine-tunes for VQA (the question in the Q-Former too) and reports its accuracy.
    seed: shifts every seed of the run (DemoPlan.seed); a folder resumes only under its own seed."""
    plan = dataclasses.replace(plan or (QUICK if quick else FULL), seed=seed)
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    run = DemoRun(out, plan, _State(out / "demo_state.json", plan), device, show_progress,
                  training_precision(device or "cpu", allow_bf16=bf16))
    for phase in PHASES + ((_vqa_phase,) if with_vqa else ()):
        phase(run)
    report = _report(run, quick, time.perf_counter() - t_start)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "report.txt").write_text(format_report(report))
    return report


def _report(run: DemoRun, quick: bool, wall_s: float) -> dict:
    """report.json: what every phase measured, with the machine and the paths."""
    out, data, r = run.out, run.data, run.results
    train, test, vqa_records, vqa = data["train"], data["test"], data["vqa_records"], r["vqa"]
    ft = r.get("vqa_fine_tuned")
    return {
        "plan": "quick" if quick else "full", "out_dir": str(out),
        "machine": {**_machine(run.model), "training": run.precision.amp, "training_reason": run.precision.reason},
        "data": {"train_images": len(train), "test_images": len(test), "distinct_captions": r["retrieval"]["texts"],
                 "vqa_questions": len(vqa_records), "vqa_train_questions": sum(len(im.qa) for im in train)},
        "stage1": r["stage1"], "stage2": r["stage2"], "retrieval": r["retrieval"],
        "captions": {**r["captions"], "examples": [{"image": im.image.name, "truth": im.caption, "generated": c}
                                                   for im, c in list(zip(test, r["caption_list"]))[:6]]},
        "chance": {"retrieval_r1": 1 / r["retrieval"]["texts"], "color": 1 / len(COLORS), "shape": 1 / len(SHAPES),
                   "both": 1 / (len(COLORS) * len(SHAPES))},
        "vqa": {"accuracy": {p: v["accuracy"] for p, v in vqa.items()}, "majority_answer": data["majority"],
                "majority_baseline": data["baseline"], "examples": _vqa_examples(vqa_records, vqa[VQA_PROMPTS[0]]),
                "fine_tuned": None if ft is None else {**{k: ft[k] for k in ("accuracy", "steps", "loss", "checkpoints")},
                                                       "examples": _vqa_examples(vqa_records, ft)}},
        "ort": r["ort"], "int4": r["int4"], "times_s": run.state.times, "wall_s_this_run": round(wall_s, 1),
        "paths": {"stage1": str(out / "stage1" / "checkpoints"), "stage2": str(out / "stage2" / "checkpoints"),
                  "export": str(out / "export"), "export_int4": str(out / "export_int4"),
                  "export_log": str(out / EXPORT_LOG), "feature_cache": str(out / "feature_cache")},
    }


def _vqa_examples(records: list[dict], result: dict, n: int = 6) -> list[dict]:
    """The first questions with the generated answer and the part of it that was scored."""
    return [{"question": r["question"], "answer": r["answer"], "image": Path(r["image"]).name,
             "generated": result["answers"][i], "scored": result["scored"][i]} for i, r in enumerate(records[:n])]


def _load_model(device: str | None, seed: int):
    import blip2rt

    # the demo trains, evaluates and exports one model: the CPU unless a device is asked for
    return blip2rt.from_pretrained("blip2-mini", device=device or "cpu", dtype="fp32", seed=seed)


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
        f"{m['torch_threads']} threads, training in {'bf16 autocast' if m.get('training') == 'bf16' else 'fp32'}"
        + (f": {m['training_reason']}" if m.get("training_reason") else ""),
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
    lines.append(f"  VQA         {r['data']['vqa_questions']} test questions, each answer scored on its first line; "
                 f"always answering {v['majority_answer']!r}: {_pct(v['majority_baseline'])}")
    lines.append("              zero-shot: " + ", ".join(f"{p!r} {_pct(a)}" for p, a in v["accuracy"].items()))
    for e in v["examples"][:3]:
        lines.append(f"                {e['question']!r} -> {e['generated']!r}, scored {e['scored']!r} "
                     f"(truth {e['answer']!r})")
    ft = v.get("fine_tuned")
    if ft:
        lines.append(f"              fine-tuned ({ft['steps']} steps on {r['data']['vqa_train_questions']} training "
                     f"questions, the question in the Q-Former): {_pct(ft['accuracy'])}")
        for e in ft["examples"][:3]:
            lines.append(f"                {e['question']!r} -> {e['generated']!r}, scored {e['scored']!r} "
                         f"(truth {e['answer']!r})")
    lines += [
        f"  ONNX        ORT captions equal PyTorch's on {o['equal']}/{o['compared']} test images ({o['providers'][0]}"
        + (f", {o['search']} graphs" if o.get("search") else "") + ")",
    ]
    if "static_cache_equal" in o:
        lines.append(f"  static KV   PyTorch's static-cache captions equal its transformers-generate ones on "
                     f"{o['static_cache_equal']}/{o['compared']}")
    q = r.get("int4")
    if q:
        qc = q["captions"]
        lines.append(f"  int4 LLM    ORT with the LLM's weights in 4 bits ({q['llm_graphs_mb']['int4']} MB of LLM graphs, "
                     f"fp32 {q['llm_graphs_mb']['fp32']} MB), on the first {q['compared']} test images: colour "
                     f"{_pct(qc['color'])}, shape {_pct(qc['shape'])}, both {_pct(qc['both'])}; captions equal "
                     f"PyTorch fp32's on {q['equal']}/{q['compared']}")
    lines += [
        "  photos      (skimage.data; the model has only seen coloured shapes)",
    ]
    for e in o["photos"]:
        lines.append(f"              {e['image']}: ORT {e['ort']!r}, PyTorch {e['torch']!r} (by hand: {e['truth']!r})")
    lines += [
        f"  latency     caption, batch 1 (median): eager PyTorch {lat['eager']:.0f} ms"
        + (f" (static cache {lat['eager_static_cache']:.0f} ms)" if "eager_static_cache" in lat else "")
        + f", fused {fused}, ONNX Runtime {lat['ort']:.0f} ms ({lat['eager'] / lat['ort']:.2f}x eager)"
        + (f", int4 {q['latency_ms']:.0f} ms" if q else ""),
        "  time        " + ", ".join(f"{k} {v:.0f} s" for k, v in r["times_s"].items())
        + f"; {sum(r['times_s'].values()) / 60:.1f} min in all",
        f"  written     checkpoints {r['paths']['stage1']}, {r['paths']['stage2']}"
        + (f", {v['fine_tuned']['checkpoints']}" if v.get("fine_tuned") else ""),
        f"              export {r['paths']['export']} (the exporter's log: {r['paths']['export_log']})",
        f"              report {Path(r['out_dir']) / 'report.txt'} (and report.json)",
    ]
    return "\n".join(lines)
