"""The options of a training run: one frozen dataclass (configs.presets.build_options makes it from a preset
and the command line; train.py saves it as training_options.json; training.loop.training_loop reads it)."""

import dataclasses

from training.sampling.samplers import CIFAR10_MID_T


@dataclasses.dataclass(frozen=True)
class TrainingOptions:
    """Every component is dict(class_name=..., **kwargs); the loop never interprets method hyperparameters."""
    dataset_kwargs: dict = dataclasses.field(default_factory=dict)      # dataset component
    data_loader_kwargs: dict = dataclasses.field(default_factory=dict)  # torch DataLoader options
    data_on_device: bool = False        # hold the whole dataset on the training device (no DataLoader)
    network_kwargs: dict = dataclasses.field(default_factory=dict)      # network (resolution/channels/labels from the data)
    method_kwargs: dict = dataclasses.field(default_factory=dict)       # training method (training.methods.*)
    optimizer_kwargs: dict = dataclasses.field(default_factory=dict)    # optimiser (torch.optim.*), with lr
    lr_kwargs: dict = dataclasses.field(default_factory=dict)           # learning-rate schedule component
    ema_kwargs: dict = dataclasses.field(default_factory=dict)          # EMA component (training.loop.ema.*)
    grad_clip_norm: float = None        # clip the global gradient norm to this before each step; None = no clipping
    total_kimg: float = 25600           # training length in thousands of images
    batch_size: int = 128               # global batch size
    batch_gpu: int = None               # micro-batch per process per round; None = no accumulation
    tick_kimg: float = 12.8             # images per tick, thousands
    snapshot_ticks: int = 50            # ticks between network snapshots; None/0 = only at the end
    state_dump_ticks: int = 100         # ticks between training states; None/0 = only at the end
    sample_ticks: int = 50              # ticks between sample grids; None/0 = none
    eval_ticks: int = None              # ticks between metric evaluations (metrics callback of train.py)
    metrics: list = dataclasses.field(default_factory=list)             # metric names (metrics callback)
    metrics_ref: str = None             # reference statistics/dataset of the metrics (metrics callback)
    eval_init_metrics: list = dataclasses.field(default_factory=list)   # metrics of the initial network (callback)
    eval_init_background: bool = False  # score the initial network in a background process (metrics.background)
    metric_samples: int = None          # generated images per metric evaluation; None = the metric's own count
    detector_files: dict = dataclasses.field(default_factory=dict)      # metric detector files (detector, vgg16,
                                                                        # dinov2); missing = the official ones
    max_hours: float = None             # stop (with a state) after this much training time
    seed: int = 0                       # global seed
    precision: str = 'fp32'             # fp32 | tf32 | bf16 | fp16
    compile: bool = False               # torch.compile the trained network (training.compile; off: see train.py --compile)
    transfer: str = None                # initial weights: official pickle, URL or our snapshot
    mid_t: list = dataclasses.field(default_factory=lambda: [CIFAR10_MID_T])    # intermediate times of 2-step grids
    grid_sampler: str = 'consistency'   # edm | consistency | trigflow | meanflow (samplers.FEW_STEP)
    find_unused_parameters: bool = False    # DDP option for networks with parameters the loss never uses
    channels_last: bool = False         # train the network in NHWC layout (training.networks.layers.set_memory_format)
    tensorboard: bool = False           # also write TensorBoard events (scalars, grids, metrics)
    wandb: str = None                   # 'PROJECT[/RUN]': also log to Weights & Biases (training.loop.trackers)
    resume_state: str = None            # training-state file to continue from

    def replace(self, **changes):
        """A copy with `changes` applied."""
        return dataclasses.replace(self, **changes)

    def to_dict(self):
        """Plain data (for training_options.json, snapshot metadata and training states)."""
        return dataclasses.asdict(self)
