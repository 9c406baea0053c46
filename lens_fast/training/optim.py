"""The trainer's AdamW and its memory options (``optimizer_states``, ``optimizer_offload``, ``step_in_backward``).

:func:`build_adamw` returns, for the parameters of one training stage:

- defaults (fp32 states, no offload, no step in backward): ``torch.optim.AdamW`` (fused on CUDA), as before;
- ``states="8bit"``: bitsandbytes' blockwise 8-bit AdamW (``bnb.optim.AdamW8bit``: m and v in uint8 with one
  fp32 absmax per 256-value block, ~2 B/param instead of 8; tensors under 4096 values keep fp32 states);
- ``offload=True`` or ``step_in_backward=True``: a :class:`LeanAdamW`.

:class:`LeanAdamW` (a ``torch.optim.Optimizer``: ``LambdaLR`` drives its ``param_groups[0]["lr"]``):

- ``offload``: fp32 master weights and the AdamW states live in host memory (pinned when the parameters are
  on CUDA); gradients are copied to the host in fp32, AdamW (torch's fused CPU AdamW, or the 8-bit one) steps
  the masters there, and the updated masters are copied back into the device parameters, rounded to their
  dtype (bf16 parameters under ``precision=bf16``: the masters keep what bf16 cannot hold).
- ``step_in_backward`` without offload: every parameter is stepped in its
  ``register_post_accumulate_grad_hook`` during backward and its gradient freed at once (PyTorch's
  "optimizer step in backward" recipe), so no full gradient buffer exists. It cannot see the global gradient
  norm before stepping (``grad_clip`` must be 0) nor accumulate over several backward passes (``micro_batch``
  must not split a step's rows): :meth:`TrainConfig.check_world` refuses both, and DDP (its all-reduce runs
  after the hooks).
- ``step_in_backward`` with offload: every gradient is sent to the host in its hook and added to an fp32
  host buffer, then freed on the device (ZeRO-Offload's streamed gradients): no device gradient buffer either,
  any number of backward passes accumulate, and the step runs on the host after the last one, so global-norm
  clipping works (:meth:`clip_grad_norm_`).

The loop, identical for every option::

    optimizer.zero_grad(set_to_none=True)
    for micro_batch in ...:           # one or more backward passes per optimizer step
        loss.backward()               # step_in_backward: the hooks step / stream here
    norm = clip_grad_norm(optimizer, max_norm)   # the gradient norm (clipped to max_norm where it can be)
    optimizer.step()                  # offload: the host step + copy back; step_in_backward: finishes the step
    scheduler.step()

``state_dict`` / ``load_state_dict`` round-trip every option (the masters travel with the states), so a
killed run resumes exactly. CUDA copies are ``non_blocking`` through pinned memory; the host waits for the
device stream before it reads gradients or writes masters (see :meth:`LeanAdamW.step`).
"""
from __future__ import annotations

import math
import weakref
from typing import Iterable, Optional

import torch
from torch import nn

OPTIMIZER_STATES = ("fp32", "8bit")
BETAS = (0.9, 0.999)
EPS = 1e-8


def _adamw(params: list, lr: float, weight_decay: float, states: str, fused: bool) -> torch.optim.Optimizer:
    """One AdamW over ``params``: torch's (``fused`` kernel or not) for fp32 states, bitsandbytes' for 8-bit."""
    if states not in OPTIMIZER_STATES:
        raise ValueError(f"optimizer_states must be one of {OPTIMIZER_STATES}, got {states!r}")
    if states == "8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ImportError("optimizer_states='8bit' needs bitsandbytes: pip install 'lens_fast[lean]' "
                              "(or pip install 'bitsandbytes>=0.45')") from None
        return bnb.optim.AdamW8bit(params, lr=lr, betas=BETAS, eps=EPS, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, betas=BETAS, eps=EPS, weight_decay=weight_decay, fused=fused)


def build_adamw(params: Iterable[nn.Parameter], lr: float, weight_decay: float, *, states: str = "fp32",
                offload: bool = False, step_in_backward: bool = False) -> torch.optim.Optimizer:
    """AdamW (betas 0.9/0.999, eps 1e-8) over ``params`` with the memory options (see the module's docstring).
    ValueError for ``states`` other than fp32 | 8bit; ImportError naming the package when 8bit lacks bitsandbytes."""
    params = list(params)
    if not params:
        raise ValueError("build_adamw: no trainable parameters")
    if offload or step_in_backward:
        return LeanAdamW(params, lr, weight_decay, states=states, offload=offload, step_in_backward=step_in_backward)
    return _adamw(params, lr, weight_decay, states, fused=params[0].device.type == "cuda")


def clip_grad_norm(optimizer: torch.optim.Optimizer, max_norm: float) -> torch.Tensor:
    """The total 2-norm of the gradients ``optimizer`` is about to step, clipped to ``max_norm`` (``inf``: not
    clipped); :meth:`LeanAdamW.clip_grad_norm_` for a :class:`LeanAdamW`, ``torch.nn.utils.clip_grad_norm_``
    over the param groups otherwise."""
    if isinstance(optimizer, LeanAdamW):
        return optimizer.clip_grad_norm_(max_norm)
    return nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], max_norm)


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the optimizer's per-parameter states (m, v, quantisation maps and scales, step counters; each
    storage counted once), wherever they live; a :class:`LeanAdamW`'s fp32 masters are not included."""
    inners = optimizer.inner if isinstance(optimizer, LeanAdamW) else [optimizer]
    seen: dict = {}
    for inner in inners:
        for state in inner.state.values():
            for value in state.values():
                if torch.is_tensor(value):
                    seen[value.untyped_storage().data_ptr()] = value.untyped_storage().nbytes()
    return sum(seen.values())


class LeanAdamW(torch.optim.Optimizer):
    """AdamW with fp32 masters and states in host memory (``offload``) and/or each parameter's update or
    gradient transfer done during backward (``step_in_backward``); see the module's docstring.

    ``params``: the device parameters (one device; any float dtype, bf16 included). One param group: its
    ``lr`` (set by the LR scheduler) and ``weight_decay`` are read at every update.
    """

    def __init__(self, params: list, lr: float, weight_decay: float, *, states: str = "fp32", offload: bool = False,
                 step_in_backward: bool = False) -> None:
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay))
        self.params: list = self.param_groups[0]["params"]
        devices = {p.device for p in self.params}
        if len(devices) != 1:
            raise ValueError(f"LeanAdamW: the parameters must share one device, got {sorted(map(str, devices))}")
        self.device = devices.pop()
        self.offload, self.step_in_backward, self.states = offload, step_in_backward, states
        self.masters: list = []  # offload: fp32 host copies; master.grad is its host buffer once a gradient arrived
        self.host_grads: list = []  # offload: fp32 host gradient buffers (pinned for CUDA parameters)
        if offload:
            pin = self.device.type == "cuda"
            self.masters = [torch.empty(p.shape, dtype=torch.float32, pin_memory=pin).copy_(p.detach()) for p in self.params]
            self.host_grads = [torch.empty(p.shape, dtype=torch.float32, pin_memory=pin) for p in self.params]
        targets = self.masters if offload else self.params
        fused = offload or self.device.type == "cuda"  # torch's fused AdamW: CUDA, and the CPU for the host step
        groups = [[t] for t in targets] if step_in_backward and not offload else [targets]  # one AdamW per hook
        self.inner = [_adamw(group, lr, weight_decay, states, fused) for group in groups]
        self._squared_norm: Optional[torch.Tensor] = None  # step in backward without offload: sum of grad**2 so far
        self._hooks = [p.register_post_accumulate_grad_hook(_backward_hook(weakref.ref(self), i))
                       for i, p in enumerate(self.params)] if step_in_backward else []

    # ---- backward ---------------------------------------------------------------------------------------
    def _in_backward(self, index: int, param: nn.Parameter) -> None:
        """The hook of ``param``: stream its gradient to the host (offload) or step it; its gradient is freed."""
        if self.offload:
            self._to_host(index, param.grad)
        else:
            square = param.grad.detach().float().pow(2).sum()
            self._squared_norm = square if self._squared_norm is None else self._squared_norm + square
            self._sync_hyperparameters(self.inner[index])
            self.inner[index].step()
        param.grad = None

    def _to_host(self, index: int, grad: torch.Tensor) -> None:
        """Add ``grad`` (device, any float dtype) into the parameter's fp32 host buffer."""
        master, grad32 = self.masters[index], grad.detach().to(torch.float32)
        if master.grad is None:  # the step's first gradient: an asynchronous copy (waited for in step)
            master.grad = self.host_grads[index]
            master.grad.copy_(grad32, non_blocking=True)
        else:  # another backward pass: the host adds, so it waits for this copy (and the earlier ones)
            master.grad.add_(grad32.to("cpu"))

    # ---- the step ---------------------------------------------------------------------------------------
    def zero_grad(self, set_to_none: bool = True) -> None:
        """The device gradients (``set_to_none``: freed) and the host buffers' contents dropped."""
        super().zero_grad(set_to_none)
        for master in self.masters:
            master.grad = None
        self._squared_norm = None

    def _wait_for_device(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()

    def _gather_gradients(self) -> None:
        """Offload: the device gradients not yet sent (no step in backward) into the host buffers, then wait
        until every copy has landed."""
        for index, p in enumerate(self.params):
            if p.grad is not None and self.masters[index].grad is None:
                self._to_host(index, p.grad)
        self._wait_for_device()

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """The total 2-norm of this step's gradients (fp32 scalar) and, where they still exist (every option but
        step in backward without offload, whose updates are already done), the gradients scaled to ``max_norm``."""
        if self.offload:
            self._gather_gradients()
            return nn.utils.clip_grad_norm_([m for m in self.masters if m.grad is not None], max_norm)
        if self.step_in_backward:
            if math.isfinite(max_norm):
                raise ValueError("step_in_backward without optimizer_offload cannot clip by the global gradient norm "
                                 f"(each parameter is stepped before the others' gradients exist): max_norm {max_norm}, "
                                 "wanted inf (grad_clip 0)")
            return torch.zeros(()) if self._squared_norm is None else self._squared_norm.sqrt().cpu()
        return nn.utils.clip_grad_norm_(self.params, max_norm)

    def _sync_hyperparameters(self, inner: torch.optim.Optimizer) -> None:
        for group in inner.param_groups:
            group["lr"], group["weight_decay"] = self.param_groups[0]["lr"], self.param_groups[0]["weight_decay"]

    @torch.no_grad()
    def step(self, closure=None) -> None:
        """Offload: gradients to the host (unless streamed in backward), one host AdamW step of the masters that
        received a gradient, the masters copied back into the device parameters (``non_blocking``; the next
        step's wait for the device comes before the host writes a master again). Step in backward without
        offload: the updates are done in backward; the step's norm bookkeeping is reset."""
        if closure is not None:
            raise ValueError("LeanAdamW.step takes no closure")
        if not self.offload:
            self._squared_norm = None
            return
        self._gather_gradients()
        (inner,) = self.inner
        self._sync_hyperparameters(inner)
        inner.step()  # AdamW skips the masters whose grad is None
        for p, master in zip(self.params, self.masters):
            if master.grad is not None:
                # fp32 parameters take the master as it is; others get it copied over, then rounded on the device
                p.copy_(master if p.dtype == torch.float32 else master.to(p.device, non_blocking=True), non_blocking=True)
                master.grad = None

    # ---- checkpoints ------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The hyperparameters (lr, and the scheduler's ``initial_lr``), the inner AdamW state(s) and, with
        offload, the fp32 masters (they hold more than bf16 device weights)."""
        return {
            "options": {"states": self.states, "offload": self.offload, "step_in_backward": self.step_in_backward},
            "hyperparameters": {k: v for k, v in self.param_groups[0].items() if k != "params"},
            "inner": [inner.state_dict() for inner in self.inner],
            "masters": [m.detach().clone() for m in self.masters],
        }

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict) -> None:
        """Restore :meth:`state_dict`'s output; ValueError if it was written with other options or parameters."""
        options = {"states": self.states, "offload": self.offload, "step_in_backward": self.step_in_backward}
        if state_dict.get("options") != options:
            raise ValueError(f"LeanAdamW.load_state_dict: saved with options {state_dict.get('options')}, now {options}")
        if len(state_dict["inner"]) != len(self.inner) or len(state_dict["masters"]) != len(self.masters):
            raise ValueError("LeanAdamW.load_state_dict: the saved state is of another parameter list")
        self.param_groups[0].update(state_dict["hyperparameters"])
        for inner, saved in zip(self.inner, state_dict["inner"]):
            inner.load_state_dict(saved)
        for p, master, saved in zip(self.params, self.masters, state_dict["masters"]):
            master.copy_(saved)
            p.copy_(master)

    def close(self) -> None:
        """Remove the step-in-backward hooks from the parameters (before another optimizer takes them)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()


def _backward_hook(owner: weakref.ref, index: int):
    """The post-accumulate-grad hook of parameter ``index`` (a weak reference: a dropped optimizer steps nothing)."""

    def hook(param: nn.Parameter) -> None:
        optimizer = owner()
        if optimizer is not None:
            optimizer._in_backward(index, param)

    return hook
