"""Index-seeded, sharded, resumable sample sets for FID-50k (issue 7 item 1; method §9).

A sample set is ``num_samples`` images whose class label and noise are functions of (seed, sample index) alone
(:func:`simflow.sampling.sample_labels`, :func:`simflow.sampling.sample_noise`; design.md "Sample index"). The
indices ``[0, N)`` are cut into consecutive ranges of ``range_size``; range ``r`` belongs to worker slot
``r mod S`` where a slot is (array task, rank) -> ``array_index * world_size + rank`` and ``S = array_count *
world_size``. Workers never talk to each other: each writes its own ranges. Because a range is always generated the
same way (same indices, same batch boundaries ``start, start + batch_size, ...``), the packed set is bit-identical
for any world size and any split into array tasks, given the same weights, settings, batch size and device type.

Layout of an output folder::

    <out>/parts/00000000-00000999.npz    arr_0 uint8 (n, H, W, 3), labels int64 (n,), indices int64 (n,)
    <out>/parts/00000000-00000999.json   commit record: range, byte size and SHA-256 of the .npz, the settings
                                          (and their SHA-256), batch size, device, img/s, non-finite count
    <out>/samples.npz                    arr_0 uint8 (N, H, W, 3), labels int64 (N,)  (after :func:`pack`)
    <out>/samples.json                   sidecar: weights path + SHA-256, EMA, CFG mode/scale/anneal, temperature,
                                          seed, N, resolution, quantisation, code version, file SHA-256

A part is finished when its record exists and the ``.npz`` has the recorded size and SHA-256. Each file is written
to a temporary name and renamed (atomic on POSIX), the record after the data, so a process killed at any point
leaves either a finished part or one that the next run regenerates. Re-running skips finished parts and rewrites
partial or corrupt ones; a part made with other settings (weights, CFG, seed, N, ...) is an error, never mixed in.
NPZ files are written with fixed zip timestamps, so identical content gives byte-identical files.

Quantisation (:func:`simflow.sampling.to_uint8`): ``uint8(clamp(127.5 x + 128, 0, 255))`` of decoded images
``x`` clamped to [-1, 1]: DiT's ``sample_ddp.py`` form (nearest level), not the truncation of ADM's and REPA-E's
sampling scripts; the ``.npz`` is scored by the ADM evaluator (method §9).
"""

from __future__ import annotations

import functools
import glob
import hashlib
import io
import json
import os
import socket
import sys
import time
import zipfile
from dataclasses import dataclass
from typing import IO, Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm import tqdm

from simflow import storage
from simflow.config import ConfigError, SimFlowConfig
from simflow.runtime import code_version, detect_dist_env
from simflow.sampling import sample_images, sample_labels, to_uint8

PART_FORMAT = "simflow-sample-part/1"
SET_FORMAT = "simflow-sample-set/1"
QUANTISATION = (
    "uint8(clamp(127.5 * x + 128, 0, 255)) of decoded images x clamped to [-1, 1] (DiT/REPA-E sample_ddp.py "
    "convention, scored by the ADM evaluator; method §9)"
)
PARTS_DIR = "parts"
SAMPLES_NPZ = "samples.npz"
SAMPLES_JSON = "samples.json"
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # fixed member timestamps: same content -> same bytes


class SampleSetError(ValueError):
    """A sample-set folder or request is inconsistent (missing ranges, foreign parts, bad slot). Names the file."""


# ------------------------------------------------------------------------------------------------------------------
# who does what
# ------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Slot:
    """This process's place in the sampling job: rank within a (torchrun/srun) job and index within a job array.

    ``index = array_index * world_size + rank`` out of ``count = array_count * world_size`` slots.
    ``local_rank`` picks the GPU on a node.
    """

    rank: int = 0
    world_size: int = 1
    array_index: int = 0
    array_count: int = 1
    local_rank: int = 0

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise SampleSetError(f"rank {self.rank} is outside world size {self.world_size}")
        if self.array_count < 1 or not 0 <= self.array_index < self.array_count:
            raise SampleSetError(
                f"array index {self.array_index} is outside array count {self.array_count} (a Slurm array must be "
                f"contiguous, e.g. --array=0-{max(self.array_count - 1, 0)})"
            )

    @property
    def index(self) -> int:
        return self.array_index * self.world_size + self.rank

    @property
    def count(self) -> int:
        return self.array_count * self.world_size

    def describe(self) -> str:
        return f"rank {self.rank}/{self.world_size}, array task {self.array_index}/{self.array_count}"


def _env_int(env: Mapping[str, str], key: str) -> Optional[int]:
    raw = env.get(key)
    if raw is None or raw == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise SampleSetError(f"environment variable {key}={raw!r}: not an integer") from None


def slot_from_env(
    environ: Optional[Mapping[str, str]] = None,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
    array_index: Optional[int] = None,
    array_count: Optional[int] = None,
) -> Slot:
    """The :class:`Slot` of this process. Explicit arguments win over the environment.

    Rank / world size / local rank: :func:`simflow.runtime.detect_dist_env` (``RANK``/``WORLD_SIZE``
    from torchrun, else ``SLURM_PROCID``/``SLURM_STEP_NUM_TASKS`` inside an ``srun`` step, else 0/1). Array:
    ``SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN`` of ``SLURM_ARRAY_TASK_COUNT``, else 0/1. No process group is
    created: ranks never communicate.

    Raises:
        SampleSetError: malformed or out-of-range values (naming the variable).
    """
    env = os.environ if environ is None else environ
    local_rank = 0
    if rank is None and world_size is None:
        try:  # the launcher's reading of torchrun / srun variables, so both agree on who is who
            de = detect_dist_env(env)
        except ConfigError as e:
            raise SampleSetError(str(e)) from None
        rank, world_size, local_rank = de.rank, de.world_size, de.local_rank
    elif rank is None or world_size is None:
        raise SampleSetError("give both rank and world size, or neither (they are then read from the environment)")
    else:
        local_rank = _env_int(env, "LOCAL_RANK") or 0
    if array_index is None and array_count is None and "SLURM_ARRAY_TASK_ID" in env:
        task = _env_int(env, "SLURM_ARRAY_TASK_ID")
        count = _env_int(env, "SLURM_ARRAY_TASK_COUNT")
        if count is None:
            raise SampleSetError("SLURM_ARRAY_TASK_ID is set but SLURM_ARRAY_TASK_COUNT is not")
        array_index, array_count = task - (_env_int(env, "SLURM_ARRAY_TASK_MIN") or 0), count
    elif (array_index is None) != (array_count is None):
        raise SampleSetError("give both --array-index and --array-count, or neither")
    return Slot(rank, world_size, array_index or 0, array_count or 1, local_rank)


def index_ranges(num_samples: int, range_size: int) -> List[Tuple[int, int]]:
    """``[(start, stop), ...]`` covering ``[0, num_samples)`` in consecutive ranges of ``range_size`` (the last may
    be shorter)."""
    if num_samples < 1:
        raise SampleSetError(f"sample.num_samples={num_samples}: must be >= 1")
    if range_size < 1:
        raise SampleSetError(f"sample.range_size={range_size}: must be >= 1")
    return [(s, min(s + range_size, num_samples)) for s in range(0, num_samples, range_size)]


def assigned_ranges(num_samples: int, range_size: int, slot: Slot) -> List[Tuple[int, int]]:
    """The ranges of ``slot``: range number ``r`` goes to slot ``r mod slot.count`` (round-robin)."""
    return [r for i, r in enumerate(index_ranges(num_samples, range_size)) if i % slot.count == slot.index]


def part_stem(start: int, stop: int) -> str:
    """File stem of the part holding indices ``[start, stop)``: ``"00000000-00000999"`` (inclusive end)."""
    return f"{start:08d}-{stop - 1:08d}"


def part_paths(out_dir: str, start: int, stop: int) -> Tuple[str, str]:
    """(``.npz``, ``.json``) paths of a part."""
    base = os.path.join(out_dir, PARTS_DIR, part_stem(start, stop))
    return base + ".npz", base + ".json"


# ------------------------------------------------------------------------------------------------------------------
# files
# ------------------------------------------------------------------------------------------------------------------
def _write_json(obj: Dict[str, Any], path: str) -> None:
    storage.write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class NpzStreamWriter:
    """Write an uncompressed ``.npz`` member by member, streaming each array's rows, with fixed zip timestamps.

    ``np.load`` reads the result like any ``np.savez`` file. Memory: one chunk at a time, so a 50k x 256 x 256 x 3
    set (9.8 GB) is packed without holding it.
    """

    def __init__(self, f: IO[bytes], path: str):
        """``f``: the open binary file to write (e.g. :func:`simflow.storage.open_atomic`'s ``.f``); ``path``: its
        name in messages."""
        self.path = path
        self._zf = zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True)

    def add(self, name: str, array: np.ndarray) -> None:
        """Store a whole in-memory array as ``name``."""
        array = np.ascontiguousarray(array)
        self.add_stream(name, array.shape, array.dtype, [array])

    def add_stream(self, name: str, shape: Sequence[int], dtype: Any, chunks: Iterable[np.ndarray]) -> None:
        """Store an array of ``shape``/``dtype`` given as consecutive row chunks (C order)."""
        dtype = np.dtype(dtype)
        info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_TIME)
        info.compress_type = zipfile.ZIP_STORED
        info.external_attr = 0o644 << 16
        expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        written = 0
        with self._zf.open(info, "w", force_zip64=True) as f:
            header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                      "shape": tuple(int(s) for s in shape)}
            np.lib.format.write_array_header_1_0(f, header)
            for chunk in chunks:
                chunk = np.ascontiguousarray(chunk, dtype=dtype)
                f.write(chunk.tobytes())
                written += chunk.nbytes
        if written != expected:
            raise SampleSetError(f"{self.path}['{name}']: wrote {written} bytes for shape {tuple(shape)} {dtype}, "
                                 f"expected {expected}")

    def close(self) -> None:
        self._zf.close()

    def __enter__(self) -> "NpzStreamWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _write_part_npz(path: str, images: np.ndarray, labels: np.ndarray, indices: np.ndarray) -> Tuple[int, str]:
    with storage.open_atomic(path) as out, NpzStreamWriter(out.f, path) as w:
        w.add("arr_0", images)
        w.add("labels", labels.astype(np.int64))
        w.add("indices", indices.astype(np.int64))
    return os.path.getsize(path), storage.sha256_file(path)


def settings_sha256(settings: Dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON of a settings dict (sorted keys, no whitespace)."""
    return _sha256_bytes(json.dumps(settings, sort_keys=True, separators=(",", ":")).encode())


def sampling_settings(cfg: SimFlowConfig, weights_sha256: str, ema: bool, dtype: torch.dtype) -> Dict[str, Any]:
    """Everything that determines the images of a sample set (its identity; batch size and device only change
    floating-point rounding and are recorded per part instead).

    Args:
        cfg: config (``model``, ``sample``).
        weights_sha256: SHA-256 of the weights file (or of a checkpoint's ``generator.pt``).
        ema: whether the flow runs with EMA weights.
        dtype: autocast dtype of the networks (``torch.float32`` or ``torch.bfloat16``).
    """
    from simflow.eval.weights import model_fingerprint

    s = cfg.sample
    return {
        "format": PART_FORMAT,
        "weights_sha256": weights_sha256,
        "ema": bool(ema),
        "model": model_fingerprint(cfg),
        "num_classes": int(cfg.model.flow.num_classes),
        "resolution": int(cfg.model.resolution),
        "num_samples": int(s.num_samples),
        "range_size": int(s.range_size),
        "seed": int(s.seed),
        "cfg_scale": float(s.cfg_scale),
        "cfg_mode": s.cfg_mode,
        "cfg_anneal": bool(s.cfg_anneal),
        "temperature": float(s.temperature),
        "precision": str(dtype).replace("torch.", ""),
        "quantisation": QUANTISATION,
    }


def _read_record(json_path: str) -> Optional[Dict[str, Any]]:
    try:
        with open(json_path) as f:
            rec = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    return rec if isinstance(rec, dict) else None


def _settings_diff(a: Dict[str, Any], b: Dict[str, Any]) -> str:
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return ", ".join(f"{k}: {_short(a.get(k))} vs {_short(b.get(k))}" for k in keys[:4]) or "(none)"


def _short(v: Any) -> str:
    text = json.dumps(v, sort_keys=True)
    return text if len(text) <= 60 else text[:57] + "..."


def check_part(out_dir: str, start: int, stop: int, settings_digest: Optional[str] = None,
               verify_hash: bool = True) -> Tuple[str, str]:
    """State of the part ``[start, stop)``: ``(status, reason)``.

    ``status``: ``"ok"`` (finished; with ``verify_hash`` its SHA-256 was re-checked), ``"missing"`` (nothing
    written), ``"partial"`` (data without a record: the writer was killed), ``"corrupt"`` (unreadable record, or data
    of the wrong size or SHA-256) or ``"foreign"`` (a finished part made with other settings than
    ``settings_digest``).
    """
    npz, rec_path = part_paths(out_dir, start, stop)
    if not os.path.exists(rec_path):
        return ("partial", "data file without a commit record") if os.path.exists(npz) else ("missing", "not written")
    rec = _read_record(rec_path)
    if rec is None or rec.get("format") != PART_FORMAT:
        return "corrupt", f"{rec_path}: unreadable or not a {PART_FORMAT} record"
    if rec.get("start") != start or rec.get("stop") != stop:
        got = f"[{rec.get('start')}, {rec.get('stop')})"
        return "corrupt", f"{rec_path}: records range {got}, expected [{start}, {stop})"
    if settings_digest is not None and rec.get("settings_sha256") != settings_digest:
        return "foreign", f"{rec_path} was made with other settings"
    if not os.path.exists(npz):
        return "corrupt", f"{npz}: missing (its record exists)"
    size = os.path.getsize(npz)
    if size != rec.get("bytes"):
        return "corrupt", f"{npz}: {size} bytes, record says {rec.get('bytes')} (truncated?)"
    if verify_hash and storage.sha256_file(npz) != rec.get("sha256"):
        return "corrupt", f"{npz}: SHA-256 differs from its record"
    return "ok", "finished"


def part_records(out_dir: str) -> List[Dict[str, Any]]:
    """All readable part records in ``out_dir/parts``, by start index."""
    recs = []
    for path in sorted(glob.glob(os.path.join(out_dir, PARTS_DIR, "*.json"))):
        rec = _read_record(path)
        if rec is not None and rec.get("format") == PART_FORMAT:
            recs.append(rec)
    return sorted(recs, key=lambda r: r.get("start", 0))


def missing_ranges(out_dir: str, settings: Dict[str, Any], verify_hash: bool = False) -> List[Tuple[int, int]]:
    """Ranges of the set described by ``settings`` that are not finished in ``out_dir``."""
    digest = settings_sha256(settings)
    return [r for r in index_ranges(settings["num_samples"], settings["range_size"])
            if check_part(out_dir, *r, settings_digest=digest, verify_hash=verify_hash)[0] != "ok"]


def _range_list(ranges: Sequence[Tuple[int, int]], limit: int = 8) -> str:
    names = [part_stem(*r) for r in ranges[:limit]]
    more = f" and {len(ranges) - limit} more" if len(ranges) > limit else ""
    return ", ".join(names) + more


# ------------------------------------------------------------------------------------------------------------------
# sampling
# ------------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def sample_range(model, cfg: SimFlowConfig, start: int, stop: int, device: torch.device,
                 dtype: torch.dtype = torch.float32, on_batch: Optional[Callable[[int], None]] = None
                 ) -> Tuple[np.ndarray, np.ndarray, int]:
    """Generate the samples with indices ``[start, stop)``.

    Batches are ``[start, start + B), [start + B, start + 2B), ...`` with ``B = cfg.sample.batch_size``, so a range
    is computed identically whichever process runs it. Labels are uniform in ``[0, num_classes)`` (ADM protocol,
    method §9) and noise N(0, I) (method §4.5 step 1), both from (``sample.seed``, index); CFG, temperature: see
    :func:`simflow.sampling.sample_images`.

    Returns:
        ``images`` uint8 (n, H, W, 3) (:data:`QUANTISATION`), ``labels`` int64 (n,), and the number of samples that
        had non-finite pixels (set to 0, i.e. mid-grey, before quantisation; TarFlow resamples such samples instead,
        method §4.5 "Numerics").
    """
    bs = cfg.sample.batch_size
    images, labels, nonfinite = [], [], 0
    for b0 in range(start, stop, bs):
        idx = torch.arange(b0, min(b0 + bs, stop), dtype=torch.int64)
        y = sample_labels(cfg.model.flow.num_classes, cfg.sample.seed, idx)
        x = sample_images(model, idx, y, cfg.sample, device, dtype)
        bad = ~torch.isfinite(x).flatten(1).all(dim=1)
        if bad.any():
            nonfinite += int(bad.sum())
            x = torch.nan_to_num(x, nan=0.0, posinf=1.0, neginf=-1.0)
        images.append(to_uint8(x).numpy())
        labels.append(y.numpy())
        if on_batch is not None:
            on_batch(len(idx))
    return np.concatenate(images), np.concatenate(labels).astype(np.int64), nonfinite


def write_part(out_dir: str, start: int, stop: int, images: np.ndarray, labels: np.ndarray,
               settings: Dict[str, Any], meta: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Write one finished part atomically (data, then its commit record); returns the record.

    Args:
        images: uint8 (stop - start, H, W, 3). labels: int64 (stop - start,).
        settings: :func:`sampling_settings` of the set. meta: extra fields for the record (batch size, device, ...).
    """
    n = stop - start
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[0] != n or images.shape[-1] != 3:
        raise SampleSetError(f"part {part_stem(start, stop)}: expected uint8 ({n}, H, W, 3) images, got "
                             f"{images.dtype} {images.shape}")
    if labels.shape != (n,):
        raise SampleSetError(f"part {part_stem(start, stop)}: expected ({n},) labels, got {labels.shape}")
    npz, rec_path = part_paths(out_dir, start, stop)
    os.makedirs(os.path.dirname(npz), exist_ok=True)
    size, digest = _write_part_npz(npz, images, labels, np.arange(start, stop, dtype=np.int64))
    rec = {"format": PART_FORMAT, "start": start, "stop": stop, "count": n, "file": os.path.basename(npz),
           "bytes": size, "sha256": digest, "settings_sha256": settings_sha256(settings), "settings": settings,
           **(meta or {})}
    _write_json(rec, rec_path)
    return rec


def _remove_stale_tmp(out_dir: str, start: int, stop: int) -> None:
    for path in glob.glob(os.path.join(out_dir, PARTS_DIR, part_stem(start, stop) + ".*.tmp-*")):
        try:
            os.remove(path)
        except OSError:
            pass


def generate(
    model,
    cfg: SimFlowConfig,
    out_dir: str,
    slot: Slot,
    settings: Dict[str, Any],
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    source: Optional[Dict[str, Any]] = None,
    progress: bool = True,
    log: Callable[[str], None] = lambda m: print(m, file=sys.stderr),
) -> Dict[str, Any]:
    """Generate this slot's unfinished ranges of the set into ``out_dir/parts``.

    Every assigned range is checked first (:func:`check_part` with its SHA-256): finished ones are skipped, partial
    or corrupt ones regenerated, and a part made with other settings stops the run before any sampling.

    Args:
        model: a :class:`~simflow.models.simflow.SimFlowModel` in eval mode on ``device`` (EMA flow loaded).
        cfg: config; ``sample.*`` gives N, range size, batch size, seed, CFG and temperature.
        out_dir: output folder (created).
        slot: this process's :class:`Slot`.
        settings: :func:`sampling_settings` (must match ``cfg``).
        source: description of the weights, copied into each part record (``WeightsSource.describe()``).
        progress: tqdm bar over this slot's images (img/s).
        log: where to report skipped/rewritten parts.

    Returns:
        summary dict: ``slot``, ``assigned``/``skipped``/``written`` range counts, ``rewritten`` (stems and reasons),
        ``images`` generated, ``seconds``, ``img_per_s`` (generated images per second of sampling, this process).

    Raises:
        SampleSetError: a part in ``out_dir`` was made with other settings (names it and the differing keys).
    """
    digest = settings_sha256(settings)
    if settings["num_samples"] != cfg.sample.num_samples or settings["range_size"] != cfg.sample.range_size:
        raise SampleSetError("settings do not match cfg.sample (num_samples / range_size)")
    ranges = assigned_ranges(cfg.sample.num_samples, cfg.sample.range_size, slot)
    todo, rewritten = [], []
    for r in ranges:
        status, why = check_part(out_dir, *r, settings_digest=digest)
        if status == "foreign":
            rec = _read_record(part_paths(out_dir, *r)[1]) or {}
            raise SampleSetError(
                f"{why} ({_settings_diff(rec.get('settings', {}), settings)}); use another --out folder, or delete "
                f"{os.path.join(out_dir, PARTS_DIR)} to start over"
            )
        if status != "ok":
            todo.append(r)
            if status in ("partial", "corrupt"):
                rewritten.append({"part": part_stem(*r), "reason": why})
                log(f"[{slot.describe()}] regenerating {part_stem(*r)}: {why}")
    skipped = len(ranges) - len(todo)
    total = sum(b - a for a, b in ranges)
    done_before = sum(b - a for a, b in ranges if (a, b) not in todo)
    bar = tqdm(total=total, initial=done_before, unit="img", desc=f"sample {slot.index}/{slot.count}",
               disable=not progress, file=sys.stderr, dynamic_ncols=True)
    host = socket.gethostname()
    generated, t_sampling = 0, 0.0
    with bar:
        for start, stop in todo:
            _remove_stale_tmp(out_dir, start, stop)
            t0 = time.perf_counter()
            images, labels, nonfinite = sample_range(model, cfg, start, stop, device, dtype, on_batch=bar.update)
            dt = time.perf_counter() - t0
            generated += stop - start
            t_sampling += dt
            if nonfinite:
                log(f"[{slot.describe()}] {part_stem(start, stop)}: {nonfinite} samples had non-finite pixels")
            write_part(out_dir, start, stop, images, labels, settings, {
                "batch_size": cfg.sample.batch_size,
                "device": str(device),
                "host": host,
                "slot": {"rank": slot.rank, "world_size": slot.world_size, "array_index": slot.array_index,
                         "array_count": slot.array_count},
                "nonfinite": nonfinite,
                "seconds": round(dt, 3),
                "img_per_s": round((stop - start) / dt, 3) if dt > 0 else None,
                "source": source or {},
                "code_version": _code_version(),
            })
            bar.set_postfix(img_per_s=f"{generated / max(t_sampling, 1e-9):.2f}")
    return {
        "slot": slot.describe(),
        "assigned": len(ranges),
        "skipped": skipped,
        "written": len(todo),
        "rewritten": rewritten,
        "images": generated,
        "seconds": round(t_sampling, 3),
        "img_per_s": round(generated / t_sampling, 3) if t_sampling > 0 else None,
    }


@functools.lru_cache(maxsize=1)
def _code_version() -> str:
    return code_version()


# ------------------------------------------------------------------------------------------------------------------
# packing
# ------------------------------------------------------------------------------------------------------------------
def _settings_of_folder(out_dir: str) -> Dict[str, Any]:
    recs = part_records(out_dir)
    if not recs:
        raise SampleSetError(f"{os.path.join(out_dir, PARTS_DIR)}: no finished parts to pack")
    digests = {r.get("settings_sha256") for r in recs}
    if len(digests) > 1:
        raise SampleSetError(f"{out_dir}: parts were made with {len(digests)} different settings; they cannot be "
                             f"packed into one set")
    return recs[0]["settings"]


def _read_verified_part(out_dir: str, start: int, stop: int, rec: Dict[str, Any], hw: Optional[Tuple[int, int]]
                        ) -> Tuple[np.ndarray, np.ndarray]:
    npz, _ = part_paths(out_dir, start, stop)
    with open(npz, "rb") as f:
        data = f.read()
    if _sha256_bytes(data) != rec["sha256"]:
        raise SampleSetError(f"{npz}: SHA-256 differs from its record (corrupt); re-run sampling to rewrite it")
    with np.load(io.BytesIO(data)) as z:
        images, labels, indices = z["arr_0"], z["labels"], z["indices"]
    n = stop - start
    if images.dtype != np.uint8 or images.shape[0] != n or images.ndim != 4 or images.shape[-1] != 3:
        raise SampleSetError(f"{npz}: arr_0 is {images.dtype} {images.shape}, expected uint8 ({n}, H, W, 3)")
    if hw is not None and tuple(images.shape[1:3]) != hw:
        raise SampleSetError(f"{npz}: images are {images.shape[1:3]}, expected {hw}")
    if not np.array_equal(indices, np.arange(start, stop)):
        raise SampleSetError(f"{npz}: holds indices {indices[:3]}..., expected {start}..{stop - 1}")
    return images, labels


def pack(out_dir: str, settings: Optional[Dict[str, Any]] = None, progress: bool = True) -> Dict[str, Any]:
    """Pack all parts into ``samples.npz`` (``arr_0`` uint8 (N, H, W, 3), ``labels`` int64 (N,)) and write the
    ``samples.json`` sidecar.

    Args:
        out_dir: the sample-set folder.
        settings: the expected :func:`sampling_settings`; default: those of the parts found (all must agree).
        progress: tqdm bar.

    Returns:
        the sidecar dict (also written to ``samples.json``).

    Raises:
        SampleSetError: ranges are missing, partial, corrupt or made with other settings (names them), or a part's
            content does not match its record.
    """
    settings = settings or _settings_of_folder(out_dir)
    digest = settings_sha256(settings)
    n, res = settings["num_samples"], settings["resolution"]
    ranges = index_ranges(n, settings["range_size"])
    problems: List[Tuple[Tuple[int, int], str]] = []
    records: Dict[Tuple[int, int], Dict[str, Any]] = {}
    for r in ranges:
        status, why = check_part(out_dir, *r, settings_digest=digest, verify_hash=False)
        if status != "ok":
            problems.append((r, status))
        else:
            records[r] = _read_record(part_paths(out_dir, *r)[1])
    if problems:
        kinds: Dict[str, List[Tuple[int, int]]] = {}
        for r, status in problems:
            kinds.setdefault(status, []).append(r)
        detail = "; ".join(f"{k} ({len(v)}): {_range_list(v)}" for k, v in sorted(kinds.items()))
        raise SampleSetError(
            f"{out_dir}: cannot pack, {len(problems)} of {len(ranges)} ranges are not finished: {detail}. Re-run "
            f"python -m simflow.sample with the same settings (finished ranges are skipped)"
        )
    out_npz = os.path.join(out_dir, SAMPLES_NPZ)
    labels_all: List[np.ndarray] = []
    bar = tqdm(total=n, unit="img", desc="pack", disable=not progress, file=sys.stderr)

    def chunks() -> Iterable[np.ndarray]:
        for r in ranges:
            images, labels = _read_verified_part(out_dir, *r, records[r], (res, res))
            labels_all.append(labels.astype(np.int64))
            bar.update(len(images))
            yield images

    with bar, storage.open_atomic(out_npz) as out, NpzStreamWriter(out.f, out_npz) as w:
        w.add_stream("arr_0", (n, res, res, 3), np.uint8, chunks())
        w.add("labels", np.concatenate(labels_all))
    npz_sha256, size = storage.sha256_file(out_npz), os.path.getsize(out_npz)
    recs = list(records.values())
    labels = np.concatenate(labels_all)
    source = recs[0].get("source") or {}
    sidecar = {
        "format": SET_FORMAT,
        "samples": SAMPLES_NPZ,
        "sha256": npz_sha256,
        "bytes": size,
        "arr_0": {"shape": [n, res, res, 3], "dtype": "uint8"},
        "labels": {"shape": [n], "dtype": "int64", "sha256": _sha256_bytes(labels.tobytes()),
                   "num_distinct": int(len(np.unique(labels)))},
        "quantisation": settings["quantisation"],
        "num_samples": n,
        "resolution": res,
        "weights": {"path": source.get("path"), "kind": source.get("kind"), "sha256": settings["weights_sha256"],
                    "step": source.get("step"), "run_id": source.get("run_id")},
        "ema": settings["ema"],
        "cfg_mode": settings["cfg_mode"],
        "cfg_scale": settings["cfg_scale"],
        "cfg_anneal": settings["cfg_anneal"],
        "temperature": settings["temperature"],
        "seed": settings["seed"],
        "num_classes": settings["num_classes"],
        "precision": settings["precision"],
        "range_size": settings["range_size"],
        "num_parts": len(ranges),
        "batch_sizes": sorted({r.get("batch_size") for r in recs if r.get("batch_size") is not None}),
        "devices": sorted({str(r.get("device")) for r in recs}),
        "nonfinite_samples": int(sum(r.get("nonfinite", 0) for r in recs)),
        "code_version": sorted({str(r.get("code_version")) for r in recs}),
        "pack_code_version": _code_version(),
        "model": settings["model"],
        "settings_sha256": digest,
        "packed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    _write_json(sidecar, os.path.join(out_dir, SAMPLES_JSON))
    return sidecar


def packed_up_to_date(out_dir: str, settings: Dict[str, Any]) -> bool:
    """True when ``samples.npz`` exists with the size its sidecar records and the sidecar has these settings."""
    side = _read_record(os.path.join(out_dir, SAMPLES_JSON))
    npz = os.path.join(out_dir, SAMPLES_NPZ)
    return (side is not None and side.get("settings_sha256") == settings_sha256(settings) and os.path.exists(npz)
            and os.path.getsize(npz) == side.get("bytes"))


__all__ = [
    "PART_FORMAT",
    "SET_FORMAT",
    "QUANTISATION",
    "SampleSetError",
    "Slot",
    "slot_from_env",
    "index_ranges",
    "assigned_ranges",
    "part_stem",
    "part_paths",
    "NpzStreamWriter",
    "sampling_settings",
    "settings_sha256",
    "check_part",
    "part_records",
    "missing_ranges",
    "sample_range",
    "write_part",
    "generate",
    "pack",
    "packed_up_to_date",
]
