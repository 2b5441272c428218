"""Property-based fuzzing of the two parsers of untrusted files (images, checkpoints) and of ``recognise``.

- ``load_image`` on arbitrary bytes and on mutated PNG / JPEG / GIF / BMP files returns a PIL image
  (``RGB`` or ``L``) or raises ``InputError``: any other exception is a failure.
- ``read_checkpoint`` on arbitrary bytes (also behind a valid magic number), on mutated safetensors /
  torch.save (zip and legacy) files and on generated safetensors headers returns a state dict of plain
  tensors or raises ``WeightsError``; whatever it returns, ``recognise`` answers an ``Architecture`` or a
  ``WeightsError``.
- ``recognise`` on perturbed state dicts (keys dropped, dims changed, odd keys added) answers a
  ``WeightsError`` or an ``Architecture`` whose model, built independently, has exactly those keys and shapes.

Mutations are bit flips, overwrites (with bytes or with integers that often sit in length fields),
truncation, deletion, insertion and splicing with a piece of another seed file.

Two hypothesis profiles, chosen with ``HYPOTHESIS_PROFILE``: ``ci`` (the default: 120 examples per
property, the same every run, ~15 s in all) and ``long`` (20,000 examples per property, new ones every run).
The long run is a script that prints examples run, times and any falsifying example::

    HYPOTHESIS_PROFILE=long python tests/test_fuzz.py            # every property (about 10 minutes on 2 cores)
    HYPOTHESIS_PROFILE=long python tests/test_fuzz.py checkpoint  # only the properties whose name has this

Neither profile keeps a database of examples (nothing is written into the checkout).
"""

from __future__ import annotations

import atexit
import functools
import io
import os
import shutil
import struct
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

import pytest

pytest.importorskip("hypothesis")

import torch  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from PIL import Image  # noqa: E402

if __name__ == "__main__":  # run as a script: make the package importable as conftest does for pytest
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from resnet_demo.core.errors import InputError, WeightsError  # noqa: E402
from resnet_demo.core.preprocess import load_image  # noqa: E402
from resnet_demo.core.weights.reader import read_checkpoint  # noqa: E402
from resnet_demo.core.weights.recognise import Architecture, recognise  # noqa: E402

_COMMON = dict(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# CI draws the same examples every run (a failure there is reproducible, never flaky); the long run explores.
settings.register_profile("ci", max_examples=120, derandomize=True, **_COMMON)
settings.register_profile("long", max_examples=20_000, **_COMMON)
# Applied per test rather than loaded globally, so other test files keep hypothesis' defaults.
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
FUZZ = settings.get_profile(PROFILE if PROFILE in ("ci", "long") else "ci")

# Examples run per property, for the script's report.
RUNS: Counter[str] = Counter()

WORK = Path(tempfile.mkdtemp(prefix="resnet-demo-fuzz-"))
atexit.register(shutil.rmtree, WORK, ignore_errors=True)


# --- seeds ---------------------------------------------------------------------------------------------------


def _image_seeds() -> dict[str, bytes]:
    g = torch.Generator().manual_seed(0)
    rgb = Image.fromarray(torch.randint(0, 256, (12, 10, 3), generator=g, dtype=torch.uint8).numpy(), "RGB")
    out = {}
    for fmt, img, kw in (
        ("PNG", rgb, {}),
        ("PNG", rgb.convert("P"), {"transparency": 0}),
        ("PNG", rgb.convert("LA"), {}),
        ("JPEG", rgb, {"quality": 80}),
        ("JPEG", rgb, {"progressive": True, "exif": b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x01\x01\x12\x00\x03"
                                                           b"\x00\x00\x00\x01\x00\x06\x00\x00\x00\x00\x00\x00"}),
        ("GIF", rgb.convert("P"), {"save_all": True, "append_images": [rgb.convert("P").rotate(90)]}),
        ("BMP", rgb, {}),
        ("BMP", rgb.convert("1"), {}),
    ):
        buf = io.BytesIO()
        img.save(buf, format=fmt, **kw)
        out[f"{fmt.lower()}-{img.mode}-{len(out)}"] = buf.getvalue()
    return out


def _checkpoint_seeds() -> dict[str, bytes]:
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    sd = {
        "conv1.weight": torch.randn(4, 3, 3, 3, generator=g),
        "bn1.running_var": torch.rand(4, generator=g).half(),
        "bn1.num_batches_tracked": torch.tensor(7),
        "fc.weight": torch.randn(5, 4, generator=g),
        "fc.bias": torch.zeros(5),
    }
    out = {}
    save_file(sd, str(WORK / "seed.safetensors"))
    out["safetensors"] = (WORK / "seed.safetensors").read_bytes()
    torch.save(sd, WORK / "seed.pth")
    out["zip"] = (WORK / "seed.pth").read_bytes()
    torch.save({"state_dict": sd, "epoch": 3}, WORK / "seed.pth")
    out["zip-wrapped"] = (WORK / "seed.pth").read_bytes()
    torch.save(sd, WORK / "seed.pth", _use_new_zipfile_serialization=False)
    out["legacy"] = (WORK / "seed.pth").read_bytes()
    return out


IMAGES = _image_seeds()
CHECKPOINTS = _checkpoint_seeds()

# Integers that often sit in length and offset fields: small, boundary and huge.
_INTERESTING = [0, 1, 2, 7, 8, 127, 128, 255, 256, 2**15, 2**16 - 1, 2**31 - 1, 2**31, 2**32 - 1, 2**63 - 1, 2**64 - 1]
_mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 2**20), st.integers(0, 7)),
    st.tuples(st.just("overwrite"), st.integers(0, 2**20), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("number"), st.integers(0, 2**20), st.sampled_from(_INTERESTING), st.sampled_from("<>"),
              st.sampled_from("BHIQ")),
    st.tuples(st.just("truncate"), st.integers(0, 2**20)),
    st.tuples(st.just("delete"), st.integers(0, 2**20), st.integers(1, 512)),
    st.tuples(st.just("insert"), st.integers(0, 2**20), st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("splice"), st.integers(0, 2**20), st.integers(0, 15), st.integers(0, 2**20), st.integers(1, 4096)),
)


def mutate(data: bytes, ops: list[tuple], donors: list[bytes]) -> bytes:
    """Apply ``ops`` to ``data``; positions wrap around the current length, so every op lands somewhere."""
    buf = bytearray(data)
    for op in ops:
        at = op[1] % (len(buf) + 1)
        if op[0] == "flip" and buf:
            buf[at % len(buf)] ^= 1 << op[2]
        elif op[0] == "overwrite":
            buf[at : at + len(op[2])] = op[2]
        elif op[0] == "number":
            _, _, value, order, code = op
            size = struct.calcsize(code)
            buf[at : at + size] = struct.pack(order + code, value % (1 << (8 * size)))
        elif op[0] == "truncate":
            del buf[at:]
        elif op[0] == "delete":
            del buf[at : at + op[2]]
        elif op[0] == "insert":
            buf[at:at] = op[2]
        elif op[0] == "splice":  # a piece of another seed (or of this one): chunks in the wrong place
            donor = donors[op[2] % len(donors)]
            start = op[3] % (len(donor) + 1)
            buf[at:at] = donor[start : start + op[4]]
    return bytes(buf)


# --- (a) images --------------------------------------------------------------------------------------------------


def check_image(data: bytes) -> None:
    try:
        img = load_image(data)
    except InputError as exc:
        assert str(exc), "an InputError without a message"
        return
    assert isinstance(img, Image.Image) and img.mode in ("RGB", "L"), img


@FUZZ
@given(data=st.binary(max_size=4096))
def test_load_image_on_arbitrary_bytes(data):
    RUNS["load_image: arbitrary bytes"] += 1
    check_image(data)


@FUZZ
@given(seed=st.sampled_from(sorted(IMAGES)), ops=st.lists(_mutation, min_size=1, max_size=6))
def test_load_image_on_mutated_images(seed, ops):
    RUNS["load_image: mutated images"] += 1
    check_image(mutate(IMAGES[seed], ops, list(IMAGES.values())))


# Found by the long run: PIL's format plugins raise a bare ValueError while opening some damaged files
# (PpmImagePlugin._read_token, PngImagePlugin.chunk_IHDR, ...) and Image.open passes it on; load_image now
# answers them with an InputError like every other damaged file.
KNOWN_IMAGE_CRASHES = {
    "ppm-header-ends-early": b"P6\n",
    "ppm-maxval-zero": b"P5 1 1 0\n\0",
    "png-short-ihdr": b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 4) + b"IHDR" + bytes(8),
}


@pytest.mark.parametrize("data", KNOWN_IMAGE_CRASHES.values(), ids=KNOWN_IMAGE_CRASHES.keys())
def test_files_that_once_crashed_load_image_get_an_input_error(data):
    with pytest.raises(InputError, match="could not be read"):
        load_image(data)


# --- (b) checkpoints -----------------------------------------------------------------------------------------------


def check_checkpoint(data: bytes, suffix: str) -> None:
    # A new file each time, removed after: tensors of a zip checkpoint map their file, and rewriting a file
    # in place under a live mapping would be this test's bug, not the reader's (unlinking is safe).
    path = WORK / f"upload-{sum(RUNS.values())}{suffix}"
    path.write_bytes(data)
    try:
        sd = read_checkpoint(path, max_bytes=1 << 20)
    except WeightsError as exc:
        assert str(exc) and "\n" not in str(exc) and "weights_only" not in str(exc), str(exc)
        return
    finally:
        path.unlink()
    assert isinstance(sd, dict) and sd
    assert all(isinstance(k, str) and type(v) is torch.Tensor and v.layout == torch.strided for k, v in sd.items())
    try:
        arch = recognise(sd)
    except WeightsError:
        return
    assert isinstance(arch, Architecture)


@FUZZ
@given(data=st.binary(max_size=4096), suffix=st.sampled_from([".pth", ".safetensors", ".bin"]))
def test_read_checkpoint_on_arbitrary_bytes(data, suffix):
    RUNS["read_checkpoint: arbitrary bytes"] += 1
    check_checkpoint(data, suffix)


@FUZZ
@given(prefix=st.sampled_from([b"PK\x03\x04", b"\x80\x02", b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19.",
                               struct.pack("<Q", 60) + b"{", struct.pack("<Q", 2**40) + b"{"]),
       data=st.binary(max_size=2048))
def test_read_checkpoint_on_bytes_behind_a_valid_magic(prefix, data):
    RUNS["read_checkpoint: bytes behind a magic"] += 1
    check_checkpoint(prefix + data, ".pth")


@FUZZ
@given(seed=st.sampled_from(sorted(CHECKPOINTS)), ops=st.lists(_mutation, min_size=1, max_size=6),
       suffix=st.sampled_from([".pth", ".safetensors"]))
def test_read_checkpoint_on_mutated_checkpoints(seed, ops, suffix):
    RUNS["read_checkpoint: mutated checkpoints"] += 1
    if seed != "safetensors" and suffix == ".safetensors":
        suffix = ".pth"  # a .safetensors name forces that format: keep the torch files mostly on their path
    check_checkpoint(mutate(CHECKPOINTS[seed], ops, list(CHECKPOINTS.values())), suffix)


_dim = st.one_of(st.integers(0, 8), st.sampled_from([0, 1, 2**31, 2**32, 10**9, 2**63, 2**64]))
_entry = st.fixed_dictionaries(
    {
        "dtype": st.one_of(st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "BOOL", "C64", "F8_E4M3"]), st.text(max_size=4)),
        "shape": st.one_of(st.lists(_dim, max_size=5), st.integers(), st.just(None), st.lists(st.floats(), max_size=2)),
        "data_offsets": st.one_of(st.lists(st.one_of(st.integers(-2, 300), st.sampled_from([2**63, 2**64])),
                                           min_size=0, max_size=3), st.text(max_size=3)),
    }
)
_header = st.dictionaries(
    st.sampled_from(["conv1.weight", "fc.weight", "fc.bias", "__metadata__", "a", ""]),
    st.one_of(_entry, st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2), st.integers()),
    max_size=4,
)


@FUZZ
@given(header=_header, data=st.binary(max_size=300), slack=st.integers(-3, 3))
def test_read_checkpoint_on_generated_safetensors_headers(header, data, slack):
    RUNS["read_checkpoint: generated safetensors headers"] += 1
    import json

    raw = json.dumps(header).encode()
    check_checkpoint(struct.pack("<Q", max(0, len(raw) + slack)) + raw + data, ".safetensors")


# --- (c) recognise, on what a checkpoint that was read can still hold ---------------------------------------------


def _shape_seeds() -> dict[str, dict[str, tuple[int, ...]]]:
    from resnet_demo.core.model import ResNetConfig, build_model
    from resnet_demo.core.weights.recognise import tutorial_key_map
    from resnet_demo.core.weights.torchvision_resnets import build_torchvision

    small = ResNetConfig(widths=(4, 8, 8), blocks=(1, 2, 1), in_channels=1, num_classes=3)
    with torch.device("meta"):
        seeds = {
            "transition": build_model(small).state_dict(),
            "projection": build_model(ResNetConfig(widths=(4, 8), blocks=(2, 1), downsample="projection")).state_dict(),
            "resnet18": build_torchvision("resnet18", num_classes=7).state_dict(),
            "cifar-resnet18": build_torchvision("resnet18", num_classes=10, stem_kernel=3, maxpool=False).state_dict(),
        }
    mapping = tutorial_key_map(small)
    seeds["tutorial"] = {f"{mapping.get(k.rpartition('.')[0], k.rpartition('.')[0])}.{k.rpartition('.')[2]}": v
                         for k, v in seeds["transition"].items()}
    return {name: {k: tuple(v.shape) for k, v in sd.items()} for name, sd in seeds.items()}


SHAPES = _shape_seeds()
_key = st.one_of(
    st.sampled_from(sorted({k for sd in SHAPES.values() for k in sd})),
    st.builds("{}.{}".format, st.sampled_from(["res0", "res99", "conv9", "stages.7", "stages.0.transition.conv",
                                               "stages.0.blocks.res9.branch.conv1", "layer5.0.conv1", "module.fc",
                                               "stages.99999999999999999999", "res" + "9" * 40]),
              st.sampled_from(["weight", "bias", "running_var", "num_batches_tracked"])),
)
_edit = st.one_of(
    st.tuples(st.just("delete"), st.integers(0, 2**16)),
    st.tuples(st.just("reshape"), st.integers(0, 2**16), st.integers(0, 3), st.sampled_from([0, 1, 2, 3, 7, 64, 10**6])),
    st.tuples(st.just("add"), _key, st.lists(st.integers(0, 70), max_size=4).map(tuple)),
)


@functools.lru_cache(maxsize=256)
def meta_shapes(arch: Architecture, tutorial: bool) -> dict[str, tuple[int, ...]]:
    """The keys and shapes of the model ``arch`` describes, built independently on the meta device."""
    from resnet_demo.core.model import build_model
    from resnet_demo.core.weights.recognise import tutorial_key_map
    from resnet_demo.core.weights.torchvision_resnets import build_torchvision

    with torch.device("meta"):
        if arch.kind == "resnet":
            shapes = {k: tuple(v.shape) for k, v in build_model(arch.config).state_dict().items()}
            if tutorial:
                mapping = tutorial_key_map(arch.config)
                shapes = {f"{mapping.get(k.rpartition('.')[0], k.rpartition('.')[0])}.{k.rpartition('.')[2]}": v
                          for k, v in shapes.items()}
            return shapes
        model = build_torchvision(arch.kind, arch.num_classes, in_channels=arch.in_channels,
                                  stem_kernel=arch.stem_kernel, maxpool=arch.maxpool)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@FUZZ
@given(seed=st.sampled_from(sorted(SHAPES)), edits=st.lists(_edit, max_size=4))
def test_recognise_on_perturbed_state_dicts(seed, edits):
    """``recognise`` answers an Architecture whose model has exactly these keys and shapes, or a WeightsError."""
    RUNS["recognise: perturbed state dicts"] += 1
    shapes = dict(SHAPES[seed])
    for edit in edits:
        keys = list(shapes)
        if edit[0] == "delete" and keys:
            del shapes[keys[edit[1] % len(keys)]]
        elif edit[0] == "reshape" and keys:
            key = keys[edit[1] % len(keys)]
            if shapes[key]:
                dims = list(shapes[key])
                dims[edit[2] % len(dims)] = edit[3]
                shapes[key] = tuple(dims)
        elif edit[0] == "add":
            shapes[edit[1]] = edit[2]
    try:
        arch = recognise(shapes)
    except WeightsError as exc:
        assert str(exc) and "\n" not in str(exc), str(exc)
        return
    expected = meta_shapes(arch, tutorial="res1.conv1.weight" in shapes and "conv1.weight" in shapes)
    given_ = {k.removeprefix("module."): v for k, v in shapes.items()} if all(k.startswith("module.") for k in shapes) \
        else shapes
    assert {k: v for k, v in expected.items() if k in given_ or not k.endswith("num_batches_tracked")} == given_


# --- the long run ---------------------------------------------------------------------------------------------------


def main(argv: list[str]) -> int:
    """Run every property (or those whose name contains ``argv[0]``) and print examples run and failures."""
    tests = [(n, f) for n, f in sorted(globals().items()) if n.startswith("test_") and hasattr(f, "hypothesis")]
    tests = [(n, f) for n, f in tests if not argv or argv[0] in n]
    failures = 0
    for name, test in tests:
        start = time.monotonic()
        try:
            test()
            outcome = "ok"
        except Exception as exc:  # noqa: BLE001 - a failing property: report it and go on with the next
            failures += 1
            # hypothesis puts the falsifying example in the exception's notes.
            notes = "\n".join(getattr(exc, "__notes__", []))
            trace = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)[-6:])
            outcome = f"FAILED: {type(exc).__name__}: {str(exc)[:2000]}\n{notes[:4000]}\n{trace}"
        print(f"{name}: {time.monotonic() - start:.0f} s, {outcome}", flush=True)
    print(f"profile {PROFILE}: " + ", ".join(f"{k}: {v:,} examples" for k, v in sorted(RUNS.items())), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
