"""Training as a product: ``autopar train --config job.toml``.

``config`` (typed TOML sections, every default documented there), ``data`` (token sources, seeded order,
per-dp-rank shares), ``model`` (the job's model and how batches feed it), ``accumulate`` (micro-batches with
one gradient sync per step), ``checkpoints`` (step directories, resume, keep-last-N), ``metrics`` (JSONL,
progress bar, TensorBoard), ``hf_io`` (HF safetensors in, sliced per rank, and out) and ``loop`` (the
ordered training function). Sits above the runtime and front ends, below ``autopar.tools``.
"""
from autopar.train.config import TrainConfig, load_train_config
from autopar.train.loop import TrainResult, lr_at, train

__all__ = ["TrainConfig", "TrainResult", "load_train_config", "lr_at", "train"]
