"""Single-process tests of the parallel layer: environment parsing, layout checks, the derived DeepSpeed config,
and the launcher refusing a bad layout before any process group exists."""

from __future__ import annotations

import os
import time

import pytest
import torch

from simflow.config import ConfigError, load_config
from simflow.parallel.topology import check_parallel_config
from simflow.runtime import detect_dist_env, expand_slurm_tasks_per_node, first_slurm_host

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")


def test_torchrun_env():
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "1",
           "MASTER_ADDR": "10.0.0.7", "MASTER_PORT": "29555", "SLURM_PROCID": "0", "SLURM_STEP_ID": "0"}
    e = detect_dist_env(env)  # torchrun variables win over an enclosing srun step
    assert (e.launcher, e.rank, e.world_size, e.local_rank, e.local_world_size, e.node_rank, e.num_nodes) == (
        "torchrun", 3, 4, 1, 2, 1, 2)
    assert (e.master_addr, e.master_port) == ("10.0.0.7", 29555)


def test_srun_env():
    env = {"SLURM_PROCID": "5", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "6", "SLURM_NODEID": "2",
           "SLURM_LOCALID": "1", "SLURM_STEP_TASKS_PER_NODE": "2(x3)", "SLURM_STEP_NODELIST": "gpu[007-009]",
           "SLURM_JOB_ID": "123456", "SLURM_NTASKS": "99"}
    e = detect_dist_env(env)
    assert (e.launcher, e.rank, e.world_size, e.local_rank, e.local_world_size, e.node_rank, e.num_nodes) == (
        "srun", 5, 6, 1, 2, 2, 3)
    assert e.master_addr == "gpu007"
    assert e.master_port == 23456  # 20000 + job id mod 10000: the base slurm/train.sh also probes from
    env["MASTER_ADDR"], env["MASTER_PORT"] = "head", "31000"
    e = detect_dist_env(env)
    assert (e.master_addr, e.master_port) == ("head", 31000)


def test_sbatch_batch_step_is_single_process():
    # the batch script itself has SLURM_* job variables but no step: it is not a rank of a parallel job
    e = detect_dist_env({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "8", "SLURM_PROCID": "0"})
    assert (e.launcher, e.rank, e.world_size) == ("single", 0, 1)


@pytest.mark.parametrize("env, key", [
    ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, "outside world size"),
    ({"SLURM_PROCID": "0", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_TASKS_PER_NODE": "2[x]"},
     "SLURM_TASKS_PER_NODE"),
])
def test_bad_env_names_the_variable(env, key):
    with pytest.raises(ConfigError, match=key.replace("[", r"\[")):
        detect_dist_env(env)


@pytest.mark.parametrize("nodelist, first", [
    ("gpu[003-005,9],cpu1", "gpu003"), ("node1,node2", "node1"), ("a[1-2]-ib", "a1-ib"), ("solo", "solo"),
    ("rack[10,12]n[1-4]", "rack10n[1-4]"),
])
def test_first_slurm_host(nodelist, first):
    assert first_slurm_host(nodelist) == first


def test_expand_tasks_per_node():
    assert expand_slurm_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert expand_slurm_tasks_per_node("4") == [4]


def test_layout_checks_name_the_key():
    cfg = load_config(TINY, ["parallel.engine=deepspeed", "parallel.tp_size=2"])
    assert check_parallel_config(cfg, 4) == 2
    with pytest.raises(ConfigError, match="parallel.tp_size=2.*world size 3"):
        check_parallel_config(cfg, 3)
    cfg = load_config(TINY, ["parallel.engine=deepspeed", "train.micro_batch_size=4", "train.grad_accumulation=2",
                             "train.global_batch_size=16"])
    assert check_parallel_config(cfg, 2) == 2 and cfg.train.grad_accumulation == 2
    assert check_parallel_config(cfg, 4) == 4 and cfg.train.grad_accumulation == 1  # elastic: derived per start
    with pytest.raises(ConfigError, match=r"train.global_batch_size=16 cannot be kept at DP size 3.*micro_batch_size "
                                          r"\(4\) x DP size \(3\) = 12"):
        check_parallel_config(cfg, 3)
    with pytest.raises(ConfigError, match="parallel.engine='local'.*world size is 2"):
        check_parallel_config(load_config(TINY), 2)
    with pytest.raises(ConfigError, match="attention heads"):
        load_config(TINY, ["parallel.tp_size=3"])  # 4 heads of 16 in the tiny flow


def test_global_batch_size_fixes_the_batch_at_every_world_size():
    """train.global_batch_size set: grad_accumulation = G / (micro x DP) at each (re)start, whatever was given; the
    global batch (hence the data order) is the same at DP 1, 2, 3, 6; a DP size that cannot divide fails naming both
    keys. Unset: the accumulation given is kept and the global batch follows the world size."""
    from simflow.config import derive_grad_accumulation, global_batch_size

    cfg = load_config(TINY, ["train.micro_batch_size=2", "train.grad_accumulation=7", "train.global_batch_size=12"])
    for dp, acc in ((1, 6), (2, 3), (3, 2), (6, 1), (2, 3)):
        assert derive_grad_accumulation(cfg, dp) == acc == cfg.train.grad_accumulation
        assert global_batch_size(cfg, dp) == 12
    with pytest.raises(ConfigError, match=r"configs/x.yaml: train.global_batch_size=12 cannot be kept at DP size 4"):
        derive_grad_accumulation(cfg, 4, "configs/x.yaml")
    with pytest.raises(ConfigError, match="train.global_batch_size=12 cannot be kept at DP size 5"):
        check_parallel_config(load_config(TINY, ["parallel.engine=deepspeed", "train.micro_batch_size=2",
                                                 "train.global_batch_size=12"]), 5)
    free = load_config(TINY, ["train.micro_batch_size=2", "train.grad_accumulation=3"])
    assert derive_grad_accumulation(free, 4) == 3 and global_batch_size(free, 4) == 24


def test_deepspeed_config_is_derived_from_the_simflow_config():
    from simflow.parallel.deepspeed_engine import deepspeed_config

    cfg = load_config(TINY, ["train.micro_batch_size=3", "train.grad_accumulation=5", "optim.grad_clip=0.7"])
    c = deepspeed_config(cfg, dp_size=4, device=torch.device("cpu"))
    assert c["train_micro_batch_size_per_gpu"] == 3 and c["gradient_accumulation_steps"] == 5
    assert c["train_batch_size"] == 60 and c["gradient_clipping"] == 0.7
    z = c["zero_optimization"]
    assert z["stage"] == 3 and z["stage3_param_persistence_threshold"] == 0 and z["memory_efficient_linear"] is False
    assert not c["bf16"]["enabled"] and "torch_autocast" not in c  # fp32 on CPU
    g = deepspeed_config(cfg, dp_size=4, device=torch.device("cuda", 0))  # bf16 autocast on CUDA (precision=auto)
    assert g["torch_autocast"]["enabled"] and g["torch_autocast"]["dtype"] == "bfloat16"
    # fp32 gradient reduction under bf16: no module class tagged with a bf16 comm dtype (deepspeed_config docstring)
    assert g["torch_autocast"]["lower_precision_safe_modules"] == [] and g["communication_data_type"] == "fp32"
    f = deepspeed_config(load_config(TINY, ["train.precision=fp32"]), 1, torch.device("cuda", 0))
    assert "torch_autocast" not in f


@pytest.mark.parametrize("overrides, env, key", [
    (["parallel.engine=deepspeed", "parallel.tp_size=2"], {"WORLD_SIZE": "3", "RANK": "0"}, "parallel.tp_size"),
    (["parallel.engine=deepspeed", "train.global_batch_size=100"], {"WORLD_SIZE": "2", "RANK": "1"},
     "train.global_batch_size"),
    ([], {"WORLD_SIZE": "2", "RANK": "0"}, "parallel.engine"),
    (["train.global_batch_size=5"], {}, "train.global_batch_size"),
])
def test_launcher_rejects_bad_layout_before_any_process_group(overrides, env, key, monkeypatch, capsys):
    """The launcher checks the layout against the environment and exits with status 2 naming the key; the
    rendezvous address points nowhere, so reaching init_process_group would hang instead of returning."""
    from simflow.launch import main

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "SLURM_PROCID", "SLURM_STEP_ID"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("MASTER_ADDR", "192.0.2.1")  # TEST-NET-1: unroutable
    monkeypatch.setenv("MASTER_PORT", "9")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    t0 = time.time()
    assert main(["--config", TINY, *overrides]) == 2
    assert time.time() - t0 < 30
    err = capsys.readouterr().err
    assert "config error" in err and key in err
    assert not torch.distributed.is_initialized()


@pytest.mark.parametrize("world,tp", [(8, 2), (8, 4), (6, 3), (4, 1), (4, 4), (1, 1)])
def test_rank_layout_is_megatron_order(world, tp):
    """rank_layout places every rank where megatron-core's own rank generator does (order tp-cp-ep-dp-pp, the one
    init_topology starts for DeepSpeed at TP > 1): its TP rank is its index in its TP group, its DP rank its index in
    its DP group. Hand-checked: world 8, TP 2 -> rank 5 is (tp 1, dp 2)."""
    from megatron.core.parallel_state import RankGenerator

    from simflow.parallel.topology import rank_layout

    gen = RankGenerator(tp=tp, ep=1, dp=world // tp, pp=1, cp=1, order="tp-cp-ep-dp-pp")
    expected = {}
    for kind, slot in (("tp", 0), ("dp", 1)):
        for group in gen.get_ranks(kind):
            for i, r in enumerate(group):
                expected.setdefault(r, [None, None])[slot] = i
    assert [rank_layout(r, world, tp) for r in range(world)] == [tuple(expected[r]) for r in range(world)]
    assert rank_layout(5, 8, 2) == (1, 2)
    for bad in ((0, 6, 4), (6, 6, 2), (-1, 4, 2), (0, 4, 0)):
        with pytest.raises(ValueError, match="rank_layout"):
            rank_layout(*bad)


@pytest.mark.parametrize("engine", ["fsdp2", "deepspeed"])
def test_tp1_engines_never_import_megatron(engine):
    """At TP = 1 the FSDP2 and the DeepSpeed engines start their process groups and build (DeepSpeed: ZeRO-3 over
    the world, TP = the rank alone) without megatron-core, whose import pulls in torch._dynamo (~2 s of CPU per
    process). FSDP2's Topology hands out no groups (its engine uses a DeviceMesh); destroy_topology may run twice."""
    import subprocess
    import sys

    from simflow.runtime import free_port

    code = (
        "import os, sys, torch\n"
        "from simflow.config import load_config\n"
        "from simflow.parallel.factory import build_engine\n"
        "from simflow.parallel.topology import destroy_topology, init_topology\n"
        "from simflow.runtime import DistEnv\n"
        f"cfg = load_config({TINY!r}, ['parallel.engine={engine}', 'model.flow.layers_per_block=[1,1,1,1]'])\n"
        f"topo = init_topology(cfg, DistEnv('torchrun', 0, 1, 0, 1, 0, 1, '127.0.0.1', {free_port()}))\n"
        "assert (topo.tp_rank, topo.dp_rank, topo.dp_size, topo.megatron) == (0, 0, 1, False), topo\n"
        "eng = build_engine(cfg, lambda factory=None: torch.nn.Linear(3, 5), 'discriminator', [], topo)\n"
        "eng.backward(eng.module(torch.ones(2, 3)).square().sum())\n"
        "eng.step()\n"
        "assert topo.distributed and not any(m.startswith('megatron') for m in sys.modules)\n"
        "if cfg.parallel.engine == 'deepspeed':\n"
        "    assert torch.distributed.get_process_group_ranks(topo.tp_group) == [0] == eng.mpu.get_data_parallel_group_ranks()\n"
        "else:\n"
        "    try:\n"
        "        topo.tp_group\n"
        "    except RuntimeError as e:\n"
        "        assert 'parallel.engine=fsdp2: no TP/DP process groups here' in str(e), e\n"
        "    else:\n"
        "        raise AssertionError('tp_group handed out a group')\n"
        "destroy_topology(topo)\n"
        "destroy_topology(topo)\n"
        "print('ok')\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**env, "PYTHONPATH": ROOT}, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr
