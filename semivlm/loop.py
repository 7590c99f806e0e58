"""The one training loop every script uses (Accelerate; DeepSpeed ZeRO-2/3 when launched with it).

Gradient accumulation, clipping, warmup + cosine, held-out eval, one log line per optimizer step, atomic
checkpoints, resume, stop-and-checkpoint on SIGUSR1 or an `output_dir/STOP` file, and a gathered final export.

Loss normalisation: every optimizer step first collates its whole window of micro-batches and all-reduces the
number of supervised tokens, so the gradient is the mean over all tokens of the step whatever the padding, the
accumulation or the number of ranks (a mean of per-micro-batch means is not).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import netrc
import os
import re
import resource
import signal
import time
import warnings
import zlib
from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Callable, Literal
from urllib.parse import urlparse

import numpy as np
import torch

from semivlm import checkpoint as ckpt
from semivlm.config import ConfigError
from semivlm.model import compile_blocks, flops_per_token, local_numel, numel, wants_gradient_checkpointing


@dataclass
class TrainConfig:
    output_dir: str = ""
    init_from: str = ""  # model directory or hub id; empty = random init from model_config
    model_config: dict = field(default_factory=dict)  # tiny debug models: {model_type: llama, hidden_size: 64, ...}
    tokenizer: str = ""  # directory or hub id; empty = init_from
    train_data: str = ""
    eval_data: str = ""
    max_steps: int = 100  # optimizer steps; 0 when training by epochs
    # passes over the training set (fractions allowed) instead of max_steps: ceil(epochs × records / global batch)
    # steps, the last one shortened so that each epoch is exactly one permutation of the records; 0 = use max_steps
    epochs: float = 0
    learning_rate: float = 3e-4
    min_lr_ratio: float = 0.1  # cosine decays to learning_rate * min_lr_ratio
    warmup_steps: int = 10
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    micro_batch_size: int = 8  # sequences per rank per forward
    grad_accum: int = 1
    eval_every: int = 50  # 0 = only before and after training
    eval_batches: int = 20  # micro-batches per rank per eval
    save_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 1
    seed: int = 0
    # read for precision and clipping when not launched under DeepSpeed; under DeepSpeed the launcher's file rules
    ds_config: str = "ds_configs/zero3.json"
    # auto = on when one micro-batch's activations would fill 60 % of the GPU (model.wants_gradient_checkpointing)
    gradient_checkpointing: bool | Literal["auto"] = "auto"
    attn_implementation: str = "auto"  # auto = flash_attention_2 when installed on a GPU, else sdpa
    liger: Literal["auto", "on", "off"] = "auto"  # Liger kernels: auto = when installed on a GPU
    compile: bool = False  # torch.compile each transformer block (model.compile_blocks); not under ZeRO-3
    # experiment trackers through Accelerate: none | tensorboard | wandb | mlflow, or a list of them; their files go
    # under output_dir (tensorboard/, mlruns/, wandb/) unless MLFLOW_TRACKING_URI or WANDB_DIR point elsewhere
    report_to: str | list[str] = "none"
    exit_after_steps: int = 0  # checkpoint and exit 0 after this many steps of this invocation (time-sliced jobs)
    peak_tflops: float = 0.0  # per device, for MFU; 0 = datasheet for known GPUs, else a measured matmul ceiling
    # how long a rank waits in a collective before the job fails: rank 0 works alone after training (the LoRA merge and
    # export, train_moe's classification check, building the stage's starting model) while the others wait in a
    # barrier, and DeepSpeed's default (10 min) would kill a healthy run; a real hang still ends, after this long
    dist_timeout_minutes: float = 60.0


# ---------------------------------------------------------------- setup

# Dense (no sparsity) bf16 tensor-core TFLOP/s per GPU from NVIDIA's datasheets, matched against
# torch.cuda.get_device_name() in this order, first match wins: the variants that share a prefix come first
# ("H100 PCIe" before "H100", "L40S" before "L40") and the short names are whole words ("L4" is not "L40",
# "A10" is not "A100"/"A10G", "H20" is not "H200"). Unlisted cards fall back to a measured matmul ceiling.
DATASHEET_BF16_TFLOPS: list[tuple[str, float]] = [
    (r"H100.*NVL", 835.0),  # "NVIDIA H100 NVL"
    (r"H100.*PCIe", 756.0),  # "NVIDIA H100 PCIe"
    (r"H100", 989.0),  # SXM: "NVIDIA H100 80GB HBM3"
    (r"H200.*NVL", 835.0),  # "NVIDIA H200 NVL"
    (r"H200", 989.0),  # "NVIDIA H200", "NVIDIA GH200 480GB"
    (r"H800.*PCIe", 756.0),
    (r"H800", 989.0),
    (r"\bH20\b", 148.0),  # "NVIDIA H20"
    (r"A100", 312.0),  # SXM and PCIe: "NVIDIA A100-SXM4-80GB", "NVIDIA A100 80GB PCIe"
    (r"A800", 312.0),
    (r"L40S", 362.0),
    (r"\bL40\b", 181.0),
    (r"\bL4\b", 121.0),
    (r"\bA10\b", 125.0),  # not the A10G (AWS), which is slower and unlisted
    (r"\bA30\b", 165.0),
    (r"\bA40\b", 150.0),
    (r"V100", 125.0),  # fp16 tensor cores (no bf16 on Volta)
]


def datasheet_tflops(device_name: str) -> float | None:
    """Dense bf16 TFLOP/s of a GPU from its torch.cuda.get_device_name(), None when the card is not listed."""
    for pattern, tflops in DATASHEET_BF16_TFLOPS:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            return tflops
    return None


def read_ds_config(path: str) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise SystemExit(f"ds_config '{path}' does not exist") from None
    except json.JSONDecodeError as e:
        raise SystemExit(f"ds_config '{path}' is not valid JSON: {e}") from None


# report_to name -> the module accelerate's tracker imports, and what provides it
TRACKERS = {"tensorboard": ("tensorboard", "tensorboard==2.21.0"), "wandb": ("wandb", "wandb==0.31.0"),
            "mlflow": ("mlflow", "mlflow-skinny==3.18.0")}


def report_to_trackers(report_to: str | list[str]) -> list[str]:
    """The tracker names `report_to` asks for ("none" dropped); unknown or uninstalled ones are a config error
    (accelerate itself would skip an uninstalled tracker without a word)."""
    import importlib.util

    names = [report_to] if isinstance(report_to, str) else list(report_to)
    names = [n.strip() for name in names for n in str(name).split(",") if n.strip()]  # "tensorboard,mlflow" too
    for name in names:
        if name != "none" and name not in TRACKERS:
            raise ConfigError(f"report_to: unknown tracker '{name}'; choose none, {', '.join(TRACKERS)} "
                              "or a list of them")
    names = list(dict.fromkeys(n for n in names if n != "none"))
    for name in names:
        module, package = TRACKERS[name]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"report_to: {name} needs the '{module}' module: pip install {package}")
    return names


def make_accelerator(cfg: TrainConfig):
    """Accelerator whose precision, clipping and ZeRO stage all come from one ds_configs/ file."""
    from accelerate import Accelerator, InitProcessGroupKwargs
    from accelerate.utils import ProjectConfiguration

    # DeepSpeed 0.19 calls these deprecated collectives every step; one warning per call floods the log
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.*|.*reduce_scatter_tensor.*")
    use_deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    ds_file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", cfg.ds_config) if use_deepspeed else cfg.ds_config
    ds = read_ds_config(ds_file)
    precision = "bf16" if ds.get("bf16", {}).get("enabled") is True else (
        "fp16" if ds.get("fp16", {}).get("enabled") is True else "no")
    # without a GPU accelerate misreads the world size under DeepSpeed unless the gloo backend is named
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if cfg.dist_timeout_minutes <= 0:
        raise SystemExit(f"dist_timeout_minutes must be > 0 (got {cfg.dist_timeout_minutes})")
    # the timeout reaches torch's process group and, under DeepSpeed, deepspeed.comm.init_distributed(timeout=...)
    # (accelerate's PartialState passes the handler's fields on)
    timeout = timedelta(minutes=cfg.dist_timeout_minutes)
    handlers = [InitProcessGroupKwargs(backend="gloo" if not torch.cuda.is_available() else "nccl", timeout=timeout)
                ] if distributed else []
    # trackers are named here and started by train() (start_trackers); TensorBoard writes under logging_dir
    out = cfg.output_dir or "."
    accelerator = Accelerator(gradient_accumulation_steps=cfg.grad_accum, mixed_precision=precision,
                              kwargs_handlers=handlers, log_with=report_to_trackers(cfg.report_to) or None,
                              project_config=ProjectConfiguration(project_dir=out,
                                                                  logging_dir=os.path.join(out, "tensorboard")))
    if use_deepspeed:
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.micro_batch_size
    accelerator.ds_file, accelerator.clip = ds_file, float(ds.get("gradient_clipping", 0.0))
    accelerator.param_dtype = torch.bfloat16 if use_deepspeed and precision == "bf16" else torch.float32
    return accelerator


def _wandb_has_credentials() -> bool:
    """An API key in the environment or a `wandb login` entry in ~/.netrc (read for its presence only)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def tracker_config(run_config: dict) -> dict:
    """The run's config as trackers' hyperparameters: scalars only (TensorBoard's hparams refuse lists, dicts and
    None), so anything else becomes its JSON text."""
    return {k: v if isinstance(v, (bool, int, float, str)) else json.dumps(v, default=str)
            for k, v in run_config.items()}


def start_trackers(cfg: TrainConfig, accelerator, run_config: dict) -> None:
    """Start the report_to trackers on the main process, offline by default, files under output_dir.

    MLflow: a file store in output_dir/mlruns unless MLFLOW_TRACKING_URI names a server or database (MLflow 3
    refuses file stores without MLFLOW_ALLOW_FILE_STORE, which is set for this one); MLFLOW_EXPERIMENT_NAME
    overrides the experiment "semivlm". W&B: under output_dir/wandb unless WANDB_DIR is set; WANDB_MODE is
    honoured, and when it is unset and there is no API key or login the run is written offline (`wandb sync`
    uploads it later) instead of prompting for a key. The project is WANDB_PROJECT or "semivlm"; the run is named
    after output_dir. API keys stay in the environment: nothing here writes or prints them."""
    names = [str(t) for t in accelerator.log_with]
    if not names or accelerator.trackers or not accelerator.is_main_process:
        return  # none asked, or already started by an earlier train() on this Accelerator
    out = Path(cfg.output_dir).resolve()
    init_kwargs: dict = {}
    where = {"tensorboard": str(out / "tensorboard")}
    if "mlflow" in names:
        import mlflow

        if not os.environ.get("MLFLOW_TRACKING_URI"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            mlflow.set_tracking_uri((out / "mlruns").as_uri())
        where["mlflow"] = mlflow.get_tracking_uri()
        init_kwargs["mlflow"] = {"run_name": out.name}
    if "wandb" in names:
        wandb_kwargs = {"name": out.name}
        if not os.environ.get("WANDB_DIR"):
            wandb_kwargs["dir"] = str(out)
        mode = os.environ.get("WANDB_MODE")
        if not mode and not _wandb_has_credentials():
            wandb_kwargs["mode"] = mode = "offline"
        where["wandb"] = f"{os.environ.get('WANDB_DIR') or out}/wandb ({mode or 'online'})"
        init_kwargs["wandb"] = wandb_kwargs
    accelerator.init_trackers(os.environ.get("WANDB_PROJECT") or "semivlm", config=tracker_config(run_config),
                              init_kwargs=init_kwargs)
    accelerator.print("tracking: " + " | ".join(f"{n} -> {where[n]}" for n in names))


def fill_ds_bucket_sizes(accelerator, model) -> None:
    """Resolve "auto" ZeRO bucket sizes from the text model's width.

    Accelerate derives them from `model.config.hidden_size`, which composite configs (Llava) do not have, so it
    would stop in prepare(); these are the same formulas accelerate uses.
    """
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    h = config.hidden_size
    zero = plugin.deepspeed_config.get("zero_optimization", {})
    for key, value in {"reduce_bucket_size": h * h, "stage3_prefetch_bucket_size": int(0.9 * h * h),
                       "stage3_param_persistence_threshold": 10 * h}.items():
        if zero.get(key) == "auto":
            zero[key] = value


def zero_stage(accelerator) -> int:
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return int(plugin.zero_stage) if plugin is not None else 0


def measure_peak_tflops(device: torch.device, dtype: torch.dtype, quick: bool = False) -> float:
    """Best matmul rate over a few sizes: the ceiling MFU is quoted against where no datasheet figure applies.
    The best, not a typical, rate: on a shared CPU any single probe can land in a busy moment. `quick`: one size
    (~6 GFLOP on CPU), the check a cached ceiling gets."""
    best = 0.0
    sizes = (4096, 8192) if device.type == "cuda" else (256, 512, 1024)
    for n in sizes[-2:-1] if quick else sizes:
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        for _ in range(6):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(4):
                a @ b
            if device.type == "cuda":
                torch.cuda.synchronize()
            best = max(best, 4 * 2 * n**3 / (time.perf_counter() - t0) / 1e12)
    return best


def peak_tflops(cfg: TrainConfig, accelerator) -> tuple[float, str]:
    if cfg.peak_tflops > 0:
        return cfg.peak_tflops, "configured"
    if accelerator.device.type == "cuda":
        name = torch.cuda.get_device_name(accelerator.device)
        if (tflops := datasheet_tflops(name)) is not None:
            return tflops, f"{name} datasheet bf16 dense"
    dtype = torch.bfloat16 if accelerator.device.type == "cuda" else torch.float32
    return cached_peak_tflops(accelerator.device, dtype)


def cached_peak_tflops(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """measure_peak_tflops, in full once per machine: its probe (~60 GFLOP on CPU) took 24 s of a 2-step run's
    start-up on a loaded 2-core machine, before every first step. Kept in $SEMIVLM_CACHE (else ~/.cache/semivlm)/
    peak_tflops.json under the processor, thread count, dtype and torch version. A ceiling measured while the machine
    was busy is too low (one measured at load 16 read 0.003 TFLOP/s, 30x under the idle figure, and MFU read
    2,389 %), so every later run adds a quick probe and the cache keeps the best figure seen."""
    import platform

    what = torch.cuda.get_device_name(device) if device.type == "cuda" else next(
        (line.split(":", 1)[1].strip() for line in _read_text("/proc/cpuinfo").splitlines()
         if line.startswith("model name")), platform.processor() or platform.machine())
    key = f"{what} | {torch.get_num_threads()} threads | {dtype} | torch {torch.__version__}"
    path = Path(os.environ.get("SEMIVLM_CACHE") or Path.home() / ".cache" / "semivlm").expanduser() / "peak_tflops.json"
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    source = f"measured {dtype} matmul on {device.type}"
    if isinstance(cached.get(key), (int, float)):
        tflops = measure_peak_tflops(device, dtype, quick=True)
        if tflops <= cached[key]:
            return float(cached[key]), f"{source}, cached in {path}"
    else:
        tflops = measure_peak_tflops(device, dtype)
    with contextlib.suppress(OSError):  # a read-only home only costs the next run the probe
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({**cached, key: tflops}, indent=1) + "\n")
        tmp.replace(path)  # atomic: ranks measuring at once each write a whole file
    return tflops, source


def _read_text(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def epoch_line(records: int, global_batch: int, steps: int) -> str:
    """How many passes over the training set the run makes: the recipe YAMLs' epoch arithmetic rests on guessed
    record counts, so the start line says what the data really gives."""
    per_epoch = records / global_batch
    return (f"{records:,} training sequences / {global_batch} per step = {per_epoch:,.1f} steps per epoch → "
            f"{steps} steps = {steps / per_epoch:.2f} epochs")


def planned_steps(cfg: TrainConfig, records: int, global_batch: int) -> tuple[int, int | None]:
    """(optimizer steps, samples the run consumes): by epochs, or max_steps over an endless sequence (None)."""
    if cfg.epochs < 0:
        raise ConfigError(f"epochs must be >= 0 (got {cfg.epochs})")
    if cfg.epochs > 0:
        if cfg.max_steps > 0:
            raise ConfigError(f"set max_steps or epochs, not both (max_steps {cfg.max_steps}, epochs {cfg.epochs}): "
                              "add --max_steps 0 to train by epochs")
        total = round(cfg.epochs * records)
        if total < 1:
            raise ConfigError(f"epochs {cfg.epochs} of {records} records is no sample at all")
        return math.ceil(total / global_batch), total
    if cfg.max_steps <= 0:
        raise ConfigError("set max_steps > 0 or epochs > 0")
    return cfg.max_steps, None


def keep_global_batch(saved: dict, world: int, micro: int, accum: int, checkpoint) -> int:
    """The grad_accum that keeps the checkpoint's global batch (samples per optimizer step) on `world` ranks × `micro`.

    The sample sequence is cut into global batches of that size, so a resume on another world size must keep it to
    see the same samples at the same steps; grad_accum absorbs the change when it divides, else the run stops."""
    batch = int(saved.get("global_batch") or 0)
    if not batch or batch == world * micro * accum:
        return accum
    if batch % (world * micro) == 0:
        return batch // (world * micro)
    micros = [m for m in range(1, batch + 1) if batch % (world * m) == 0]
    worlds = [w for w in range(1, batch + 1) if batch % (w * micro) == 0]
    raise SystemExit(f"checkpoint '{checkpoint}' was trained with a global batch of {batch} samples per step "
                     f"({saved.get('world_size')} ranks × {saved.get('micro_batch_size')} micro × "
                     f"{saved.get('grad_accum')} accum), which {world} ranks × {micro} micro cannot keep with any "
                     f"grad_accum: use micro_batch_size in {micros} or a world size in {worlds}")


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def cosine_with_warmup(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / (cfg.warmup_steps + 1)
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def default_param_groups(model, weight_decay: float) -> list[dict]:
    """Decay matrices, not biases or norm gains (the usual GPT recipe). Under ZeRO-3 a partitioned parameter is an
    empty 1-D placeholder: its true shape is `ds_shape` (reading `ndim` would exempt every matrix from decay and give
    the run one group where a plain run has two, so their checkpoints would not match)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if len(getattr(p, "ds_shape", p.shape)) >= 2 else no_decay).append(p)
    return [g for g in ({"params": decay, "weight_decay": weight_decay},
                        {"params": no_decay, "weight_decay": 0.0}) if g["params"]]


# ---------------------------------------------------------------- data order

def random_order(seed: int, n: int, epoch: int) -> np.ndarray:
    """The loop's default sample order: a permutation of range(n), fixed per (seed, epoch)."""
    return np.random.default_rng((seed, epoch)).permutation(n)


class StepBatches:
    """The micro-batches this rank runs for optimizer step `step`.

    Samples come from a sequence of per-epoch permutations (`permutation(epoch)`, random by default, or e.g.
    length-grouped): global position p is record permutation(p // n)[p % n]. A function of (seed, epoch, position)
    only, so it is the same on any world size. Step s runs positions [s·G, (s+1)·G) with G = world × micro × accum
    the global batch, which a resume keeps (loop.keep_global_batch); within it micro-batch m of rank r is
    [s·G + (m·world + r)·micro, … + micro). With `total` (training by epochs) positions from `total` on are not
    run: the last step is short, and a micro-batch left with no sample runs one record at weight 0 (`empty(step)`),
    since every rank must join the forward and backward collectives of ZeRO-3.
    """

    def __init__(self, dataset, collate, cfg: TrainConfig, world: int, rank: int,
                 permutation: Callable[[int], np.ndarray] | None = None, total: int | None = None):
        self.dataset, self.collate, self.cfg, self.world, self.rank = dataset, collate, cfg, world, rank
        self.permutation = permutation or partial(random_order, cfg.seed, len(dataset))
        self.total = total
        self._perm_cache: dict[int, np.ndarray] = {}

    def _index(self, pos: int) -> int:
        epoch, i = divmod(pos, len(self.dataset))
        if epoch not in self._perm_cache:
            self._perm_cache = {epoch: self.permutation(epoch)}
        return int(self._perm_cache[epoch][i])

    def _positions(self, step: int) -> list[range]:
        micro, ga = self.cfg.micro_batch_size, self.cfg.grad_accum
        base = step * micro * ga * self.world
        starts = [base + (m * self.world + self.rank) * micro for m in range(ga)]
        end = self.total if self.total is not None else float("inf")
        return [range(start, int(min(start + micro, max(start, end)))) for start in starts]

    def empty(self, step: int) -> list[bool]:
        """Which of this rank's micro-batches of `step` hold no sample (only past the end of an epochs run)."""
        return [len(r) == 0 for r in self._positions(step)]

    def indices(self, step: int) -> list[list[int]]:
        """The dataset indices of this rank's micro-batches of `step` (what record_index.WorkerBatches prefetches);
        an empty micro-batch gets the step's first record as a stand-in that the loop weights 0."""
        first = step * self.cfg.micro_batch_size * self.cfg.grad_accum * self.world
        return [[self._index(p) for p in r] or [self._index(first)] for r in self._positions(step)]

    def __call__(self, step: int) -> list[dict]:
        return [self.collate([self.dataset[i] for i in idx]) for idx in self.indices(step)]


# ---------------------------------------------------------------- loss

def model_inputs(batch: dict) -> dict:
    """Keys starting with "_" carry bookkeeping for the loop (token and item counts), never model inputs."""
    return {k: v for k, v in batch.items() if not k.startswith("_")}


def causal_lm_loss(model, batch: dict, num_items: float) -> tuple[torch.Tensor, dict]:
    """Summed token cross-entropy divided by `num_items` (HF's own loss path, so Liger/fused variants apply)."""
    out = model(**model_inputs(batch), num_items_in_batch=num_items, use_cache=False)
    return out.loss, {}


def supervised_tokens(batch: dict) -> int:
    """What the loss averages over: supervised tokens, or `_n_items` (e.g. preference pairs) when the batch says."""
    if "_n_items" in batch:
        return int(batch["_n_items"])
    return int((batch["labels"][:, 1:] != -100).sum())


def input_tokens(batch: dict) -> int:
    if "_n_tokens" in batch:
        return int(batch["_n_tokens"])
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None and mask.dim() == 2 else int(batch["input_ids"].numel())


@torch.no_grad()
def evaluate(model, accelerator, dataset, collate, cfg: TrainConfig, loss_fn=causal_lm_loss) -> dict:
    """Token-weighted held-out loss and perplexity; every rank runs the same number of forwards (ZeRO-3 gathers)."""
    model.eval()
    world, rank, micro = accelerator.num_processes, accelerator.process_index, cfg.micro_batch_size
    n = min(len(dataset), cfg.eval_batches * micro * world)
    rounds = math.ceil(n / (micro * world))
    totals = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    extra_sums: dict[str, float] = {}  # loss_fn extras (e.g. DPO reward margin), weighted like the loss
    for r in range(rounds):
        idx = [i for i in range((r * world + rank) * micro, (r * world + rank + 1) * micro) if i < n]
        weight = 1.0 if idx else 0.0
        batch = collate([dataset[i] for i in (idx or [0])])  # a rank without data still joins the collectives
        batch = {k: v.to(accelerator.device) if torch.is_tensor(v) else v for k, v in batch.items()}
        tokens = supervised_tokens(batch)
        loss, extras = loss_fn(model, batch, 1.0)  # summed over tokens
        totals += torch.tensor([float(loss) * weight, tokens * weight], dtype=torch.float64, device=totals.device)
        for k, v in (extras or {}).items():
            extra_sums[k] = extra_sums.get(k, 0.0) + float(v) * tokens * weight
    keys = sorted(extra_sums)
    totals = torch.cat([totals, torch.tensor([extra_sums[k] for k in keys], dtype=torch.float64,
                                             device=totals.device)])
    totals = accelerator.reduce(totals, reduction="sum")
    model.train()
    mean = float(totals[0] / totals[1]) if totals[1] > 0 else float("nan")
    out = {"eval_loss": mean, "eval_tokens": int(totals[1])}
    if loss_fn is causal_lm_loss:  # perplexity only means something for the token-level LM loss
        out["eval_ppl"] = math.exp(min(mean, 50.0))
    out.update({f"eval_{k}": float(totals[2 + i] / totals[1]) if totals[1] > 0 else float("nan")
                for i, k in enumerate(keys)})
    return out


def eval_line(step: int, metrics: dict) -> str:
    ppl = f" | ppl {metrics['eval_ppl']:.2f}" if "eval_ppl" in metrics else ""
    extra = "".join(f" | {k[5:]} {v:.4f}" for k, v in metrics.items()
                    if k not in ("eval_loss", "eval_ppl", "eval_tokens"))
    return f"eval step {step} | loss {metrics['eval_loss']:.4f}{ppl}{extra}"


# ---------------------------------------------------------------- the loop

class _StopRequest:
    def __init__(self, stop_file: Path):
        self.stop_file, self.signalled = stop_file, False
        signal.signal(signal.SIGUSR1, self._on_signal)

    def _on_signal(self, *_):
        self.signalled = True

    def requested(self) -> bool:
        return self.signalled or self.stop_file.exists()


def train(cfg: TrainConfig, accelerator, model, tokenizer, train_dataset, eval_dataset, collate: Callable,
          loss_fn: Callable = causal_lm_loss, param_groups: list[dict] | None = None, lora_config=None,
          seq_len: int | None = None, permutation: Callable[[int], np.ndarray] | None = None,
          on_start: Callable | None = None, base_for_merge: str | None = None,
          artifacts: Callable[[], tuple[dict[str, str], dict[str, float]]] | None = None,
          train_flops_per_token: float | None = None, batch_loader: Callable | None = None,
          before_step: Callable[[int], None] | None = None, export_layout: tuple[Callable, Callable] | None = None
          ) -> dict:
    """Train `model` for cfg.max_steps optimizer steps, or cfg.epochs passes over `train_dataset`; returns
    {"history": [...], "final_dir": path | None, "stopped_early": bool, "max_steps": the run's step count}.

    `permutation(epoch)` orders the samples (default: random per epoch); `on_start(model, accelerator)` runs on
    every rank after prepare() and resume, before the first step (e.g. DPO reference log-probs); `artifacts()`,
    called on every rank at each save, returns ({file name: text} written into the checkpoint and the export,
    {name: scalar} recorded at that step like the log line's), e.g. routing statistics and shares.
    `train_flops_per_token` replaces the decoder formula of model.flops_per_token for models it does not describe
    (e.g. a two-tower CLIP, whose image and text tokens pass different towers). `batch_loader(StepBatches)` may
    wrap the micro-batch source, e.g. record_index.batch_loader's DataLoader workers (same indices, same order).
    `before_step(step)` runs on every rank before the micro-batches of optimizer step `step` (0-based; after a resume
    too), e.g. model.DynamicRank.set_step, which fixes the LoRA sub-rank all of that step's forwards train."""
    out = Path(cfg.output_dir)
    main = accelerator.is_main_process
    log = accelerator.print
    if not cfg.output_dir:
        raise SystemExit("output_dir is required")
    run_config = dataclasses.asdict(cfg)
    stop = _StopRequest(out / "STOP")
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "STOP").unlink(missing_ok=True)  # a stale request from the job that was requeued
        for d in ckpt.remove_partial_checkpoints(out):
            log(f"removed incomplete checkpoint {d}")
        (out / ckpt.RUN_CONFIG).write_text(json.dumps(run_config, indent=2, default=str) + "\n")
    accelerator.wait_for_everyone()

    # parameters per rank, measured before prepare() (afterwards DeepSpeed hides them in flat buffers)
    total_params = sum(numel(p) for p in model.parameters())
    trainable_params = sum(numel(p) for p in model.parameters() if p.requires_grad)
    local_params = sum(local_numel(p) for p in model.parameters())
    seq_len = seq_len or len(train_dataset[0]["input_ids"])
    fpt = train_flops_per_token or flops_per_token(model, seq_len)
    print(f"rank {accelerator.process_index}/{accelerator.num_processes} holds {local_params:,} of "
          f"{total_params:,} parameters (ZeRO stage {zero_stage(accelerator)})", flush=True)

    checkpointing = wants_gradient_checkpointing(cfg.gradient_checkpointing, model, cfg.micro_batch_size, seq_len,
                                                 accelerator.device)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if lora_config is not None:
            model.enable_input_require_grads()
    if cfg.compile:
        if zero_stage(accelerator) == 3:  # its parameter hooks gather weights inside every block: graph breaks
            raise SystemExit("compile: true is not supported under ZeRO-3; use ds_configs/zero2.json or compile: false")
        log(f"compiled {compile_blocks(model)} transformer blocks (torch.compile, regional)")
    # a resume keeps the checkpoint's global batch (grad_accum absorbs a new world size), then the step count
    # follows from it: the same samples at the same steps, and the same schedule, as the uninterrupted run
    world = accelerator.num_processes
    latest = ckpt.find_latest_checkpoint(out)
    state = ckpt.load_trainer_state(latest) if latest is not None else {}
    accum = keep_global_batch(state, world, cfg.micro_batch_size, cfg.grad_accum, latest)
    if accum != cfg.grad_accum:
        log(f"grad_accum {cfg.grad_accum} -> {accum} on {world} ranks × {cfg.micro_batch_size} micro: keeps the "
            f"checkpoint's global batch of {state['global_batch']} samples ({state.get('world_size')} ranks × "
            f"{state.get('micro_batch_size')} micro × {state.get('grad_accum')} accum)")
        accelerator.gradient_accumulation_steps = accum
        plugin = getattr(accelerator.state, "deepspeed_plugin", None)
        if plugin is not None:
            plugin.deepspeed_config["gradient_accumulation_steps"] = accum
    global_batch = world * cfg.micro_batch_size * accum
    steps, total_samples = planned_steps(cfg, len(train_dataset), global_batch)
    # the loop, the schedule and the log read this copy; the caller's cfg (and run_config) keep what was asked
    cfg = dataclasses.replace(cfg, max_steps=steps, epochs=0, grad_accum=accum)
    if state.get("max_steps") not in (None, steps) or state.get("records") not in (None, len(train_dataset)):
        log(f"warning: checkpoint {latest} was from a run of {state.get('max_steps')} steps over "
            f"{state.get('records')} records; this one has {steps} steps over {len(train_dataset)} records, so the "
            "schedule and the sample order differ from that run's")

    groups = param_groups or default_param_groups(model, cfg.weight_decay)
    fused = accelerator.device.type == "cuda" and zero_stage(accelerator) == 0
    optimizer = torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  weight_decay=cfg.weight_decay, fused=fused)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_with_warmup(s, cfg))
    fill_ds_bucket_sizes(accelerator, model)
    # the scheduler stays outside prepare(): accelerate would step it once per process, distorting the schedule
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)

    start_step, history = 0, []
    if latest is not None:
        ckpt.load_checkpoint(accelerator, model, optimizer, scheduler, latest, state, log)
        start_step, history = state["step"], state["history"]
        log(f"resumed from {latest} at step {start_step}")
    elif cfg.init_from:
        log(f"initialised from {cfg.init_from}")

    tflops, tflops_source = peak_tflops(cfg, accelerator)
    log(f"training {trainable_params:,} of {total_params:,} parameters for {cfg.max_steps} steps | "
        f"{world} ranks × {cfg.micro_batch_size} micro × {cfg.grad_accum} accum = {global_batch} sequences/step | "
        f"{epoch_line(len(train_dataset), global_batch, cfg.max_steps)} | precision {accelerator.mixed_precision} | "
        f"ds_config {accelerator.ds_file} | activation checkpointing {'on' if checkpointing else 'off'} | "
        f"peak {tflops:.3g} TFLOP/s ({tflops_source})")
    start_trackers(cfg, accelerator, run_config)

    def record(step: int, metrics: dict):
        """Every scalar the run reports goes here: into the history and to each tracker (main process only)."""
        history.append({"step": step, **metrics})
        accelerator.log(metrics, step=step)

    def artifact_files(step: int) -> dict[str, str] | None:
        if artifacts is None:
            return None
        files, scalars = artifacts()
        if scalars:
            record(step, scalars)
        return files

    if on_start is not None:
        on_start(model, accelerator)
    if start_step == 0 and eval_dataset is not None:
        metrics = evaluate(model, accelerator, eval_dataset, collate, cfg, loss_fn)
        record(0, metrics)
        log(eval_line(0, metrics))

    order = StepBatches(train_dataset, collate, cfg, world, accelerator.process_index, permutation, total_samples)
    batches_for = order
    # test hook: each rank appends the records it trains on at each step to SEMIVLM_SAMPLE_LOG.rank<r> (JSON lines)
    sample_log = os.environ.get("SEMIVLM_SAMPLE_LOG")
    if batch_loader is not None:
        batches_for = batch_loader(batches_for)
    model.train()
    step, stopped_early, t_start = start_step, False, time.perf_counter()
    while step < cfg.max_steps:
        t0 = time.perf_counter()
        if before_step is not None:
            before_step(step)
        window = batches_for(step)
        data_wait = time.perf_counter() - t0  # waiting for this step's micro-batches (decoded, collated)
        # dropout draws from torch's global RNG, which DataLoader iterators and evaluations also advance: seeded per
        # (seed, rank, step), the masks of a resumed run are the uninterrupted run's
        torch.manual_seed(zlib.crc32(f"{cfg.seed}:{accelerator.process_index}:{step}".encode()))
        empty = order.empty(step)  # stand-ins past the end of an epochs run: weight 0, not counted
        if sample_log:
            ids = [i for idx, e in zip(order.indices(step), empty) if not e for i in idx]
            with open(f"{sample_log}.rank{accelerator.process_index}", "a") as f:
                f.write(json.dumps({"step": step + 1, "ids": ids}) + "\n")
        counts = torch.tensor([sum(supervised_tokens(b) for b, e in zip(window, empty) if not e),
                               sum(input_tokens(b) for b, e in zip(window, empty) if not e),
                               float(stop.requested())], dtype=torch.float64, device=accelerator.device)
        counts = accelerator.reduce(counts, reduction="sum")
        if counts[0] == 0:
            raise RuntimeError(f"step {step}: no supervised tokens in the whole batch (every label is -100)")
        # backward divides by grad_accum and data parallelism averages over ranks; undo both so the step's
        # gradient is sum-over-tokens / tokens-in-step
        num_items = float(counts[0]) / (cfg.grad_accum * world)
        loss_sum, extras_sum, grad_norm = 0.0, {}, None
        for batch, is_empty in zip(window, empty):
            batch = {k: v.to(accelerator.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            with accelerator.accumulate(model):
                loss, extras = loss_fn(model, batch, num_items)
                if is_empty:
                    loss, extras = loss * 0.0, {}
                accelerator.backward(loss)
                if accelerator.sync_gradients:  # under DeepSpeed this only reads the norm it clipped with
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), accelerator.clip or float("inf"))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            loss_sum += float(loss.detach()) * num_items
            for k, v in extras.items():
                extras_sum[k] = extras_sum.get(k, 0.0) + float(v) / cfg.grad_accum
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        step += 1
        reduced = accelerator.reduce(torch.tensor([loss_sum, *extras_sum.values()], dtype=torch.float64,
                                                  device=accelerator.device), reduction="sum")
        step_loss = float(reduced[0] / counts[0])
        extras_mean = {k: float(v) / world for k, v in zip(extras_sum, reduced[1:].tolist())}
        if accelerator.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        tok_s = float(counts[1]) / dt
        mfu = fpt * tok_s / (tflops * 1e12 * world)
        metrics = {"loss": step_loss, "lr": lr, "tokens_per_s": tok_s, "mfu": mfu, "data_wait": data_wait / dt,
                   "peak_mem_gib": peak_memory_gib(accelerator.device), **extras_mean}
        if grad_norm is not None:
            metrics["grad_norm"] = float(grad_norm)
        record(step, metrics)
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            extra = "".join(f" | {k} {v:.4f}" for k, v in extras_mean.items())
            elapsed = time.perf_counter() - t_start
            eta = elapsed / (step - start_step) * (cfg.max_steps - step)
            log(f"step {step}/{cfg.max_steps} | loss {step_loss:.4f}{extra} | lr {lr:.1e} | {tok_s:,.0f} tok/s | "
                f"MFU {100 * mfu:.1f}% | data wait {100 * data_wait / dt:.1f}% | {metrics['peak_mem_gib']:.1f} GiB | "
                f"ETA {eta:.0f}s")
        if eval_dataset is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.max_steps):
            em = evaluate(model, accelerator, eval_dataset, collate, cfg, loss_fn)
            record(step, em)
            log(eval_line(step, em))
        stop_now = bool(counts[2] > 0) or (cfg.exit_after_steps and step - start_step >= cfg.exit_after_steps)
        if (cfg.save_every and step % cfg.save_every == 0) or (stop_now and step < cfg.max_steps):
            files = artifact_files(step)  # before the state is written: its history includes the scalars
            # what a resume on another world size needs to rebuild the same sample sequence and schedule
            trainer_state = {"step": step, "history": history, "world_size": world, "global_batch": global_batch,
                             "micro_batch_size": cfg.micro_batch_size, "grad_accum": cfg.grad_accum,
                             "max_steps": cfg.max_steps, "records": len(train_dataset),
                             "zero_stage": zero_stage(accelerator)}
            path = ckpt.save_checkpoint(accelerator, out, step, trainer_state, run_config, cfg.keep_checkpoints, files)
            log(f"saved checkpoint {path}")
        if stop_now and step < cfg.max_steps:
            log(f"stop requested: checkpointed at step {step}; rerun the same command to resume")
            stopped_early = True
            break

    final = None
    if not stopped_early:
        final = ckpt.export_final(accelerator, model, tokenizer, out, run_config, lora_config, base_for_merge,
                                  artifact_files(step), layout=export_layout)
        if main:
            (out / "history.json").write_text(json.dumps(history, indent=1) + "\n")
        log(f"exported {final}")
    return {"history": history, "final_dir": str(final) if final else None, "stopped_early": stopped_early,
            "max_steps": cfg.max_steps}
