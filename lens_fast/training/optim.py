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
- ``offload`` on FSDP2-sharded (DTensor) parameters: each process keeps the masters and states of its own
  shards (``to_local()``), receives its shards of the averaged gradients after FSDP2's reduce-scatter and
  writes the updated masters back into its shards; :meth:`LeanAdamW.clip_grad_norm_` sums the squared norm
  over every process (an all-reduce: the norm ``torch.nn.utils.clip_grad_norm_`` gives for DTensors), and
  :meth:`LeanAdamW.sharded_state_dict` is the state ``torch.distributed.checkpoint`` saves and loads at any
  process count. Step in backward is refused there (FSDP2 assigns sharded gradients after its
  reduce-scatter, past the post-accumulate-grad hooks).
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
from typing import Iterable, Optional, Sequence

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta

OPTIMIZER_STATES = ("fp32", "8bit")
BETAS = (0.9, 0.999)
EPS = 1e-8


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor (FSDP2's sharded parameters and gradients; writes reach it), a plain
    tensor as it is."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


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
    over the param groups otherwise (which cannot mix FSDP2's DTensors with the plain parameters FSDP2 left
    whole: those mixes are clipped over every process's shards as it does for DTensors). Collective under FSDP2."""
    if isinstance(optimizer, LeanAdamW):
        return optimizer.clip_grad_norm_(max_norm)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    sharded = [p for p in params if isinstance(p, DTensor)]
    if sharded and len(sharded) < len(params):  # FSDP2 with parameters left whole (a bf16 model's fp32 ones)
        grads = [(_local(p.grad), isinstance(p, DTensor)) for p in params if p.grad is not None]
        return _clip_split_grad_norm_(grads, max_norm, sharded[0].device_mesh.get_group(), params[0].device)
    return nn.utils.clip_grad_norm_(params, max_norm)


def _clip_split_grad_norm_(grads: list, max_norm: float, group, device: torch.device) -> torch.Tensor:
    """Global-norm clipping of gradients split over the processes of ``group``: ``grads`` is [(this process's
    gradient tensor, whether it is a shard of an FSDP2-sharded parameter)], all on one device; the others are
    replicated (the same on every process). The 2-norm of the whole: the shards' squared norms summed over the
    processes (an all-reduce on ``device``), the replicated ones' added once (as ``clip_grad_norm_`` computes
    it for DTensors); every gradient scaled in place to ``max_norm`` as ``clip_grad_norm_`` does. Returns the
    norm, fp32 0-dim on the CPU. Collective: every process calls it."""
    def squared(tensors: list) -> torch.Tensor:
        if not tensors:
            return torch.zeros((), device=device)
        return torch.stack([t.detach().float().pow(2).sum() for t in tensors]).sum().to(device)

    total = squared([g for g, sharded in grads if sharded])
    torch.distributed.all_reduce(total, group=group)
    norm = (total + squared([g for g, sharded in grads if not sharded])).sqrt()
    if grads:
        scale = (max_norm / (norm + 1e-6)).clamp(max=1.0).to(grads[0][0].device)
        for grad, _ in grads:
            grad.mul_(scale)
    return norm.cpu()


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the optimizer's per-parameter states (m, v, quantisation maps and scales, step counters; each
    storage counted once; of FSDP2-sharded parameters, this process's shards), wherever they live; a
    :class:`LeanAdamW`'s fp32 masters are not included."""
    inners = optimizer.inner if isinstance(optimizer, LeanAdamW) else [optimizer]
    seen: dict = {}
    for inner in inners:
        for state in inner.state.values():
            for value in state.values():
                if torch.is_tensor(value):  # (a DTensor state: this process's shard)
                    storage = _local(value).untyped_storage()
                    seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def _sharded_like(param: DTensor, local: torch.Tensor) -> DTensor:
    """``local`` (this process's shard of ``param``'s values, any dtype, on the host) as a DTensor sharded as
    ``param``, left where it is: ``DTensor.from_local`` would move it to the mesh's device (the GPU), FSDP2's own
    CPU offload builds its host DTensors this way."""
    meta = TensorMeta(param.shape, param.stride(), local.dtype)
    return DTensor(local, DTensorSpec(param.device_mesh, param.placements, tensor_meta=meta), requires_grad=False)


class LeanAdamW(torch.optim.Optimizer):
    """AdamW with fp32 masters and states in host memory (``offload``) and/or each parameter's update or
    gradient transfer done during backward (``step_in_backward``); see the module's docstring.

    ``params``: the device parameters (one device; any float dtype, bf16 included; with ``offload``, FSDP2's
    sharded DTensors and plain ones may mix). One param group: its ``lr`` (set by the LR scheduler) and
    ``weight_decay`` are read at every update.
    """

    def __init__(self, params: list, lr: float, weight_decay: float, *, states: str = "fp32", offload: bool = False,
                 step_in_backward: bool = False) -> None:
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay))
        self.params: list = self.param_groups[0]["params"]
        devices = {p.device for p in self.params}
        if len(devices) != 1:
            raise ValueError(f"LeanAdamW: the parameters must share one device, got {sorted(map(str, devices))}")
        self.device = devices.pop()
        sharded = [p for p in self.params if isinstance(p, DTensor)]
        if sharded and (step_in_backward or not offload):
            raise ValueError("LeanAdamW on FSDP2-sharded (DTensor) parameters needs offload=True and step_in_backward=False "
                             f"(FSDP2 assigns sharded gradients after its reduce-scatter), got offload={offload}, "
                             f"step_in_backward={step_in_backward}")
        # the process group whose processes hold the other shards (None: no parameter is sharded)
        self.shard_group = sharded[0].device_mesh.get_group() if sharded else None
        self.offload, self.step_in_backward, self.states = offload, step_in_backward, states
        self.masters: list = []  # offload: fp32 host copies; master.grad is its host buffer once a gradient arrived
        self.host_grads: list = []  # offload: fp32 host gradient buffers (pinned for CUDA parameters)
        if offload:
            pin = self.device.type == "cuda"
            self.masters = [torch.empty(_local(p).shape, dtype=torch.float32, pin_memory=pin).copy_(_local(p).detach())
                            for p in self.params]
            self.host_grads = [torch.empty(m.shape, dtype=torch.float32, pin_memory=pin) for m in self.masters]
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
        master, grad32 = self.masters[index], _local(grad).detach().to(torch.float32)
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
            if self.shard_group is not None:
                grads = [(m.grad, isinstance(p, DTensor)) for p, m in zip(self.params, self.masters) if m.grad is not None]
                return _clip_split_grad_norm_(grads, max_norm, self.shard_group, self.device)
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
                shard = _local(p)
                shard.copy_(master if p.dtype == torch.float32 else master.to(p.device, non_blocking=True), non_blocking=True)
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
            _local(p).copy_(master)

    def sharded_state_dict(self, names: Sequence[str]) -> dict:
        """Offload only: the state ``torch.distributed.checkpoint`` saves, and the template it loads into (see
        :meth:`load_sharded_state_dict`). ``names``: the parameters' names (the model's), in order. Returns
        ``{"hyperparameters": {name: float64 0-dim}, <name>: {"master", "exp_avg", "exp_avg_sq": fp32 (the
        parameter's shape), "step": float32 0-dim}}``; an FSDP2-sharded parameter's tensors are DTensors over
        its mesh holding this process's host shard (the masters themselves), so the checkpoint loads at any
        process count. 8-bit states are written dequantized (fp32) and quantized again on load: within one code
        (a block whose largest moment is negative comes back with a <= 0.7% smaller scale: the signed map ends at
        -0.993). A parameter without AdamW state yet (no gradient so far) has step -1 and zero moments."""
        if not self.offload:
            raise ValueError("LeanAdamW.sharded_state_dict needs offload=True (the device AdamW's state is torch's)")
        if len(names) != len(self.params):
            raise ValueError(f"LeanAdamW.sharded_state_dict: {len(names)} names for {len(self.params)} parameters")
        (inner,) = self.inner
        hyper = {k: torch.tensor(float(v), dtype=torch.float64) for k, v in self.param_groups[0].items()
                 if k in ("lr", "weight_decay", "initial_lr")}
        state: dict = {"hyperparameters": hyper}
        for name, p, master in zip(names, self.params, self.masters):
            step, exp_avg, exp_avg_sq = _fp32_moments(inner.state.get(master, {}), master)
            if isinstance(p, DTensor):
                shards = [_sharded_like(p, t) for t in (master, exp_avg, exp_avg_sq)]
            else:
                shards = [master, exp_avg, exp_avg_sq]
            state[name] = dict(zip(("master", "exp_avg", "exp_avg_sq"), shards), step=step)
        return state

    @torch.no_grad()
    def load_sharded_state_dict(self, state: dict, names: Sequence[str]) -> None:
        """Install :meth:`sharded_state_dict`'s template once ``torch.distributed.checkpoint`` has loaded into it:
        the hyperparameters, the AdamW states of the parameters whose step is >= 0 (8-bit ones quantized again)
        and the masters (loaded in place) copied into the device parameters."""
        (inner,) = self.inner
        self.param_groups[0].update({k: float(v) for k, v in state["hyperparameters"].items()})
        self._sync_hyperparameters(inner)
        for name, p, master in zip(names, self.params, self.masters):
            saved = state[name]
            if float(saved["step"]) >= 0:
                inner.state[master] = _installed_moments(inner, master, saved["step"], _local(saved["exp_avg"]),
                                                         _local(saved["exp_avg_sq"]))
            _local(p).copy_(master)

    def close(self) -> None:
        """Remove the step-in-backward hooks from the parameters (before another optimizer takes them)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()


def _fp32_moments(state: dict, master: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(step float32 0-dim, m, v fp32 like ``master``) of one AdamW state: torch's as it is, bitsandbytes' 8-bit
    moments dequantized; (-1, zeros, zeros) for no state."""
    if not state:
        return torch.tensor(-1.0), torch.zeros_like(master), torch.zeros_like(master)
    step = torch.tensor(float(state["step"]))
    if "exp_avg" in state:  # torch's AdamW
        return step, state["exp_avg"], state["exp_avg_sq"]
    if state["state1"].dtype != torch.uint8:  # bitsandbytes keeps small tensors' states in fp32
        return step, state["state1"], state["state2"]
    from bitsandbytes.functional import dequantize_blockwise

    m, v = (dequantize_blockwise(state[f"state{i}"], absmax=state[f"absmax{i}"], code=state[f"qmap{i}"], blocksize=256)
            for i in (1, 2))
    return step, m.view_as(master), v.view_as(master)


def _installed_moments(inner: torch.optim.Optimizer, master: torch.Tensor, step: torch.Tensor, exp_avg: torch.Tensor,
                       exp_avg_sq: torch.Tensor) -> dict:
    """The AdamW state of ``master`` in ``inner``'s own layout from fp32 moments (copies): torch's, or
    bitsandbytes' (its fresh state filled, 8-bit moments quantized blockwise with its maps)."""
    if isinstance(inner, torch.optim.AdamW):
        return {"step": step.to(torch.float32).clone(), "exp_avg": exp_avg.clone(), "exp_avg_sq": exp_avg_sq.clone()}
    from bitsandbytes.functional import quantize_blockwise

    inner.state[master] = {}
    index = next(i for i, p in enumerate(inner.param_groups[0]["params"]) if p is master)
    inner.init_state(inner.param_groups[0], master, 0, index)
    state = inner.state[master]
    state["step"] = int(step)
    for i, moment in ((1, exp_avg), (2, exp_avg_sq)):
        if state[f"state{i}"].dtype == torch.uint8:
            quantized, quant_state = quantize_blockwise(moment, code=state[f"qmap{i}"], blocksize=256)
            state[f"state{i}"].copy_(quantized.view_as(state[f"state{i}"]))
            state[f"absmax{i}"].copy_(quant_state.absmax)
        else:
            state[f"state{i}"].copy_(moment)
    return state


def _backward_hook(owner: weakref.ref, index: int):
    """The post-accumulate-grad hook of parameter ``index`` (a weak reference: a dropped optimizer steps nothing)."""

    def hook(param: nn.Parameter) -> None:
        optimizer = owner()
        if optimizer is not None:
            optimizer._in_backward(index, param)

    return hook
