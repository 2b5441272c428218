"""Start the real Gradio app on a free port (tests, through conftest's fixtures, and scripts/screenshots.py);
weights are the shipped ones when present."""

from __future__ import annotations

import base64
import io
from contextlib import contextmanager
from pathlib import Path

from PIL import Image

from resnet_demo.core.weights.cards import WEIGHTS_DIR
from resnet_demo.tools.loadtest import free_port, write_untrained_weights

SHIPPED = ("cifar10_resnet", "mnist_resnet")


def inline_image(value: dict) -> Image.Image:
    """An InlineImage output as gradio_client returns it: no file, the PNG in a data URL."""
    assert value["path"] is None and value["mime_type"] == "image/png", value
    head, _, data = value["url"].partition(",")
    assert head == "data:image/png;base64", head
    return Image.open(io.BytesIO(base64.b64decode(data, validate=True)))


def weights_dir(tmp: Path) -> Path:
    """The shipped weights folder if both files are there, else random (untrained) tutorial Nets in ``tmp``."""
    if all((WEIGHTS_DIR / f"{n}.safetensors").is_file() for n in SHIPPED):
        return WEIGHTS_DIR
    return write_untrained_weights(tmp)


@contextmanager
def running_app(wdir: Path, concurrency: int = 2, uploads: bool = True, timelines=None, **launch):
    """The app on ``127.0.0.1:<free port>``; ``launch``: more of ``Blocks.launch``'s arguments
    (``state_session_capacity``)."""
    import app
    from resnet_demo.view.registry import default_registry

    registry = default_registry("cpu", wdir)
    registry.load_all()
    from resnet_demo.view.uploads import UserModels

    demo = app.make_demo(registry, uploads=UserModels() if uploads else None, timelines=timelines)
    demo.queue(**app.queue_options(concurrency, max_size=512))
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                **app.launch_options(uploads), **launch)
    try:
        yield f"http://127.0.0.1:{port}/", registry
    finally:
        demo.close()
