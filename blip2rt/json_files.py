"""Reading a JSON file with one clear error for a missing or malformed file."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import Blip2rtError


def read_json(path: str | Path, what: str, error: type[Blip2rtError] = Blip2rtError):
    """The parsed contents of `path`; otherwise `error`, saying that it does not exist, is a folder,
    or is not valid JSON."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise error(f"{what} {path} is a folder, not a JSON file") from None
    except json.JSONDecodeError as e:
        raise error(f"{what} {path} is not valid JSON ({e})") from None
