"""blip2rt: a BLIP-2 runtime and trainer built for speed.

    import blip2rt
    m = blip2rt.from_pretrained("path/to/hf_blip2_folder")   # or a preset: "tiny", "blip2-opt-2.7b", ...
    m.caption(["photo.jpg"])
"""

from .config import Blip2Config, QFormerConfig, VisionConfig
from .errors import Blip2rtError, CheckpointError, ImageError, InputError
from .model import Blip2
from .presets import PRESET_NAMES, preset_config
from .pretrained import from_pretrained

__version__ = "0.1.0"

__all__ = ["Blip2", "Blip2Config", "QFormerConfig", "VisionConfig", "Blip2rtError", "CheckpointError",
           "ImageError", "InputError", "PRESET_NAMES", "preset_config", "from_pretrained", "__version__"]
