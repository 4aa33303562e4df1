"""`blip2rt train stage1|stage2|vqa` and `blip2rt eval ...`: argument wiring for the trainer."""

from __future__ import annotations

import argparse



def add_train_parser(sub) -> None:
    p = sub.add_parser(
        "train", help="train the Q-Former: stage 1 (ITC+ITM+ITG), stage 2 (through the frozen LLM), or VQA "
                      "fine-tuning",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train BLIP-2. Settings come from --config (JSON or TOML) and --key value overrides of any\n"
                    "TrainConfig field (see training/config.py), e.g. --batch-size 64 --max-steps 5000.\n"
                    "vqa: fine-tunes a stage-2 model on {image, question, answer} annotations; the question goes\n"
                    "into the Q-Former and, after the soft prompt, into the frozen LLM (BLIP-2 section 4.2).\n"
                    "Multi-GPU: torchrun --nproc-per-node N -m blip2rt train stage1 --config FILE",
        epilog="examples:\n"
               "  blip2rt train stage1 --config stage1.json\n"
               "  blip2rt train stage2 --model ./blip2-opt --init runs/s1/checkpoints/step_00010000 \\\n"
               "      --annotations coco.json --image-root coco/images --out-dir runs/s2\n"
               "  blip2rt train vqa --model blip2-mini --init runs/s2/checkpoints/step_00000250 \\\n"
               "      --annotations vqa_train.json --image-root images --out-dir runs/vqa\n"
               "A run resumes from its out_dir's latest checkpoint (--resume false to start over).")
    from .stages import STAGES

    p.add_argument("stage", choices=[s.name for s in STAGES.values()],
                   help="; ".join(f"{s.name}: {s.description} (by default lr {s.recipe.lr:g} to {s.recipe.min_lr:g} "
                                  f"after {s.recipe.warmup_steps} warmup steps)" for s in STAGES.values()))
    p.add_argument("--config", default=None, help="JSON or TOML file of TrainConfig fields")
    p.set_defaults(run=_run_train, accepts_overrides=True)


def _run_train(args, overrides: list[str]) -> None:
    from .config import load_config
    from .stages import stage_named
    from .trainer import Trainer

    cfg = load_config(args.config, ["--stage", str(stage_named(args.stage).number), *overrides])
    last = Trainer(cfg).run()
    print("done:", ", ".join(f"{k}={v}" for k, v in last.items()))


def add_eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate: retrieval R@k, captioning BLEU/CIDEr, or VQA accuracy",
                       description="Evaluate a model on annotations (JSON list of {image, caption[, image_id]} for "
                                   "retrieval and captioning; {image, question, answer} for vqa).")
    p.add_argument("task", choices=["retrieval", "caption", "vqa"])
    p.add_argument("--model", required=True, help="preset, Hugging Face Blip2 folder, or weights file")
    p.add_argument("--config", default=None, help="for a bare weights file: the preset or folder it fits")
    p.add_argument("--annotations", required=True, help="JSON annotation file")
    p.add_argument("--image-root", default=".", help="folder the annotation image paths are relative to")
    p.add_argument("--device", default=None)
    p.add_argument("--kernels", default="auto", choices=["auto", "triton", "torch"])
    p.add_argument("--top-k", type=int, default=128, help="retrieval: candidates re-ranked by ITM")
    p.add_argument("--num-beams", type=int, default=5)
    p.add_argument("--json", action="store_true", help="print the full result as JSON")
    p.set_defaults(run=_run_eval)


def _run_eval(args) -> None:
    import json

    import blip2rt

    from . import evaluate
    from .data import load_annotations

    records = load_annotations([args.annotations]) if args.task != "vqa" else json.loads(open(args.annotations).read())
    model = blip2rt.from_pretrained(args.model, device=args.device, kernels=args.kernels, config=args.config)
    if args.task == "retrieval":
        result = evaluate.retrieval(model, records, args.image_root, k=args.top_k, show_progress=True)
    elif args.task == "caption":
        result = evaluate.captioning(model, records, args.image_root, num_beams=args.num_beams, show_progress=True)
    else:
        result = evaluate.vqa(model, records, args.image_root, num_beams=args.num_beams, show_progress=True)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()
                        if not isinstance(v, (dict, list))))
