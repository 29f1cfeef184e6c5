"""Issue 11 parts 3-5 without a process group: untrusted shard names, the start-up ``data.path`` check, the run
lock's job tokens (one live job per run directory) and the exit-status table.

The multi-process halves (two torchrun jobs on one run directory, a stop signal to one rank x 10, ``data.path``
under ``torchrun --nproc-per-node=2``, elastic leave and rejoin) are in ``tests/test_elastic.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from simflow.checkpoint.lock import RunLock, RunLockError, job_tokens, pid_start_time, torchrun_agent_pid
from simflow.data.loader import DataError
from simflow.data.shard_writer import write_shards
from simflow.data.shards import (PipeStore, ShardSource, StagedStore, check_data_path, check_shard_name,
                                 path_inside)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")

HOSTILE = [
    "../../escaped.tar",
    "/tmp/abs.tar",
    "sub/dir.tar",
    "..",
    ".hidden.tar",
    "-o.tar",
    "$(touch {canary})",
    "`touch {canary}`",
    "a.tar; touch {canary}",
    "a.tar|sh",
    "a b.tar",
    "a\nb.tar",
    "\x00.tar",
    "x" * 256,
    "",
    7,
    None,
]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """A real 3-shard set written from 30 demo photos (tools/make_shards.py's writer)."""
    from simflow.data.demo import build_demo

    root = tmp_path_factory.mktemp("shards")
    train, _, _ = build_demo(str(root / "npz"), source="photos", limit=30)
    write_shards(train, str(root / "good"), samples_per_shard=10, progress=False)
    return str(root / "good")


def _hostile_copy(good: str, dest: str, entry: int, name) -> str:
    shutil.copytree(good, dest)
    path = os.path.join(dest, "index.json")
    doc = json.load(open(path))
    doc["shards"][entry]["name"] = name
    json.dump(doc, open(path, "w"))
    return dest


def test_safe_names_pass_and_unsafe_names_fail_naming_the_entry():
    for ok in ("shard-000000.tar", "imagenet_train.0001.tar", "A9", "_x"):
        assert check_shard_name(ok, "idx") == ok
    for bad in HOSTILE:
        b = bad.format(canary="/tmp/c") if isinstance(bad, str) else bad
        with pytest.raises(DataError, match=r"^idx: shards\[2\]\.name: unsafe shard name"):
            check_shard_name(b, "idx: shards[2].name")
    with pytest.raises(DataError, match="outside the cache"):
        path_inside("/tmp/cache", "../x")
    assert path_inside("/tmp", "a.tar") == os.path.join(os.path.realpath("/tmp"), "a.tar")


@pytest.mark.parametrize("name", ["../../escaped.tar", "$(touch {canary})", "a.tar; touch {canary}",
                                  "`touch {canary}`", "/tmp/abs.tar"])
def test_hostile_index_runs_nothing_writes_nothing_outside_the_cache(shards, tmp_path, name):
    """A ``pipe:`` data set whose index.json (fetched by the pipe command itself) holds a path-escaping name or
    shell metacharacters: ShardSource fails while reading the index, naming the entry; the canary command never
    ran, nothing appeared outside the cache, and the cache holds nothing but the index fetch's temp folder
    (removed). The same index as a local folder fails the launcher's start-up check the same way."""
    canary = str(tmp_path / "canary")
    hostile = _hostile_copy(shards, str(tmp_path / "data"), 1, name.format(canary=canary))
    cache = tmp_path / "cache"
    outside_before = sorted(os.listdir(tmp_path))
    with pytest.raises(DataError, match=r"index.json: shards\[1\]\.name: unsafe shard name"):
        ShardSource(f"pipe:cat {hostile}/{{name}}", cache_dir=str(cache))
    with pytest.raises(DataError, match=r"index.json: shards\[1\]\.name: unsafe shard name"):
        check_data_path("shards", hostile)
    with pytest.raises(DataError, match=r"index.json: shards\[1\]\.name: unsafe shard name"):
        ShardSource(hostile)
    assert not os.path.exists(canary)
    assert not os.path.exists(tmp_path / "escaped.tar") and not os.path.exists("/tmp/abs.tar.part")
    assert sorted(os.listdir(tmp_path)) == sorted(outside_before + ["cache"])  # only the cache folder is new
    assert os.listdir(cache) == []


def test_pipe_command_runs_without_a_shell_and_staging_stays_in_the_cache(shards, tmp_path):
    """The pipe: template is split into words once and run without a shell; names reach it only after the check;
    a name that slipped past the index (direct call) is still refused by the stager before any file is opened."""
    canary = tmp_path / "canary"
    store = PipeStore(f"pipe:cat {shards}/{{name}}", str(tmp_path / "cache"))
    assert store.command("shard-000001.tar") == ["cat", f"{shards}/shard-000001.tar"]
    with pytest.raises(DataError, match="unsafe shard name"):
        store.command(f"x;touch {canary}")
    os.makedirs(tmp_path / "cache")
    staged = StagedStore(store, str(tmp_path / "cache"), {}, retries=0)
    with pytest.raises(DataError, match="unsafe shard name '../evil.tar'"):
        staged.stage("../evil.tar")
    assert staged.stage("shard-000000.tar") == os.path.join(os.path.realpath(tmp_path / "cache"), "shard-000000.tar")
    assert not canary.exists() and not (tmp_path / "evil.tar").exists()
    # shell syntax in the template is not interpreted: `;` is just an argument to cat, which then fails
    bad = PipeStore(f"pipe:cat {shards}/{{name}} ; touch {canary}", str(tmp_path / "cache"))
    with pytest.raises(OSError, match="exited with status 1"):
        bad.fetch_to("index.json", str(tmp_path / "cache" / "i"))
    assert not canary.exists()


def test_data_path_check_names_the_path(shards, tmp_path, npz_file=None):
    check_data_path("shards", shards)
    check_data_path("shards", os.path.join(shards, "index.json"))
    check_data_path("shards", f"pipe:cat {shards}/{{name}}")
    cases = [
        ("npz", str(tmp_path / "missing.npz"), r"data.path='.*missing.npz': no such file \(data.source=npz\)"),
        ("shards", str(tmp_path / "nowhere"), r"data.path='.*nowhere': .*nowhere/index.json does not exist"),
        ("shards", "pipe:no-such-program-xyz {name}", r"program 'no-such-program-xyz' of the pipe: command not found"),
        ("shards", "pipe:cat /data/shard.tar", r"must contain '\{name\}'"),
        ("shards", "pipe:cat '{name}", r"cannot split the pipe: command"),
        ("npz", "pipe:cat {name}", r"pipe: URLs work with data.source=shards only"),
        ("npz", "", r"data.path is empty"),
    ]
    for source, path, msg in cases:
        with pytest.raises(DataError, match=msg):
            check_data_path(source, path)


def test_s3_data_path_that_does_not_exist_fails_naming_it(monkeypatch):
    """An unreachable S3 endpoint (nothing listens on the port): a clear DataError naming the path, after the
    bounded retries, not a traceback from inside the trainer."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(DataError, match=r"data.path='s3://bucket/prefix': cannot reach s3://bucket/prefix/index.json"):
        check_data_path("shards", "s3://bucket/prefix", endpoint=f"http://127.0.0.1:{port}", timeout_s=2, retries=0)


def test_launcher_exits_2_naming_a_missing_data_path(tmp_path, capsys):
    from simflow.launch import main

    missing = str(tmp_path / "no" / "demo.npz")
    assert main(["--config", TINY, "data.source=npz", f"data.path={missing}", f"train.out_dir={tmp_path}/run"]) == 2
    err = capsys.readouterr().err
    assert "config error" in err and missing in err
    assert not os.path.exists(tmp_path / "run")  # nothing was created: the check ran before the trainer


# ----------------------------------------------------------------------------------------------------------------
# the run lock: live holders are never taken over; the same job's restart proves itself with a job token
def test_live_lock_is_refused_whatever_the_rendezvous_id(tmp_path, monkeypatch):
    """The holder is alive on another host with a fresh heartbeat. A newcomer with the same ``--rdzv-id``
    (TORCHELASTIC_RUN_ID) but other job tokens is refused naming the holder; one that shares a token (the same
    torchrun agent after a worker restart, or the same Slurm job after a requeue) takes the lock at once."""
    root = str(tmp_path / "ckpt")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "simflow-demo")
    holder = RunLock(root, "run", heartbeat_s=0.2, stale_s=60, host="node-b", pid=4242,
                     jobs=["torchrun:node-b:100:555", "torchrun:node-a:200:666"]).acquire()
    try:
        t0 = time.monotonic()
        with pytest.raises(RunLockError, match=r"in use by a live job \(host node-b, pid 4242, run 'run', job "
                                               r"torchrun:node-a:200:666, torchrun:node-b:100:555, heartbeat 0 s ago\)"
                                               r"; this job \(torchrun:node-c:300:777\) is not that job"):
            RunLock(root, "run", heartbeat_s=0.2, stale_s=60, jobs=["torchrun:node-c:300:777"]).acquire()
        with pytest.raises(RunLockError, match="no job token"):
            RunLock(root, "run", heartbeat_s=0.2, stale_s=60, jobs=[]).acquire()
        assert time.monotonic() - t0 < 5
        assert json.load(open(os.path.join(root, "run.lock")))["pid"] == 4242  # untouched
        same_agent = RunLock(root, "run", heartbeat_s=0.2, stale_s=60, jobs=["torchrun:node-a:200:666"])
        assert same_agent.stale_reason(same_agent.read()).startswith("same job (torchrun:node-a:200:666)")
    finally:
        holder.release()
    slurm = RunLock(root, "run", heartbeat_s=5, stale_s=60, host="n1", pid=1, jobs=["slurm:lab:41"]).acquire()
    slurm._stop.set()
    requeued = RunLock(root, "run", heartbeat_s=5, stale_s=60, jobs=["slurm:lab:41"]).acquire()
    assert json.load(open(os.path.join(root, "run.lock")))["pid"] == os.getpid()
    requeued.release()
    monkeypatch.setenv("SLURM_JOB_ID", "41")
    monkeypatch.setenv("SLURM_CLUSTER_NAME", "lab")
    assert job_tokens()[0] == "slurm:lab:41"


def test_job_token_names_the_torchrun_agent(tmp_path):
    """Under a real torchrun agent the worker's token is the agent's host, pid and start time; a plain process has
    no agent token."""
    script = tmp_path / "w.py"
    script.write_text("import json, os; from simflow.checkpoint.lock import job_tokens, torchrun_agent_pid\n"
                      "print(json.dumps([os.getppid(), torchrun_agent_pid(), job_tokens()]))\n")
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    for k in ("SLURM_JOB_ID", "TORCHELASTIC_RUN_ID", "RANK", "WORLD_SIZE"):
        env.pop(k, None)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=1", "--rdzv-id=same",
                        "--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:0", str(script)], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    ppid, agent, tokens = json.loads([l for l in r.stdout.splitlines() if l.startswith("[")][-1])
    assert agent == ppid and tokens == [f"torchrun:{socket.gethostname()}:{agent}:{tokens[0].split(':')[-1]}"]
    assert int(tokens[0].split(":")[-1]) > 0
    assert torchrun_agent_pid() is None and job_tokens() == [] or "TORCHELASTIC_RUN_ID" in os.environ
    assert pid_start_time(os.getpid()) is not None


def test_exit_status_table():
    from simflow.train import signals

    codes = {signals.REQUEUE_EXIT_CODE: 75, signals.WATCHDOG_EXIT_CODE: 70, signals.LOCKED_EXIT_CODE: 73,
             signals.CONFIG_EXIT_CODE: 2}
    assert all(k == v for k, v in codes.items()) and len(set(codes)) == 4
    text = open(os.path.join(ROOT, "slurm", "train.sh")).read()
    assert "REQUEUE_EXIT_CODE=75" in text


CLASH_CHILD = """
import datetime, os, sys, torch.distributed as dist
from omegaconf import OmegaConf
from simflow.checkpoint.lock import RendezvousClashError, claim_run_dir
from simflow.config import CheckpointConfig
rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[2], rank=rank, world_size=2,
                        timeout=datetime.timedelta(seconds=60))
try:
    claim_run_dir(sys.argv[3], "run", CheckpointConfig())
    print("claimed")
except RendezvousClashError as e:
    print("clash:", e)
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_ranks_of_two_slurm_jobs_in_one_world_refuse_to_train(tmp_path):
    """Two processes that meet in one process group but carry different SLURM_JOB_IDs (agents of two jobs that met
    in one rendezvous): both raise the same RendezvousClashError naming each rank's job, and no lock is taken."""
    from simflow.parallel.topology import free_port

    port, root = str(free_port()), str(tmp_path / "ckpt")
    procs = []
    for rank, job in ((0, "101"), (1, "202")):
        env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", SLURM_JOB_ID=job, SLURM_CLUSTER_NAME="lab")
        procs.append(subprocess.Popen([sys.executable, "-c", CLASH_CHILD, str(rank), port, root], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=120)[0] for p in procs]
    for out in outs:
        assert ("clash: the ranks of this world belong to different Slurm jobs (rank 0 on "
                in out and "slurm:lab:101" in out and "slurm:lab:202" in out), out[-2000:]
    assert not os.path.exists(os.path.join(root, "run.lock"))
