"""The lesion study and block similarity over a visitor's labelled ZIP, for a model of classes no shipped set has."""

import io
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, TINY_PROJ, randomise_bn
from PIL import Image

from resnet_demo.core.capture import find_blocks
from resnet_demo.core.errors import DataError
from resnet_demo.core.explorer import Explorer
from resnet_demo.core.model import build_model
from resnet_demo.core.studies import budget
from resnet_demo.core.studies.budget import StudyTooLarge, held
from resnet_demo.core.studies.similarity import block_similarity
from resnet_demo.core.weights.cards import CIFAR10, ModelCard
from resnet_demo.view import dataset_page
from resnet_demo.view.dataset_page import SHIPPED_SET, USER_SET
from resnet_demo.view.pages import Pages
from resnet_demo.view.registry import Registry
from resnet_demo.view.results import Settings
from resnet_demo.view.uploads import UserModels

CLASSES = ["cat", "dog", "fox"]


def pets(config, seed: int, name: str) -> Explorer:
    """A tiny untrained ResNet whose head names three classes that are neither CIFAR-10's nor MNIST's; without a
    head bias, so its answers follow the images rather than one favoured class."""
    torch.manual_seed(seed)
    config = replace(config, num_classes=3)
    card = ModelCard.from_preset(CIFAR10, name, classes=list(CLASSES), config=config.to_dict(), trained=False)
    model = randomise_bn(build_model(config), seed)
    with torch.no_grad():
        model.fc.bias.zero_()
    return Explorer(model, card, "cpu")


def images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` noisy images of random colours (noise alone looks alike to a model after its pooling), classes in turn."""
    g = torch.Generator().manual_seed(seed)
    colour = torch.randint(0, 256, (n, 3, 1, 1), generator=g)
    noise = torch.randint(-40, 41, (n, 3, 32, 32), generator=g)
    return (colour + noise).clamp(0, 255).to(torch.uint8), torch.arange(n) % 3


def labelled_zip(path: Path, pixels: torch.Tensor, labels: torch.Tensor) -> Path:
    """A ZIP with one folder per class, as a visitor makes it."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for i, (img, label) in enumerate(zip(pixels, labels)):
            png = io.BytesIO()
            Image.fromarray(img.permute(1, 2, 0).numpy()).save(png, format="PNG")
            z.writestr(f"{CLASSES[int(label)]}/{i:03d}.png", png.getvalue())
    path.write_bytes(buf.getvalue())
    return path


@pytest.fixture
def page():
    """A server with no shipped model: the session's two uploaded models, A and B."""
    pages = Pages(Registry([]), UserModels())
    a, b = pets(TINY, 1, "pets-a"), pets(TINY_PROJ, 2, "pets-b")
    key_a, _ = pages.uploads.add("s1", a, "A")
    key_b, _ = pages.uploads.add("s1", b, "B")
    return pages, Settings(key_a, 3, session="s1"), key_b, a, b


def upload(pages, settings, tmp_path, name: str, seed: int, n: int = 12):
    pixels, labels = images(n, seed)
    path = labelled_zip(tmp_path / name, pixels, labels)
    explorer = pages.explorer(settings.model_key, "photo", settings.session)[1]
    data = pages.user_sets.read(settings.session, explorer, path, name)
    assert torch.equal(data.images, pixels) and torch.equal(data.labels, labels)  # 32×32 PNGs arrive unchanged
    return data


def by_hand(explorer: Explorer, pixels: torch.Tensor, labels: torch.Tensor) -> dict[str, np.ndarray]:
    """Right answers per class, intact ("none") and with each block's branch removed: y = relu(s(x))."""
    out = {}
    with torch.inference_mode():
        x = explorer.batch_input(pixels)
        for spec in [None, *find_blocks(explorer.model)]:
            hook = None
            if spec is not None:
                block = spec.module
                hook = block.register_forward_hook(lambda m, inp, _: m.act(m.shortcut(inp[0])))
            try:
                right = explorer.model(x).argmax(1) == labels
            finally:
                if hook is not None:
                    hook.remove()
            out["none" if spec is None else spec.name] = np.bincount(labels[right].numpy(), minlength=3)
    return out


def test_the_lesion_study_runs_over_the_visitors_zip(page, tmp_path, monkeypatch):
    pages, settings, _, a, _ = page
    with pytest.raises(DataError, match="upload a labelled ZIP of yours in this tab"):
        pages.lesion_study(settings, "photo", SHIPPED_SET)  # no stored study, no shipped set of these classes
    with pytest.raises(DataError, match="No labelled set of yours .* upload a ZIP"):
        pages.lesion_study(settings, "photo", USER_SET)
    data = upload(pages, settings, tmp_path, "mine.zip", seed=3)
    scans = []
    real = dataset_page.scan_explorer
    monkeypatch.setattr(dataset_page, "scan_explorer", lambda *args, **kw: scans.append(real(*args, **kw)) or scans[-1])
    v = pages.lesion_study(settings, "photo", USER_SET)
    (scan,) = scans
    want = by_hand(a, data.images, data.labels)
    assert len({tuple(c) for c in want.values()}) >= 3  # the lesions change which classes are right
    lesions = scan.lesions
    assert lesions.rows == list(want) and lesions.classes == CLASSES
    assert np.array_equal(lesions.correct, np.stack(list(want.values())))
    assert lesions.support.tolist() == [4, 4, 4]
    overall = {r: c.sum() / 12 for r, c in want.items()}
    intact = overall.pop("none")
    worst = sorted(overall.items(), key=lambda kv: kv[1])[:3]
    assert v.text.startswith(f"Over 12 images of your ZIP mine.zip, computed now: intact accuracy {intact:.1%}; "
                             "without " + ", ".join(f"**{b}** {x:.1%}" for b, x in worst) + ".")
    assert pages.lesion_study(settings, "photo", USER_SET) is v and len(scans) == 1  # cached
    # A second ZIP under the same name is another set: computed again, over its own images.
    other = upload(pages, settings, tmp_path, "mine.zip", seed=4, n=9)
    v2 = pages.lesion_study(settings, "photo", USER_SET)
    assert len(scans) == 2 and v2 is not v and "Over 9 images of your ZIP mine.zip" in v2.text
    assert np.array_equal(scans[1].lesions.correct, np.stack(list(by_hand(a, other.images, other.labels).values())))
    with pytest.raises(DataError, match="upload a labelled ZIP of yours"):  # the shipped source is unchanged
        pages.lesion_study(settings, "photo", SHIPPED_SET)


def test_the_user_sets_studies_go_through_the_servers_budget(page, tmp_path, monkeypatch):
    pages, settings, key_b, _, _ = page
    upload(pages, settings, tmp_path, "mine.zip", seed=3)
    monkeypatch.setattr(budget, "BUDGET", 1000)
    with pytest.raises(StudyTooLarge, match="The lesion study .*it was not started"):
        pages.lesion_study(settings, "photo", USER_SET)
    with pytest.raises(StudyTooLarge, match="Block similarity of pets-a and pets-b over 12 images .*not started"):
        pages.similarity(settings, key_b)
    assert held() == 0


def test_block_similarity_runs_over_the_visitors_zip(page, tmp_path, monkeypatch):
    pages, settings, key_b, a, b = page
    with pytest.raises(ValueError, match="load a labelled ZIP of yours for it in the Data set tab"):
        pages.similarity(settings, key_b)
    data = upload(pages, settings, tmp_path, "mine.zip", seed=5)
    calls = []
    monkeypatch.setattr("resnet_demo.view.pages.similarity_map", lambda m, *args: calls.append(m) or "map")
    v = pages.similarity(settings, key_b)
    want = block_similarity(a, b, data.images)
    (matrix,) = calls
    assert torch.allclose(matrix, want.matrix, atol=1e-12) and want.n == 12
    assert v.text.startswith("Linear CKA over 12 images of your ZIP `mine.zip`")
    matches = ", ".join(f"{x}→{y} ({s:.2f})" for x, y, s in want.best_match())
    assert f"the most similar block of B: {matches}." in v.text
    pages.similarity(settings, key_b)
    assert len(calls) == 2 and calls[1] is matrix  # cached
    other = upload(pages, settings, tmp_path, "mine.zip", seed=6, n=8)
    pages.similarity(settings, key_b)
    assert torch.allclose(calls[2], block_similarity(a, b, other.images).matrix, atol=1e-12)
    assert not torch.allclose(calls[2], matrix)
