"""Caption quality of an export with the LLM's weights quantised, on the demo's test split: copies a
trained fp32 export (`blip2rt demo` writes one to DEMO_OUT/export) once per variant, quantises the
copy's LLM graphs, captions the test images greedily with ONNX Runtime as the demo does, and prints
colour / shape accuracy and how many captions equal the fp32 export's.

    python benchmarks/quantized_quality.py DEMO_OUT/export [--images 1000] [--variants fp32 int8 int4 int4-rtn]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

VARIANTS = {  # name: (precision, quantize_graph's options)
    "fp32": (None, {}),
    "int8": ("int8", {}),  # the export's: GGUF Q8_0 blocks
    "int4": ("int4", {}),  # the export's: GGUF Q4_1 blocks, the LM head Q8_0
    "int4-acc1": ("int4", {"accuracy_level": 1}),  # activations kept fp32 in the 4-bit product
    # onnxruntime's quantiser (MatMulNBitsQuantizer), for comparison
    "int8-rtn": ("int8", {"algorithm": "rtn"}),
    "int4-rtn": ("int4", {"algorithm": "rtn"}),
    "int4-rtn-head-fp32": ("int4", {"algorithm": "rtn", "lm_head": False}),
    "int4-rtn-asym": ("int4", {"algorithm": "rtn", "symmetric": False}),
    "int4-rtn-b16": ("int4", {"algorithm": "rtn", "block_size": 16}),
    "int4-hqq": ("int4", {"algorithm": "hqq"}),
}


def main() -> None:
    from blip2rt.embedded.demo import CAPTION_GEN, caption_accuracy
    from blip2rt.embedded.easy_vqa import load_split
    from blip2rt.export.export_config import ExportConfig
    from blip2rt.export import OrtBlip2
    from blip2rt.export.quantize import quantize_graph

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("export", type=Path, help="a trained model's fp32 export folder")
    p.add_argument("--images", type=int, default=1000, help="the first N test images (default: 1000, all)")
    p.add_argument("--variants", nargs="+", default=["fp32", "int8", "int4"], choices=list(VARIANTS))
    args = p.parse_args()
    test = load_split("test")[: args.images]
    cfg = ExportConfig.read(args.export)
    llm = cfg.llm_graphs
    reference = None
    with tempfile.TemporaryDirectory() as tmp:
        for name in ["fp32"] + [v for v in args.variants if v != "fp32"]:
            bits, options = VARIANTS[name]
            folder = Path(tmp) / name
            shutil.copytree(args.export, folder)
            t0 = time.perf_counter()
            for key in llm if bits else []:
                options = {"lm_head": True, **options}
                quantize_graph(folder / cfg.graphs[key], bits, cfg.vocab_size, **options)
            quantised_s = time.perf_counter() - t0
            rt = OrtBlip2(folder, providers=["CPUExecutionProvider"])
            t0 = time.perf_counter()
            captions = []
            for i in range(0, len(test), 16):
                captions += rt.caption([im.image for im in test[i: i + 16]], **CAPTION_GEN)
            reference = reference or captions
            llm_mb = sum(f.stat().st_size for f in folder.iterdir() if f.name.split(".")[0] in llm) / 1e6
            print(json.dumps({"variant": name, **{k: round(v, 4) for k, v in caption_accuracy(test, captions).items()},
                              "equal_to_fp32": sum(a == b for a, b in zip(captions, reference)), "images": len(test),
                              "llm_graphs_mb": round(llm_mb), "quantise_s": round(quantised_s, 1),
                              "caption_s": round(time.perf_counter() - t0, 1)}), flush=True)
            shutil.rmtree(folder)


if __name__ == "__main__":
    main()
