"""Hugging Face ZeroGPU: a GPU exists only inside functions decorated with ``spaces.GPU``.

A subprocess stands in for a ZeroGPU Space: ``SPACES_ZERO_GPU`` set as ZeroGPU sets it, a stand-in
``spaces`` module whose ``GPU`` decorator records what it wraps and marks when a GPU would exist, CUDA
reported available (as ZeroGPU reports it at start-up) and every CUDA entry point that would need a
real GPU replaced by a trap that fails outside a decorated function. The app then starts the way
``app.main`` does, models loaded on ``cuda``: nothing may touch the GPU, and every handler that
computes must be decorated.
"""

import subprocess
import sys
import textwrap

import pytest
from conftest import ROOT

pytestmark = pytest.mark.slow  # a fresh interpreter that builds the whole page

SCRIPT = textwrap.dedent(
    """
    import os, sys, threading, types
    sys.path[:0] = [{root!r}, {tests!r}]
    os.environ["SPACES_ZERO_GPU"] = "true"

    inside = threading.local()
    wrapped = []

    def GPU(fn=None, **kwargs):
        def decorate(f):
            wrapped.append(getattr(f, "__qualname__", repr(f)))
            def run(*a, **k):
                inside.gpu = True
                try:
                    return f(*a, **k)
                finally:
                    inside.gpu = False
            return run
        return decorate(fn) if fn is not None else decorate

    sys.modules["spaces"] = types.SimpleNamespace(GPU=GPU)

    import torch
    from torch import nn

    touched = []

    def trap(name):
        def call(*a, **k):
            if not getattr(inside, "gpu", False):
                touched.append(name)
                raise RuntimeError(f"{{name}} outside a spaces.GPU function")
            raise RuntimeError("no real GPU in this test")
        return call

    torch.cuda.is_available = lambda: True  # ZeroGPU reports CUDA at start-up
    for name in ("CUDAGraph", "graph", "Stream", "current_stream", "synchronize", "init"):
        setattr(torch.cuda, name, trap(f"torch.cuda.{{name}}"))
    real_to = nn.Module.to

    def deferred_to(self, *args, **kwargs):  # ZeroGPU defers .to("cuda") until a GPU function runs
        device = args[0] if args else kwargs.get("device")
        if device is not None and torch.device(device).type == "cuda":
            return self
        return real_to(self, *args, **kwargs)

    nn.Module.to = deferred_to

    import app
    from appserver import weights_dir
    from pathlib import Path
    import tempfile

    assert app.gpu is GPU, "app.py must decorate its handlers with spaces.GPU when the module exists"
    args = app.parse_args(["--device", "cuda", "--weights-dir", str(weights_dir(Path(tempfile.mkdtemp())))])
    app.prepare_process(args.device)
    registry = app.build_registry(args)
    loaded = registry.loaded
    from resnet_demo.view.uploads import UserModels

    app.make_demo(registry, uploads=UserModels())
    print("LOADED", len(loaded), sorted({{str(e.where) for e in loaded}}))
    print("GRAPHS", [e.cuda_graphs for e in loaded])
    print("CUDNN_BENCHMARK", torch.backends.cudnn.benchmark)
    print("TOUCHED", touched)
    print("WRAPPED", sorted(set(wrapped)))
    """
)


def test_nothing_touches_cuda_at_start_and_every_computing_handler_gets_a_gpu(tmp_path):
    script = tmp_path / "zerogpu.py"
    script.write_text(SCRIPT.format(root=str(ROOT), tests=str(ROOT / "tests")))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines() if " " in line)
    assert lines["LOADED"] == "2 ['cuda']"  # both shipped models, placed on cuda (ZeroGPU defers the move)
    assert lines["GRAPHS"] == "[False, False]"  # no CUDA graph recorded at load
    assert lines["CUDNN_BENCHMARK"] == "False"  # no autotuning switched on at start-up
    assert lines["TOUCHED"] == "[]"
    wrapped = lines["WRAPPED"]
    for handler in ("Pages.analyze", "lesions_tab.<locals>.lesion", "lesions_tab.<locals>.sweep",
                    "readout_tab.<locals>.readout", "gradcam_tab.<locals>.gradcam", "export_tab.<locals>.export",
                    "residual_tab.<locals>.opened", "compare_tab.<locals>.compare",
                    "compare_tab.<locals>.similarity", "wire_uploads.<locals>.load"):
        assert handler in wrapped, f"{handler} is not decorated with spaces.GPU: {wrapped}"
