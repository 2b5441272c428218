"""The hostile corpus for checkpoint readers: pickles that would run code if they were ever unpickled unsafely.

Made in a test's ``tmp_path``; no binary file is committed. Unpickling any of them runs ``touch <marker>``.
"""

from __future__ import annotations

import os
import pickle
import shlex
from pathlib import Path

import torch


class Payload:
    """Unpickling this runs ``touch marker``: what a hostile checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


HOSTILE_FORMATS = ("raw5.pth", "raw2.pth", "zip.pth", "legacy.pth")


def hostile(folder: Path, marker: Path, name: str) -> Path:
    """One hostile checkpoint in ``folder``: a bare pickle (protocol 5 or 2), torch.save's zip format (the payload
    in data.pkl, under a training checkpoint's ``state_dict``), or torch.save's legacy format."""
    path = folder / name
    if name == "raw5.pth":
        path.write_bytes(pickle.dumps({"conv1.weight": Payload(marker)}))
    elif name == "raw2.pth":
        path.write_bytes(pickle.dumps({"conv1.weight": Payload(marker)}, protocol=2))
    elif name == "zip.pth":
        torch.save({"state_dict": {"conv1.weight": Payload(marker)}}, path)
    elif name == "legacy.pth":
        torch.save({"conv1.weight": Payload(marker)}, path, _use_new_zipfile_serialization=False)
    else:
        raise ValueError(name)
    return path
