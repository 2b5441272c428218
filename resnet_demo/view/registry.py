"""The models the page offers: the shipped ones and one from the command line, loaded once and shared.

A model that cannot be loaded stays listed with its error, so the page and the terminal say what is
missing instead of silently serving something else.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..core.explorer import Explorer
from ..core.runtime import enable_cudnn_autotuning, share_cores
from ..core.weights.cards import SHIPPED, WEIGHTS_DIR, WeightsError, read_class_names
from ..core.weights.hub import normalise_model_id, open_from_hub
from ..core.weights.opening import configs_beside
from ..core.weights.torchvision_resnets import published_torchvision

__all__ = [
    "AUTO",
    "CUSTOM",
    "HUB_PREFIX",
    "ModelChoice",
    "Registry",
    "default_registry",
    "example_caption",
    "example_kind",
    "prepare_process",
    "start_serving",
]

AUTO = "auto"  # the selector's "the model trained for this kind of input"
CUSTOM = "custom"  # the selector's key for a model given on the command line
HUB_PREFIX = "hub:"  # keys of models from the Hugging Face Hub given on the command line (--hub MODEL_ID)


@dataclass
class ModelChoice:
    """One entry of the model selector: how to load it, and what went wrong if it cannot be."""

    key: str
    label: str
    load: Callable[[], Explorer]
    explorer: Explorer | None = None
    error: str | None = None


class Registry:
    """The models the page offers, loaded once at start-up and shared by all sessions."""

    def __init__(self, choices: list[ModelChoice]) -> None:
        self.choices = {c.key: c for c in choices}
        self._lock = threading.Lock()

    def load_all(self) -> None:
        for choice in self.choices.values():
            self._load(choice)

    def _load(self, choice: ModelChoice) -> None:
        with self._lock:
            if choice.explorer is None and choice.error is None:
                try:
                    choice.explorer = choice.load()
                except (WeightsError, ValueError, OSError) as exc:
                    choice.error = str(exc)

    def add_custom(
        self,
        weights: str | None,
        arch: str | None = None,
        *,
        device: str | None = None,
        download: bool = False,
        classes: str | None = None,
    ) -> None:
        """Offer the model given on the command line as :data:`CUSTOM`.

        - ``weights`` with its card beside it (a project ``.safetensors`` and its ``.json``): loaded as the card
          says, the file checked against the card's sha256 (``arch``, if given, must be the card's).
        - ``weights`` without a card: opened exactly as an uploaded checkpoint is (read within bounds, never
          unpickled unsafely, recognised from its keys and shapes or as ``arch`` says, ``resnet18:no-maxpool``
          included, the preprocessing chosen from it), so the terminal and the page take the same decisions and
          refuse with the same sentences; ``classes`` is a class-names file (one per line, or JSON). A timm or
          transformers ``config.json`` and a ``preprocessor_config.json`` beside the file are read, as
          :func:`~resnet_demo.core.weights.opening.open_weights` reads them.
        - no ``weights``: torchvision's published ImageNet weights for ``arch``, fetched only with ``download``.
        """
        if weights:
            path = Path(weights)
            card_path = path.with_suffix(".json")

            def load() -> Explorer:
                names = read_class_names(classes) if classes else None
                if not card_path.is_file():
                    config, preprocessor = configs_beside(path)
                    return Explorer.from_checkpoint(path, arch=arch or None, class_names=names,
                                                    source=f"checkpoint {weights}", config=config,
                                                    preprocessor=preprocessor, device=device)
                explorer = Explorer.from_weights(path, device)
                card = explorer.card
                if arch and _arch_key(arch) != _arch_key(card.arch) and not (arch == "tutorial" and
                                                                             card.arch == "resnet"):
                    raise WeightsError(f"weights file {path} has its card {card_path} beside it, which says it is "
                                       f"{card.arch}, not {arch}: leave out --arch or give the card's")
                if names is not None:
                    if len(names) != len(card.classes):
                        raise WeightsError(f"{len(names)} class names were given, but the checkpoint's classifier "
                                           f"has {len(card.classes)} classes")
                    card.classes = names
                return explorer

            label = f"Your checkpoint ({path.name})"
        else:

            def load() -> Explorer:
                if not arch:
                    raise WeightsError("give a checkpoint with --weights, or --arch and --download-weights")
                names = read_class_names(classes) if classes else None
                return Explorer(*published_torchvision(arch, download=download, classes=names), device=device)

            label = f"{arch} (torchvision's published weights)"
        self.choices[CUSTOM] = ModelChoice(CUSTOM, label, load)

    def add_hub(self, model_id: str, *, device: str | None = None) -> str:
        """Offer ``model_id`` from the Hugging Face Hub (``--hub MODEL_ID``), downloaded (or taken from the cache) and
        opened when the registry loads, as an upload is opened; a failure stays listed with its sentence.

        Returns:
            its key in the selector, :data:`HUB_PREFIX` and the model id.

        Raises:
            WeightsError: ``model_id`` is not a model id.
        """
        repo = normalise_model_id(model_id)
        key = HUB_PREFIX + repo
        self.choices[key] = ModelChoice(key, f"{repo} (Hugging Face Hub)",
                                        lambda: Explorer(*open_from_hub(repo), device=device))
        return key

    def get(self, key: str) -> Explorer:
        """The explorer for ``key``; raises ``WeightsError`` saying what is missing and where."""
        if key not in self.choices:
            raise WeightsError(f"unknown model '{key}'; choose one of {list(self.choices)}")
        choice = self.choices[key]
        self._load(choice)
        if choice.explorer is None:
            raise WeightsError(f"The {choice.label} model is not available: {choice.error}")
        return choice.explorer

    def resolve(self, key: str, kind: str) -> str:
        """:data:`AUTO` picks the first loaded model trained for the input's kind (its card's ``input_kind``)."""
        if key != AUTO:
            return key
        for choice in self.choices.values():
            if choice.explorer is not None and choice.explorer.card.input_kind == kind:
                return choice.key
        for choice in self.choices.values():  # none loaded: name the one that should have been, with its error
            shipped = SHIPPED.get(choice.key)
            if shipped is not None and shipped.preset.input_kind == kind:
                return choice.key
        return next(iter(self.choices))

    def kind_of(self, key: str) -> str:
        """The kind of input (``photo``/``drawing``) the model ``key`` was trained on, for examples named by key."""
        choice = self.choices.get(key)
        if choice is not None and choice.explorer is not None:
            return choice.explorer.card.input_kind
        return SHIPPED[key].preset.input_kind if key in SHIPPED else "photo"

    @property
    def loaded(self) -> list[Explorer]:
        return [c.explorer for c in self.choices.values() if c.explorer is not None]

    @property
    def failed(self) -> dict[str, str]:
        """Key -> error of every model that could not be loaded."""
        return {c.key: c.error for c in self.choices.values() if c.explorer is None and c.error is not None}

    def status(self) -> list[str]:
        """One line per model: what it is and whether it is ready."""
        return [self._status(c) for c in self.choices.values()]

    @staticmethod
    def _status(c: ModelChoice) -> str:
        if c.explorer is None:
            return f"**{c.label}**: not available — {c.error}"
        card = c.explorer.card
        if not card.trained:
            return f"**{c.label}**: {card.name} has UNTRAINED weights; its predictions are noise"
        headline, target = card.headline(), card.target()
        figure = ""
        if headline:
            tta = " with flip TTA" if headline[0] == "test_acc_tta" else ""
            figure = f", {headline[1]:.2%} test accuracy{tta}"
        if target and not target[2]:
            figure += f" (below the project's {target[1]:.1%} target: interim weights, see the README)"
        return f"**{c.label}**: {card.name} on {c.explorer.where}{figure}"


def _arch_key(arch: str) -> str:
    """An architecture as compared with a card's: case and dashes aside; a timm model by its name without the
    pretrained tag (``timm/resnet50.a1_in1k`` is ``timm/resnet50``); transformers' ResNet however it is written."""
    key = str(arch).strip().lower().replace("-", "")
    if key.startswith("timm/"):
        return key.partition(".")[0]
    if key in ("transformers", "transformers/resnet", "transformers/resnetforimageclassification"):
        return "transformers/resnet"
    return key


def default_registry(device: str | None = None, weights_dir: Path | None = None) -> Registry:
    """The shipped models (:data:`~resnet_demo.core.weights.cards.SHIPPED`): CIFAR-10 for photos, MNIST for drawings.

    ``weights_dir``: where ``<name>.safetensors`` and its card are; the shipped ``weights/`` by default.
    """
    weights_dir = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR

    def shipped(name: str) -> Callable[[], Explorer]:
        return lambda: Explorer.from_weights(weights_dir / f"{name}.safetensors", device)

    return Registry([ModelChoice(m.key, m.label, shipped(m.name)) for m in SHIPPED.values()])


def example_kind(registry: Registry, path: Path) -> str:
    """The kind of input an example is: examples are named ``<model key>-<label>-<n>``, the key's model decides."""
    return registry.kind_of(Path(path).name.split("-")[0])


def example_caption(path: Path) -> str:
    return f"{Path(path).stem.split('-')[1]} (true label)"


def prepare_process(device: str | None) -> None:
    """Process settings that must precede loading the models (cuDNN autotuning on a GPU)."""
    enable_cudnn_autotuning(device)


def start_serving(registry: Registry, concurrency: int | None) -> int:
    """Share the cores out between the analyses the server runs at once; returns that number.

    By default 2 on a CPU, 4 when a model runs on a GPU.
    """
    concurrency = concurrency or (4 if any(e.on_gpu for e in registry.loaded) else 2)
    share_cores(concurrency)
    return concurrency
