"""simflow.runtime: the one device rule, the one rendezvous-port rule, the code version; and the single-process
form of the one Topology (issue 13)."""

import os
import re
import subprocess

import pytest
import torch

from simflow.config import ConfigError, load_config
from simflow.parallel.topology import Topology, init_topology
from simflow.runtime import DistEnv, code_version, rendezvous_base_port, resolve_device


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_resolve_device_rule():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto", local_rank=3) == (torch.device("cuda", 3 % torch.cuda.device_count())
                                                     if torch.cuda.is_available() else torch.device("cpu"))
    with pytest.raises(ConfigError, match=r"eval.device='meta': only auto, cpu, cuda and cuda:N"):
        resolve_device("meta", key="eval.device")
    with pytest.raises(ConfigError, match=r"--device='nonsense': not a device"):
        resolve_device("nonsense", key="--device")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a host without CUDA")
def test_resolve_device_cuda_missing_is_a_config_error():
    for want in ("cuda", "cuda:1"):
        with pytest.raises(ConfigError, match=rf"train.device='{want}' but torch.cuda.is_available\(\) is False"):
            resolve_device(want, local_rank=1, key="train.device")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_resolve_device_cuda_follows_local_rank():
    n = torch.cuda.device_count()
    assert resolve_device("cuda", local_rank=n + 1) == torch.device("cuda", (n + 1) % n)
    assert resolve_device("cuda:0", local_rank=5) == torch.device("cuda", 0)
    with pytest.raises(ConfigError, match=f"has {n} CUDA device"):
        resolve_device(f"cuda:{n}")


def test_rendezvous_port_rule_matches_slurm_script():
    assert [rendezvous_base_port(j) for j in (0, 9999, 10000, 123456)] == [20000, 29999, 20000, 23456]
    with open(os.path.join(ROOT, "slurm", "train.sh")) as f:
        script = f.read()
    assert "p=$((20000 + SLURM_JOB_ID % 10000))" in script


def test_single_topology_is_the_trainer_default():
    t = Topology.single()
    assert (t.rank, t.world_size, t.local_rank, t.tp_size, t.tp_rank, t.dp_size, t.dp_rank) == (0, 1, 0, 1, 0, 1, 0)
    assert t.is_main and t.backend is None and t.engine == "local" and t.device == torch.device("cpu")
    cfg = load_config(os.path.join(ROOT, "configs", "tiny.yaml"), ["train.device=cpu"])
    env = DistEnv("single", 0, 1, 0, 1, 0, 1, "127.0.0.1", 0)
    assert init_topology(cfg, env) == Topology.single(torch.device("cpu"), "local", env)


def test_code_version_is_the_checkout_commit():
    head = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    v = code_version()
    assert re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", v) and v.startswith(head)
