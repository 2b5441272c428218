"""Residual Block Explorer: the page. Layout and event wiring only; the work happens in ``resnet_demo``.

    python app.py                      # http://127.0.0.1:7860
    python app.py --weights my_net.pth # also explore your own checkpoint of the tutorial's Net
    python app.py --arch resnet50 --weights resnet50.pth
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
from pathlib import Path

# Nothing may leave the machine: no analytics, no version check, no hub lookups.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import gradio as gr  # noqa: E402
import torch  # noqa: E402

from resnet_demo import present  # noqa: E402
from resnet_demo.checkpoints import WEIGHTS_DIR, WeightsError  # noqa: E402
from resnet_demo.explorer import Explorer, tune_malloc  # noqa: E402
from resnet_demo.render import VIEWS  # noqa: E402

try:  # Hugging Face Spaces with ZeroGPU: the decorated function gets a GPU for its duration.
    import spaces

    gpu = spaces.GPU
except ImportError:

    def gpu(fn):
        return fn


ROOT = Path(__file__).resolve().parent
EXAMPLES = sorted((ROOT / "examples").glob("*.*"))
MAX_UPLOAD = "10mb"
THEME = gr.themes.Default(  # system fonts: the default theme would fetch Google Fonts
    font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]
)
VIEW_CHOICES = [(f"{label} ({key})", key) for key, label in VIEWS.items()]

HOW_TO_READ = {
    "predictions": "The model's top-k classes with softmax probabilities. The small image is the input "
    "**as the network saw it** after preprocessing (32×32 for the shipped models).",
    "maps": "One tile per channel, the 16 most active first. **F(x)** is the residual branch — what the "
    "block *adds*: red is positive, blue negative, white zero. **x** and **y** are the block's input and output "
    "(after ReLU, so never negative: dark = 0, bright = large). Each grid shares one colour scale, so strong "
    "channels look strong. Pick a block below (or click a grid) to see all its channels, each on its own scale.",
    "residual": "Bars: **‖F(x)‖ / ‖s(x)‖**, how much each block changes what flows through it "
    "(Jastrzębski et al. 2018). Near 0 the block is almost an identity; near 1 it rewrites its input. "
    "The line: **cosine(F, s)**: positive = the branch amplifies the input, negative = it suppresses it. "
    "Grey bands, when shown, are the 5–95 and 25–75 percentile ranges over the test set.",
    "lesions": "**Lesion** a block (Veit et al. 2016): remove its branch so that y = relu(s(x)) — only the "
    "shortcut remains. Residual networks often survive losing one block (they behave like ensembles of shallower "
    "paths); the sweep shows which blocks this image cannot do without. KL is the divergence of the lesioned "
    "prediction from the intact one.",
    "readout": "**Readout**: the classifier head (pool + linear) applied to the output of every block as wide as "
    "the head. It shows how the prediction forms with depth, and the block from which it no longer changes.",
    "gradcam": "**Grad-CAM** (Selvaraju et al. 2017): the block's channels weighted by the gradient of the class "
    "score, summed, kept where positive: where in the image the evidence for the class sits at that depth.",
    "export": "Download the current analysis: a JSON with predictions, every per-block metric, the lesion of the "
    "blocks chosen in *Lesions*, the sweep, the readout and a reference to the model card, plus the images as PNG.",
}


def to_gr_error(fn):
    """Turn the library's input and weights errors into a message on the page."""

    @functools.wraps(fn)  # keeps the signature: Gradio reads it to pass gr.Request and gr.SelectData
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ValueError, KeyError, WeightsError) as exc:  # InputError is a ValueError
            raise gr.Error(str(exc).strip("'\""), print_exception=False) from None

    return wrapper


class PhotoInput(gr.Image):
    """``gr.Image`` that lets the project's decoder judge a bad upload, so the page shows its clear message.

    ``is_template`` makes the front end render it as a plain image component.
    """

    is_template = True

    def preprocess(self, payload):
        try:
            return super().preprocess(payload)
        except Exception:  # noqa: BLE001 - PIL raises many types for hostile files
            from resnet_demo.preprocess import InputError, load_image

            try:
                load_image(payload.path)
            except InputError as exc:
                raise gr.Error(str(exc), print_exception=False) from None
            raise gr.Error("The upload could not be read as an image.", print_exception=False) from None


N_OUTPUTS = 12
# Gradio keeps every session's page state (~150 KB here: a copy of the page's component configs)
# until this many newer sessions have come; its default, 10,000, would let a public demo grow by
# ~1.5 GB. A session evicted while its tab is still open loses only the tools' memory of its image.
SESSIONS = 1000
SELECT_BRUSH_JS = """() => { setTimeout(() => {
  const b = document.querySelector('#sketchpad button[aria-label="Brush"]'); if (b) b.click(); }, 150); }"""


def make_demo(registry: present.Registry, default_model: str = present.AUTO) -> gr.Blocks:
    model_choices = [("Auto (photo → CIFAR-10, drawing → MNIST)", present.AUTO)] + [
        (c.label, c.key) for c in registry.choices.values()
    ]

    @gpu
    def run(source, kind: str, model_key: str, k: int, view: str, detail: str | None):
        """Analyse with the model chosen for this input; the model's card decides the preprocessing."""
        explorer = registry.get(registry.resolve(model_key, kind))
        analysis = explorer.analyze(source, k=int(k))
        names = [m.name for m in analysis.metrics]
        chosen = detail if detail in names else names[-1]
        return present.build_page(analysis, view=view, detail_block=chosen), names, chosen

    @to_gr_error
    def analyze(source, kind, model_key, k, view, detail, lesioned=None):
        if source is None:
            raise ValueError("No image yet: upload, paste, photograph or draw one, or pick an example.")
        page, names, chosen = run(source, kind, model_key, k, view, detail)
        return (
            page.predictions,
            page.model_input,
            page.grids,
            page.chart,
            page.table,
            page.summary,
            page.detail,
            gr.update(choices=names, value=chosen),
            gr.update(choices=names, value=[name for name in (lesioned or []) if name in names]),
            gr.update(choices=names, value=chosen),
            gr.update(choices=["", *page.analysis.card.classes], value=""),
            (source, kind),
        )

    def current(state, model_key, k):
        """The explorer and analysis of the image on the page (recomputed: a forward pass is cheap)."""
        if state is None:
            raise ValueError("Analyse an image first: upload, paste, photograph or draw one, or pick an example.")
        source, kind = state
        explorer = registry.get(registry.resolve(model_key, kind))
        return explorer, explorer.analyze(source, k=int(k))

    @to_gr_error
    @gpu
    def do_lesion(state, model_key, k, blocks):
        explorer, analysis = current(state, model_key, k)
        _, preds, text = present.lesion_view(explorer, analysis, blocks or [], int(k))
        return preds, text

    @to_gr_error
    @gpu
    def do_sweep(state, model_key, k):
        explorer, analysis = current(state, model_key, k)
        _, chart, rows = present.sweep_view(explorer, analysis)
        return chart, rows

    @to_gr_error
    @gpu
    def do_readout(state, model_key, k):
        explorer, analysis = current(state, model_key, k)
        _, chart, text = present.readout_view(explorer, analysis)
        return chart, text

    @to_gr_error
    @gpu
    def do_gradcam(state, model_key, k, block, label):
        explorer, analysis = current(state, model_key, k)
        image, label = present.gradcam_view(explorer, analysis, block or analysis.metrics[-1].name, label or None)
        return gr.update(value=image, label=f"Grad-CAM for “{label}” at {block or analysis.metrics[-1].name}")

    @to_gr_error
    @gpu
    def do_export(state, model_key, k, blocks, request: gr.Request):
        explorer, analysis = current(state, model_key, k)
        folder = Path(tempfile.gettempdir()) / "residual-block-explorer" / (request.session_hash or "anon")
        for old in folder.glob("*.zip"):  # one export per session on disk; Gradio serves its own copy
            old.unlink(missing_ok=True)
        return str(present.export_view(explorer, analysis, blocks or [], folder))

    def reanalyze(state, *settings):
        if state is None:
            return (gr.skip(),) * N_OUTPUTS
        return analyze(*state, *settings)

    def block_clicked(evt: gr.SelectData):
        return evt.value["caption"].split(" · ")[0]

    def example_selected(evt: gr.SelectData, *settings):
        path = EXAMPLES[evt.index]
        return analyze(str(path), "drawing" if path.name.startswith("mnist") else "photo", *settings)

    # Every response writes its images to Gradio's cache: sweep files older than an hour every 10 minutes.
    with gr.Blocks(title="Residual Block Explorer", analytics_enabled=False, delete_cache=(600, 3600)) as demo:
        gr.Markdown(
            "# Residual Block Explorer\n"
            "Every residual block computes **y = relu(F(x) + x)**: it keeps its input *x* and adds a correction "
            "*F(x)*. Give the network an image and see, block by block, what each correction looks like and "
            "how large it is."
        )
        gr.Markdown("  \n".join(registry.status()), elem_id="model-status")
        state = gr.State(None)
        with gr.Row():
            with gr.Column(scale=4):
                with gr.Tabs():
                    with gr.Tab("Photo", id="photo"):
                        photo = PhotoInput(
                            sources=["upload", "clipboard", "webcam"], type="filepath", image_mode=None,
                            label="Upload, paste or snap", height=260, elem_id="photo",
                        )
                    with gr.Tab("Draw", id="draw") as draw_tab:
                        sketch = gr.Sketchpad(
                            label="Draw a digit (updates while you draw)", type="numpy", image_mode="RGBA",
                            canvas_size=(280, 280), brush=gr.Brush(default_size=18, colors=["#000000"],
                                                                  color_mode="fixed"),
                            elem_id="sketchpad",
                        )
                    with gr.Tab("Live webcam", id="webcam"):
                        webcam = gr.Image(sources=["webcam"], streaming=True, type="pil", label="Webcam stream")
                    with gr.Tab("Examples", id="examples"):
                        gallery = gr.Gallery(
                            value=[(str(p), f"{p.stem.split('-')[1]} (true label)") for p in EXAMPLES],
                            columns=6, height=260, object_fit="contain", allow_preview=False, label="Test-set examples",
                        )
                with gr.Row():
                    model_key = gr.Dropdown(model_choices, value=default_model, label="Model")
                    k = gr.Slider(1, 10, value=5, step=1, label="Top-k")
            with gr.Column(scale=5):
                with gr.Row():
                    predictions = gr.Label(label="Predictions", num_top_classes=10, elem_id="predictions")
                    model_input = gr.Image(label="Input as the model saw it", height=180, interactive=False,
                                           format="png")
                summary = gr.Markdown(elem_id="summary")
                gr.Markdown(HOW_TO_READ["predictions"])
        with gr.Tabs():
            with gr.Tab("Feature maps"):
                view = gr.Radio(VIEW_CHOICES, value="f", label="Show")
                grids = gr.Gallery(label="Blocks (most active channels)", columns=9, height=220,
                                   object_fit="contain", elem_id="block-grids", format="png")
                gr.Markdown(HOW_TO_READ["maps"])
                detail_block = gr.Dropdown([], label="Block to enlarge", allow_custom_value=True)
                detail = gr.Image(label="All channels of the chosen block", interactive=False, height=480, format="png")
            with gr.Tab("Residual magnitudes"):
                chart = gr.Image(label="‖F(x)‖ / ‖s(x)‖ and cosine per block", interactive=False, format="png")
                gr.Markdown(HOW_TO_READ["residual"])
                table = gr.Dataframe(headers=present.METRIC_COLUMNS, label="Per-block metrics", interactive=False,
                                     elem_id="metrics-table")

            with gr.Tab("Lesions"):
                gr.Markdown(HOW_TO_READ["lesions"])
                with gr.Row():
                    lesion_blocks = gr.CheckboxGroup([], label="Remove the residual branch of these blocks")
                    lesion_btn = gr.Button("Lesion", variant="primary", scale=0)
                with gr.Row():
                    lesion_preds = gr.Label(label="Predictions with the lesion", num_top_classes=10)
                    lesion_text = gr.Markdown()
                sweep_btn = gr.Button("Lesion each block alone")
                sweep_chart = gr.Image(label="Each block lesioned alone", interactive=False)
                sweep_table = gr.Dataframe(headers=present.SWEEP_COLUMNS, interactive=False)
            with gr.Tab("Readout"):
                gr.Markdown(HOW_TO_READ["readout"])
                readout_btn = gr.Button("Read out every block", variant="primary")
                readout_chart = gr.Image(label="The classifier head applied after each block", interactive=False)
                readout_text = gr.Markdown()
            with gr.Tab("Grad-CAM"):
                gr.Markdown(HOW_TO_READ["gradcam"])
                with gr.Row():
                    cam_block = gr.Dropdown([], label="Block", allow_custom_value=True)
                    cam_class = gr.Dropdown([], label="Class (empty: the predicted one)", allow_custom_value=True)
                    cam_btn = gr.Button("Explain", variant="primary", scale=0)
                cam_image = gr.Image(label="Grad-CAM", interactive=False, height=300)
            with gr.Tab("Export"):
                gr.Markdown(HOW_TO_READ["export"])
                export_btn = gr.Button("Build the ZIP", variant="primary")
                export_file = gr.File(label="Analysis (JSON + PNG images)", interactive=False)

        outputs = [predictions, model_input, grids, chart, table, summary, detail, detail_block, lesion_blocks,
                   cam_block, cam_class, state]
        settings = [model_key, k, view, detail_block, lesion_blocks]
        photo.change(lambda img, *s: analyze(img, "photo", *s) if img is not None else (gr.skip(),) * N_OUTPUTS,
                     [photo, *settings], outputs, api_name="analyze_photo", trigger_mode="always_last")
        sketch.change(lambda v, *s: analyze(v, "drawing", *s), [sketch, *settings], outputs,
                      api_name="analyze_drawing", trigger_mode="always_last", show_progress="hidden")
        webcam.stream(lambda img, *s: analyze(img, "photo", *s), [webcam, *settings], outputs,
                      api_name="analyze_webcam", stream_every=0.2, time_limit=60, show_progress="hidden")
        gallery.select(example_selected, settings, outputs, api_name="analyze_example")
        for control in (model_key, k, view, detail_block):
            control.input(reanalyze, [state, *settings], outputs, api_visibility="private",
                          trigger_mode="always_last", show_progress="hidden")
        lesion_btn.click(do_lesion, [state, model_key, k, lesion_blocks], [lesion_preds, lesion_text],
                         api_name="lesion")
        sweep_btn.click(do_sweep, [state, model_key, k], [sweep_chart, sweep_table], api_name="lesion_sweep")
        readout_btn.click(do_readout, [state, model_key, k], [readout_chart, readout_text], api_name="readout")
        cam_btn.click(do_gradcam, [state, model_key, k, cam_block, cam_class], cam_image, api_name="gradcam")
        export_btn.click(do_export, [state, model_key, k, lesion_blocks], export_file, api_name="export")
        # The sketchpad starts with no tool selected; pick the brush so the user can draw at once.
        draw_tab.select(None, None, None, js=SELECT_BRUSH_JS)
        grids.select(block_clicked, None, detail_block, api_visibility="private").then(
            reanalyze, [state, *settings], outputs, api_visibility="private", show_progress="hidden")

    return demo


def build_registry(args: argparse.Namespace) -> present.Registry:
    registry = present.default_registry(args.device, args.weights_dir)
    if args.weights or args.arch:
        if args.arch and args.arch != "tutorial":
            from resnet_demo.tv import load_torchvision

            load = lambda: Explorer(  # noqa: E731
                *load_torchvision(args.arch, args.weights, download=args.download_weights, classes=args.classes),
                device=args.device,
            )
            label = f"{args.arch} ({Path(args.weights).name if args.weights else 'torchvision weights'})"
        else:
            load = lambda: Explorer.from_weights(args.weights, args.device)  # noqa: E731
            label = f"Your checkpoint ({Path(args.weights).name})"
        registry.choices["custom"] = present.ModelChoice("custom", label, load)
    registry.load_all()
    return registry


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Residual Block Explorer: see what each residual block does.")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    parser.add_argument("--share", action="store_true", help="create a public gradio.live link (needs internet)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: the best available)")
    parser.add_argument("--weights", help="your own checkpoint: a tutorial Net state dict, a project .safetensors, "
                        "or with --arch a torchvision ResNet state dict")
    parser.add_argument("--weights-dir", type=Path, default=WEIGHTS_DIR,
                        help="folder holding cifar10_resnet.* and mnist_resnet.* (default: the shipped weights/)")
    parser.add_argument("--arch", help="tutorial (default) or a torchvision ResNet: resnet18/34/50/101/152")
    parser.add_argument("--download-weights", action="store_true",
                        help="with --arch and no --weights: fetch torchvision's published ImageNet weights")
    parser.add_argument("--classes", help="with --arch: a file of class names, one per line, for a fine-tuned model")
    parser.add_argument("--concurrency", type=int, default=None,
                        help="analyses run at once (default: 2 on a CPU, 4 on a GPU)")
    parser.add_argument("--sessions", type=int, default=SESSIONS,
                        help=f"browser sessions whose page state is kept, most recent first (default {SESSIONS})")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if torch.cuda.is_available() and not (args.device or "").startswith(("cpu", "mps")):
        # Inputs have a fixed size per model: autotune once. Set before the models load, since each
        # Explorer records its CUDA graph (and so picks its kernels) as it is made.
        torch.backends.cudnn.benchmark = True
    registry = build_registry(args)
    for line in registry.status():
        print(line)
    custom = registry.choices.get("custom")
    if custom is not None and custom.explorer is None:
        sys.exit(f"error: {custom.error}")
    if all(c.explorer is None for c in registry.choices.values()):
        sys.exit("error: no model could be loaded; see the lines above for where the weights should be.")
    demo = make_demo(registry, default_model="custom" if custom is not None else present.AUTO)
    gpu_present = any(c.explorer is not None and c.explorer.device.type == "cuda" for c in registry.choices.values())
    concurrency = args.concurrency or (4 if gpu_present else 2)
    # Requests are single images: intra-op threads buy little and fight each other when several
    # analyses run at once, so the cores are shared out between concurrent requests instead (on a GPU
    # machine too: decoding, metrics and drawing stay on the CPU).
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // concurrency))
    # Keep freed activation memory for the next request (a few % of every forward), in one malloc
    # arena per concurrent analysis rather than one per pool thread (RSS).
    tune_malloc(arenas=max(2, concurrency))
    demo.queue(default_concurrency_limit=concurrency, max_size=256)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, max_file_size=MAX_UPLOAD,
                theme=THEME, footer_links=["api"], state_session_capacity=args.sessions)


if __name__ == "__main__":
    main()
