"""The scalar streams a run writes beside metrics.jsonl, as `train.report_to` names them: TensorBoard event files
(through `torch.utils.tensorboard`) and Weights & Biases, always offline (it never needs a network; `wandb sync`
uploads later). Both are optional packages: without one, a line at start says how to install it and the run goes
on. Hugging Face's Trainer reports the same way (transformers `src/transformers/integrations/integration_utils.py`,
`TensorBoardCallback` and `WandbCallback`).

Every record the trainer logs (its `TrainLog`) becomes one scalar per number in it, tagged SPLIT/KEY (train/lm_loss,
train/lr, train/grad_norm, train/tokens_per_s, train/mfu, valid/loss, valid/bits_per_byte, ...). TensorBoard has
one x axis, the integer step of each event, so the event files are written twice:
    RUN/tensorboard/steps/    tags SPLIT/KEY, against the optimizer step
    RUN/tensorboard/tokens/   tags SPLIT_by_tokens/KEY, against the input tokens seen
A resumed session opens its writers with `purge_step` at the checkpoint it resumed from, so TensorBoard drops
what an interrupted session had logged past it, in each folder on its own axis.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console

    from pretrain.checkpoint import TrainState
    from pretrain.config import Config
    from pretrain.run import RunDir

INSTALL = {"tensorboard": 'pip install tensorboard (or pip install -e ".[report]")', "wandb": "pip install wandb"}
AXES = ("step", "tokens")  # what the records are plotted against; never a scalar of their own


class TensorBoard:
    """Event files in RUN/tensorboard/ (see the module docstring)."""

    def __init__(self, cfg: Config, run: RunDir, state: TrainState) -> None:
        from torch.utils.tensorboard import SummaryWriter  # ImportError without the tensorboard package

        def writer(axis: str, at: int) -> SummaryWriter:  # at: where this session starts on that axis
            return SummaryWriter(str(run.tensorboard / axis), purge_step=at + 1 if at else None)

        self.by_step, self.by_tokens = writer("steps", state.step), writer("tokens", state.tokens)

    def write(self, split: str, values: dict[str, float], step: int, tokens: int) -> None:
        """One scalar per value, at `step` in steps/ and at `tokens` in tokens/."""
        for key, value in values.items():
            self.by_step.add_scalar(f"{split}/{key}", value, step)
            self.by_tokens.add_scalar(f"{split}_by_tokens/{key}", value, tokens)

    def close(self) -> None:
        """Flush and close both writers."""
        self.by_step.close()
        self.by_tokens.close()


class Wandb:
    """A Weights & Biases run in RUN/wandb/, offline: nothing leaves the machine until `wandb sync`."""

    def __init__(self, cfg: Config, run: RunDir, state: TrainState) -> None:
        import wandb  # ImportError without the wandb package

        self.run = wandb.init(project="pretrain", name=run.path.name, dir=str(run.path), config=cfg.to_dict(),
                              mode="offline")

    def write(self, split: str, values: dict[str, float], step: int, tokens: int) -> None:
        """One history row at `step`, the input tokens beside the values."""
        self.run.log({**{f"{split}/{k}": v for k, v in values.items()}, "tokens": tokens}, step=step)

    def close(self) -> None:
        """Finish the offline run (its files stay in RUN/wandb/)."""
        self.run.finish()


STREAMS = {"tensorboard": TensorBoard, "wandb": Wandb}


class Trackers:
    """The streams `train.report_to` names, opened for one session of the loop on the writing rank (`run` None:
    another rank, which writes nothing)."""

    def __init__(self, cfg: Config, run: RunDir | None, state: TrainState, console: Console) -> None:
        self.streams: list[Any] = []
        for name in cfg.train.report_to if run is not None else ():
            try:
                self.streams.append(STREAMS[name](cfg, run, state))
            except ImportError:
                console.print(f"note: train.report_to names {name}, which is not installed: {INSTALL[name]}; "
                              f"the run goes on without it", highlight=False, soft_wrap=True)

    def write(self, record: dict[str, Any]) -> None:
        """Log every number of a metrics.jsonl record (no "split": a training record) against its step and tokens."""
        if not self.streams:
            return
        values = {k: float(v) for k, v in record.items()
                  if k not in AXES and isinstance(v, (int, float)) and not isinstance(v, bool)}
        for stream in self.streams:
            stream.write(record.get("split", "train"), values, int(record["step"]), int(record["tokens"]))

    def close(self) -> None:
        """Close every stream."""
        for stream in self.streams:
            stream.close()
