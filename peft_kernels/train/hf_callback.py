"""AdaLoRA inside HF ``transformers.Trainer``: a callback that runs the rank allocator.

PEFT's trap: ``Trainer`` never calls ``update_and_allocate``, so an AdaLoRA model silently trains as
a fixed-rank LoRA. Add :class:`AdaLoRACallback` and it cannot happen::

    trainer = Trainer(model=adapted.model, args=args, train_dataset=ds,
                      callbacks=[AdaLoRACallback()])

- ``on_train_begin`` finds the AdaLoRA modules, builds a :class:`~peft_kernels.train.adalora.RankAllocator`
  (``total_step`` defaults to the run's ``max_steps``; tinit/tfinal to 10%/20% of it) and hooks the
  model's forward so that, in training mode, the orthogonal regulariser is added to ``outputs.loss``
  (what PEFT's ``AdaLoraModel.forward`` does), scaled the way ``Trainer`` will scale that loss: when
  the forward received ``num_items_in_batch`` (models taking loss kwargs, most causal LMs),
  ``Trainer`` no longer divides the loss by the accumulation steps and, with
  ``average_tokens_across_devices``, multiplies it by the process count, so the regulariser is
  divided by both here; otherwise it would weigh ``gradient_accumulation_steps`` (x processes)
  times its setting (PEFT's own forward has this flaw). A ``compute_loss_func`` or label smoother
  computes the loss from the logits and never sees ``outputs.loss``: the regulariser is then not
  applied (label smoothing logs a warning; a ``compute_loss_func`` is not visible to callbacks);
- ``on_optimizer_step`` (after ``optimizer.step()``, before ``zero_grad``: the gradients are still
  there) calls ``allocator.step(global_step + 1)``, the same 1-based step count as our trainer;
  a step with non-finite gradients (an fp16 step the grad scaler skipped) updates no scores;
- ``on_train_end`` removes the hook and logs the final ranks (also in ``callback.final_ranks``).

The rank masks are model buffers, so HF checkpoints carry them; the allocator's score EMAs are not
saved by ``Trainer``: a run resumed inside the budgeting phase restarts them (the next allocations
use fresh scores), one resumed after it keeps the checkpoint's final masks.
:mod:`peft_kernels.train.trainer` checkpoints the allocator too and resumes exactly.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Optional

from transformers import TrainerCallback

from .adalora import AdaLoRAConfig, RankAllocator, adalora_config_for, find_adalora_modules, orthogonal_regularization

logger = logging.getLogger(__name__)


class AdaLoRACallback(TrainerCallback):
    def __init__(self, config: Optional[AdaLoRAConfig] = None):
        self.config = config
        self.allocator: Optional[RankAllocator] = None
        self.final_ranks = None
        self._hook = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise ValueError("AdaLoRACallback needs the model (transformers passes it to callbacks)")
        mods = find_adalora_modules(model)
        if not mods:
            raise ValueError("AdaLoRACallback: the model holds no AdaLoRA modules; remove the callback or "
                             "adapt the model with method='adalora'")
        total = int(state.max_steps)
        cfg = self.config
        if cfg is None:
            init_r = max(int(m.lora_A.shape[0]) for m in mods.values())
            cfg = adalora_config_for(total, init_r=init_r, target_r=max(1, 2 * init_r // 3))
        elif cfg.total_step is None:
            cfg = dataclasses.replace(cfg, total_step=total)
        self.allocator = RankAllocator(mods, cfg)
        weight = cfg.orth_reg_weight
        allocator = self.allocator
        accum = max(1, int(getattr(args, "gradient_accumulation_steps", 1) or 1))
        # Trainer multiplies a num_items_in_batch-normalised loss by the process count (// TP size,
        # which these adapters do not use) under average_tokens_across_devices
        procs = int(getattr(args, "world_size", 1) or 1) if getattr(args, "average_tokens_across_devices", False) else 1

        def add_orth_reg(module, inputs, kwargs, output):
            if not module.training or weight == 0:
                return output
            loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
            if loss is None:
                return output
            scale = 1.0
            if kwargs.get("num_items_in_batch") is not None:
                # Trainer treats this loss as already normalised over the whole accumulated (and
                # gathered) batch: it neither divides it by the accumulation steps nor leaves it
                # unscaled across processes; the regulariser must be per optimizer step
                scale = 1.0 / (accum * procs)
            reg = orthogonal_regularization(allocator.modules, weight)
            output["loss"] = loss + (scale * reg).to(loss.dtype)
            return output

        self._hook = model.register_forward_hook(add_orth_reg, with_kwargs=True)
        if getattr(args, "label_smoothing_factor", 0):
            logger.warning("AdaLoRACallback: with label smoothing the Trainer computes the loss from the logits, "
                           "so the orthogonal regulariser is not applied")

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.allocator is None:
            raise RuntimeError("AdaLoRACallback: on_optimizer_step before on_train_begin")
        # Under fp16 an overflowed step reaches here too (the scaler skipped optimizer.step, HF
        # calls the callback anyway): its inf/nan gradients would turn the importance EMAs into nan
        # for the rest of the run, so such a step only does what needs no gradient.
        finite = self.allocator.grads_finite()
        if not finite:
            logger.debug("AdaLoRACallback: non-finite gradients at step %d, importance update skipped",
                         int(state.global_step) + 1)
        self.allocator.step(int(state.global_step) + 1, grads_valid=finite)

    def on_train_end(self, args, state, control, **kwargs):
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self.allocator is not None:
            self.final_ranks = self.allocator.current_ranks()
            logger.info(self.allocator.report())


__all__ = ["AdaLoRACallback"]
