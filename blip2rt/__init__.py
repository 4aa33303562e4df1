"""blip2rt: a BLIP-2 runtime and trainer built for speed.

    import blip2rt
    m = blip2rt.from_pretrained("path/to/hf_blip2_folder")   # or a preset: "tiny", "blip2-opt-2.7b", ...
    m.caption(["photo.jpg"])

Names load on first use, so `blip2rt.export.OrtBlip2` (ONNX Runtime only) never imports the
PyTorch model code.
"""

from .errors import Blip2rtError, CheckpointError, ImageError, InputError
from .lazy import lazy_attributes

__version__ = "0.1.0"

_LAZY = {
    "Blip2": ".model", "Blip2Config": ".config", "QFormerConfig": ".config", "VisionConfig": ".config",
    "PRESET_NAMES": ".presets", "preset_config": ".presets", "from_pretrained": ".pretrained",
}

__all__ = ["Blip2", "Blip2Config", "QFormerConfig", "VisionConfig", "Blip2rtError", "CheckpointError",
           "ImageError", "InputError", "PRESET_NAMES", "preset_config", "from_pretrained", "__version__"]

__getattr__ = lazy_attributes(__name__, _LAZY)
