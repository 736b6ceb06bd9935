"""Compression in a ``transformers.Trainer`` script: two lines around ``trainer.train()``.

::

    from pinch_ray.hf import attach

    trainer = Trainer(model=model, args=training_args, train_dataset=train, data_collator=collator)
    pinch = attach(trainer, "sspg", target_sparsity=0.65)   # after Trainer(...), before train()
    trainer.train()                                         # resume_from_checkpoint=True works too
    pinch.save_pretrained("out/pruned", processor)          # at the target; stock AutoModelForCTC loads it

Needs accelerate, as transformers' Trainer does: ``pip install 'pinch-ray[hf]'``.

:func:`attach` puts the gates on ``trainer.model`` before ``train()`` builds the optimizer and any
DDP wrapper (so both see them, as PEFT's ``get_peft_model`` before a Trainer), and adds a
:class:`PinchCallback`, which:

- adds the sparsity term to the loss: a forward hook on the model adds
  :meth:`~pinch_ray.core.pinch.Pinch.sparsity_loss` to ``outputs.loss`` in training mode. A
  callback cannot change the loss, and the hook is the least a script has to change: no Trainer
  subclass, no ``compute_loss`` of its own, every loss Trainer computes from ``outputs.loss``
  (gradient accumulation, DDP, bf16 autocast) includes the term;
- keeps the thresholds (and movement scores) out of the Trainer's optimizer and clipping: it steps
  them itself before the Trainer's optimizer, which then skips them (no gradient left). It clips the
  weights to ``max_grad_norm`` alone and the thresholds apart, as the pipeline does, so it sets the
  Trainer's ``args.max_grad_norm`` to 0 while training and puts it back at the end, or when the same
  Trainer trains again after an exception (the Trainer's logged ``grad_norm`` is then the unclipped
  norm of everything; ``weight_grad_norm`` is the weights' alone);
- steps the schedules (target ramp, temperature, ``lambda_1``, the peers' masks) over the Trainer's
  ``max_steps``;
- with ``gates.masked_update`` (sspg), scales each gated weight's update by its soft mask once the
  Trainer's optimizer has stepped (the weights and masks are noted by the first forward of the step);
- saves its state with every Trainer checkpoint (``checkpoint-N/pinch_state.pt``; the thresholds,
  masks and scores are in the model's weights) and restores it when ``trainer.train`` resumes
  from a checkpoint under ``output_dir``;
- logs ``sparsity`` (hard, of ``target_basis``), ``soft_sparsity``, ``target_now``, ``lambda_1``,
  ``tau``, and the gradient norms with the Trainer's training logs, to whatever it reports to
  (TensorBoard, W&B, ``trainer.state.log_history``);
- at the end of training calibrates to the target and folds the gates into the weights
  (:meth:`~pinch_ray.core.pinch.Pinch.finalize`): ``trainer.model`` is then a plain model at the
  target, for ``trainer.evaluate()`` and ``trainer.save_model()`` (``sspg-neuron``: write it with
  ``pinch.save_pretrained``, which adds the loader of its smaller layers).

Not supported (refused by :func:`attach`): fp16 loss scaling (use ``bf16=True`` or fp32),
DeepSpeed, FSDP, ``model_init``.
"""

from __future__ import annotations

import logging
import os

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from pinch_ray.core import pinch as pinch_lib

log = logging.getLogger(__name__)

PINCH_STATE = "pinch_state.pt"  # in each Trainer checkpoint directory: Pinch.state_dict()


def attach(trainer: Trainer, method: str, target_sparsity: float, **settings) -> pinch_lib.Pinch:
    """Attach ``method``'s gates to ``trainer.model`` for ``target_sparsity`` and add the
    :class:`PinchCallback` that trains them with the Trainer; returns the
    :class:`~pinch_ray.core.pinch.Pinch`. Call it after building the Trainer and before
    ``trainer.train()``. ``settings``: :func:`pinch_ray.attach`'s keywords (``gates``,
    ``target_basis``, ``threshold_lr``, ``betas``); ``max_steps`` is the Trainer's.

    Raises:
        ValueError: a Trainer setup the callback cannot train (fp16, DeepSpeed, FSDP,
            ``model_init``), or a model that already carries gates.
        ConfigError: bad method, target or settings (all listed).
    """
    args = trainer.args
    refused = [reason for flag, reason in (
        (args.fp16, "fp16=True (its loss scaling hands the thresholds scaled gradients; use bf16=True or fp32)"),
        (trainer.is_deepspeed_enabled, "DeepSpeed"), (trainer.is_fsdp_enabled, "FSDP"),
        (trainer.model_init is not None, "model_init (the gates would be lost when train() rebuilds the model)"))
        if flag]
    if refused:
        raise ValueError(f"pinch_ray.hf.attach: this Trainer uses {', '.join(refused)}, which PinchCallback does "
                         "not support")
    pinch = pinch_lib.attach(trainer.model, method, target_sparsity, max_steps=None, **settings)
    # First in the list: the Trainer runs callbacks in order and its reporters (TensorBoard, W&B,
    # ...) come before a script's own, so this one adds its metrics to the logs before they report.
    trainer.callback_handler.callbacks.insert(0, PinchCallback(pinch))
    return pinch


class PinchCallback(TrainerCallback):
    """Trains a :class:`~pinch_ray.core.pinch.Pinch` with the Trainer that runs its model: see the
    module docstring. Add it with :func:`attach`, which also places it before the reporters."""

    def __init__(self, pinch: pinch_lib.Pinch):
        self.pinch = pinch
        self.max_grad_norm = 0.0  # the Trainer's, applied here to the weights alone while training
        self.metrics: dict = {}  # the latest step's (tensors until logged)
        self._weights: list[torch.nn.Parameter] = []
        self._hook = None

    def on_train_begin(self, args, state, control, **kwargs):
        pinch = self.pinch
        if self._hook is not None:  # this Trainer's last train() stopped on an exception: undo what it set up
            self._hook.remove()
            args.max_grad_norm = self.max_grad_norm
        pinch.set_max_steps(state.max_steps)
        if state.global_step > 0:  # resumed: the Trainer has loaded the gated model's weights
            self._restore(args, state)
        self._weights = pinch.weight_parameters()
        self._hook = pinch.model.register_forward_hook(self._add_sparsity_loss)
        self.max_grad_norm, args.max_grad_norm = args.max_grad_norm, 0.0

    def _add_sparsity_loss(self, module, inputs, outputs):
        if not module.training:
            return outputs
        if isinstance(outputs, tuple):  # return_dict=False: the loss first, where there is one
            return (outputs[0] + self.pinch.sparsity_loss(), *outputs[1:]) if outputs and outputs[0].dim() == 0 \
                else outputs
        if outputs.get("loss") is not None:
            outputs["loss"] = outputs["loss"] + self.pinch.sparsity_loss()
        return outputs

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if self.max_grad_norm > 0:
            self.metrics = {"weight_grad_norm": torch.nn.utils.clip_grad_norm_(self._weights, self.max_grad_norm)}
        lr_scale = optimizer.param_groups[0]["lr"] / args.learning_rate if args.learning_rate else 1.0
        self.metrics.update(self.pinch.update_gates(lr_scale))  # the gates' gradients: used and cleared

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.metrics.update(self.pinch.advance())

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs:  # evaluation and the end-of-training summary
            return
        pinch = self.pinch
        values = {"sparsity": pinch.on_basis(pinch.hard_sparsity()),
                  **{key: value for key, value in self.metrics.items() if key != "sparsity_loss"}}
        values = {key: float(value) for key, value in values.items()}
        logs.update(values)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(values)

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        path = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}", PINCH_STATE)
        torch.save(self.pinch.state_dict(), path + ".tmp")
        os.replace(path + ".tmp", path)

    def _restore(self, args, state) -> None:
        path = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}", PINCH_STATE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"resuming at step {state.global_step}, but {path} is missing: PinchCallback "
                                    "saves its state in each checkpoint under output_dir, and resumes from one of "
                                    "those (resume_from_checkpoint=True, or the path of one)")
        self.pinch.load_state_dict(torch.load(path, map_location=self.pinch.device, weights_only=True))
        log.info("pinch_ray: %s resumed at step %d", self.pinch.method, self.pinch.step_count)

    def on_train_end(self, args, state, control, **kwargs):
        args.max_grad_norm = self.max_grad_norm
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self.pinch.finalize()
