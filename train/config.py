"""Settings of a training run: the loop's (shared by every method) and the method's own options.

A run is described by a JSON file (see docs/training.md for one per method) whose keys are the fields
below, with the method's options under "options"; command-line flags override single fields.
"""
import dataclasses
import json
from dataclasses import dataclass, field

MIXED_PRECISION = ("no", "fp16", "bf16")


@dataclass
class TrainConfig:
    method: str = ""
    output_dir: str = "likeness_training"
    checkpoint: str = ""             # base model (.safetensors), loaded with the host's checkpoint loader
    clip_vision: str = ""            # CLIP vision model (.safetensors) for the methods that need one
    data: str = ""                   # image folder
    layout: str = "folder"           # folder | ffhq | celebahq (train/data.py)
    identities: str = ""             # CSV file,identity (folder layout)
    resolution: int = 512
    crop: str = "center"             # center | random
    flip: bool = False
    max_steps: int = 1000
    batch_size: int = 4              # per process
    gradient_accumulation_steps: int = 1
    learning_rate: float = 0.0       # 0: the method's default (the paper's rate)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 0.0       # 0: no clipping
    lr_warmup_steps: int = 0
    mixed_precision: str = "no"      # no | fp16 | bf16 (accelerate autocast; weights stay fp32)
    seed: int = 0
    num_workers: int = 0
    cpu: bool = False
    log_every: int = 10
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    sample_every: int = 0            # 0: no sample images during training
    sample_steps: int = 30
    resume: str = ""                 # "" | latest | a checkpoint directory
    report_to: str = ""              # an accelerate tracker (tensorboard, wandb ...), optional
    options: dict = field(default_factory=dict)

    def validate(self):
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision must be one of {', '.join(MIXED_PRECISION)} (got {self.mixed_precision!r})")
        for name in ("max_steps", "batch_size", "gradient_accumulation_steps"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1 (got {getattr(self, name)})")
        if not self.learning_rate >= 0:
            raise ValueError(f"learning_rate must be 0 (the method's default) or above (got {self.learning_rate})")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown training settings: {', '.join(unknown)} (method options go under \"options\")")
        return cls(**data)

    @classmethod
    def from_json(cls, path: str) -> "TrainConfig":
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    def with_overrides(self, pairs: list[str]) -> "TrainConfig":
        """KEY=VALUE pairs (VALUE parsed as JSON when it can be); options.KEY sets a method option."""
        data = self.to_dict()
        for pair in pairs:
            if "=" not in pair:
                raise ValueError(f"--set expects KEY=VALUE, got {pair!r}")
            key, raw = pair.split("=", 1)
            try:
                value = json.loads(raw)
            except json.JSONDecodeError:
                value = raw
            if key.startswith("options."):
                data["options"][key[len("options."):]] = value
            else:
                data[key] = value
        return TrainConfig.from_dict(data)
