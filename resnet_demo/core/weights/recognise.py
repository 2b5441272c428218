"""The recogniser: which network a checkpoint is, from its key names and shapes only.

One answer for every caller (a visitor's upload, ``--weights`` on the command line, a card-less file given
to :func:`~.load.load_model`): :func:`recognise` compares the state dict with candidates built on the meta
device (no memory, no initialisation): the tutorial's ``Net``, this project's :class:`~..model.ResNet` in
either layout, and torchvision's ResNets, wide ResNets and ResNeXts, with torchvision's 7×7 stem or the 3×3
stem that CIFAR code puts on torchvision's blocks. Its answer is an :class:`Architecture`, with what the
weights cannot say (a max-pool has no parameters; nor has a stride) stated as an assumption; when nothing
fits, its one sentence says what the file does look like: the closest candidate and its first key or shape
that does not fit, the blocks per stage the file has, or that it is no ResNet read here.

A caller does::

    sd = read_checkpoint(path)                 # .reader: bounded, never unpickled unsafely
    arch = recognise(sd, source=f"checkpoint {path.name}")
    model = build_recognised(arch)             # .fitting
    fit_recognised(model, sd, arch, f"checkpoint {path.name}")

or :func:`~.load.open_checkpoint`, which does all of it and writes the card.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import cache, lru_cache

import torch

from ..errors import WeightsError
from ..model import TUTORIAL_CONFIG, ResNetConfig, build_model
from .reader import _is_count, _shape_str, strip_prefixes
from .torchvision_resnets import SUPPORTED_ARCHS, build_torchvision

__all__ = [
    "MAX_BLOCKS",
    "MAX_STAGES",
    "Architecture",
    "compare_shapes",
    "expected_shapes",
    "parse_override",
    "recognise",
    "tutorial_key_map",
]

# A bound on the candidates built on the meta device from the keys: resnet152 has 50 blocks in 4 stages.
MAX_STAGES = 16
MAX_BLOCKS = 1000


def _plural(n: int, word: str, words: str | None = None) -> str:
    return f"{n:,} {word if n == 1 else (words or word + 's')}"


@dataclass(frozen=True)
class Architecture:
    """What a checkpoint is, as far as its key names and shapes say, and what was assumed where they cannot.

    Attributes:
        kind: ``"resnet"`` for this project's :class:`~..model.ResNet` (the tutorial's ``Net`` included),
            else a torchvision architecture name from :data:`~.torchvision_resnets.SUPPORTED_ARCHS`.
        config: the :class:`~..model.ResNetConfig` for ``"resnet"``, else ``None``.
        num_classes: the classifier's width.
        in_channels: the first conv's input channels.
        description: one line for the page (with what was assumed, in parentheses).
        stem_kernel: the first conv's kernel: 7 (torchvision's stem) or 3 (the tutorial's, this project's
            and the CIFAR-style stem on torchvision's blocks).
        stem_stride: the first conv's stride (2 for torchvision's 7×7 stem, else 1): an assumption for a
            torchvision layout, whose weights do not hold it.
        maxpool: whether a max-pool follows the stem: an assumption for a torchvision layout (it has no
            weights), unless the caller said which.
        assumptions: what the weights could not say and was taken as something, one clause each.
    """

    kind: str
    config: ResNetConfig | None
    num_classes: int
    in_channels: int
    description: str
    stem_kernel: int = 3
    stem_stride: int = 1
    maxpool: bool = False
    assumptions: tuple[str, ...] = ()

    @property
    def stem_reduction(self) -> int:
        """How much the stem shrinks the input before the first block: 4 for torchvision's, 1 for CIFAR's."""
        return self.stem_stride * (2 if self.maxpool else 1)

    @property
    def stem(self) -> str:
        """The stem in words: "a 7×7 stem at stride 2 with a max-pool"."""
        pool = "with a max-pool" if self.maxpool else "without a max-pool"
        return f"a {self.stem_kernel}×{self.stem_kernel} stem at stride {self.stem_stride} {pool}"


@dataclass(frozen=True)
class _Candidate:
    """An architecture to compare a checkpoint with: its expected keys and shapes in state_dict order."""

    kind: str
    label: str  # "torchvision resnet18", "CIFAR-style resnet18", "the tutorial's Net", "this project's ResNet"
    short: str  # "resnet18", "the tutorial's Net", "this project's ResNet"
    expected: dict[str, tuple[int, ...]]
    config: ResNetConfig | None
    summary: str  # "3 stages of 3 blocks at 64/128/256 channels"
    note: str = ""
    stem_kernel: int = 3
    stem_stride: int = 1
    maxpool: bool = False


_RES_KEY = re.compile(r"^res(\d{1,6})\.")
_STAGE_KEY = re.compile(r"^stages\.(\d{1,6})\.")
_BLOCK_KEY = re.compile(r"^stages\.(\d{1,6})\.blocks\.res(\d{1,6})\.")
_LAYER_KEY = re.compile(r"^layer(\d{1,6})\.(\d{1,6})\.")
_OVERRIDES = ("tutorial", "resnet", *SUPPORTED_ARCHS)
_TRANSFORMERS = ("resnet.embedder.", "embedder.", "encoder.stages.")


def recognise(
    sd_or_shapes: Mapping[str, torch.Tensor | tuple[int, ...]],
    override: str | None = None,
    *,
    maxpool: bool | None = None,
    source: str = "the checkpoint",
) -> Architecture:
    """The architecture a state dict fits exactly, read from its key names and shapes only.

    Candidates are built on the meta device (no memory, no initialisation) and compared key by key and
    shape by shape. BN ``num_batches_tracked`` counters may be absent (older checkpoints lack them; eval
    never reads them). The first conv's input channels and the classifier's width are read from the
    checkpoint for every family, and for torchvision's blocks the stem's kernel too: 7×7 is torchvision's
    stem (stride 2, then a max-pool), 3×3 the CIFAR-style stem (stride 1, no max-pool). Neither a stride nor
    a max-pool is in the weights: they are taken as said and the :class:`Architecture` records the
    assumption (``maxpool`` overrides it). The first stage's stride of this project's ResNet is taken as 1
    (as 2, and said so, when the first stage downsamples).

    Args:
        sd_or_shapes: a state dict, or its keys with shapes (tuples); ``module.`` / ``_orig_mod.`` prefixes
            are removed.
        override: ``"tutorial"`` (the tutorial's key names), ``"resnet"`` (this project's ResNet, either key
            naming) or a torchvision architecture name: only that family is considered; ``"auto"`` or ``None``:
            every family. A ``:maxpool`` / ``:no-maxpool`` suffix says ``maxpool`` (:func:`parse_override`).
        maxpool: for torchvision's blocks, whether a max-pool follows the stem; ``None``: as the stem says
            (after a 7×7 stem yes, after a 3×3 stem no).
        source: what the messages call the checkpoint, e.g. ``"checkpoint net.pth"``.

    Returns:
        The :class:`Architecture`.

    Raises:
        ValueError: ``override`` is not one of the names above.
        WeightsError: one sentence: nothing fits, with the closest candidate and its first key or shape that
            does not fit, or what the file is instead; the ``override`` does not fit, with its first key or
            shape that does not fit and what does fit; a max-pool asked of a network without one; a
            classifier without classes or a first conv without input channels.
    """
    family, said = parse_override(override)
    maxpool = said if maxpool is None else maxpool
    shapes = _shapes_of(sd_or_shapes, source)
    if not shapes:
        raise WeightsError(f"{source} holds no tensors")
    found, scored = _search(shapes, family, maxpool)
    if found is not None:
        return _architecture(found, source, maxpool)
    (score, problem), best = max(scored, key=lambda s: s[0][0])  # max keeps the first of equal scores
    what = _problem_text(problem, best.short)
    if family is None:
        raise WeightsError(_fits_nothing(shapes, source, score, f"closest is {best.label}, but {what}"))
    fits, _ = _search(shapes, None, maxpool)
    hint = f"it fits {fits.label} instead" if fits is not None else _unsupported(shapes, _best_score(shapes, maxpool))
    raise WeightsError(f"{source} does not fit {best.label} (as asked): {what}" + (f"; {hint}" if hint else ""))


def _search(
    shapes: Mapping[str, tuple[int, ...]], family: str | None, maxpool: bool | None
) -> tuple[_Candidate | None, list[tuple[tuple[int, tuple | None], _Candidate]]]:
    """The first candidate of ``family`` (``None``: any) that ``shapes`` fits, and every candidate's score."""
    if family is None:
        # Try the family the key names point to first: building all twelve candidates is the slow path.
        for candidate in _candidates(shapes, _sniff(shapes), maxpool):
            if _compare(candidate.expected, shapes)[1] is None:
                return candidate, []
    scored = [(_compare(c.expected, shapes), c) for c in _candidates(shapes, family or "all", maxpool)]
    return next((c for (_, problem), c in scored if problem is None), None), scored


def _best_score(shapes: Mapping[str, tuple[int, ...]], maxpool: bool | None) -> int:
    return max(score for (score, _), _ in _search(shapes, "all", maxpool)[1])


def _file_blocks(shapes: Mapping[str, tuple[int, ...]]) -> tuple[list[int], str]:
    """Blocks per stage of a torchvision-style file (``layer{s}.{i}.``), counted in the file, and their kind."""
    blocks: dict[int, set[int]] = {}
    for key in shapes:
        if m := _LAYER_KEY.match(key):
            blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    per_stage = [len(blocks[s]) for s in sorted(blocks)]
    kind = "Bottleneck" if any(_LAYER_KEY.match(k) and ".conv3." in k for k in shapes) else "BasicBlock"
    return per_stage, kind


def _unsupported(shapes: Mapping[str, tuple[int, ...]], score: int) -> str | None:
    """What a file that fits nothing is, as a clause, when that says more than the closest candidate does."""
    if any(k.startswith(_TRANSFORMERS) for k in shapes):
        return "it is a Hugging Face transformers ResNet checkpoint, whose key names are not read here"
    if any(_LAYER_KEY.match(k) for k in shapes):
        per_stage, kind = _file_blocks(shapes)
        known = {_TV_BLOCKS[a] for a in SUPPORTED_ARCHS if (_TV_KIND[a] == kind)}
        if tuple(per_stage) not in known:
            return (f"it has {'/'.join(map(str, per_stage))} torchvision-style {kind}s per stage, "
                    "which no supported torchvision ResNet has")
        return None
    if score == 0:
        sample = ", ".join(f"'{k[:60]}'" for k in list(shapes)[:3])
        return f"it is not a ResNet checkpoint read here (its first keys are {sample})"
    return None


def _fits_nothing(shapes: Mapping[str, tuple[int, ...]], source: str, score: int, closest: str) -> str:
    clause = _unsupported(shapes, score)
    if clause is None:
        return f"{source} fits no supported architecture: {closest}"
    if clause.startswith("it has"):  # torchvision's blocks in another number: the closest is worth saying
        return f"{source} fits no supported architecture: {clause} ({closest})"
    return f"{source} fits no supported architecture: {clause}"


def parse_override(override: str | None) -> tuple[str | None, bool | None]:
    """An architecture override as a person writes it (``--arch``, the page's chooser): ``(family, maxpool)``.

    ``"resnet18"`` -> ``("resnet18", None)``; ``"resnet18:no-maxpool"`` -> ``("resnet18", False)``;
    ``"auto:maxpool"`` -> ``(None, True)`` (recognised, with a max-pool after the stem); ``""``, ``"auto"`` or
    ``None`` -> ``(None, None)``.

    Raises:
        ValueError: an unknown architecture or max-pool word, with the choices.
    """
    if override is None:
        return None, None
    arch, sep, pool = str(override).strip().partition(":")
    maxpool = None
    if sep:
        word = pool.strip().lower().replace("_", "-").replace(" ", "")
        if word not in ("maxpool", "no-maxpool"):
            raise ValueError(f"unknown max-pool choice {pool!r} in {override!r}; write ':maxpool' or ':no-maxpool'")
        maxpool = word == "maxpool"
    return _normalise_override(arch), maxpool


def _normalise_override(override: str | None) -> str | None:
    if override is None or str(override).strip().lower() in ("", "auto"):
        return None
    key = str(override).strip().lower().replace("-", "").replace(" ", "")
    if key not in _OVERRIDES:
        raise ValueError(f"unknown architecture {override!r}; choose one of {', '.join(_OVERRIDES)} (or auto), "
                         "followed by ':maxpool' or ':no-maxpool' to say whether a max-pool follows the stem, or "
                         "timm/<name> for one of timm's ResNets")
    return key


def _shapes_of(sd: Mapping, source: str) -> dict[str, tuple[int, ...]]:
    """Keys -> shapes as int tuples, prefixes removed.

    Raises:
        WeightsError: a key that is not a string or a shape that is not non-negative integers.
    """
    out: dict[str, tuple[int, ...]] = {}
    for key, value in sd.items():
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else value
        if not isinstance(key, str) or not isinstance(shape, (tuple, list)) or not all(_is_count(d) for d in shape):
            raise WeightsError(f"{source} has an entry {str(key)[:80]!r} that is not a named tensor shape")
        out[key] = tuple(int(d) for d in shape)
    return strip_prefixes(out)


def _sniff(shapes: Mapping[str, tuple[int, ...]]) -> str:
    if "res1.conv1.weight" in shapes and "conv1.weight" in shapes:
        return "tutorial"
    if "stem.conv.weight" in shapes:
        return "resnet"
    if "layer1.0.conv1.weight" in shapes:
        return "torchvision"
    return "none"


def _candidates(
    shapes: Mapping[str, tuple[int, ...]], family: str, maxpool: bool | None = None
) -> Iterator[_Candidate]:
    """The candidates of ``family``: "all", "tutorial", "resnet" (both namings), "torchvision" or an arch.

    Lazily, so that the first fit ends the search; torchvision's networks come in the order of how well
    their blocks per stage agree with the keys, so the one that fits is usually the first one built.
    """
    if family in ("all", "tutorial", "resnet"):
        yield _tutorial_candidate(shapes)
    if family in ("all", "resnet"):
        yield _project_candidate(shapes)
    if family in ("all", "torchvision"):
        per_stage = [len({k.split(".")[1] for k in shapes if k.startswith(f"layer{s}.")}) for s in range(1, 5)]
        for arch in sorted(SUPPORTED_ARCHS, key=lambda a: _TV_BLOCKS[a] != tuple(per_stage)):
            yield _torchvision_candidate(shapes, arch, maxpool)
    elif family in SUPPORTED_ARCHS:
        yield _torchvision_candidate(shapes, family, maxpool)


# Blocks per stage of each torchvision network, to try the likely ones first (checked against torchvision
# by the tests, which recognise every one of them).
_TV_BLOCKS = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3), "resnet50": (3, 4, 6, 3),
              "resnet101": (3, 4, 23, 3), "resnet152": (3, 8, 36, 3), "wide_resnet50_2": (3, 4, 6, 3),
              "wide_resnet101_2": (3, 4, 23, 3), "resnext50_32x4d": (3, 4, 6, 3),
              "resnext101_32x8d": (3, 4, 23, 3), "resnext101_64x4d": (3, 4, 23, 3)}
_TV_KIND = {a: "BasicBlock" if a in ("resnet18", "resnet34") else "Bottleneck" for a in _TV_BLOCKS}


def _compare(
    expected: Mapping[str, tuple[int, ...]], shapes: Mapping[str, tuple[int, ...]]
) -> tuple[int, tuple | None]:
    """(matching key+shape pairs, the first problem or ``None``).

    The first problem is the first expected key (in state_dict order) that is missing or has another shape,
    else the first key of ``shapes`` the candidate does not have.
    """
    score, problem = 0, None
    for key, want in expected.items():
        got = shapes.get(key)
        if got is None:
            if not key.endswith("num_batches_tracked") and problem is None:
                problem = ("missing", key, want)
        elif got != want:
            problem = problem or ("shape", key, got, want)
        else:
            score += 1
    if problem is None:
        extra = next((k for k in shapes if k not in expected), None)
        if extra is not None:
            problem = ("unexpected", extra)
    return score, problem


def _problem_text(problem: tuple, short: str) -> str:
    """The first key or shape that does not fit, as a clause: "key 'x' has shape [..] where resnet18 has [..]"."""
    if problem[0] == "missing":
        return f"key '{problem[1]}' is missing (where {short} has {_shape_str(problem[2])})"
    if problem[0] == "shape":
        return f"key '{problem[1]}' has shape {_shape_str(problem[2])} where {short} has {_shape_str(problem[3])}"
    return f"key '{problem[1]}' is not part of {short}"


def _dim(shapes: Mapping[str, tuple[int, ...]], key: str, axis: int, ndim: int, default: int) -> int:
    shape = shapes.get(key)
    return shape[axis] if shape is not None and len(shape) == ndim else default


def _num_classes(shapes: Mapping[str, tuple[int, ...]], default: int) -> int:
    return _dim(shapes, "fc.weight", 0, 2, _dim(shapes, "fc.bias", 0, 1, default))


@lru_cache(maxsize=64)  # bounded: every odd checkpoint brings a config of its own
def _meta_resnet_shapes(config: ResNetConfig) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """Key -> shape pairs of this project's ResNet for ``config``, built on the meta device."""
    with torch.device("meta"):
        model = build_model(config)
    return tuple((k, tuple(v.shape)) for k, v in model.state_dict().items())


@cache
def _meta_torchvision_shapes(arch: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """Key -> shape pairs of torchvision ``arch`` with 1000 classes, built on the meta device."""
    with torch.device("meta"):
        model = build_torchvision(arch)
    return tuple((k, tuple(v.shape)) for k, v in model.state_dict().items())


def _widths_blocks(widths: list[int], blocks: list[int]) -> str:
    stages = _plural(len(widths), "stage")
    per = f"{blocks[0]}" if len(set(blocks)) == 1 else "/".join(map(str, blocks))
    return f"{stages} of {per} block{'s' if max(blocks) > 1 else ''} at {'/'.join(map(str, widths))} channels"


def _resnet_candidate(
    config: ResNetConfig | None, *, tutorial_names: bool, label: str, note: str = ""
) -> _Candidate:
    """A candidate of this project's ResNet for ``config`` (the tutorial's when ``None``), in either naming."""
    short = "the tutorial's Net" if tutorial_names else "this project's ResNet"
    if config is None:  # nothing to infer from: compare with the tutorial's Net as it is
        config, note = TUTORIAL_CONFIG, ""
    try:
        pairs = _meta_resnet_shapes(config)
    except (RuntimeError, ValueError, OverflowError):  # absurd widths from a hostile table of shapes
        config, note = TUTORIAL_CONFIG, ""
        pairs = _meta_resnet_shapes(config)
    expected = dict(pairs)
    if tutorial_names:
        mapping = tutorial_key_map(config)
        expected = {f"{mapping.get(p, p)}.{leaf}": s for p, leaf, s in ((*k.rsplit(".", 1), s) for k, s in pairs)}
    summary = _widths_blocks(list(config.widths), list(config.blocks))
    return _Candidate("resnet", label, short, expected, config, summary, note)


def _tutorial_candidate(shapes: Mapping[str, tuple[int, ...]]) -> _Candidate:
    """The tutorial's key names: ``conv1``/``bn1`` stem, ``res{k}`` blocks numbered across stages, ``conv{s}``/``bn{s}``
    transitions between stages, ``fc``. The key names do not say which stage a block is in: block widths do."""
    config, note = _infer_tutorial(shapes)
    same = config is not None and (config.widths, config.blocks) == (TUTORIAL_CONFIG.widths, TUTORIAL_CONFIG.blocks)
    label = "the tutorial's Net" if config is None or same else "the tutorial's Net, resized"
    return _resnet_candidate(config, tutorial_names=True, label=label, note=note)


def _infer_tutorial(shapes: Mapping[str, tuple[int, ...]]) -> tuple[ResNetConfig | None, str]:
    if len(shapes.get("conv1.weight", ())) != 4:
        return None, ""
    in_channels, w0 = shapes["conv1.weight"][1], shapes["conv1.weight"][0]
    widths = [w0]
    while len(widths) < MAX_STAGES and len(shapes.get(f"conv{len(widths) + 1}.weight", ())) == 4:
        widths.append(shapes[f"conv{len(widths) + 1}.weight"][0])
    ids = sorted({int(m.group(1)) for k in shapes if (m := _RES_KEY.match(k))})
    if not ids or len(ids) > MAX_BLOCKS:
        return None, ""
    block_widths = [_dim(shapes, f"res{k}.conv1.weight", 0, 4, -1) for k in ids]
    blocks, ambiguous = _split_blocks(shapes, widths, ids, block_widths)
    if blocks is None:
        return None, ""
    note = ""
    if ambiguous:
        note = ("stages of equal width: which blocks belong to which is not in the weights "
                f"and was taken as {'/'.join(map(str, blocks))}")
    try:
        config = ResNetConfig(in_channels=in_channels, num_classes=_num_classes(shapes, 10), widths=tuple(widths),
                              blocks=tuple(blocks), downsample="transition", name="tutorial")
    except ValueError:
        return None, ""
    return config, note


def _split_blocks(
    shapes: Mapping[str, tuple[int, ...]], widths: list[int], ids: list[int], block_widths: list[int]
) -> tuple[list[int] | None, bool]:
    """Blocks per stage for the tutorial's naming, and whether the weights left the split undecided.

    Consecutive blocks of a stage have its width, so the split is unique unless two neighbouring stages have
    the same width. Then the order of the keys decides when it interleaves transitions and blocks (as
    ``torch.save`` of ``Net.state_dict()`` does), else the blocks are shared out evenly.
    """
    n = len(widths)
    if len(ids) < n:
        return None, False
    # The key order: the blocks whose first key comes after transition conv{s+1} (and before the next).
    order = {k: i for i, k in enumerate(shapes)}
    marks = [order.get(f"conv{s + 1}.weight", -1) for s in range(1, n)]
    first_of: dict[int, int] = {}
    for i, k in enumerate(shapes):
        if m := _RES_KEY.match(k):
            first_of.setdefault(int(m.group(1)), i)
    first = [first_of[b] for b in ids]
    by_order = [sum(1 for f in first if (s == 0 or f > marks[s - 1]) and (s == n - 1 or f < marks[s]))
                for s in range(n)]
    if sum(by_order) == len(ids) and min(by_order) >= 1 and _fits_widths(by_order, widths, block_widths):
        return by_order, False
    # The widths: runs of neighbouring stages with one width, each run taking the blocks of that width.
    runs: list[list[int]] = []  # [width, stages, blocks]
    for w in widths:
        if runs and runs[-1][0] == w:
            runs[-1][1] += 1
        else:
            runs.append([w, 1, 0])
    r = 0
    for bw in block_widths:
        if bw != runs[r][0] and r + 1 < len(runs) and bw == runs[r + 1][0]:
            r += 1
        runs[r][2] += 1
    blocks: list[int] = []
    for _, n_stages, n_blocks in runs:
        blocks += [n_blocks // n_stages + (1 if i < n_blocks % n_stages else 0) for i in range(n_stages)]
    if min(blocks) < 1:  # a width that no block has: share the blocks out evenly, for the comparison
        blocks = [len(ids) // n + (1 if i < len(ids) % n else 0) for i in range(n)]
    return blocks, any(n_stages > 1 for _, n_stages, _ in runs)


def _fits_widths(blocks: list[int], widths: list[int], block_widths: list[int]) -> bool:
    stage_of = [s for s, count in enumerate(blocks) for _ in range(count)]
    return all(widths[s] == bw for s, bw in zip(stage_of, block_widths))


def _project_candidate(shapes: Mapping[str, tuple[int, ...]]) -> _Candidate:
    """This project's key names: ``stem.*``, ``stages.{s}.transition.*``, ``stages.{s}.blocks.res{k}.*``, ``fc.*``."""
    config, note = _infer_project(shapes)
    layout = "projection shortcuts" if config is not None and config.downsample == "projection" else "transitions"
    return _resnet_candidate(config, tutorial_names=False, label=f"this project's ResNet ({layout})", note=note)


def _infer_project(shapes: Mapping[str, tuple[int, ...]]) -> tuple[ResNetConfig | None, str]:
    if len(shapes.get("stem.conv.weight", ())) != 4:
        return None, ""
    in_channels, w0 = shapes["stem.conv.weight"][1], shapes["stem.conv.weight"][0]
    stage_ids = sorted({int(m.group(1)) for k in shapes if (m := _STAGE_KEY.match(k))})
    if not stage_ids or len(stage_ids) > MAX_STAGES:
        return None, ""
    blocks_of: dict[int, set[int]] = {s: set() for s in stage_ids}
    for k in shapes:
        if (m := _BLOCK_KEY.match(k)) and int(m.group(1)) in blocks_of:
            blocks_of[int(m.group(1))].add(int(m.group(2)))
    if sum(len(b) for b in blocks_of.values()) > MAX_BLOCKS:
        return None, ""
    widths, blocks = [], []
    for s in stage_ids:
        first = min(blocks_of[s], default=None)
        prefix = f"stages.{s}."
        width = next(
            (shapes[k][0] for k in (f"{prefix}blocks.res{first}.branch.conv1.weight", f"{prefix}transition.conv.weight",
                                   f"{prefix}blocks.res{first}.shortcut.conv.weight")
             if len(shapes.get(k, ())) == 4),
            widths[-1] if widths else w0,
        )
        widths.append(width)
        blocks.append(len(blocks_of[s]))
    projection = any(".shortcut." in k for k in shapes)
    # A first stage that downsamples has a transition (or a projection) of its own: its stride is not in the
    # weights, only that it is not 1.
    strided = any(k.startswith(("stages.0.transition.", f"stages.0.blocks.res{min(blocks_of[0], default=1)}.shortcut."))
                  for k in shapes) if 0 in blocks_of else False
    try:
        config = ResNetConfig(in_channels=in_channels, num_classes=_num_classes(shapes, 10), widths=tuple(widths),
                              blocks=tuple(blocks), downsample="projection" if projection else "transition",
                              first_stride=2 if strided else 1, name="custom")
    except ValueError:
        return None, ""
    return config, "the first stage downsamples: its stride is not in the weights and was taken as 2" if strided else ""


def _torchvision_candidate(shapes: Mapping[str, tuple[int, ...]], arch: str, maxpool: bool | None = None) -> _Candidate:
    """torchvision ``arch`` with the checkpoint's input channels, stem kernel (7 or 3) and classifier width.

    A 3×3 first conv is the CIFAR-style stem (stride 1, no max-pool, unless ``maxpool`` says there is one);
    any other kernel is compared with torchvision's 7×7 stem (stride 2, then a max-pool unless ``maxpool``
    says not).
    """
    expected = dict(_meta_torchvision_shapes(arch))
    out_c = expected["conv1.weight"][0]
    small = tuple(shapes.get("conv1.weight", ()))[2:] == (3, 3)
    kernel = 3 if small else 7
    expected["conv1.weight"] = (out_c, _dim(shapes, "conv1.weight", 1, 4, 3), kernel, kernel)
    classes = _num_classes(shapes, 1000)
    expected["fc.weight"] = (classes, expected["fc.weight"][1])
    expected["fc.bias"] = (classes,)
    per_stage = [len({k.split(".")[1] for k in expected if k.startswith(f"layer{s}.")}) for s in range(1, 5)]
    block = "Bottleneck" if "layer1.0.conv3.weight" in expected else "BasicBlock"
    summary = f"4 stages of {'/'.join(map(str, per_stage))} {block}s"
    if small:
        pool = bool(maxpool)
        note = ("a 3×3 stem at stride 1 and no max-pool, as CIFAR code puts before torchvision's blocks: neither "
                "is in the weights" if maxpool is None else
                f"a 3×3 stem at stride 1 {'with a' if pool else 'and no'} max-pool, as asked")
        return _Candidate(arch, f"CIFAR-style {arch}", arch, expected, None, summary, note, 3, 1, pool)
    pool = maxpool is not False
    note = ("the max-pool after the 7×7 stem is not in the weights and was taken as there, as torchvision builds "
            "it" if maxpool is None else f"{'with' if pool else 'without'} the max-pool after the 7×7 stem, as asked")
    return _Candidate(arch, f"torchvision {arch}", arch, expected, None, summary, note, 7, 2, pool)


def _architecture(candidate: _Candidate, source: str, maxpool: bool | None = None) -> Architecture:
    """The :class:`Architecture` of a candidate the checkpoint fits.

    Raises:
        WeightsError: a classifier without classes, a first conv without input channels, or a max-pool asked
            of this project's ResNet (which has none).
    """
    first = "conv1.weight" if "conv1.weight" in candidate.expected else "stem.conv.weight"
    in_channels = candidate.expected[first][1]
    num_classes = candidate.expected["fc.weight"][0]
    if num_classes < 1:
        raise WeightsError(f"{source} has a classifier without classes ('fc.weight' has shape "
                           f"{_shape_str(candidate.expected['fc.weight'])})")
    if in_channels < 1:
        raise WeightsError(f"{source} has a first convolution without input channels ('{first}' has shape "
                           f"{_shape_str(candidate.expected[first])})")
    if candidate.kind == "resnet" and maxpool:
        raise WeightsError(f"{source} is {candidate.label}, which has no max-pool after its stem to keep: "
                           "the max-pool choice is for torchvision's ResNets")
    params = sum(math.prod(s) for k, s in candidate.expected.items()
                 if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    description = (
        f"{candidate.label}: {candidate.summary}, {_plural(in_channels, 'input channel')}, "
        f"{_plural(num_classes, 'class', 'classes')}, {params:,} parameters"
        + (f" ({candidate.note})" if candidate.note else "")
    )
    assumed = (candidate.note,) if candidate.note and not candidate.note.endswith("as asked") else ()
    return Architecture(candidate.kind, candidate.config, num_classes, in_channels, description,
                        candidate.stem_kernel, candidate.stem_stride, candidate.maxpool, assumed)


# --- key names and expected shapes ----------------------------------------------------------------------------


def tutorial_key_map(config: ResNetConfig) -> dict[str, str]:
    """Map the project's key prefixes to the tutorial's (``stages.0.blocks.res1.branch.conv1`` -> ``res1.conv1``)."""
    if config.downsample != "transition":
        raise WeightsError("tutorial-style checkpoints need a config with downsample='transition'")
    mapping = {"stem.conv": "conv1", "stem.bn": "bn1", "fc": "fc"}
    k = 0
    for s, n in enumerate(config.blocks):
        if s > 0:
            mapping[f"stages.{s}.transition.conv"] = f"conv{s + 1}"
            mapping[f"stages.{s}.transition.bn"] = f"bn{s + 1}"
        for _ in range(n):
            k += 1
            for part in ("conv1", "bn1", "conv2", "bn2"):
                mapping[f"stages.{s}.blocks.res{k}.branch.{part}"] = f"res{k}.{part}"
    return mapping


def expected_shapes(arch: Architecture, sd_keys: Iterable[str] = ()) -> dict[str, tuple[int, ...]]:
    """The keys and shapes a checkpoint of ``arch`` has, in the tutorial's naming when ``sd_keys`` use it.

    Raises:
        ValueError: an ``arch`` of kind ``"resnet"`` without a config.
    """
    keys = set(sd_keys)
    if arch.kind == "resnet":
        if arch.config is None:
            raise ValueError("an Architecture of kind 'resnet' needs a config")
        tutorial = "res1.conv1.weight" in keys and "conv1.weight" in keys
        return _resnet_candidate(arch.config, tutorial_names=tutorial, label="").expected
    k = arch.stem_kernel
    shapes = {"conv1.weight": (64, arch.in_channels, k, k), "fc.weight": (arch.num_classes, 0)}
    return _torchvision_candidate(shapes, arch.kind, arch.maxpool).expected


def compare_shapes(expected: Mapping[str, tuple[int, ...]], sd: Mapping, source: str, short: str) -> str | None:
    """The first key or shape of ``sd`` that does not fit ``expected``, as a clause, or ``None`` when all fit."""
    _, problem = _compare(expected, _shapes_of(sd, source))
    return None if problem is None else _problem_text(problem, short)
