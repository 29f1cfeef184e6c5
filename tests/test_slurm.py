"""The Slurm scripts (``slurm/``) run for real: ``sbatch`` against the two-node test cluster (issue 6 "Must show").

The cluster is Debian's Slurm 22.05 with two emulated nodes ``n1``/``n2`` on this machine, brought up by
``../shared/slurm/start-slurm.sh`` (``.ci/run`` starts it before the test suite and stops it afterwards). Tests
marked ``slurm`` skip, saying why, when no controller answers ``sinfo``. Every job is the shipped script, unedited,
with the test settings given the way a user would: ``sbatch`` options (no GPUs, one CPU per task, a short time limit)
and ``SIMFLOW_*`` environment variables (tiny config, run directory, rendezvous port, Python interpreter), on CPU
with gloo and one task per node:

* a clean two-node run of ``slurm/train_xl.sh`` whose losses and final weights equal a two-process ``torchrun`` run;
* ``scancel --signal=USR1 --batch``: the job saves, requeues itself (``Restarts`` 1), resumes and ends with the
  clean run's weights, bit for bit;
* SIGKILL of everything node ``n2`` runs for the job (its torchrun agent, worker shell and worker): ``n1`` carries on
  alone at world size 1 from the newest checkpoint, with the same global batch, and finishes;
* ``slurm/sample_fid50k.sh`` as a two-task job array writes its index ranges; re-submitting it skips the finished
  ranges and regenerates a missing one bit-identically.

Time on the 2-core CI machine: about 5 minutes for the module, of which ~1 minute is DeepSpeed compiling its shm op
once per virtual environment (``EXT_DIR``); much more when other jobs load the machine.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from typing import Dict, List, Optional

import pytest
import torch

from simflow.train.signals import REQUEUE_EXIT_CODE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLURM_DIR = os.path.join(ROOT, "slurm")
SHARED_SLURM = os.path.normpath(os.path.join(ROOT, "..", "shared", "slurm"))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")

STEPS = 16
# DeepSpeed JIT-compiles a small shm op at its first init (~60 s on 2 cores). The jobs and the torchrun reference
# share one build folder per virtual environment: torch's default (~/.cache/torch_extensions/py311_cpu) is shared by
# every venv of the user, and two venvs take turns rebuilding it.
EXT_DIR = os.path.join(sys.prefix, "torch_extensions")
# sbatch options that fit the scripts' requests to the CPU test cluster (n1, n2: 8 CPUs, 4 GB, no GPUs each)
CPU_SBATCH = ["--gpus-per-node=0", "--cpus-per-task=1", "--mem=0", "--time=30"]


# ----------------------------------------------------------------------------------------------------------------
# static checks of the scripts (no cluster needed)
# ----------------------------------------------------------------------------------------------------------------
def _sbatch_options(path: str) -> Dict[str, str]:
    opts = {}
    for line in open(path):
        m = re.match(r"#SBATCH\s+--([\w-]+)(?:=(\S+))?", line)
        if m:
            opts[m.group(1)] = m.group(2) or ""
    return opts


@pytest.mark.parametrize("name", ["train.sh", "train_xl.sh", "sample_fid50k.sh"])
def test_scripts_parse(name):
    r = subprocess.run(["bash", "-n", os.path.join(SLURM_DIR, name)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_xl_recipe_requests():
    """train_xl.sh asks for the XL layout (2 nodes x 8 GPUs = DP 16 for the config's global batch 256) and for
    everything that makes pre-emption and node loss survivable; the agents' shutdown grace fits in the signal lead."""
    o = _sbatch_options(os.path.join(SLURM_DIR, "train_xl.sh"))
    assert o["nodes"] == "2" and o["ntasks-per-node"] == "1" and o["gpus-per-node"] == "8"
    for flag in ("requeue", "no-kill", "exclusive"):
        assert flag in o, flag
    assert o["open-mode"] == "append"
    m = re.fullmatch(r"B:USR1@(\d+)", o["signal"])
    assert m, o["signal"]
    lead = int(m.group(1))
    grace = int(re.search(r"SIMFLOW_SHUTDOWN_TIMEOUT:-(\d+)", open(os.path.join(SLURM_DIR, "train_xl.sh")).read())[1])
    assert 0 < grace < lead
    from simflow.config import load_config

    cfg = load_config(os.path.join(ROOT, "configs", "xl.yaml"))
    assert cfg.train.global_batch_size == cfg.train.micro_batch_size * cfg.train.grad_accumulation * 2 * 8
    s = _sbatch_options(os.path.join(SLURM_DIR, "sample_fid50k.sh"))
    assert re.fullmatch(r"\d+-\d+", s["array"]) and "requeue" in s


def test_train_script_requeues_on_the_trainers_code():
    """The batch shell's requeue status is the one the trainer exits with after a stop signal."""
    m = re.search(r"^REQUEUE_EXIT_CODE=(\d+)", open(os.path.join(SLURM_DIR, "train.sh")).read(), re.M)
    assert m and int(m.group(1)) == REQUEUE_EXIT_CODE


@pytest.mark.parametrize("name, args", [("train.sh", ["configs/tiny.yaml"]), ("train_xl.sh", []),
                                        ("sample_fid50k.sh", ["--out", "x"])])
def test_scripts_refuse_to_run_outside_slurm(name, args):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    r = subprocess.run(["bash", os.path.join(SLURM_DIR, name), *args], capture_output=True, text=True, cwd=ROOT,
                       env=env, timeout=60)
    assert r.returncode == 2
    assert "not inside a Slurm job" in r.stderr and "sbatch" in r.stderr


def test_train_script_names_a_missing_config(tmp_path):
    """Inside a job (faked by SLURM_JOB_ID), a config that does not exist stops the batch shell before srun."""
    env = dict(os.environ, SLURM_JOB_ID="1", SLURM_SUBMIT_DIR=ROOT)
    r = subprocess.run(["bash", os.path.join(SLURM_DIR, "train.sh"), str(tmp_path / "nope.yaml")], cwd=ROOT,
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 2 and f"{tmp_path / 'nope.yaml'} does not exist" in r.stderr


# ----------------------------------------------------------------------------------------------------------------
# the two-node cluster
# ----------------------------------------------------------------------------------------------------------------
def _cluster_skip_reason() -> Optional[str]:
    hint = (f"start the two-node test cluster with {SHARED_SLURM}/start-slurm.sh (as root; .ci/run does it)"
            if os.path.isfile(os.path.join(SHARED_SLURM, "start-slurm.sh"))
            else f"{SHARED_SLURM} is absent next to this checkout, so no test cluster can be started")
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return f"Slurm client tools (sinfo, sbatch) are not installed: {hint}"
    try:
        r = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return f"sinfo timed out: no Slurm controller answers; {hint}"
    if r.returncode != 0:
        return f"no Slurm controller reachable (sinfo: {r.stderr.strip()[:200]}); {hint}"
    ready = {ln.split()[0] for ln in r.stdout.splitlines()
             if len(ln.split()) == 2 and ln.split()[1].rstrip("*~#") in ("idle", "mixed", "allocated")}
    if len(ready) < 2:
        return f"the Slurm cluster has {len(ready)} usable node(s) ({r.stdout.strip()!r}), these tests need 2; {hint}"
    return None


@pytest.fixture(scope="module")
def cluster():
    why = _cluster_skip_reason()
    if why:
        pytest.skip(why)
    submitted: List[str] = []
    yield submitted
    for job in submitted:  # nothing of ours may outlive the module, also when a test failed half-way
        if _queued(job):
            subprocess.run(["scancel", job], capture_output=True, timeout=30)
    for job in submitted:
        _wait_gone(job, 60)


def _free_port() -> int:
    from simflow.parallel.topology import free_port

    return free_port()


def _job_env(run_dir: str) -> Dict[str, str]:
    env = dict(os.environ)
    env.update(
        SIMFLOW_ROOT=ROOT, SIMFLOW_PYTHON=sys.executable, SIMFLOW_CONFIG=TINY, SIMFLOW_RUN_DIR=run_dir,
        SIMFLOW_RDZV_PORT=str(_free_port()),
        # a node that starts late is still waited for this long before the first round closes without it
        SIMFLOW_RDZV_CONF="last_call_timeout=10",
        OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", TORCH_EXTENSIONS_DIR=EXT_DIR,
    )
    return env


def _overrides(demo_npz: str, *extra: str) -> List[str]:
    return ["data.source=npz", f"data.path={demo_npz}", "train.micro_batch_size=4", "model.flow.width=32",
            "logging.wandb=disabled", "eval.self_score_samples=0", "train.sample_every=0", "parallel.engine=deepspeed", f"train.steps={STEPS}",
            "train.log_every=1", "train.sample_grid=10", "train.global_batch_size=8", *extra]


def _sbatch(cluster: List[str], script: str, args: List[str], env: Dict[str, str], out: str,
            opts: List[str] = ()) -> str:
    """Submit ``slurm/<script> args`` with the CPU options; returns the job id (recorded for clean-up)."""
    cmd = ["sbatch", "--parsable", "--job-name=simflow-test", f"--output={out}", *CPU_SBATCH, *opts,
           os.path.join(SLURM_DIR, script), *args]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    m = re.match(r"(\d+)", r.stdout.strip())
    assert r.returncode == 0 and m, f"sbatch {script}: {r.stdout!r} {r.stderr!r}"
    cluster.append(m.group(1))
    return m.group(1)


def _queued(job: str) -> bool:
    r = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True, timeout=30)
    return bool(r.stdout.strip())


def _wait_gone(job: str, timeout: float) -> bool:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if not _queued(job):
            return True
        time.sleep(0.5)
    return False


def _job_info(job: str) -> Dict[str, str]:
    r = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, timeout=30)
    return dict(re.findall(r"(\w+)=(\S*)", r.stdout))


def _metrics(run_dir: str) -> List[Dict[str, float]]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    out = []
    for line in open(path):
        try:
            m = json.loads(line)
        except json.JSONDecodeError:  # a line being written
            continue
        if "loss" in m:
            out.append(m)
    return out


def _wait_for(cond, timeout: float, what: str, job: str, out: str) -> None:
    t0 = time.time()
    while not cond():
        if time.time() - t0 > timeout or not _queued(job):
            log = open(out).read()[-4000:] if os.path.exists(out) else "(no output)"
            pytest.fail(f"job {job}: timed out or ended waiting for {what}\n{log}")
        time.sleep(0.2)


def _weights(run_dir: str) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.path.join(run_dir, "weights.safetensors"))


LOSS_KEYS = ("loss", "nll", "rec", "bits_per_dim", "log_det", "grad_norm", "lr")


@pytest.fixture(scope="module")
def demo_npz(tmp_path_factory):
    from simflow.data.demo import build_demo

    train, _, _ = build_demo(str(tmp_path_factory.mktemp("demo")), limit=2000)
    return train


@pytest.fixture(scope="module")
def clean_run(cluster, demo_npz, tmp_path_factory):
    """``sbatch slurm/train_xl.sh`` on both nodes, STEPS steps, nothing interrupted."""
    d = tmp_path_factory.mktemp("clean")
    run_dir, out = str(d / "run"), str(d / "job.out")
    job = _sbatch(cluster, "train_xl.sh", _overrides(demo_npz, "checkpoint.every_steps=8"), _job_env(run_dir), out)
    assert _wait_gone(job, 600), f"job {job} still queued after 10 minutes"
    return {"job": job, "run_dir": run_dir, "out": out, "log": open(out).read(), "info": _job_info(job)}


@pytest.mark.slurm
@pytest.mark.slow
def test_two_node_training_equals_torchrun(clean_run, demo_npz, tmp_path):
    """Two nodes x one worker under sbatch give, step for step, the losses of ``torchrun --nproc-per-node=2``
    on one machine (same global batch 8 = 4 x 1 x 2), and the same exported weights."""
    info, log = clean_run["info"], clean_run["log"]
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-3000:]
    assert info["NodeList"] == "n[1-2]" and info["Restarts"] == "0"
    # one torchrun agent on each node, rendezvous on the first
    assert re.search(r"\[simflow-slurm \S+ n1\] node 0: torchrun agent, 1 worker\(s\), rendezvous n1:\d+", log)
    assert re.search(r"\[simflow-slurm \S+ n2\] node 1: torchrun agent, 1 worker\(s\), rendezvous n1:\d+", log)
    assert "| nodes x procs/node   | 2 x 1" in log and "| global batch         | 8 = 4 x 1 x 2" in log
    assert "result: done" in log
    exits = os.listdir(os.path.join(clean_run["run_dir"], "slurm", "exit-codes", f"{clean_run['job']}.0"))
    assert sorted(exits) == ["n1-rank0-restart0", "n2-rank1-restart0"]

    ref = str(tmp_path / "torchrun")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", TORCH_EXTENSIONS_DIR=EXT_DIR)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "simflow.launch",
           "--config", TINY, f"train.out_dir={ref}", *_overrides(demo_npz, "checkpoint.every_steps=8")]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]

    got, want = _metrics(clean_run["run_dir"]), _metrics(ref)
    assert [m["step"] for m in got] == [m["step"] for m in want] == list(range(1, STEPS + 1))
    for a, b in zip(got, want):
        for k in LOSS_KEYS:
            assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-7), (a["step"], k, a[k], b[k])
    assert got[-1]["loss"] < got[0]["loss"] - 0.1  # it trained: the comparison is not between constants
    wa, wb = _weights(clean_run["run_dir"]), _weights(ref)
    assert wa.keys() == wb.keys()
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-6


@pytest.mark.slurm
@pytest.mark.slow
def test_usr1_saves_requeues_and_resumes_to_the_clean_weights(cluster, clean_run, demo_npz, tmp_path):
    """``scancel --signal=USR1 --batch`` mid-run: every worker saves the same step and exits 75, the batch shell
    requeues the job, the requeued job (SLURM_RESTART_COUNT 1, same job id and run directory) resumes and finishes
    with exactly the clean run's losses and final weights."""
    run_dir, out = str(tmp_path / "run"), str(tmp_path / "job.out")
    job = _sbatch(cluster, "train_xl.sh", _overrides(demo_npz, "checkpoint.every_steps=8"), _job_env(run_dir), out)
    _wait_for(lambda: len(_metrics(run_dir)) >= 3, 300, "step 3", job, out)
    seen = len(_metrics(run_dir))
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True, timeout=30)
    assert _wait_gone(job, 400), f"job {job} still queued"
    log = open(out).read()
    info = _job_info(job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-4000:]
    assert info["Restarts"] == "1", log[-4000:]
    assert re.search(rf"job {job} restart 0: 2 node\(s\)", log) and re.search(rf"job {job} restart 1: 2 node\(s\)", log)
    assert "got SIGUSR1" in log
    assert f"worker exit codes: {REQUEUE_EXIT_CODE}" in log and "result: requeue" in log
    m = re.search(r"resumed from (\S+) at step (\d+)", log)
    assert m, log[-4000:]
    saved = int(m.group(2))
    assert os.path.dirname(m.group(1)) == os.path.join(run_dir, "checkpoints")
    assert seen <= saved < STEPS  # saved at the step boundary after the signal, not at the periodic step 8 only
    assert log.count("result: done") == 1
    for rec in ("n1-rank0-restart0", "n2-rank1-restart0"):
        assert open(os.path.join(run_dir, "slurm", "exit-codes", f"{job}.0", rec)).read().strip() == "75"
        assert open(os.path.join(run_dir, "slurm", "exit-codes", f"{job}.1", rec)).read().strip() == "0"

    got, want = _metrics(run_dir), _metrics(clean_run["run_dir"])
    assert [x["step"] for x in got] == list(range(1, STEPS + 1))  # nothing lost, nothing repeated
    for a, b in zip(got, want):
        for k in LOSS_KEYS:
            assert a[k] == b[k], (a["step"], k, a[k], b[k])
    wa, wb = _weights(run_dir), _weights(clean_run["run_dir"])
    assert all(torch.equal(wa[k], wb[k]) for k in wb)


def _step_pids(job: str, node: str) -> List[int]:
    """PIDs of job step 0 on ``node`` (its torchrun agent, worker shell and worker), as slurmd tracks them."""
    r = subprocess.run(["scontrol", "listpids", f"{job}.0", node], capture_output=True, text=True, timeout=30)
    return [int(ln.split()[0]) for ln in r.stdout.splitlines()[1:] if ln.split() and ln.split()[0].isdigit()]


@pytest.mark.slurm
@pytest.mark.slow
def test_node_failure_survivor_finishes_alone(cluster, clean_run, demo_npz, tmp_path):
    """SIGKILL of everything n2 runs for the job mid-run: the job goes on; n1's agent restarts its worker at world
    size 1 (grad accumulation 2 keeps the global batch 8) from the newest checkpoint, and finishes the run."""
    run_dir, out = str(tmp_path / "run"), str(tmp_path / "job.out")
    job = _sbatch(cluster, "train_xl.sh", _overrides(demo_npz, "checkpoint.every_steps=1"), _job_env(run_dir), out)
    _wait_for(lambda: len(_metrics(run_dir)) >= 3, 300, "step 3", job, out)
    pids = _step_pids(job, "n2")
    comms = {open(f"/proc/{p}/comm").read().strip() for p in pids if os.path.exists(f"/proc/{p}/comm")}
    assert len(pids) >= 3 and "python" in {c[:6] for c in comms}, (pids, comms)
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    killed_after = len(_metrics(run_dir))
    assert killed_after < STEPS, "the run ended before n2 was killed"
    assert _wait_gone(job, 400), f"job {job} still queued"
    log = open(out).read()
    info = _job_info(job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-4000:]
    assert info["Restarts"] == "0"  # no requeue: the survivor did it inside the same job
    assert "n2: task 1: Killed" in log
    assert "train.global_batch_size=8 at DP size 1: train.grad_accumulation 1 -> 2" in log  # the launcher's rule
    assert "| world size           | 1" in log and "| global batch         | 8 = 4 x 2 x 1" in log
    m = re.search(r"resumed from \S+ at step (\d+)", log)
    assert m, log[-4000:]
    resumed = int(m.group(1))
    assert 2 <= resumed <= killed_after
    assert os.listdir(os.path.join(run_dir, "slurm", "exit-codes", f"{job}.0")).count("n1-rank0-restart1") == 1
    assert open(os.path.join(run_dir, "slurm", "exit-codes", f"{job}.0", "n1-rank0-restart1")).read().strip() == "0"
    assert "result: done" in log

    got = _metrics(run_dir)
    assert got[-1]["step"] == STEPS
    after = [x for x in got if x["step"] > resumed]
    after = after[len(after) - (STEPS - resumed):]  # the entries logged after the restart
    assert [x["step"] for x in after] == list(range(resumed + 1, STEPS + 1))
    clean = {x["step"]: x for x in _metrics(clean_run["run_dir"])}
    # The first step after the restart starts from the checkpointed state and sees the same global batch: only
    # the summation order differs (2 micro-batches on one process vs an all-reduce over two).
    first = after[0]
    for k in ("loss", "nll", "rec", "grad_norm"):
        assert first[k] == pytest.approx(clean[first["step"]][k], rel=1e-5), (k, first[k], clean[first["step"]][k])


@pytest.mark.slurm
@pytest.mark.slow
def test_sampling_array_writes_ranges_and_resubmission_skips_them(cluster, clean_run, tmp_path):
    """``sbatch --array=0-1 slurm/sample_fid50k.sh``: task i writes ranges i, i+2, ... of the set; re-submitting
    after one part was lost skips the finished part (file untouched) and regenerates the lost one bit-identically."""
    import numpy as np

    samples = str(tmp_path / "samples")
    args = ["--weights", os.path.join(clean_run["run_dir"], "weights.safetensors"), "--config", TINY,
            "model.flow.width=32", "--out", samples, "--num-samples", "8", "--range-size", "4", "--batch-size", "4",
            "--device", "cpu"]
    env = dict(os.environ, SIMFLOW_ROOT=ROOT, SIMFLOW_PYTHON=sys.executable, OMP_NUM_THREADS="1",
               PYTHONWARNINGS="ignore")
    opts = ["--array=0-1", "--ntasks-per-node=1", "--gpus-per-task=0"]

    def submit(tag: str) -> Dict[int, dict]:
        out = str(tmp_path / f"{tag}-%A_%a.out")
        job = _sbatch(cluster, "sample_fid50k.sh", args, env, out, opts=opts)
        assert _wait_gone(job, 300), f"job {job} still queued"
        res = {}
        for task in (0, 1):
            log = open(out.replace("%A", job).replace("%a", str(task))).read()
            lines = [ln for ln in log.splitlines() if ln.startswith("{")]
            assert lines, log[-3000:]
            res[task] = json.loads(lines[-1])
            assert f"task {task}: simflow.sample finished with status 0" in log
        return res

    parts = os.path.join(samples, "parts")
    first = submit("first")
    for task in (0, 1):
        assert first[task]["slot"] == f"rank 0/1, array task {task}/2"
        assert (first[task]["assigned"], first[task]["written"], first[task]["skipped"]) == (1, 1, 0)
    assert sorted(os.listdir(parts)) == ["00000000-00000003.json", "00000000-00000003.npz",
                                         "00000004-00000007.json", "00000004-00000007.npz"]
    for stem, task in (("00000000-00000003", 0), ("00000004-00000007", 1)):
        rec = json.load(open(os.path.join(parts, stem + ".json")))
        assert rec["slot"]["array_index"] == task and rec["slot"]["array_count"] == 2
    packed = np.load(os.path.join(samples, "samples.npz"))
    assert packed["arr_0"].shape == (8, 32, 32, 3) and packed["arr_0"].dtype == np.uint8
    assert packed["arr_0"].std() > 1.0  # real images, not a constant

    keep = os.path.join(parts, "00000000-00000003.npz")
    keep_stat = os.stat(keep)
    lost = os.path.join(parts, "00000004-00000007.npz")
    lost_bytes = open(lost, "rb").read()
    os.remove(lost)
    os.remove(lost[:-4] + ".json")

    again = submit("again")
    assert (again[0]["written"], again[0]["skipped"]) == (0, 1)
    assert (again[1]["written"], again[1]["skipped"]) == (1, 0)
    assert os.stat(keep).st_mtime_ns == keep_stat.st_mtime_ns  # the finished part was not rewritten
    assert open(lost, "rb").read() == lost_bytes  # the missing part came back bit-identical
    repacked = np.load(os.path.join(samples, "samples.npz"))
    assert np.array_equal(repacked["arr_0"], packed["arr_0"])


@pytest.mark.slurm
@pytest.mark.slow
def test_two_jobs_forced_onto_one_rendezvous_port_never_mix(cluster, demo_npz, tmp_path):
    """Jobs A and B on node n1 with the same SIMFLOW_RDZV_PORT (issue 11 part 3). A's torchrun agent hosts its
    c10d store on that port; B's batch shell finds the port taken before starting any agent and stops with
    exit 2 saying why, without a requeue. A is untouched: it finishes at world size 1, every step logged once."""
    port = str(_free_port())
    runs = {n: (str(tmp_path / n / "run"), str(tmp_path / f"{n}.out")) for n in ("a", "b")}
    env = {n: dict(_job_env(runs[n][0]), SIMFLOW_RDZV_PORT=port) for n in ("a", "b")}
    ov = _overrides(demo_npz, "checkpoint.every_steps=8")
    job_a = _sbatch(cluster, "train.sh", [TINY, *ov], env["a"], runs["a"][1], opts=["--nodes=1", "-w", "n1"])
    _wait_for(lambda: len(_metrics(runs["a"][0])) >= 2, 300, "job A training", job_a, runs["a"][1])
    job_b = _sbatch(cluster, "train.sh", [TINY, *ov], env["b"], runs["b"][1], opts=["--nodes=1", "-w", "n1"])
    assert _wait_gone(job_b, 120), f"job {job_b} still queued"
    assert _queued(job_a), "job A ended before job B was turned away; raise STEPS"
    log_b = open(runs["b"][1]).read()
    info_b = _job_info(job_b)
    assert info_b["ExitCode"] == "2:0" and info_b["Restarts"] == "0", log_b[-3000:]
    assert (f"rendezvous port {port} (SIMFLOW_RDZV_PORT) is already in use on n1, probably by another job's "
            f"rendezvous: not starting") in log_b
    assert "torchrun agent" not in log_b and not os.path.exists(os.path.join(runs["b"][0], "metrics.jsonl"))
    assert _wait_gone(job_a, 600), f"job {job_a} still queued"
    log_a = open(runs["a"][1]).read()
    info_a = _job_info(job_a)
    assert info_a["JobState"] == "COMPLETED" and info_a["ExitCode"] == "0:0", log_a[-4000:]
    assert "| world size           | 1" in log_a and "| world size           | 2" not in log_a
    assert [m["step"] for m in _metrics(runs["a"][0])] == list(range(1, STEPS + 1))
    assert "result: done" in log_a
