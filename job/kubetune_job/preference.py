"""Preference tuning with Direct Preference Optimization on TRL's DPOTrainer: the evaluation figures under
kubetune's metric names, and checkpoints and output that hold the trained adapter alone.

The reference model is the frozen starting point. With a new adapter it is the model with the adapter
disabled; continuing a saved adapter, TRL keeps a frozen copy of it (the "ref" adapter, the size of the
adapter, beside the one base model); only a full fine-tune keeps a second copy of the model.
"""

from __future__ import annotations

import functools
from typing import Any

from kubetune_api.spec import PREFERENCE_METRICS

#: kubetune's metric name -> the name DPOTrainer logs the figure under (averaged over the evaluation's batches).
REWARDS = dict(zip(PREFERENCE_METRICS, ("rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected"),
                   strict=True))  # fmt: skip
#: The adapter TRL adds as the frozen copy of a saved adapter it is given to train further.
REFERENCE_ADAPTER = "ref"


def reward_metrics(found: dict[str, list[float]]) -> dict[str, float]:
    """The evaluation's preference metrics, eval_<name>, from DPOTrainer's per-batch figures (pure)."""
    return {
        f"eval_{ours}": sum(found[theirs]) / len(found[theirs]) for ours, theirs in REWARDS.items() if found.get(theirs)
    }


def trainer_class() -> type:
    """TRL's DPOTrainer whose evaluation reports reward accuracy, margin and the chosen and rejected rewards as
    eval_<metric> beside eval_loss: in the dict the callbacks' on_evaluate receives and in the log history. TRL's
    other figures (log-probabilities, logits, token accuracy) go to the log history only."""
    from trl import DPOTrainer

    from .sft import NoCacheTraining

    class Trainer(NoCacheTraining, DPOTrainer):
        def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
            # DPOTrainer averages what it gathered since the last log and adds it to the dict it is given; in an
            # evaluation that dict is also the one on_evaluate receives, so it gets a copy.
            if self.model is not None and not self.model.training:
                logs.update(reward_metrics(self._metrics["eval"]))
            super().log(dict(logs), start_time)

        def _save(self, output_dir: str | None = None, state_dict: dict[str, Any] | None = None) -> None:
            # PEFT saves every adapter the model holds unless told which: TRL's frozen reference copy of a saved
            # adapter is no part of what was trained, in a checkpoint or in the output.
            model = self.accelerator.unwrap_model(self.model)
            if REFERENCE_ADAPTER not in getattr(model, "peft_config", {}):
                super()._save(output_dir, state_dict)
                return
            model.save_pretrained = functools.partial(model.save_pretrained, selected_adapters=[model.active_adapter])
            try:
                super()._save(output_dir, state_dict)
            finally:
                del model.save_pretrained  # the class's method again

    return Trainer
