"""The data-parallel wrapper: sharding as DistributedSampler does it, collectives in one process and in two
(launched with torchrun, gloo on the CPU), and the bands command under torchrun giving one process's bands."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import ROOT, TINY, free_port, randomise_bn
from torch.utils.data import DistributedSampler

from resnet_demo.core.model import build_model
from resnet_demo.core.studies.distributed import Dist
from resnet_demo.core.weights.cards import ModelCard
from resnet_demo.core.weights.files import file_sha256, save_weights
from resnet_demo.training.bands import main as bands_main

TORCHRUN_TIMEOUT = 180  # seconds: two interpreters importing torch on a busy two-core machine


def torchrun(args, timeout=TORCHRUN_TIMEOUT):
    """``python -m torch.distributed.run --nproc-per-node 2 ...`` on the CPU, in the repository root."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), *args]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0 and GLOO_TEARDOWN in done.stderr:
        # A rank aborting in gloo's teardown after every collective and write is done (seen once in ~40 runs
        # on a loaded 2-core machine; docs/performance.md, "Data-parallel scans"). The job's results are
        # complete; the run is repeated once so that the test still checks them, and a second abort fails.
        print(f"torchrun: a rank aborted in gloo's teardown; running once more\n{done.stderr[-1500:]}")
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


GLOO_TEARDOWN = "terminate called without an active exception"


# --- sharding ------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, world", [(10, 2), (7, 3), (2, 4), (0, 2)])
def test_shard_is_distributed_samplers_split_without_its_padding(n, world):
    shards = [Dist(r, world).shard(n).tolist() for r in range(world)]
    for r, shard in enumerate(shards):
        sampler = list(DistributedSampler(range(n), num_replicas=world, rank=r, shuffle=False)) if n else []
        assert shard == sampler[: len(shard)]  # the sampler's own order; what it adds after are repeats
        assert len(sampler) - len(shard) in (0, 1)
    assert sorted(sum(shards, [])) == list(range(n))  # every item exactly once


def test_shard_in_blocks_hands_whole_batches_round_the_ranks():
    assert Dist(0, 2).shard(10, block=4).tolist() == [0, 1, 2, 3, 8, 9]
    assert Dist(1, 2).shard(10, block=4).tolist() == [4, 5, 6, 7]
    assert Dist().shard(5, block=4).tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="cannot shard 3 items in blocks of 0"):
        Dist().shard(3, block=0)
    with pytest.raises(ValueError, match="rank 2 of 2 processes"):
        Dist(2, 2)


def test_one_process_collectives_return_their_input_and_gather_orders_by_index():
    d = Dist()
    t = torch.tensor([[1, 2], [3, 4]])
    assert torch.equal(d.sum(t), t) and d.sum(t) is not t
    assert torch.equal(d.gather(t), t)
    values = torch.tensor([10.0, 30.0, 20.0])
    assert d.gather(values, torch.tensor([0, 2, 1])).tolist() == [10.0, 20.0, 30.0]
    with pytest.raises(ValueError, match="do not number the 3 gathered rows 0..2 once each"):
        d.gather(values, torch.tensor([0, 0, 1]))
    with pytest.raises(ValueError, match="2 indices for 3 rows"):
        d.gather(values, torch.tensor([0, 1]))
    assert Dist.from_env("cpu").world == 1 or "WORLD_SIZE" in os.environ  # launched without torchrun


def test_collectives_without_a_process_group_say_how_to_get_one():
    with pytest.raises(RuntimeError, match="launch with torchrun and make the Dist with Dist.from_env"):
        Dist(0, 2).sum(torch.ones(1))


# --- two processes -------------------------------------------------------------------------------

WORKER = """
import json, sys, torch
from resnet_demo.core.studies.distributed import Dist

with Dist.from_env("cpu") as d:
    summed = d.sum(torch.tensor([d.rank + 1, 10 * (d.rank + 1)], dtype=torch.int64))
    ragged = d.gather(torch.arange(3 + 2 * d.rank, dtype=torch.float64) + 100 * d.rank)
    index = d.shard(7, block=2)
    ordered = d.gather(index.double() * 1.5, index)
    rows = d.gather(torch.stack([index, -index], 1), index)
    out = dict(rank=d.rank, world=d.world, shard=index.tolist(), sum=summed.tolist(), ragged=ragged.tolist(),
               ordered=ordered.tolist(), rows=rows.tolist())
    with open(f"{sys.argv[1]}/rank{d.rank}.json", "w") as f:
        json.dump(out, f)
"""


@pytest.mark.slow
def test_two_processes_sum_and_gather_under_torchrun(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(WORKER))
    torchrun([str(script), str(tmp_path)])
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [g["rank"] for g in got] == [0, 1] and all(g["world"] == 2 for g in got)
    assert got[0]["shard"] == [0, 1, 4, 5] and got[1]["shard"] == [2, 3, 6]
    for g in got:  # every process gets the combined result
        assert g["sum"] == [3, 30]
        assert g["ragged"] == [0.0, 1.0, 2.0, 100.0, 101.0, 102.0, 103.0, 104.0]
        assert g["ordered"] == [1.5 * i for i in range(7)]
        assert g["rows"] == [[i, -i] for i in range(7)]


def tiny_weights(folder, classes=("cat", "dog")):
    card = ModelCard(name="tiny", classes=list(classes), mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25],
                     config=TINY.to_dict() | {"num_classes": len(classes)}, input_size=16, resize=16,
                     metrics={"accuracy": 0.5})
    torch.manual_seed(0)
    model = randomise_bn(build_model(card.resnet_config))
    folder.mkdir(parents=True, exist_ok=True)
    save_weights(model, card, folder / "tiny.safetensors")
    return folder / "tiny.safetensors"


@pytest.mark.slow
def test_bands_command_under_torchrun_gives_one_processes_bands(tmp_path):
    rng = np.random.default_rng(0)
    data = tmp_path / "set.npz"
    np.savez(data, images=rng.integers(0, 256, (23, 3, 16, 16), dtype=np.uint8),
             labels=rng.integers(0, 2, 23), classes=np.array(["cat", "dog"]))
    one, two = tiny_weights(tmp_path / "one"), tiny_weights(tmp_path / "two")
    sha = file_sha256(two)
    common = ["--data", str(data), "--device", "cpu", "--batch-size", "4"]
    want = bands_main(["--weights", str(one), *common])
    done = torchrun(["-m", "resnet_demo.training.bands", "--weights", str(two), *common])
    assert "2 process(es)" in done.stdout
    got = json.loads(two.with_suffix(".json").read_text())["reference_bands"]
    assert got == json.loads(one.with_suffix(".json").read_text())["reference_bands"] == json.loads(json.dumps(want))
    assert got["n"] == 23 and set(got["ratio"]) == {"res1", "res2", "res3"}
    assert file_sha256(two) == sha
