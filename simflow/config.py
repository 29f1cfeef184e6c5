"""One validated configuration schema for every SimFlow entry point.

The schema is a tree of dataclasses turned into an OmegaConf *structured* config, so that

* YAML files (``configs/*.yaml``) and ``key=value`` command-line overrides are merged onto the schema;
* an unknown key or a value of the wrong type fails at merge time, naming the key;
* cross-field rules (``layers_per_block`` length, batch-size arithmetic, ...) are checked by :func:`validate`
  before any model is built or any process group is started.

Sections: ``model.vae``, ``model.flow``, ``loss``, ``data``, ``optim``, ``train``, ``parallel``, ``checkpoint``,
``sample``, ``eval``, ``logging``.

Typical use::

    cfg = load_config("configs/tiny.yaml", ["train.steps=50", "model.flow.width=64"])

Errors: :class:`ConfigError` (a subclass of ``ValueError``) whose message names the file and the key at fault.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A configuration value or key is invalid. The message names the file and/or key."""


# --------------------------------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------------------------------
@dataclass
class VAEConfig:
    """LDM/REPA-E convolutional KL-autoencoder (method §3.1).

    ``posterior="fixed"`` is SimFlow: the encoder predicts the mean only, the posterior std is the constant
    ``posterior_std`` (method §3.2, default 0.5). ``posterior="learned"`` adds a log-variance head and a KL term
    (the paper's learnable-variance ablation, method §10.3).
    """

    in_channels: int = 3
    base_channels: int = 128
    ch_mult: List[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    num_res_blocks: int = 2
    attn_resolutions: List[int] = field(default_factory=lambda: [16])
    latent_channels: int = 64
    dropout: float = 0.0
    posterior: str = "fixed"  # fixed | learned
    posterior_std: float = 0.5
    norm_groups: int = 32


@dataclass
class FlowConfig:
    """TarFlow/STARFlow-style autoregressive transformer flow over latent tokens (method §4).

    ``layers_per_block`` lists the shallow blocks first and the deep block last (STARFlow deep-shallow design,
    method §11.2); in the data->noise direction the deep block runs last (method §4.4).
    """

    patch_size: int = 1
    width: int = 1152
    num_blocks: int = 6
    layers_per_block: List[int] = field(default_factory=lambda: [2, 2, 2, 2, 2, 46])
    head_dim: int = 64
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    scale_param: str = "softplus"  # softplus (STARFlow) | exp (TarFlow)
    soft_clip: float = 4.0  # a <- c*tanh(a/c), b likewise, on raw head outputs; 0 disables (method §4.3 step 6)
    latent_norm_reg: float = 0.0  # STARFlow 1e-4 * sum_k mean(z_k^2) (method §4.4), 0 = off
    # STARFlow-style extra Gaussian latent noise (method §5.5, §10.3 "Noise" rows): z <- z + noise_std * eps' after
    # the posterior sample, before the flow; the decoder reconstructs from the same noisy z (as STARFlow's
    # noise-fine-tuned decoder does), so flow samples decode directly. 0 = off (SimFlow). Issue 8 ablation (c).
    noise_std: float = 0.0


@dataclass
class ModelConfig:
    resolution: int = 256
    vae: VAEConfig = field(default_factory=VAEConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)


# --------------------------------------------------------------------------------------------------------------
# losses
# --------------------------------------------------------------------------------------------------------------
@dataclass
class PerceptualConfig:
    """LPIPS (VGG16 backbone, taming/LPIPS linear heads) — method §5.2.

    ``weights`` is a path to a torchvision ``vgg16`` state dict (``.pth``/``.safetensors``). It must exist unless
    ``random_init`` is true, which builds a randomly initialised backbone (tests and offline demos only).
    """

    weight: float = 1.0
    weights: Optional[str] = None
    random_init: bool = False


@dataclass
class GANConfig:
    """PatchGAN discriminator with hinge loss (method §5.3). The generator term is off before ``start_step``."""

    weight: float = 0.1
    start_step: int = 0
    ndf: int = 64
    n_layers: int = 3
    norm: str = "batch"  # batch | group | none


@dataclass
class REPAConfig:
    """Optional REPA-E alignment of a flow hidden state to frozen DINOv2 patch features (method §6)."""

    enabled: bool = False
    weight: float = 0.5
    layer: int = 8  # global transformer layer index counted from the data side (1-based), method §12 #9
    projector_dim: int = 2048
    teacher_dim: int = 768  # DINOv2 ViT-B/14 patch-feature width
    teacher_arch: str = "vit_base_patch14_dinov2"
    teacher_weights: Optional[str] = None
    teacher_resolution: int = 224
    teacher_kwargs: Dict[str, Any] = field(default_factory=dict)
    random_init: bool = False


@dataclass
class LossConfig:
    """Joint generator objective L_G (method §5.2)."""

    rec_weight: float = 1.0  # L1, mean over pixels of [-1, 1] images
    nll_weight: float = 1.0  # lambda_NF on the per-dim flow NLL (nats/dim)
    kl_weight: float = 1e-6  # learned-posterior mode only
    perceptual: PerceptualConfig = field(default_factory=PerceptualConfig)
    gan: GANConfig = field(default_factory=GANConfig)
    repa: REPAConfig = field(default_factory=REPAConfig)


# --------------------------------------------------------------------------------------------------------------
# data / optim / train / parallel / checkpoint / sample / eval / logging
# --------------------------------------------------------------------------------------------------------------
@dataclass
class DataConfig:
    """Where images come from. ``source``: ``npz`` (an in-memory NPZ, e.g. the demo set), ``shards`` (WebDataset
    tars; local, ``s3://`` or ``pipe:``) or ``ffcv``."""

    source: str = "npz"
    # npz: the .npz file; shards: a folder with index.json, s3://bucket/prefix, or pipe:CMD with {name};
    # ffcv: a .beton file (local or s3://, staged to cache_dir)
    path: str = "data/demo/demo.npz"
    num_workers: int = 0
    hflip: bool = True
    resample: bool = False  # sample with replacement instead of exact epochs
    s3_endpoint: Optional[str] = None  # default: AWS_ENDPOINT_URL / the AWS default
    retries: int = 3  # extra attempts per read before a sample is skipped (and counted)
    timeout_s: float = 60.0  # per S3 request / pipe: command
    cache_dir: Optional[str] = None  # stage whole shards / .beton files here first (pipe: and s3:// .beton need it)
    io_threads: int = 8  # concurrent range reads per micro-batch (local and staged shards)


@dataclass
class OptimConfig:
    """AdamW for the generator (VAE + flow) and the discriminator; method §8 / §12 #8."""

    lr: float = 1e-4
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 1e-4
    eps: float = 1e-8
    schedule: str = "constant"  # constant | cosine (both after linear warmup)
    warmup_steps: int = 5000
    min_lr: float = 1e-6
    grad_clip: float = 1.0
    disc_lr: float = 1e-4
    disc_betas: List[float] = field(default_factory=lambda: [0.9, 0.95])


@dataclass
class TrainConfig:
    steps: int = 800_000
    micro_batch_size: int = 16
    grad_accumulation: int = 1
    # 0 = micro_batch_size * grad_accumulation * dp_size (follows the world size). Set: fixed across elastic
    # restarts; grad_accumulation is then derived at every (re)start (derive_grad_accumulation).
    global_batch_size: int = 0
    label_drop: float = 0.1
    ema_decay: float = 0.9999
    ema_vae: bool = False
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16
    seed: int = 0
    # Frozen-VAE variants (method §10.3 "Frozen VAE" rows, issue 8 ablation (d)): load the VAE weights from an
    # exported weights file or checkpoint (``vae.*`` entries) before training, and/or train the flow only.
    init_vae_from: Optional[str] = None
    freeze_vae: bool = False
    # Speed (simflow.parallel.parallelize, applied to the built model; keys and numerics unchanged): torch.compile of
    # the flow's training forward and the VAE encoder/decoder; per-transformer-layer activation checkpointing
    # (torch.utils.checkpoint, non-reentrant: recompute in backward, bit-equal gradients).
    compile: bool = False
    activation_checkpointing: bool = False
    out_dir: str = "runs/default"
    run_id: Optional[str] = None
    log_every: int = 10
    # stop the run (exit status 3, not requeued) after this many consecutive non-finite (skipped) steps; checked at
    # log steps and before every checkpoint save, so detection lags at most log_every steps
    max_skipped_steps: int = 5
    sample_every: int = 5000
    sample_grid: int = 16
    device: str = "auto"  # auto | cpu | cuda


@dataclass
class ParallelConfig:
    engine: str = "local"  # local | deepspeed (ZeRO-3 + megatron-core TP) | fsdp2 (FSDP2 + DTensor TP)
    tp_size: int = 1
    zero_stage: int = 3
    backend: str = "auto"  # auto (nccl on CUDA, gloo on CPU) | nccl | gloo


@dataclass
class CheckpointConfig:
    """Checkpoints and fault tolerance (``simflow.checkpoint``, ``simflow.train.signals``; README "Checkpoints and
    fault tolerance").

    ``dir``: local/shared path or ``s3://bucket/prefix``. A save happens every ``every_steps`` steps, every
    ``every_minutes`` minutes of wall-clock (0 disables either), at the end, and when a stop signal arrives; the
    newest ``keep`` (>= 2) committed steps are kept. ``signals`` only set a flag; all ranks then save the same step
    and exit with status 75. ``watchdog_s``: a rank that finishes no step (or checkpoint) for this long exits with
    status 70 (0 disables). ``lock``: one live job per checkpoint directory (rank 0 holds ``run.lock``, heartbeat
    every ``lock_heartbeat_s``; stale after ``lock_stale_s``; a new job waits up to ``lock_wait_s`` for a live
    lock to go stale before failing).
    """

    dir: Optional[str] = None  # default: <train.out_dir>/checkpoints
    every_steps: int = 5000
    every_minutes: float = 0.0
    keep: int = 2
    resume: bool = True
    signals: List[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])
    watchdog_s: float = 1800.0
    lock: bool = True
    lock_heartbeat_s: float = 30.0
    lock_stale_s: float = 300.0
    lock_wait_s: float = 0.0
    async_save: bool = True  # write in a background thread; commit when every rank finished (simflow.checkpoint.manager)


@dataclass
class SampleConfig:
    """Sampling (method §4.5, §7). ``cfg_mode``: ``linear`` (TarFlow, all blocks), ``gaussian`` (STARFlow
    Gaussian product, all blocks), ``deep_only`` (STARFlow ``cond_top_only``: linear guidance in the deep block,
    shallow blocks unconditional), ``deep_only_cond`` (deep block guided, shallow blocks conditional); see
    :class:`simflow.models.flow.Guidance`."""

    cfg_scale: float = 2.0
    cfg_mode: str = "deep_only"
    cfg_anneal: bool = False
    temperature: float = 1.0
    batch_size: int = 64
    num_samples: int = 50_000
    seed: int = 0
    use_ema: bool = True
    # Offline sample sets (``python -m simflow.sample``): sample indices [0, num_samples) are cut into ranges of
    # ``range_size``, dealt round-robin to (array task, rank) and written as one NPZ part each under ``out_dir``.
    range_size: int = 1000
    out_dir: Optional[str] = None


@dataclass
class EvalConfig:
    """Sample-quality evaluation (``python -m simflow.fid``, ``tools/fid_ref.py``; ADM protocol, method §9).

    ``inception_weights``: local torch-fidelity InceptionV3 weights file (never downloaded). ``reference``: ADM-format
    reference batch ``.npz``. ``feature_extractor``: registered network (``inception``; others, e.g. issue 8's demo
    classifier, use ``extractor_weights``). ``is_split_size``: Inception Score split (ADM 5000 = 10 splits of 50k).
    ``pr_k``: k of the precision/recall k-NN manifold (ADM 3). ``fd_method``: ``sqrtm`` (ADM) or ``eigh``.
    """

    inception_weights: Optional[str] = None
    reference: Optional[str] = None
    feature_extractor: str = "inception"
    extractor_weights: Optional[str] = None
    batch_size: int = 100
    is_split_size: int = 5000
    pr_k: int = 3
    fd_method: str = "sqrtm"  # sqrtm | eigh
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # End-of-run self-scoring on the demo data (simflow/eval/self_score.py, issue 15): demo-FID (NOT Inception FID)
    # and class accuracy of this many EMA samples, without and with guidance; 0 = off. Feature network:
    # ``extractor_weights`` (default weights/demo_fid/fashion_cnn.safetensors); reference: the test split below.
    self_score_samples: int = 0
    self_score_test: str = "data/demo/demo_test.npz"


@dataclass
class LoggingConfig:
    wandb: str = "offline"  # offline | online | disabled
    project: str = "simflow"
    console: bool = True


@dataclass
class SimFlowConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


# --------------------------------------------------------------------------------------------------------------
# loading and validation
# --------------------------------------------------------------------------------------------------------------
_CHOICES = {
    "model.vae.posterior": ("fixed", "learned"),
    "model.flow.scale_param": ("softplus", "exp"),
    "loss.gan.norm": ("batch", "group", "none"),
    "data.source": ("npz", "shards", "ffcv"),
    "optim.schedule": ("constant", "cosine"),
    "train.precision": ("auto", "fp32", "bf16"),
    "train.device": ("auto", "cpu", "cuda"),
    "parallel.engine": ("local", "deepspeed", "fsdp2"),
    "parallel.backend": ("auto", "nccl", "gloo"),
    "sample.cfg_mode": ("linear", "gaussian", "deep_only", "deep_only_cond"),
    "logging.wandb": ("offline", "online", "disabled"),
}


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def validate(cfg: SimFlowConfig, dp_size: Optional[int] = None, source: str = "<config>") -> None:
    """Check cross-field rules that a type system cannot express.

    Args:
        cfg: a config object (dataclass instance, as returned by :func:`load_config`).
        dp_size: data-parallel size, when known (launcher); enables the global-batch arithmetic check
            ``global_batch_size == micro_batch_size * grad_accumulation * dp_size``.
        source: file name used in error messages.

    Raises:
        ConfigError: naming the key and the offending value.
    """

    def bad(key: str, msg: str) -> None:
        raise ConfigError(f"{source}: {key}={_get(cfg, key)!r}: {msg}")

    for key, choices in _CHOICES.items():
        if _get(cfg, key) not in choices:
            bad(key, f"must be one of {list(choices)}")
    f, v = cfg.model.flow, cfg.model.vae
    if f.num_blocks < 1:
        bad("model.flow.num_blocks", "must be >= 1")
    if len(f.layers_per_block) != f.num_blocks:
        bad("model.flow.layers_per_block", f"has {len(f.layers_per_block)} entries but model.flow.num_blocks={f.num_blocks}")
    if any(n < 1 for n in f.layers_per_block):
        bad("model.flow.layers_per_block", "every block needs >= 1 layer")
    if f.width % f.head_dim != 0:
        bad("model.flow.width", f"must be divisible by model.flow.head_dim={f.head_dim}")
    if cfg.parallel.tp_size < 1 or (f.width // f.head_dim) % cfg.parallel.tp_size != 0:
        bad("parallel.tp_size", f"attention heads ({f.width // f.head_dim}) must be divisible by the TP size")
    if v.posterior_std <= 0:
        bad("model.vae.posterior_std", "must be > 0")
    if f.noise_std < 0:
        bad("model.flow.noise_std", "must be >= 0")
    if cfg.train.compile and cfg.parallel.engine == "deepspeed":
        bad("train.compile", "is supported with parallel.engine=local or fsdp2 only (dynamo does not trace "
                             "DeepSpeed ZeRO-3's parameter-gather hooks; use DeepSpeed's own engine.compile() there)")
    if cfg.train.init_vae_from and cfg.parallel.engine != "local":
        bad("train.init_vae_from", "is supported with parallel.engine=local only (weights load before sharding)")
    down = 2 ** (len(v.ch_mult) - 1)
    if cfg.model.resolution % down != 0:
        bad("model.resolution", f"must be divisible by the VAE downsampling factor {down} (len(ch_mult)-1 halvings)")
    latent = cfg.model.resolution // down
    if latent % f.patch_size != 0:
        bad("model.flow.patch_size", f"must divide the latent size {latent}")
    if v.base_channels % v.norm_groups != 0:
        bad("model.vae.norm_groups", f"must divide model.vae.base_channels={v.base_channels}")
    if not 0.0 <= cfg.train.label_drop < 1.0:
        bad("train.label_drop", "must be in [0, 1)")
    if not 0.0 <= cfg.train.ema_decay < 1.0:
        bad("train.ema_decay", "must be in [0, 1)")
    if cfg.train.max_skipped_steps < 1:
        bad("train.max_skipped_steps", "must be >= 1 (consecutive non-finite steps before the run stops)")
    if cfg.train.log_every < 1:
        bad("train.log_every", "must be >= 1")
    if cfg.eval.self_score_samples < 0 or cfg.eval.self_score_samples == 1:
        bad("eval.self_score_samples", "must be 0 (off) or >= 2")
    if cfg.train.micro_batch_size < 1:
        bad("train.micro_batch_size", "must be >= 1")
    if cfg.train.grad_accumulation < 1:
        bad("train.grad_accumulation", "must be >= 1")
    if cfg.data.num_workers < 0:
        bad("data.num_workers", "must be >= 0")
    if cfg.data.retries < 0:
        bad("data.retries", "must be >= 0")
    if cfg.data.timeout_s <= 0:
        bad("data.timeout_s", "must be > 0")
    if cfg.data.io_threads < 1:
        bad("data.io_threads", "must be >= 1")
    ck = cfg.checkpoint
    if ck.keep < 2:
        bad("checkpoint.keep", "must be >= 2 (the previous step stays loadable if the newest turns out corrupt)")
    for key in ("checkpoint.every_steps", "checkpoint.every_minutes", "checkpoint.watchdog_s", "checkpoint.lock_wait_s"):
        if _get(cfg, key) < 0:
            bad(key, "must be >= 0 (0 disables)")
    if ck.lock_heartbeat_s <= 0:
        bad("checkpoint.lock_heartbeat_s", "must be > 0")
    if ck.lock_stale_s <= ck.lock_heartbeat_s:
        bad("checkpoint.lock_stale_s", f"must exceed checkpoint.lock_heartbeat_s={ck.lock_heartbeat_s}")
    for name in ck.signals:
        if not isinstance(getattr(signal, str(name), None), signal.Signals):
            bad("checkpoint.signals", f"{name!r} is not a signal name (e.g. SIGTERM, SIGUSR1)")
    for key in ("sample.batch_size", "sample.num_samples", "sample.range_size"):
        if _get(cfg, key) < 1:
            bad(key, "must be >= 1")
    if cfg.sample.temperature <= 0:
        bad("sample.temperature", "must be > 0")
    r = cfg.loss.repa
    if r.enabled and not 1 <= r.layer <= sum(f.layers_per_block):
        bad("loss.repa.layer", f"must be in [1, {sum(f.layers_per_block)}] (total flow layers)")
    if cfg.train.global_batch_size < 0:
        bad("train.global_batch_size", "must be >= 0 (0 = micro_batch_size x grad_accumulation x DP size)")
    if dp_size is not None and cfg.train.global_batch_size:
        want = cfg.train.micro_batch_size * cfg.train.grad_accumulation * dp_size
        if cfg.train.global_batch_size != want:
            bad(
                "train.global_batch_size",
                f"must equal micro_batch_size ({cfg.train.micro_batch_size}) x grad_accumulation "
                f"({cfg.train.grad_accumulation}) x DP size ({dp_size}) = {want}",
            )


def derive_grad_accumulation(cfg: SimFlowConfig, dp_size: int, source: str = "<config>") -> int:
    """The elastic global-batch rule, applied at every (re)start before the layout check.

    With ``train.global_batch_size = G`` set (> 0), the global batch is fixed for the whole run whatever the world
    size: ``train.grad_accumulation`` is set **in place** to ``G / (micro_batch_size x dp_size)`` (a value given in
    the config or on the command line is replaced, with a log line when it changes), so a job that shrinks from DP 16
    to DP 8 accumulates twice as many micro-batches and sees the same samples per step, in the same order
    (:mod:`simflow.data.order`). With ``G = 0`` nothing changes: the global batch is ``micro_batch_size x
    grad_accumulation x dp_size`` and follows the world size (the loader then continues from any
    ``consumed_samples``, see "Partial global batches" in :mod:`simflow.data.order`).

    Args:
        cfg: the run config (``train.*`` is read and ``train.grad_accumulation`` may be written).
        dp_size: data-parallel size of this start (world size / ``parallel.tp_size``), >= 1.
        source: config file name for messages.

    Returns:
        the grad accumulation in effect.

    Raises:
        ConfigError: ``G`` is not a multiple of ``micro_batch_size x dp_size``; names both keys and all values.
    """
    t = cfg.train
    if not t.global_batch_size:
        return t.grad_accumulation
    if dp_size < 1 or t.micro_batch_size < 1:
        raise ConfigError(f"{source}: train.micro_batch_size={t.micro_batch_size} and DP size {dp_size} must be >= 1")
    per_step = t.micro_batch_size * dp_size
    if t.global_batch_size % per_step:
        raise ConfigError(
            f"{source}: train.global_batch_size={t.global_batch_size} cannot be kept at DP size {dp_size}: it is no "
            f"multiple of train.micro_batch_size ({t.micro_batch_size}) x DP size ({dp_size}) = {per_step}; use a "
            f"world size whose DP size divides {t.global_batch_size}/{t.micro_batch_size}, or another micro-batch")
    acc = t.global_batch_size // per_step
    if acc != t.grad_accumulation:
        logging.getLogger("simflow").info(
            "train.global_batch_size=%d at DP size %d: train.grad_accumulation %d -> %d (micro-batch %d)",
            t.global_batch_size, dp_size, t.grad_accumulation, acc, t.micro_batch_size)
        t.grad_accumulation = acc
    return acc


def global_batch_size(cfg: SimFlowConfig, dp_size: int) -> int:
    """Samples per optimizer step across all data-parallel ranks: micro-batch x accumulation x DP."""
    return cfg.train.micro_batch_size * cfg.train.grad_accumulation * dp_size


def load_config(path: Optional[str] = None, overrides: Sequence[str] = (), validate_now: bool = True) -> SimFlowConfig:
    """Merge a YAML file and ``key=value`` overrides onto the schema, then validate.

    Args:
        path: YAML file, or None for the schema defaults. A YAML file may name ``defaults: [other.yaml]``
            (relative to itself) to inherit from another file.
        overrides: dotlist strings such as ``"train.steps=100"``.
        validate_now: run :func:`validate` (without the DP-dependent check).

    Returns:
        A :class:`SimFlowConfig` dataclass instance.

    Raises:
        ConfigError: unknown key, wrong type, bad value, or unreadable file (message names file and key).
    """
    schema = OmegaConf.structured(SimFlowConfig)
    source = path or "<defaults>"
    try:
        merged = schema
        if path is not None:
            for layer in _yaml_layers(path):
                merged = OmegaConf.merge(merged, layer)
        if overrides:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
        obj = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        msg = str(getattr(e, "msg", e)).splitlines()[0]
        raise ConfigError(f"{source}: invalid config key {key!r}: {msg}") from None
    if validate_now:
        validate(obj, source=source)
    return obj


def _yaml_layers(path: str) -> List[DictConfig]:
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    try:
        node = OmegaConf.load(path)
    except Exception as e:  # yaml parse errors
        raise ConfigError(f"{path}: cannot parse YAML: {e}") from None
    layers: List[DictConfig] = []
    parents = node.pop("defaults", None) if isinstance(node, DictConfig) else None
    for parent in parents or []:
        layers.extend(_yaml_layers(os.path.join(os.path.dirname(path), str(parent))))
    layers.append(node)
    return layers


def to_dict(cfg: SimFlowConfig) -> Dict[str, Any]:
    """Plain nested dict (for checkpoints, logging and JSON sidecars)."""
    return dataclasses.asdict(cfg)


def from_dict(d: Dict[str, Any], overrides: Sequence[str] = (), source: str = "stored config") -> SimFlowConfig:
    """Inverse of :func:`to_dict`, with schema checking (a checkpoint's stored config), plus ``key=value``
    ``overrides`` merged on top. Not validated (call :func:`validate` for the cross-key rules).

    Raises:
        ConfigError: an unknown key or a wrong type, naming ``source`` and the key.
    """
    try:
        merged = OmegaConf.merge(OmegaConf.structured(SimFlowConfig), OmegaConf.create(d))
        if overrides:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        msg = str(getattr(e, "msg", e)).splitlines()[0]
        raise ConfigError(f"{source}: invalid key {getattr(e, 'full_key', None)!r}: {msg}") from None


__all__ = [
    "ConfigError",
    "SimFlowConfig",
    "ModelConfig",
    "VAEConfig",
    "FlowConfig",
    "LossConfig",
    "PerceptualConfig",
    "GANConfig",
    "REPAConfig",
    "DataConfig",
    "OptimConfig",
    "TrainConfig",
    "ParallelConfig",
    "CheckpointConfig",
    "SampleConfig",
    "EvalConfig",
    "LoggingConfig",
    "load_config",
    "validate",
    "global_batch_size",
    "derive_grad_accumulation",
    "to_dict",
    "from_dict",
]
