"""The SimFlow training loop (method §5.4), readable top to bottom.

One optimizer step = ``grad_accumulation`` micro-batches on each of ``dp_size`` data-parallel ranks:

    for each micro-batch (images x, labels y, global sample indices i):
        eps      = N(0, I) drawn from (seed, i)           # posterior noise, method §3.2
        y_in     = y or null with p = label_drop from (seed, i)   # CFG label dropout, method §2
        out      = generator(x, y_in, eps)                # VAE encode -> z = mu + s eps -> decode; flow NLL of z
        L_G      = L1 + LPIPS + GAN + lambda NLL (+KL) (+REPA)    # method §5.2, D frozen
        generator.backward(L_G); discriminator.backward(hinge(D(x), D(x_hat.detach())))
    generator.step(); discriminator.step(); EMA update of the flow   # method §5.4 steps 5-7

The trainer talks to weights only through the :class:`~simflow.parallel.engine.Engine` interface and to data only
through the loader's (consumed-samples) state, so the same loop runs in one process or under torchrun/srun.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from simflow.checkpoint.lock import RunLock, RunLockError, ensure_run_id
from simflow.checkpoint.store import (CheckpointError, Group, find_latest_with_report, load_checkpoint,
                                      load_rank_state, save_parallel)
from simflow.config import SimFlowConfig, from_dict, to_dict
from simflow.losses.joint import discriminator_loss, generator_loss, nll_lower_bound
from simflow.models.discriminator import NLayerDiscriminator
from simflow.models.simflow import SimFlowModel
from simflow.parallel.engine import Engine
from simflow.sampling import sample_images, save_grid
from simflow.train.metrics import MetricsLogger, plot_loss_curve
from simflow.train.signals import REQUEUE_EXIT_CODE, RequeueExit, StepBoundary, Watchdog
from simflow.train.noise import STREAM_LATENT_NOISE, STREAM_POSTERIOR, drop_labels, per_sample_normal

log = logging.getLogger("simflow")


@dataclass
class Topology:
    """Where this process sits. The single-process default; the launcher passes the distributed one
    (``simflow.parallel.topology``) with the same fields."""

    rank: int = 0
    world_size: int = 1
    dp_rank: int = 0
    dp_size: int = 1
    tp_rank: int = 0
    tp_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(cfg: SimFlowConfig) -> torch.device:
    if cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)
    return torch.device("cpu")


def autocast_dtype(cfg: SimFlowConfig, device: torch.device) -> torch.dtype:
    """bf16 autocast on CUDA, fp32 on CPU (``train.precision=auto``; method §8)."""
    if cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return torch.float32


def code_version() -> str:
    """The git commit of the package source, or 'unknown'."""
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def rng_state() -> Dict[str, Any]:
    """Per-rank RNG states (torch CPU/CUDA, numpy, python) as weights_only-loadable containers."""
    state = {"torch": torch.get_rng_state(), "numpy": _np_state(), "python": _py_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _np_state() -> Dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss,
            "cached": cached}


def _py_state() -> List[Any]:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class Trainer:
    """Builds everything from a config and runs the loop. See the module docstring for one step."""

    def __init__(self, cfg: SimFlowConfig, topology: Optional[Topology] = None, build_engine=None):
        self.cfg = cfg
        self.topo = topology or Topology(device=resolve_device(cfg))
        self.device = self.topo.device
        self.dtype = autocast_dtype(cfg, self.device)
        self.out_dir = cfg.train.out_dir
        self.ckpt_dir = cfg.checkpoint.dir or os.path.join(self.out_dir, "checkpoints")
        self.run_id = cfg.train.run_id or os.path.basename(os.path.normpath(self.out_dir))
        # Teachers first: a missing weights file must stop the run before anything expensive happens.
        from simflow.losses.perceptual import build_perceptual

        self.perceptual = build_perceptual(cfg.loss.perceptual)
        if self.perceptual is not None:
            self.perceptual.to(self.device)
        self.teacher = None
        if cfg.loss.repa.enabled:
            from simflow.losses.teacher import build_teacher

            self.teacher = build_teacher(cfg.loss.repa).to(self.device)

        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank and for any TP size
        if build_engine is None:
            from simflow.parallel.factory import build_engine  # local or DeepSpeed by parallel.engine
        self.gen: Engine = build_engine(cfg, lambda factory=None: build_generator(cfg, factory), "generator",
                                        ["flow", "vae"] if cfg.train.ema_vae else ["flow"], self.topo)
        self.disc: Optional[Engine] = None
        if cfg.loss.gan.weight > 0:
            g = cfg.loss.gan
            self.disc = build_engine(cfg, lambda factory=None: NLayerDiscriminator(3, g.ndf, g.n_layers, g.norm),
                                     "discriminator", [], self.topo)
        from simflow.data import build_loader

        self.loader = build_loader(cfg, self.topo.dp_rank, self.topo.dp_size)
        self.step = 0
        self.metrics = MetricsLogger(self.out_dir, cfg.logging.wandb, cfg.logging.project, self.run_id,
                                     to_dict(cfg), enabled=self.topo.is_main)
        self.history: List[Dict[str, float]] = []
        self._saved_step = -1  # step of the last checkpoint this process saved or resumed from
        self.resume_report: Dict[str, Any] = {"loaded": None, "skipped": []}
        self._bound = nll_lower_bound(cfg.model.vae.posterior_std) if cfg.model.vae.posterior == "fixed" else None
        self._warned_bound = False

    # ------------------------------------------------------------------------------------------------------
    @property
    def model(self) -> SimFlowModel:
        return self.gen.module

    def state_parts(self) -> Dict[str, Any]:
        """The shared, topology-free training state, identical on every rank (collective for sharded engines):
        engine states (full weights, AdamW moments and step -> LR schedule, EMA), the loader position
        (``consumed_samples``) and trainer counters. Per-rank RNG states are saved beside it (:func:`rng_state`)."""
        parts = {
            "generator": self.gen.state_dict(),
            "loader": self.loader.state_dict(),
            "trainer": {"step": self.step},
        }
        if self.disc is not None:
            parts["discriminator"] = self.disc.state_dict()
        return parts

    def save(self) -> str:
        """Collective: every rank writes its share of step ``self.step`` and its RNG state in parallel; rank 0
        commits the manifest and marker after all finished (:func:`simflow.checkpoint.store.save_parallel`)."""
        rng = rng_state()
        meta = {"run_id": self.run_id, "config": to_dict(self.cfg), "code_version": code_version(),
                "topology": {"world_size": self.topo.world_size, "tp_size": self.topo.tp_size,
                             "dp_size": self.topo.dp_size},
                "precision": str(self.dtype).replace("torch.", ""),
                "loss_scale": "none (fp32 master weights, fp32 or bf16 compute: no dynamic loss scaling)"}
        t0 = time.perf_counter()
        d = save_parallel(self.ckpt_dir, self.step, self.state_parts(), meta, rank_state=rng,
                          keep=self.cfg.checkpoint.keep)
        self._saved_step = self.step
        if self.topo.is_main:
            log.info("saved checkpoint %s (%.2f s)", d, time.perf_counter() - t0)
        return d

    def maybe_resume(self) -> bool:
        """Load the newest valid checkpoint of this run, if any (collective; any TP/DP: the engines reshard).

        Rank 0 finds it (newer partial or corrupt steps are skipped, and each is reported with the reason) and tells
        the other ranks; every rank then reads the shared state (each file checked against the manifest's sha256)
        and its own RNG state. ``self.resume_report`` holds ``{"loaded": location or None, "skipped": [(location,
        reason), ...]}``.

        Raises:
            CheckpointError: the checkpoint belongs to another run id, or its config has another architecture.
        """
        self.resume_report: Dict[str, Any] = {"loaded": None, "skipped": []}
        if not self.cfg.checkpoint.resume:
            return False
        group = Group()
        found, skipped = find_latest_with_report(self.ckpt_dir) if group.rank == 0 else (None, [])
        found, skipped = group.broadcast((found, skipped))
        self.resume_report = {"loaded": found, "skipped": skipped}
        if self.topo.is_main:
            for d, why in skipped:
                log.warning("skipping checkpoint %s: %s", d, why)
        if found is None:
            return False
        parts, manifest = load_checkpoint(found, verify_all=False)
        check_compatible(manifest, self.run_id, self.cfg, found)
        self.gen.load_state_dict(parts["generator"])
        if self.disc is not None:
            self.disc.load_state_dict(parts["discriminator"])
        self.loader.load_state_dict(parts["loader"])
        self.step = self._saved_step = int(parts["trainer"]["step"])
        rng, exact = load_rank_state(found, manifest, self.topo.rank, self.topo.world_size)
        if rng is not None:
            set_rng_state(rng)
        if self.topo.is_main:
            log.info("resumed from %s at step %d (saved at world size %s, now %d%s)", found, self.step,
                     manifest.get("world_size"), self.topo.world_size, "" if exact else "; RNG states remapped")
        return True

    @contextlib.contextmanager
    def _run_guard(self, boundary: StepBoundary) -> Iterator[Watchdog]:
        """For the duration of :meth:`fit`: the run-id check and run lock (rank 0; every rank raises the same error
        if either fails), the stop-signal handlers and the watchdog. All undone on any exit."""
        group = Group()
        lock, err = None, None
        if group.rank == 0:
            try:
                ensure_run_id(self.ckpt_dir, self.run_id)
                if self.cfg.checkpoint.lock:
                    c = self.cfg.checkpoint
                    lock = RunLock(self.ckpt_dir, self.run_id, c.lock_heartbeat_s, c.lock_stale_s,
                                   c.lock_wait_s).acquire()
            except CheckpointError as e:
                err = (isinstance(e, RunLockError), str(e))
        err = group.broadcast(err)
        if err is not None:
            raise (RunLockError if err[0] else CheckpointError)(err[1])
        if (group.rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
                and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0) > 0):
            log.warning("torchrun shares its rendezvous TCPStore with the workers: after a worker restart it still "
                        "holds the failed round's keys and the restarted workers can hang in init_process_group "
                        "(pytorch/pytorch#135712); export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 before torchrun")
        installed = boundary.flag.install()
        watchdog = Watchdog(self.cfg.checkpoint.watchdog_s).start()
        try:
            yield watchdog
        finally:
            watchdog.stop()
            if installed:
                boundary.flag.uninstall()
            if lock is not None:
                lock.release()
            self.metrics.close()

    # ------------------------------------------------------------------------------------------------------
    def _autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def micro_step(self, batch: Dict[str, torch.Tensor]) -> Dict[str, float]:
        """Forward + backward of one micro-batch for the generator and the discriminator."""
        cfg = self.cfg
        x = batch["image"].to(self.device, non_blocking=True)
        y = batch["label"].to(self.device)
        idx = batch["index"]
        eps = per_sample_normal(self.model.latent_shape, cfg.train.seed, idx, STREAM_POSTERIOR).to(self.device)
        y_in = drop_labels(y, self.model.null_class, cfg.train.label_drop, cfg.train.seed, idx)
        latent_noise = None
        if cfg.model.flow.noise_std > 0:  # STARFlow-style extra latent noise, its own per-sample stream
            latent_noise = per_sample_normal(self.model.latent_shape, cfg.train.seed, idx,
                                             STREAM_LATENT_NOISE).to(self.device)
        teacher_features = None
        if self.teacher is not None:
            with torch.no_grad():
                teacher_features = self.teacher(x)  # (B, N, C); repa_loss resamples to the flow grid
        gan_on = self.disc is not None and self.step >= cfg.loss.gan.start_step
        with self._autocast():
            out = self.gen.module(x, y_in, eps, latent_noise)
            frozen = self.disc.frozen() if gan_on else contextlib.nullcontext()
            with frozen:
                loss, m = generator_loss(cfg, self.model, out, x, self.step, self.perceptual,
                                         self.disc.module if gan_on else None, teacher_features)
        self.gen.backward(loss)
        if gan_on:
            with self._autocast():
                d_loss, dm = discriminator_loss(self.disc.module, x, out["x_hat"])
            self.disc.backward(d_loss)
            m.update(dm)
        return m

    def train_step(self, data_iter) -> Dict[str, float]:
        """One optimizer step (``grad_accumulation`` micro-batches); returns DP-averaged metrics."""
        t0 = time.perf_counter()
        acc: Dict[str, float] = {}
        n = self.cfg.train.grad_accumulation
        for _ in range(n):
            for k, v in self.micro_step(next(data_iter)).items():
                acc[k] = acc.get(k, 0.0) + v / n
        stats = self.gen.step()
        if self.disc is not None and self.step >= self.cfg.loss.gan.start_step:
            self.disc.step()
        self.gen.ema_update()
        acc = self._reduce(acc)
        dt = time.perf_counter() - t0
        acc.update(grad_norm=stats["grad_norm"], lr=stats["lr"],
                   img_per_s=self.cfg.train.micro_batch_size * n * self.topo.dp_size / dt,
                   skipped_samples=float(getattr(self.loader, "skipped_samples", 0)))
        self.step += 1
        return acc

    def _reduce(self, m: Dict[str, float]) -> Dict[str, float]:
        if not (dist.is_available() and dist.is_initialized()) or self.topo.world_size == 1:
            return m
        keys = sorted(m)
        dev = self.device if dist.get_backend() == "nccl" else torch.device("cpu")  # NCCL reduces device tensors only
        t = torch.tensor([m[k] for k in keys], dtype=torch.float64, device=dev)
        dist.all_reduce(t)  # TP ranks hold identical values, so the world mean equals the DP mean
        return {k: v / self.topo.world_size for k, v in zip(keys, t.tolist())}

    @torch.no_grad()
    def sample_grid(self, path: str) -> str:
        """Write a grid of EMA-flow samples: ``train.sample_grid`` images, classes cycling, fixed noise."""
        n = self.cfg.train.sample_grid
        num_classes = self.cfg.model.flow.num_classes
        idx = torch.arange(n)
        labels = idx % num_classes
        with self.gen.full_params(ema=True) as model:  # collective for sharded engines: every rank samples
            was_training = model.training
            model.eval()
            x = sample_images(model, idx, labels, self.cfg.sample, self.device, self.dtype)
            model.train(was_training)
        if not self.topo.is_main:
            return path
        return save_grid(x, path, nrow=num_classes if num_classes <= n else None)  # one column per class

    def export(self, path: str) -> str:
        """Full fp32 weights (EMA flow + VAE) as safetensors, for single-process sampling."""
        from safetensors.torch import save_file

        sd = self.gen.full_state_dict(ema=True)  # collective for sharded engines; rank 0 writes
        if not self.topo.is_main:
            return path
        save_file({k: v.contiguous() for k, v in sd.items()}, path, metadata={"run_id": self.run_id,
                                                                             "step": str(self.step)})
        return path

    # ------------------------------------------------------------------------------------------------------
    def fit(self) -> Dict[str, Any]:
        """Run to ``train.steps`` (README "Checkpoints and fault tolerance"): take the run lock, resume from the
        newest valid checkpoint, train; save every ``checkpoint.every_steps`` steps, every ``every_minutes`` minutes
        and at the end; on SIGTERM/SIGUSR1 (flags voted at the step boundary) every rank saves the same step and
        exits with ``REQUEUE_EXIT_CODE`` (:class:`~simflow.train.signals.RequeueExit`). Writes sample grids, the
        loss curve and exported weights."""
        cfg = self.cfg
        vote_device = self.device if getattr(self.topo, "backend", None) == "nccl" else torch.device("cpu")
        boundary = StepBoundary(cfg.checkpoint.every_minutes, cfg.checkpoint.signals, vote_device)
        with self._run_guard(boundary) as watchdog:
            watchdog.beat("resume")
            self.maybe_resume()
            os.makedirs(self.out_dir, exist_ok=True)
            self.gen.module.train()
            data_iter = iter(self.loader)
            bar = tqdm(total=cfg.train.steps, initial=self.step, desc="train", disable=not self.topo.is_main,
                       dynamic_ncols=True)
            m: Dict[str, float] = {}
            while self.step < cfg.train.steps:
                watchdog.beat("train step")
                m = self.train_step(data_iter)
                self.history.append({"step": self.step, **m})
                if self._bound is not None and m["nll"] < self._bound and not self._warned_bound:
                    log.warning("flow NLL %.4f nats/dim is below the bound %.4f for posterior_std=%g: causal leakage "
                                "or a log-det bug (method §4.4)", m["nll"], self._bound, cfg.model.vae.posterior_std)
                    self._warned_bound = True
                if self.step % cfg.train.log_every == 0 or self.step == cfg.train.steps:
                    self.metrics.log(self.step, m)
                bar.set_postfix(loss=f"{m['loss']:.3f}", bpd=f"{m['bits_per_dim']:.3f}", rec=f"{m['rec']:.3f}")
                bar.update(1)
                if cfg.train.sample_every and self.step % cfg.train.sample_every == 0:
                    watchdog.beat("sample grid")
                    self.sample_grid(os.path.join(self.out_dir, f"samples_step{self.step:07d}.png"))
                    if self.topo.is_main:
                        plot_loss_curve(self.metrics.path, os.path.join(self.out_dir, "loss_curve.png"))
                watchdog.beat("step boundary vote")
                stop, time_due = boundary.vote()  # one all-reduce(MAX): any rank's signal or timer counts
                if stop or time_due or (cfg.checkpoint.every_steps and self.step % cfg.checkpoint.every_steps == 0):
                    watchdog.beat("checkpoint save")
                    self.save()
                    boundary.saved()
                if stop:
                    bar.close()
                    got = boundary.flag.received
                    if got or self.topo.is_main:
                        log.warning("stop requested by %s: saved step %d on every rank; exiting with the requeue "
                                    "status %d", f"{got} on rank {self.topo.rank}" if got else "a signal to another "
                                    "rank", self.step, REQUEUE_EXIT_CODE)
                    raise RequeueExit(self.step)
            bar.close()
            out = {"step": self.step, "metrics": m}
            if self._saved_step != self.step:
                watchdog.beat("final checkpoint save")
                self.save()
            watchdog.beat("final samples and export")
            samples = self.sample_grid(os.path.join(self.out_dir, "samples.png"))  # collective: every rank
            weights = self.export(os.path.join(self.out_dir, "weights.safetensors"))
            if self.topo.is_main:
                out.update(samples=samples, weights=weights,
                           loss_curve=plot_loss_curve(self.metrics.path, os.path.join(self.out_dir, "loss_curve.png")))
            if self.topo.is_main and cfg.eval.self_score_samples > 0:  # rank 0 alone: no collective follows
                watchdog.beat("self-score")
                from simflow.eval.self_score import score_run

                out["eval"] = score_run(weights, cfg, self.out_dir, step=self.step, device=self.device)
                print(out["eval"]["line"], flush=True)
        return out


def check_compatible(manifest: Dict[str, Any], run_id: str, cfg: SimFlowConfig, where: str) -> None:
    """Refuse a checkpoint of another run, or one whose ``model`` config differs (architecture change).

    Raises:
        CheckpointError: naming the checkpoint, both run ids, or the differing ``model.*`` keys with both values.
    """
    if manifest.get("run_id") != run_id:
        raise CheckpointError(f"{where} belongs to run {manifest.get('run_id')!r}, but this job is run {run_id!r} "
                              f"(train.run_id); refusing to load another run's checkpoint")
    stored = to_dict(from_dict(manifest["config"]))["model"]
    now = to_dict(cfg)["model"]
    diffs: List[str] = []

    def walk(a: Any, b: Any, key: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                walk(a.get(k), b.get(k), f"{key}.{k}")
        elif a != b:
            diffs.append(f"{key}: checkpoint {a!r}, config {b!r}")

    walk(stored, now, "model")
    if diffs:
        raise CheckpointError(f"{where}: the config changes the architecture ({'; '.join(diffs)}); a run cannot "
                              f"resume into another model (start a new run directory instead)")


def load_vae_weights(vae: torch.nn.Module, path: str) -> Dict[str, Any]:
    """Load the ``vae.*`` entries of an exported weights file or a checkpoint into ``vae`` (strict).

    Args:
        vae: the :class:`~simflow.models.vae.VAE` to fill.
        path: ``weights.safetensors`` (``Trainer.export``) or a checkpoint step/root directory.

    Returns:
        the source description (path, SHA-256, step) of :func:`simflow.eval.weights.load_state`.

    Raises:
        ValueError: missing file, no ``vae.*`` entries, or entries that do not fit the config's VAE (names the
            file, the key ``train.init_vae_from`` and the mismatching tensors).
    """
    from simflow.eval.weights import WeightsError, load_state

    try:
        state, src = load_state(path, use_ema=True)
    except WeightsError as e:
        raise ValueError(f"train.init_vae_from={path!r}: {e}") from None
    vae_state = {k[len("vae."):]: v for k, v in state.items() if k.startswith("vae.")}
    if not vae_state:
        raise ValueError(f"train.init_vae_from={path!r}: no 'vae.*' entries in the weights")
    own = vae.state_dict()
    bad = sorted(set(own) ^ set(vae_state)) + [
        f"{k}: {tuple(vae_state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own if k in vae_state and vae_state[k].shape != own[k].shape]
    if bad:
        raise ValueError(f"train.init_vae_from={path!r}: the VAE weights do not fit model.vae ({len(bad)} "
                         f"problems, e.g. {bad[:3]})")
    vae.load_state_dict({k: v.to(own[k].dtype) for k, v in vae_state.items()}, strict=True)
    return src.describe()


def build_generator(cfg: SimFlowConfig, linear_factory=None) -> SimFlowModel:
    """``SimFlowModel(cfg)``, with the VAE loaded from ``train.init_vae_from`` and frozen (``requires_grad``
    off, so no optimizer state and no updates) when ``train.freeze_vae`` (method §10.3 "Frozen VAE" variants)."""
    model = SimFlowModel(cfg, linear_factory)
    if cfg.train.init_vae_from:
        if cfg.parallel.engine != "local":
            raise ValueError("train.init_vae_from is supported with parallel.engine=local only")
        load_vae_weights(model.vae, cfg.train.init_vae_from)
    if cfg.train.freeze_vae:
        model.vae.requires_grad_(False)
    return model


def run(cfg: SimFlowConfig, topology: Optional[Topology] = None, build_engine=None) -> Dict[str, Any]:
    """Train with ``cfg`` (the launcher's entry point). Returns ``{"step", "metrics", paths...}``."""
    return Trainer(cfg, topology, build_engine).fit()
