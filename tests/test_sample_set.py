"""Index-seeded sharded sampling (``python -m simflow.sample``): the packed set does not depend on the world size, the
split into array tasks, or on being killed and resumed; bad inputs are refused with messages naming the problem.

All runs use one CPU thread (``torch.set_num_threads(1)`` here, ``OMP_NUM_THREADS=1`` in subprocesses) so that
in-process and subprocess runs execute the same kernels.
"""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from simflow.checkpoint.store import save_checkpoint
from simflow.config import load_config, to_dict
from simflow.eval.sample_set import (
    SampleSetError,
    Slot,
    assigned_ranges,
    check_part,
    generate,
    index_ranges,
    missing_ranges,
    pack,
    part_paths,
    sampling_settings,
    slot_from_env,
)
from simflow.checkpoint.weights import WeightsError, resolve_config
from simflow.eval.weights import load_generator
from simflow.models.simflow import SimFlowModel
from simflow.sample import main as sample_main
from simflow.sampling import sample_images, sample_labels, to_uint8

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")
N, RANGE, BATCH = 64, 8, 8
CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


def _sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _cfg(*overrides):
    return load_config(TINY, [f"sample.num_samples={N}", f"sample.range_size={RANGE}", f"sample.batch_size={BATCH}",
                              *overrides])


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Random tiny SimFlow weights exported as safetensors, with the zero-initialised flow heads and adaLN layers
    perturbed so labels, CFG and noise all change the images."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = SimFlowModel(load_config(TINY))
    with torch.no_grad():
        for p in model.flow.parameters():
            if p.abs().sum() == 0:
                p.normal_(std=0.05)
    path = str(tmp_path_factory.mktemp("weights") / "weights.safetensors")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path, metadata={"step": "7", "run_id": "t"})
    return path


@pytest.fixture(scope="module")
def model(weights):
    m, source = load_generator(weights, _cfg(), CPU)
    return m, source


def _run_slots(model_and_source, out_dir, slots, cfg=None, progress=False):
    """Run each slot's share in turn (the code path of one process per slot), then pack."""
    m, source = model_and_source
    cfg = cfg or _cfg()
    settings = sampling_settings(cfg, source.sha256, source.ema, torch.float32)
    summaries = [generate(m, cfg, str(out_dir), s, settings, CPU, source=source.describe(), progress=progress)
                 for s in slots]
    return summaries, settings


@pytest.fixture(scope="module")
def reference_set(model, tmp_path_factory):
    """The N=64 set from one process (world size 1): (folder, samples.npz SHA-256)."""
    out = tmp_path_factory.mktemp("ws1")
    summaries, settings = _run_slots(model, out, [Slot()])
    assert summaries[0]["written"] == N // RANGE and summaries[0]["skipped"] == 0
    side = pack(str(out), settings, progress=False)
    return out, side["sha256"]


# ------------------------------------------------------------------------------------------------------------------
# partition
# ------------------------------------------------------------------------------------------------------------------
def test_ranges_cover_every_index_once_for_any_split():
    assert index_ranges(70, 8)[-1] == (64, 70) and len(index_ranges(70, 8)) == 9
    for world, arrays in [(1, 1), (2, 1), (3, 1), (1, 2), (2, 3)]:
        got = []
        for a in range(arrays):
            for r in range(world):
                got += assigned_ranges(70, 8, Slot(r, world, a, arrays))
        assert sorted(got) == index_ranges(70, 8), (world, arrays)
    # round-robin: slot index = array_index * world_size + rank
    assert assigned_ranges(70, 8, Slot(1, 3)) == [(8, 16), (32, 40), (56, 64)]
    assert assigned_ranges(70, 8, Slot(0, 2, 1, 2)) == [(16, 24), (48, 56)]
    with pytest.raises(SampleSetError, match="num_samples=0"):
        index_ranges(0, 8)
    with pytest.raises(SampleSetError, match="range_size=0"):
        index_ranges(8, 0)


def test_slot_from_environment():
    assert slot_from_env({}) == Slot()
    s = slot_from_env({"RANK": "2", "WORLD_SIZE": "3", "LOCAL_RANK": "1"})
    assert (s.rank, s.world_size, s.local_rank, s.index, s.count) == (2, 3, 1, 2, 3)
    s = slot_from_env({"SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "4", "SLURM_STEP_ID": "0", "SLURM_LOCALID": "1"})
    assert (s.rank, s.world_size, s.local_rank) == (1, 4, 1)
    # a batch script (no srun step): SLURM_PROCID alone does not make this a multi-rank job
    assert slot_from_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "8"}) == Slot()
    s = slot_from_env({"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "4", "SLURM_ARRAY_TASK_COUNT": "3",
                       "RANK": "1", "WORLD_SIZE": "2"})
    assert (s.array_index, s.array_count, s.index, s.count) == (1, 3, 3, 6)
    assert slot_from_env({"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "2"}, array_index=0,
                         array_count=1) == Slot()
    with pytest.raises(SampleSetError, match="array index 2 is outside array count 2"):
        slot_from_env({"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "2"})
    with pytest.raises(SampleSetError, match="SLURM_ARRAY_TASK_COUNT is not"):
        slot_from_env({"SLURM_ARRAY_TASK_ID": "0"})
    with pytest.raises(SampleSetError, match="RANK='x'"):
        slot_from_env({"RANK": "x", "WORLD_SIZE": "2"})
    with pytest.raises(SampleSetError, match="rank 2 is outside world size 2"):
        slot_from_env({"RANK": "2", "WORLD_SIZE": "2"})


# ------------------------------------------------------------------------------------------------------------------
# bit-identical sets (in-process: the per-slot code path of separate processes, run one after another)
# ------------------------------------------------------------------------------------------------------------------
def test_reference_set_content(model, reference_set, weights):
    m, _ = model
    out, sha = reference_set
    with np.load(out / "samples.npz") as z:
        assert sorted(z.files) == ["arr_0", "labels"]
        arr, labels = z["arr_0"], z["labels"]
    assert arr.dtype == np.uint8 and arr.shape == (N, 32, 32, 3)
    # labels and images are functions of (seed, index): recompute range [8, 16) directly
    idx = torch.arange(8, 16)
    assert np.array_equal(labels, sample_labels(10, 0, torch.arange(N)).numpy())
    assert len(np.unique(labels)) > 3
    direct = to_uint8(sample_images(m, idx, sample_labels(10, 0, idx), _cfg().sample, CPU)).numpy()
    assert np.array_equal(arr[8:16], direct)
    assert arr.std() > 5  # real images, not a constant
    side = json.loads((out / "samples.json").read_text())
    assert side["sha256"] == sha == _sha(out / "samples.npz")
    assert side["weights"]["sha256"] == _sha(weights) and side["weights"]["path"] == weights
    assert side["weights"]["step"] == 7
    assert (side["ema"], side["cfg_scale"], side["cfg_mode"], side["cfg_anneal"], side["temperature"]) == (
        True, 1.0, "deep_only_cond", False, 1.0)
    assert (side["num_samples"], side["resolution"], side["seed"], side["num_parts"]) == (N, 32, 0, N // RANGE)
    assert side["arr_0"] == {"shape": [N, 32, 32, 3], "dtype": "uint8"}
    assert "127.5 * x + 128" in side["quantisation"] and side["code_version"]
    # the evaluator accepts the packed file as it is
    from simflow.eval.evaluator import open_samples

    assert open_samples(str(out / "samples.npz")).shape == (N, 32, 32, 3)


@pytest.mark.parametrize("world, arrays", [(2, 1), (3, 1), (1, 2)])
def test_world_sizes_and_array_tasks_give_identical_sets(model, reference_set, tmp_path, world, arrays):
    slots = [Slot(r, world, a, arrays) for a in range(arrays) for r in range(world)]
    summaries, settings = _run_slots(model, tmp_path, slots)
    assert sum(s["written"] for s in summaries) == N // RANGE
    assert missing_ranges(str(tmp_path), settings) == []
    side = pack(str(tmp_path), settings, progress=False)
    ref_dir, ref_sha = reference_set
    assert side["sha256"] == ref_sha  # the whole file, byte for byte
    with np.load(tmp_path / "samples.npz") as a, np.load(ref_dir / "samples.npz") as b:
        assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["labels"], b["labels"])


def test_settings_change_the_images(model, reference_set, tmp_path):
    """CFG scale and seed enter the set (guards against a test that passes because nothing matters)."""
    ref_dir, _ = reference_set
    with np.load(ref_dir / "samples.npz") as z:
        ref = z["arr_0"][:8]
    m, _ = model
    for override in ("sample.cfg_scale=3.0", "sample.seed=1"):
        cfg = _cfg(override)
        idx = torch.arange(8)
        x = to_uint8(sample_images(m, idx, sample_labels(10, cfg.sample.seed, idx), cfg.sample, CPU)).numpy()
        assert not np.array_equal(x, ref), override


# ------------------------------------------------------------------------------------------------------------------
# resume
# ------------------------------------------------------------------------------------------------------------------
def test_resume_rewrites_truncated_partial_and_missing_parts(model, reference_set, tmp_path):
    # an interrupted run: only rank 0 of 2 finished its ranges
    _, settings = _run_slots(model, tmp_path, [Slot(0, 2)])
    done = assigned_ranges(N, RANGE, Slot(0, 2))
    assert len(missing_ranges(str(tmp_path), settings)) == N // RANGE - len(done)
    npz0, _ = part_paths(str(tmp_path), *done[0])
    with open(npz0, "r+b") as f:  # truncated data file
        f.truncate(os.path.getsize(npz0) // 2)
    npz1, rec1 = part_paths(str(tmp_path), *done[1])
    os.remove(rec1)  # data written, commit record not (killed between the two renames)
    npz2, rec2 = part_paths(str(tmp_path), *done[2])
    data = bytearray(open(npz2, "rb").read())
    data[-100] ^= 0xFF  # same size, one flipped byte
    open(npz2, "wb").write(bytes(data))
    open(npz0 + ".tmp-host-123", "wb").write(b"half a file")  # a killed writer's temporary file
    assert check_part(str(tmp_path), *done[0])[0] == "corrupt"
    assert check_part(str(tmp_path), *done[1])[0] == "partial"
    assert check_part(str(tmp_path), *done[2]) == ("corrupt", f"{npz2}: SHA-256 differs from its record")
    assert check_part(str(tmp_path), *done[3])[0] == "ok"
    expected = "6 of 8 ranges are not finished: corrupt \\(1\\).*missing \\(4\\).*partial \\(1\\)"
    with pytest.raises(SampleSetError, match=expected):
        pack(str(tmp_path), settings, progress=False)

    summaries, _ = _run_slots(model, tmp_path, [Slot()], progress=False)
    s = summaries[0]
    assert (s["skipped"], s["written"]) == (1, N // RANGE - 1)
    assert sorted(r["part"] for r in s["rewritten"]) == sorted(
        os.path.basename(p)[:-4] for p in (npz0, npz1, npz2))
    assert not os.path.exists(npz0 + ".tmp-host-123")
    side = pack(str(tmp_path), progress=False)  # settings read back from the parts
    assert side["sha256"] == reference_set[1]


def test_pack_names_missing_ranges_and_cli_pack(model, tmp_path, capsys):
    _run_slots(model, tmp_path, [Slot(1, 3)])
    with pytest.raises(SampleSetError) as e:
        pack(str(tmp_path), progress=False)
    msg = str(e.value)
    assert "5 of 8 ranges are not finished" in msg
    assert "00000000-00000007" in msg and "00000016-00000023" in msg and "00000008-00000015" not in msg
    assert sample_main(["--pack", "--out", str(tmp_path), "--no-progress"]) == 2
    assert "00000000-00000007" in capsys.readouterr().err
    with pytest.raises(SampleSetError, match="no finished parts"):
        pack(str(tmp_path / "empty"), progress=False)


def test_pack_rechecks_every_part_hash(model, tmp_path):
    """A part whose bytes changed after it was finished (same size) is caught while packing."""
    _, settings = _run_slots(model, tmp_path, [Slot()])
    npz, _ = part_paths(str(tmp_path), 24, 32)
    data = bytearray(open(npz, "rb").read())
    data[200] ^= 0x01
    open(npz, "wb").write(bytes(data))
    with pytest.raises(SampleSetError, match="00000024-00000031.npz: SHA-256 differs from its record"):
        pack(str(tmp_path), settings, progress=False)
    assert sorted(os.listdir(tmp_path)) == ["parts"]  # no samples.npz, no temporary file


def test_parts_made_with_other_settings_are_refused(model, tmp_path):
    _run_slots(model, tmp_path, [Slot(0, 8)])
    with pytest.raises(SampleSetError, match="other settings.*cfg_scale: 1.0 vs 2.0"):
        _run_slots(model, tmp_path, [Slot(0, 8)], cfg=_cfg("sample.cfg_scale=2.0"))


# ------------------------------------------------------------------------------------------------------------------
# command line and weights
# ------------------------------------------------------------------------------------------------------------------
def test_cli_single_process_equals_reference(weights, reference_set, tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["--weights", weights, "--config", TINY, "--out", str(out), "--num-samples", str(N), "--range-size",
            str(RANGE), "--batch-size", str(BATCH), "--device", "cpu", "--no-progress"]
    assert sample_main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["written"] == N // RANGE and summary["img_per_s"] > 0
    assert _sha(out / "samples.npz") == reference_set[1]
    assert sample_main(args) == 0  # everything finished: nothing regenerated, nothing repacked
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (summary["skipped"], summary["written"], summary["packed"]) == (N // RANGE, 0, "already up to date")


@pytest.mark.parametrize("extra, needle", [
    (["--weights", "/nonexistent/w.safetensors"], "weights not found: '/nonexistent/w.safetensors'"),
    (["model.flow.width=32"], "do not fit the config's model section: shape mismatches"),
    (["--num-samples", "0"], "sample.num_samples=0: must be >= 1"),
    (["--range-size", "0"], "sample.range_size=0: must be >= 1"),
    (["sample.temperature=0", "--device", "cpu"], "sample.temperature=0.0: must be > 0"),  # intermixed
    (["sample.cfg_mode=best"], "sample.cfg_mode='best'"),
    (["sample.use_ema=false"], "exported weights hold the EMA flow only"),
    (["--array-index", "2", "--array-count", "2"], "array index 2 is outside array count 2"),
    (["--array-index", "1"], "give both --array-index and --array-count"),
    (["--rank", "0"], "give both rank and world size"),
    (["sample.cfg_scale"], "overrides must be key=value"),
])
def test_cli_rejects_bad_input(weights, tmp_path, capsys, extra, needle):
    args = ["--weights", weights, "--config", TINY, "--out", str(tmp_path / "o"), "--num-samples", "8",
            "--no-progress"]
    if extra[0] == "--weights":
        args = args[2:]
    assert sample_main(args + extra) == 2
    assert needle in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o" / "parts")


def test_cli_needs_config_and_out(weights, capsys):
    assert sample_main(["--weights", weights, "--out", "x", "--no-progress"]) == 2
    assert "pass --config" in capsys.readouterr().err
    assert sample_main(["--weights", weights, "--config", TINY, "--no-progress"]) == 2
    assert "pass --out" in capsys.readouterr().err


def test_weights_file_errors(tmp_path):
    bad = tmp_path / "w.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(WeightsError, match="not a readable safetensors file"):
        load_generator(str(bad), _cfg())
    pickled = tmp_path / "w.pt"
    torch.save({"a": [1, 2]}, pickled)
    with pytest.raises(WeightsError, match="dict of parameter name -> tensor"):
        load_generator(str(pickled), _cfg())
    with pytest.raises(WeightsError, match="unknown weights format"):
        load_generator(str(TINY), _cfg())


def test_checkpoint_weights_ema_and_config(tmp_path, weights):
    """A checkpoint step directory: config from its manifest, EMA entries replace the raw flow weights."""
    from safetensors.torch import load_file

    cfg = _cfg()
    raw = load_file(weights)
    ema = {k: v + 0.01 for k, v in raw.items() if k.startswith("flow.")}
    meta = {"run_id": "ck", "config": to_dict(cfg), "code_version": "test"}
    step = save_checkpoint(str(tmp_path / "ckpt"), 5, {"generator": {"module": raw, "ema": ema, "steps": 5}}, meta)
    got = resolve_config(None, str(tmp_path / "ckpt"), ["sample.cfg_scale=1.5"])
    assert got.model == cfg.model and got.sample.cfg_scale == 1.5
    m_ema, src = load_generator(str(tmp_path / "ckpt"), got)
    assert src.kind == "checkpoint" and src.ema and src.step == 5 and src.path == os.path.abspath(step)
    sd = m_ema.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in ema.items())
    assert all(torch.equal(sd[k], v) for k, v in raw.items() if k.startswith("vae."))
    m_raw, src_raw = load_generator(step, got, use_ema=False)
    assert not src_raw.ema and all(torch.equal(m_raw.state_dict()[k], raw[k]) for k in ema)
    save_checkpoint(str(tmp_path / "noema"), 1, {"generator": {"module": raw, "ema": {}, "steps": 1}}, meta)
    with pytest.raises(WeightsError, match="holds no EMA weights"):
        load_generator(str(tmp_path / "noema"), got)


# ------------------------------------------------------------------------------------------------------------------
# separate processes (torchrun-style RANK/WORLD_SIZE, Slurm array variables, SIGKILL)
# ------------------------------------------------------------------------------------------------------------------
def _env(**extra):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_"))}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""))
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _cli(weights, out, batch=BATCH, n=N):
    return [sys.executable, "-m", "simflow.sample", "--weights", weights, "--config", TINY, "--out", str(out),
            "--num-samples", str(n), "--range-size", str(RANGE), "--batch-size", str(batch), "--device", "cpu",
            "--no-progress"]


@pytest.mark.slow
def test_separate_processes_world_2_3_and_array_2_are_bit_identical(weights, reference_set, tmp_path):
    jobs = {}
    for world in (2, 3):
        for r in range(world):
            jobs[(f"ws{world}", r)] = _env(RANK=r, WORLD_SIZE=world, LOCAL_RANK=r)
    for a in range(2):
        jobs[("array2", a)] = _env(SLURM_ARRAY_TASK_ID=a, SLURM_ARRAY_TASK_COUNT=2, SLURM_ARRAY_TASK_MIN=0)
    procs = {k: subprocess.Popen(_cli(weights, tmp_path / k[0]), env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for k, env in jobs.items()}
    outs = {}
    for k, p in procs.items():
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, (k, err[-2000:])
        outs[k] = json.loads(out.strip().splitlines()[-1])
    for k, s in outs.items():
        world = 2 if k[0] == "ws2" else 3 if k[0] == "ws3" else 1
        arrays = 2 if k[0] == "array2" else 1
        rank, task = (k[1], 0) if arrays == 1 else (0, k[1])
        assert s["written"] == len(assigned_ranges(N, RANGE, Slot(rank, world, task, arrays))), (k, s)
    for name in ("ws2", "ws3", "array2"):
        # packed by whichever process finished last, without a separate pack step
        assert _sha(tmp_path / name / "samples.npz") == reference_set[1], name
        recs = [json.loads(open(p).read()) for p in sorted((tmp_path / name / "parts").glob("*.json"))]
        assert len(recs) == N // RANGE
    ws3 = [json.loads(p.read_text()) for p in (tmp_path / "ws3" / "parts").glob("*.json")]
    assert {r["slot"]["rank"] for r in ws3} == {0, 1, 2}
    r = subprocess.run([sys.executable, "-m", "simflow.sample", "--pack", "--out", str(tmp_path / "ws3"),
                        "--no-progress"], env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["sha256"] == reference_set[1]


@pytest.mark.slow
def test_sigkill_midway_then_resume_gives_the_same_samples(model, weights, tmp_path):
    n, batch = 128, 2  # 16 ranges of 4 batches: slow enough to be killed in the middle
    cfg = _cfg(f"sample.num_samples={n}", f"sample.batch_size={batch}")
    _, settings = _run_slots(model, tmp_path / "ref", [Slot()], cfg=cfg)
    ref = pack(str(tmp_path / "ref"), settings, progress=False)

    out = tmp_path / "killed"
    proc = subprocess.Popen(_cli(weights, out, batch, n), env=_env(), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while len(list((out / "parts").glob("*.json"))) < 2:
        assert proc.poll() is None, "the sampler ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = len(list((out / "parts").glob("*.json")))
    assert 2 <= finished < n // RANGE and not (out / "samples.npz").exists()

    r = subprocess.run(_cli(weights, out, batch, n), env=_env(), cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout.strip().splitlines()[-1])
    assert s["skipped"] == finished and s["written"] == n // RANGE - finished
    with np.load(out / "samples.npz") as a, np.load(tmp_path / "ref" / "samples.npz") as b:
        assert a["arr_0"].tobytes() == b["arr_0"].tobytes() and np.array_equal(a["labels"], b["labels"])
    assert _sha(out / "samples.npz") == ref["sha256"]
    assert not list((out / "parts").glob("*.tmp-*"))


# ------------------------------------------------------------------------------------------------------------------
# end to end: train tiny, sample, FID against demo reference statistics
# ------------------------------------------------------------------------------------------------------------------
E2E_SAMPLES = 1000  # sampled and packed
E2E_REF_IMAGES = 50  # held-out images behind the reference statistics
E2E_FID_IMAGES = 25  # samples scored, and real images scored for the real-vs-real baseline


@pytest.mark.slow
def test_train_tiny_sample_and_score_fid_end_to_end(tmp_path, demo_data, inception_weights):
    """Train ``tiny`` for 3 steps on real demo data, export, sample 1,000 images through the CLI, and score FID
    against reference statistics written by ``tools/fid_ref.py`` from the held-out demo split.

    Inception weights are random (none can be downloaded offline), so the FID value only checks the pipeline: it
    is finite and real, the FID of 25 other held-out images (real vs real) is lower than that of 25 samples, both
    against the statistics of 50 held-out images, and the result records the files. Inception-V3 at 299 px is
    most of this test's cost (one forward costs ~30 tiny-flow samples), so it runs 100 forwards in all; the
    1,000 samples are all sampled and packed (issue 7).
    """
    from simflow.eval.evaluator import evaluate, load_reference, open_samples

    from simflow.eval.features import build_feature_extractor
    from simflow.train.trainer import Trainer

    train_npz, test_npz = demo_data(500)
    cfg = load_config(TINY, ["data.source=npz", f"data.path={train_npz}", f"train.out_dir={tmp_path}/run",
                             "train.steps=3", "logging.wandb=disabled", "train.sample_every=0"])
    result = Trainer(cfg).fit()
    assert result["weights"] == f"{tmp_path}/run/weights.safetensors"

    out = tmp_path / "samples"
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "simflow.sample", "--weights", result["weights"], "--config", TINY,
                        "--out", str(out), "--num-samples", str(E2E_SAMPLES), "--range-size", "250",
                        "--batch-size", "125", "--no-progress"], env=_env(OMP_NUM_THREADS=2), cwd=ROOT,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    t_sample = time.time() - t0
    side = json.loads((out / "samples.json").read_text())
    assert side["num_samples"] == E2E_SAMPLES and side["weights"]["step"] == 3 and side["nonfinite_samples"] == 0

    inception = inception_weights
    ref_path = tmp_path / "demo_ref.npz"
    t0 = time.time()
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "fid_ref.py"), test_npz, "--out", str(ref_path),
                        "--inception-weights", inception, "--limit", str(E2E_REF_IMAGES), "--no-progress"],
                       env=_env(OMP_NUM_THREADS=2), cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    t_ref = time.time() - t0

    torch.set_num_threads(2)
    t0 = time.time()
    try:
        extractor = build_feature_extractor("inception", inception)
        ref = load_reference(str(ref_path))
        fid = evaluate(open_samples(str(out / "samples.npz")), ref, extractor, metrics=("fid",),
                       num_samples=E2E_FID_IMAGES, fd_method="eigh", progress=False)
        with np.load(test_npz) as z:
            other_real = z["images"][E2E_REF_IMAGES:E2E_REF_IMAGES + E2E_FID_IMAGES]
        np.savez(tmp_path / "real.npz", arr_0=other_real)
        baseline = evaluate(open_samples(str(tmp_path / "real.npz")), ref, extractor, metrics=("fid",),
                            fd_method="eigh", progress=False)
    finally:
        torch.set_num_threads(1)
    print(f"sampling {E2E_SAMPLES}: {t_sample:.1f}s, reference: {t_ref:.1f}s, scoring: {time.time() - t0:.1f}s; "
          f"FID samples {fid['fid']:.2f}, real vs real {baseline['fid']:.2f}")
    assert np.isfinite(fid["fid"]) and fid["fid"] > 0
    assert baseline["fid"] < fid["fid"], (baseline["fid"], fid["fid"])
    assert fid["samples"]["num_images"] == E2E_FID_IMAGES and fid["samples"]["sha256"] == side["sha256"]
    assert fid["reference"]["resolution"] == [32, 32]
    assert fid["reference"]["stats_source"]["pool"] == "stored in reference file"
