"""``attnrewrite.distill``: from a pretrained softmax model to a model of another attention kind.

Two stages, after LoLCATs (attention transfer, then low-rank fine-tuning), for any model the pass
can rewrite and any kind:

- ``"transfer"``: the kind's per-site parameters (the states :func:`attnrewrite.convert` attaches:
  hedgehog feature maps, summary queries, hash projections, sigmoid's per-head temperature and
  bias) are trained, everything else frozen, so that each site's output matches the site's exact
  softmax output on the site's real q, k, v.  The model is compiled with the pass in a
  distillation mode: every rewritten site computes both the kind's output and the exact one from
  the same canonical call, records their mean squared error and hands the *exact* output on, so
  every site sees the inputs the original model gives it (teacher forcing).  One forward gives
  all sites' errors; their sum is minimised by one optimizer.  Teacher forcing makes each site's
  operands a function of the batch alone (the frozen model never sees the states), so when the
  data is cycled the operands of each batch's first step are kept (up to
  :data:`TRANSFER_CACHE_BYTES`) and later steps on that batch run only the sites (the kind's and the
  exact attention on the kept operands), not the model.  Before the first step, kinds with a
  warm start (:data:`WARM_STARTS`: sigmoid's per-head bias) set their states in closed form from
  the sites' operands captured on the first :data:`WARM_START_BATCHES` batches.
- ``"finetune"``: low-rank adapters on the ``nn.Linear`` modules of each module that owns a site
  (the attention projections), together with the kind's states, are trained so that the
  rewritten model's output matches the original model's: KL divergence for logits, mean squared
  error for hidden states.  The adapters are merged into the weights at the end.  The teacher's
  output for each batch is computed once and reused when the data is cycled (up to
  :data:`TEACHER_CACHE_BYTES`).

Each step's cost is the model's forward and backward (in transfer, on a batch it has kept, only the
sites'): the graph is compiled once per stage (twice when batches differ in length: Dynamo then
recompiles once with dynamic shapes), and the stages run the rewritten graph without inductor unless
``compiler`` asks for it.  On a shared CPU, one torch
thread (``torch.set_num_threads(1)``) spends far fewer CPU-seconds per step than several.

Everything happens on a copy: the model passed in is never changed (its parameters, their
``requires_grad``, its train/eval mode), whether distillation succeeds or fails.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import math
import os
import warnings
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from attnrewrite import kinds as kind_registry
from attnrewrite.ir.spec import state_name
from attnrewrite.rewriter import state as state_registry
from attnrewrite.rewriter.backend import attnrewrite_backend
from attnrewrite.rewriter.convert import convert
from attnrewrite.rewriter.options import RewriteOptions

log = logging.getLogger("attnrewrite")

STAGES = ("transfer", "finetune", "both")
LOSSES = ("auto", "kl", "mse")
#: Learning-rate schedules: ``"constant"``, or ``"cosine"`` (linear warm-up over the first
#: :data:`WARMUP_FRACTION` of the steps, then cosine decay to 0 at the last step).
SCHEDULES = ("constant", "cosine")
WARMUP_FRACTION = 0.05
#: Where finetune puts its adapters: ``"attention"`` (every ``nn.Linear`` inside the modules that own
#: a site: the attention projections) or ``"all"`` (every ``nn.Linear`` of the model).
ADAPT = ("attention", "all")
#: What finetune matches the original model on: ``"output"`` (the model's output: logits or its first
#: tensor) or ``"hidden_states"`` (the output and every hidden state the model returns when called with
#: ``output_hidden_states=True``, the transformers convention: one per layer, each matched by its mean
#: squared error relative to the original's mean square, so every layer weighs alike), or ``"pooled"``
#: (the output's loss plus 1 − the cosine of the output mean-pooled over the real tokens to the
#: original's: the sentence embedding of a sentence-transformers model, what its users compare).
MATCH = ("output", "hidden_states", "pooled")
#: What attention transfer matches at each site: ``"output"`` (mean squared error of the kind's output
#: to the exact softmax output) or ``"weights"`` (cross-entropy of the exact softmax weights to the
#: kind's attention weights, normalised over the keys; kinds whose ``weights`` is a callable only).
TRANSFER_LOSSES = ("output", "weights")
#: Default learning rates: feature maps and per-head scalars take large steps, adapters small ones.
DEFAULT_LR = {"transfer": 1e-2, "finetune": 1e-3}
#: Options that give a kind per-site parameters to transfer (a hint for the error; the kinds decide).
TRAINABLE_OPTIONS = {"sigmoid": "learned=True", "linear": "feature_map='hedgehog'", "summary": "summary='learned'",
                     "hashed": "hash='learned'"}
CHECKPOINT_FORMAT = "attnrewrite.distill/1"
#: The teacher's outputs finetune keeps to reuse when it cycles through the data again (bytes).
TEACHER_CACHE_BYTES = 1 << 30
#: The sites' operands (q, k, v, mask per call) attention transfer keeps per batch to train on them again
#: without running the model when it cycles through the data (bytes; batches beyond it run the model).
TRANSFER_CACHE_BYTES = 1 << 30
#: A stage whose loss on its first batch ends above this multiple of where it began is reported as diverged.
DIVERGED_FACTOR = 1.5


class DistillError(ValueError):
    """Distillation cannot run on this model, data or checkpoint (the message says why)."""


# --------------------------------------------------------------------------- public entry point


def distill(model: nn.Module, to: str, data: Iterable[Any], *, example_inputs: Any = None,
            steps: int | Mapping[str, int] = 100, lr: float | Mapping[str, float] | None = None,
            stage: str = "transfer", seed: int | None = None, distill_seed: int | None = None,
            save_to: str | os.PathLike | None = None, save_every: int = 50,
            rank: int = 8, loss: str = "auto", compiler: str = "eager", progress: bool = True,
            schedule: str = "cosine", adapt: str = "attention", match: str = "output",
            transfer_loss: str = "output", kind_options: Mapping[str, Any] | None = None,
            **options: Any) -> nn.Module:
    """Distil ``model`` (softmax attention) into a copy that runs attention kind ``to``; return the copy.

    Args:
        model: the pretrained model; it is not changed.
        to: the attention kind (``"sigmoid"``, ``"linear"``, ...).  ``"softmax"`` is the exact
            kind: nothing is trained and a copy is returned.
        data: batches of model inputs: tuples (positional arguments), dicts (keyword arguments)
            or single tensors.  A sequence or re-iterable collection is cycled through as often as
            ``steps`` needs; a one-shot iterator is read into a list first.
        example_inputs: inputs on which the sites are found and the states created (default: the
            first batch).
        steps: optimizer steps per stage (an int, or ``{"transfer": n, "finetune": m}``).  Transfer
            with 0 steps still applies the kind's warm start (:data:`WARM_STARTS`), if it has one.
        lr: Adam's learning rate per stage (a float, a dict like ``steps``, or None for
            :data:`DEFAULT_LR`).
        stage: ``"transfer"``, ``"finetune"`` or ``"both"`` (transfer, then finetune).
        seed: distill's own seed, for a kind without a ``seed`` option of its own: seeds everything
            random (adapter initialisation, states); with the same data the result is the same.
            Default 0.  For a kind that has one (``linear``: its random features / hedgehog directions;
            ``hashed``: its projections) ``seed=`` would name both, so it is refused: say
            ``distill_seed=`` for distill's and ``kind_options={"seed": ...}`` for the kind's.
        distill_seed: distill's own seed under a name no kind shares (for any kind; not with ``seed``).
        save_to: a checkpoint file, written every ``save_every`` steps and at the end of each
            stage; when it exists, distillation resumes from it (it must have been written by a
            call with the same kind, options, stage, seed and rank).
        rank: the adapters' rank (finetune).
        loss: finetune's output loss: ``"auto"`` (KL when the output has a ``logits`` field, mean
            squared error otherwise), ``"kl"`` (the output is logits) or ``"mse"``.  When a batch is a
            dict with an ``attention_mask`` of the output's [batch, tokens] shape, padded tokens are
            left out of the loss.
        schedule: the learning rate over each stage's steps (:data:`SCHEDULES`): ``"cosine"`` (warm-up,
            then decay to 0) or ``"constant"``.
        adapt: which ``nn.Linear`` modules finetune adapts (:data:`ADAPT`): ``"attention"`` (those of
            the modules that own a site) or ``"all"``.
        match: what finetune matches (:data:`MATCH`): ``"output"`` (the model's output, by ``loss``) or
            ``"hidden_states"``: the output and, added to its loss, the mean over every hidden state the
            model returns with ``output_hidden_states=True`` (a transformers model: the embeddings' and
            each layer's, [batch, tokens, width]) of each state's squared error divided by the original
            state's mean square (padded tokens left out as for ``loss``).  Each layer then gets its own
            signal, not only what reaches the output (TinyBERT, LoLCATs match layer by layer too).
            ``"pooled"``: the output's loss plus :func:`pooled_cosine_loss` (1 − cosine of the outputs
            averaged over the real tokens: mean-pooled sentence embeddings), for models whose use is
            that embedding.
        transfer_loss: what attention transfer matches at each site (:data:`TRANSFER_LOSSES`): ``"output"``
            (mean squared error of the kind's output to the exact one) or ``"weights"``: the cross-entropy
            −Σ_j p_ij log(w_ij / Σ_j w_ij) of the exact softmax weights p to the kind's attention weights w
            (Hedgehog's loss; sigmoid's weights do not sum to 1, so only their distribution over the keys
            is matched, not their scale).  ``"weights"`` needs a kind that can compute its weights (linear,
            sigmoid) and materialises [batch, heads, queries, keys] per site: for short sequences.
        compiler: what runs the rewritten graph while fine-tuning (``"eager"``, ``"aot_eager"``,
            ``"inductor"``); attention transfer always runs ``"eager"``.
        progress: show a tqdm progress bar with the loss.
        kind_options: the kind's options as a dict, for the backend; the way to give an option whose
            name distill takes itself (``kind_options={"seed": 3}``).
        options: the kind's other options as keywords (``feature_map="hedgehog"``, ``learned=True`` ...);
            a name given here and in ``kind_options`` is refused.

    Like :func:`attnrewrite.convert`, it resets ``torch._dynamo`` (before and after): graphs compiled
    earlier in the process are compiled again on their next call.

    Returns:
        A copy of ``model`` with the kind's states attached (compile it with the backend and the
        same ``to`` and options to run it), in eval mode.  ``attnrewrite_report`` holds the
        sites, ``attnrewrite_distill`` the loss of every step per stage.

    Raises:
        DistillError (a ValueError): no site of the model can be rewritten to ``to``; stage
            ``"transfer"`` with options that give the kind no parameters; data that does not fit
            the model; a checkpoint written for another configuration.
        FloatingPointError: a loss that is not finite (the step and stage are named).
        TypeError / ValueError: an argument of the wrong type or out of range.

    Warns:
        RuntimeWarning: a stage diverged: its loss on the first batch ended more than
            :data:`DIVERGED_FACTOR` times where it began (the returned model is likely worse).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"distill() takes an nn.Module, got {type(model).__name__}")
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}; got {stage!r}")
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}; got {loss!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}; got {schedule!r}")
    if adapt not in ADAPT:
        raise ValueError(f"adapt must be one of {ADAPT}; got {adapt!r}")
    if match not in MATCH:
        raise ValueError(f"match must be one of {MATCH}; got {match!r}")
    if transfer_loss not in TRANSFER_LOSSES:
        raise ValueError(f"transfer_loss must be one of {TRANSFER_LOSSES}; got {transfer_loss!r}")
    if transfer_loss == "weights" and to != "softmax" and not callable(kind_registry.get(to).weights):
        raise DistillError(f"transfer_loss='weights' needs attention weights, and kind {to!r} cannot compute "
                           f"them; use transfer_loss='output'")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"rank must be an int >= 1; got {rank!r}")
    if not isinstance(save_every, int) or save_every < 1:
        raise ValueError(f"save_every must be an int >= 1; got {save_every!r}")
    options = RewriteOptions.parse({"to": to, "compiler": compiler, **_kind_options(kind_options, options)})
    seed = _distill_seed(to, seed, distill_seed)
    stages = ("transfer", "finetune") if stage == "both" else (stage,)
    plan = {s: (_per_stage(steps, "steps", s, int, 0), _per_stage(lr, "lr", s, float, None) or DEFAULT_LR[s])
            for s in stages}
    batches = _batches(data)

    was_training = model.training
    try:
        model.eval()
        _check_fits(model, batches, 0)
        if match == "hidden_states" and "finetune" in stages:
            _check_hidden_states(model, batches[0])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            student = copy.deepcopy(model)
            args, kwargs = _split(example_inputs if example_inputs is not None else batches[0], "example_inputs")
            student = convert(student, to, kwargs if kwargs else args, **options.kind_options)
        report = student.attnrewrite_report
        if not report.rewritten:
            reasons = "; ".join(f"{s.module or '<model>'}: {s.reason}" for s in report.skipped) or "no attention found"
            raise DistillError(f"no attention site of the model can be rewritten to {to}, so there is nothing to "
                               f"distil ({reasons})")
        student.attnrewrite_distill = {}
        if to == "softmax":  # the exact kind: the copy already computes what the model does
            log.info("attnrewrite.distill: softmax is the exact kind, nothing to train")
            return student
        trainable = {name: p.requires_grad for name, p in student.named_parameters()}
        run = _Run(model, student, to, options, batches, seed, rank, loss, save_to, save_every, progress, stage,
                   schedule, adapt, match, transfer_loss)
        for name in stages:
            n_steps, rate = plan[name]
            if name == "transfer":
                run.transfer(n_steps, rate, required=stage == "transfer")
            else:
                run.finetune(n_steps, rate)
        student.eval()
        for name, p in student.named_parameters():  # as the model had them; the states trainable
            p.requires_grad_(trainable.get(name, True))
        return student
    finally:
        torch._dynamo.reset()  # the distillation's compiled graphs hold the copy; drop them
        model.train(was_training)


# --------------------------------------------------------------------------- the two stages


class _Run:
    """One distillation: the teacher (the user's model, only ever run without gradients), the student
    (a converted copy) and what the stages share (data, checkpoint, seed)."""

    def __init__(self, teacher, student, to, options, batches, seed, rank, loss, save_to, save_every, progress,
                 request, schedule="cosine", adapt="attention", match="output", transfer_loss="output"):
        self.teacher, self.student, self.to, self.options = teacher, student, to, options
        self.transfer_loss = transfer_loss
        self.schedule, self.adapt, self.match = schedule, adapt, match
        self.batches, self.seed, self.rank, self.loss = batches, seed, rank, loss
        self.save_to, self.save_every, self.progress, self.request = save_to, save_every, progress, request
        self.checkpoint = _load_checkpoint(save_to, self._identity()) if save_to is not None else None

    def _identity(self) -> dict[str, Any]:
        return {"to": self.to, "kind_options": dict(self.options.kind_options), "stage": self.request,
                "seed": self.seed, "rank": self.rank, "schedule": self.schedule, "adapt": self.adapt,
                "match": self.match,
                # only when not the default: checkpoints written before the option existed still resume
                **({"transfer_loss": self.transfer_loss} if self.transfer_loss != "output" else {})}

    # ---- transfer

    def transfer(self, steps: int, lr: float, required: bool) -> None:
        states = state_registry.states(self.student, self.to)
        params = {name: p for name, p in self.student.named_parameters()
                  if any(name.startswith(prefix + ".") for prefix in states)}
        if not params:
            hint = TRAINABLE_OPTIONS.get(self.to)
            what = (f"{self.to} with options {self.options.kind_options} has no per-site parameters, so attention "
                    f"transfer has nothing to train" + (f" (give {hint} for learned ones)" if hint else ""))
            if required:
                raise DistillError(what + "; use stage='finetune' to fine-tune the model itself")
            warnings.warn(f"attnrewrite.distill: {what}; stage 'transfer' skipped", stacklevel=4)
            return
        if self.checkpoint is not None and self.checkpoint["phase"] == "finetune":
            return  # transfer finished before the checkpoint was written: finetune restores its result
        recorder = _Recorder(self.transfer_loss)
        backend = functools.partial(attnrewrite_backend, _tap=recorder.tap,
                                    options={"to": self.to, "compiler": "eager", **self.options.kind_options})
        torch._dynamo.reset()
        compiled = torch.compile(self.student, backend=backend)

        kind, kind_options = kind_registry.get(self.to), self.options.kind_options
        # batch slot -> (the batch's tensors and their versions when kept, its sites' operands in call order)
        cache: dict[int, tuple[tuple, list[_SiteOperands]]] = {}
        cached_bytes = 0
        reused = steps > len(self.batches)

        def step_loss(index: int, batch: Any) -> torch.Tensor:
            nonlocal cached_bytes
            slot = index % len(self.batches)
            args, kwargs = _split(batch, f"batch {index}")
            seen = _versions(batch, args, kwargs)
            kept = cache.get(slot)
            recorder.start()
            if kept is not None and _same_versions(kept[0], seen):  # the sites alone, on the operands the model
                for op in kept[1]:                                   # gave them at this very batch
                    op.replay(recorder, kind, kind_options, states)
            else:
                capture = kept is None and reused and cached_bytes < TRANSFER_CACHE_BYTES
                recorder.operands = _Capture(self.to, states) if capture else None
                try:
                    compiled(*args, **kwargs)
                    captured = recorder.operands
                finally:
                    recorder.operands = None
                if (captured is not None and captured.complete and captured.calls
                        and cached_bytes + captured.nbytes <= TRANSFER_CACHE_BYTES):
                    cache[slot] = (seen, captured.calls)
                    cached_bytes += captured.nbytes
            errors = recorder.stop()
            if not errors:
                raise DistillError("no rewritten site ran during attention transfer (is the attention outside the "
                                   "graphs torch.compile captures?)")
            return torch.stack([torch.stack(e).mean() for e in errors.values()]).sum()

        resuming = self.checkpoint is not None and self.checkpoint["phase"] == "transfer"
        if not resuming:  # a checkpoint restores the states the warm start began
            self._warm_start(compiled, recorder, states, params)
        self._train("transfer", params, steps, lr, step_loss)

    def _warm_start(self, compiled, recorder: _Recorder, states: Mapping[str, nn.Module],
                    params: Mapping[str, nn.Parameter]) -> None:
        """The kind's closed-form start of its states (:data:`WARM_STARTS`), fitted on the sites' real
        operands in the first :data:`WARM_START_BATCHES` batches, before any gradient step."""
        fit = WARM_STARTS.get(self.to)
        if fit is None:
            return
        for p in self.student.parameters():  # as training will have them: the same compiled graph serves both
            p.requires_grad_(False)
        for p in params.values():
            p.requires_grad_(True)
        recorder.captured = {}
        try:
            for index in range(min(WARM_START_BATCHES, len(self.batches))):
                args, kwargs = _split(self.batches[index], f"batch {index}")
                recorder.start()
                compiled(*args, **kwargs)
                recorder.stop()
            captured = recorder.captured
        finally:
            recorder.captured = None
        for calls in captured.values():
            first = calls[0]
            state = states.get(_state_key(self.to, first.module_path, first.ordinal))
            if state is None or first.score_mod:
                continue
            with torch.no_grad():
                fit(state, calls, self.options.kind_options)
        log.info("attnrewrite.distill: warm start of %d %s sites from %d batches", len(captured), self.to,
                 min(WARM_START_BATCHES, len(self.batches)))

    # ---- finetune

    def finetune(self, steps: int, lr: float) -> None:
        owners = [s.module for s in self.student.attnrewrite_report.rewritten] if self.adapt == "attention" else [""]
        adapters = add_adapters(self.student, owners, self.rank, self.seed)
        states = state_registry.states(self.student, self.to)
        params = {name: p for name, p in self.student.named_parameters()
                  if name.endswith((".down", ".up")) and name.rsplit(".", 1)[0] in adapters
                  or any(name.startswith(prefix + ".") for prefix in states)}
        backend = functools.partial(attnrewrite_backend,
                                    options={"to": self.to, "compiler": self.options.compiler,
                                             **self.options.kind_options})
        torch._dynamo.reset()
        compiled = torch.compile(self.student, backend=backend)

        layers = self.match == "hidden_states"
        extra = {"output_hidden_states": True} if layers else {}
        targets: dict[int, tuple[torch.Tensor, ...]] = {}  # the teacher's output per batch, while it fits the cache
        reused = steps > len(self.batches)

        def step_loss(index: int, batch: Any) -> torch.Tensor:
            args, kwargs = _split(batch, f"batch {index}")
            slot = index % len(self.batches)
            target = targets.get(slot)
            if target is None:
                with torch.no_grad():
                    out = _run_teacher(self.teacher, args, {**kwargs, **extra}, index)
                    target = tuple(t.detach() for t in (output_tensor(out)[0], *(hidden_states(out) if layers else ())))
                cached = sum(t.numel() * t.element_size() for ts in targets.values() for t in ts)
                if reused and cached + sum(t.numel() * t.element_size() for t in target) <= TEACHER_CACHE_BYTES:
                    targets[slot] = target
            out = compiled(*args, **kwargs, **extra)
            mask = kwargs.get("attention_mask")
            value = output_loss(out, target[0], self.loss, mask)
            if layers:
                value = value + hidden_state_loss(hidden_states(out), target[1:], mask)
            if self.match == "pooled":
                value = value + pooled_cosine_loss(output_tensor(out)[0], target[0], mask)
            return value

        try:
            self._train("finetune", params, steps, lr, step_loss)
        finally:
            merge_adapters(self.student)

    # ---- the loop both share

    def _train(self, phase: str, params: dict[str, nn.Parameter], steps: int, lr: float, step_loss) -> None:
        from tqdm.auto import tqdm

        for p in self.student.parameters():
            p.requires_grad_(False)
        for p in params.values():
            p.requires_grad_(True)
        optimizer = torch.optim.Adam(params.values(), lr=lr)
        start = 0
        if self.checkpoint is not None and self.checkpoint["phase"] == phase:
            start = _restore(self.checkpoint, params, optimizer)
        history = self.student.attnrewrite_distill.setdefault(phase, [])
        self.student.eval()
        bar = tqdm(total=steps, initial=min(start, steps), desc=f"distill {phase} → {self.to}",
                   disable=not self.progress, leave=False)
        try:
            for index in range(start, steps):
                for group in optimizer.param_groups:
                    group["lr"] = lr * learning_rate_factor(self.schedule, index, steps)
                value = step_loss(index, self.batches[index % len(self.batches)])
                if not torch.isfinite(value):
                    raise FloatingPointError(f"the {phase} loss is {value.item()} at step {index} (batch "
                                             f"{index % len(self.batches)}); lower the learning rate ({lr:g})")
                optimizer.zero_grad(set_to_none=True)
                value.backward()
                optimizer.step()
                history.append(value.item())
                bar.update(1)
                bar.set_postfix(loss=f"{value.item():.3g}")
                if self.save_to is not None and ((index + 1) % self.save_every == 0 or index + 1 == steps):
                    self._save(phase, index + 1, params, optimizer)
        finally:
            bar.close()
        if start == 0 and steps > 0:
            self._check_not_diverged(phase, history[-steps], step_loss, steps, lr)

    def _check_not_diverged(self, phase: str, before: float, step_loss, steps: int, lr: float) -> None:
        """Warn when the stage left the loss on its first batch far above where it began.

        A learning rate too large for the model can wreck it without a single non-finite loss (MiniLM
        fine-tuned at 1e-2 with rank-32 adapters on every linear ends at a mean embedding cosine of 0.10,
        bench/RESULTS.md); the loss on batch 0 before the first step and after the last is the same
        measurement on the same batch, so a rise is the stage's doing, not the batches'.
        """
        after = step_loss(0, self.batches[0]).item()
        if after > DIVERGED_FACTOR * before and after - before > 1e-6:
            warnings.warn(f"attnrewrite.distill: the {phase} loss on the first batch rose from {before:.4g} before the "
                          f"stage to {after:.4g} after its {steps} steps at lr {lr:g}: training diverged and the "
                          f"returned model is likely worse than the one it started from; lower the learning rate "
                          f"(or the adapters' rank, or use adapt='attention')", RuntimeWarning, stacklevel=5)

    def _save(self, phase: str, step: int, params: dict[str, nn.Parameter], optimizer) -> None:
        record = {"format": CHECKPOINT_FORMAT, **self._identity(), "phase": phase, "step": step,
                  "tensors": {name: p.detach().clone() for name, p in params.items()},
                  "optimizer": optimizer.state_dict()}
        tmp = f"{os.fspath(self.save_to)}.tmp"
        torch.save(record, tmp)
        os.replace(tmp, self.save_to)  # never a half-written checkpoint
        self.checkpoint = None  # what follows in this run is the run's own


def learning_rate_factor(schedule: str, step: int, steps: int) -> float:
    """The factor of the learning rate at ``step`` (0-based) of ``steps``: 1 for ``"constant"``; for
    ``"cosine"`` a linear warm-up over the first :data:`WARMUP_FRACTION` of the steps, then a cosine
    decay that reaches 0 after the last step."""
    if schedule == "constant":
        return 1.0
    warmup = int(WARMUP_FRACTION * steps)
    if step < warmup:
        return (step + 1) / (warmup + 1)
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


# --------------------------------------------------------------------------- the transfer tap


class _Recorder:
    """What the sites report during attention transfer: site name -> the errors of its calls (the squared
    error of the outputs, or with ``transfer_loss="weights"`` the cross-entropy of the weights)."""

    def __init__(self, transfer_loss: str = "output"):
        self.transfer_loss = transfer_loss
        self.errors: dict[str, list[torch.Tensor]] | None = None
        self.captured: dict[str, list[SiteCall]] | None = None  # set while the warm start captures
        self.operands: _Capture | None = None  # set while transfer keeps a batch's operands to replay

    def start(self) -> None:
        self.errors = {}

    def stop(self) -> dict[str, list[torch.Tensor]]:
        errors, self.errors = self.errors or {}, None
        return errors

    def record(self, name: str, student: torch.Tensor, teacher: torch.Tensor) -> None:
        """``student``, ``teacher``: the outputs, or (``transfer_loss="weights"``) the kind's and the exact weights."""
        if self.errors is None:
            return
        if self.transfer_loss == "weights":
            error = weights_cross_entropy(student, teacher)
        else:
            error = (student.float() - teacher.detach().float()).square().mean()
        self.errors.setdefault(name, []).append(error)

    def tap(self, gm, site, emit, call, kind_weights=None):
        """The pass's tap (see ``run_pass``): the kind's output and the exact output of one canonical
        call, compared by a module that records their error and returns the exact output.  The
        module also gets the call's scaled q, k, v and mask, for the warm start's statistics."""
        from attnrewrite.kinds.softmax import exact_attention

        student, teacher = emit(call), exact_attention(call)
        name = f"attnrewrite_tap_{sum(1 for n in gm._modules if n.startswith('attnrewrite_tap_'))}"
        site_name = site.module_path + (f"[{site.ordinal}]" if site.ordinal else "")
        statics = {"scale": call.scale, "is_causal": call.is_causal, "enable_gqa": call.enable_gqa,
                   "bool_mask": call.bool_mask, "score_mod": call.score_mod is not None,
                   "module_path": site.module_path, "ordinal": site.ordinal}
        # what replaying the site outside the graph needs besides q, k, v and the mask: the call's other
        # fields, when they are all static (no score modification, position term, sink or tensor q factor)
        static = (call.score_mod is None and call.position_slopes is None and call.sink_logits is None
                  and call.q_factor is None and isinstance(call.dropout_p, (int, float))
                  and (call.scale is None or isinstance(call.scale, (int, float))))
        template = dataclasses.replace(call, q=None, k=None, v=None, attn_mask=None) if static else None
        gm.add_submodule(name, _SiteError(self, site_name, statics, template))
        operands = (call.scaled_q(), call.k, call.v, call.attn_mask, call.q)
        if self.transfer_loss == "weights":
            operands += (kind_weights(call), exact_weights(call))
        return student.tracer.create_proxy("call_module", name, (student, teacher, *operands), {})


class _SiteError(nn.Module):
    """``forward(student, teacher, q, k, v, mask)``: records the site's error (and, while the recorder
    captures, the site's operands), returns ``teacher``.  Fake tensors (the pass propagating shapes)
    are not recorded."""

    def __init__(self, recorder: _Recorder, site: str, statics: dict[str, Any], template: Any = None):
        super().__init__()
        object.__setattr__(self, "recorder", recorder)  # not a submodule: nothing of it is in the graph
        self.site, self.statics = site, statics
        self.template = template  # the call without its tensors (None: the site cannot be replayed)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, q=None, k=None, v=None, mask=None,
                raw_q=None, student_weights=None, teacher_weights=None) -> torch.Tensor:
        from torch._subclasses.fake_tensor import is_fake

        if not is_fake(teacher):
            if student_weights is not None:
                self.recorder.record(self.site, student_weights, teacher_weights)
            else:
                self.recorder.record(self.site, student, teacher)
            if self.recorder.captured is not None and q is not None:
                self.recorder.captured.setdefault(self.site, []).append(
                    SiteCall(*(None if t is None else t.detach() for t in (q, k, v, mask)), **self.statics,
                             raw_q=None if raw_q is None else raw_q.detach()))
            if self.recorder.operands is not None:
                self.recorder.operands.add(self, raw_q, k, v, mask)
        return teacher


def exact_weights(call: Any) -> torch.Tensor:
    """The exact attention weights of ``call`` (an ``AttentionCall``) [B, H, Tq, Tk]: its exact attention with the
    identity as values, so masks, causality, scale and GQA are the exact op's own."""
    from attnrewrite.kinds.softmax import exact_attention

    identity = torch.ones_like(call.k[..., 0]).diag_embed()  # [B, Hkv, Tk, Tk]
    return exact_attention(dataclasses.replace(call, v=identity))


def _state_key(to: str, module_path: str, ordinal: int) -> str:
    """The qualified name of a site's state in the student (the keys of ``state_registry.states``)."""
    name = state_name(to, ordinal)
    return f"{module_path}.{name}" if module_path else name


def _versions(batch: Any, args: tuple, kwargs: dict) -> tuple:
    """What identifies a batch while transfer runs: the batch object and each of its tensors with the tensor's
    version counter (an in-place write into a tensor of the batch changes it)."""
    tensors = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]
    return (batch, *((t, t._version) for t in tensors))


def _same_versions(kept: tuple, seen: tuple) -> bool:
    """Whether ``seen`` is the batch ``kept`` was taken from, unchanged (the same objects, no write since)."""
    return (len(kept) == len(seen) and kept[0] is seen[0]
            and all(a[0] is b[0] and a[1] == b[1] for a, b in zip(kept[1:], seen[1:])))


class _Capture:
    """The operands of every site call of one forward, kept to replay the sites without the model.
    ``complete`` is False when a call cannot be replayed (its site has no static template or no state):
    then the batch is not kept.  Tensors are copied (once each: a mask shared by every site stays one
    tensor), so no later write of the model into its buffers reaches them."""

    def __init__(self, to: str, states: Mapping[str, nn.Module]):
        self.to, self.states = to, states
        self.calls: list[_SiteOperands] = []
        self.complete = True
        self.nbytes = 0
        self._copies: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id -> (original, copy): the
        # original is held so that no other tensor takes its id during the forward

    def _copy(self, t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        kept = self._copies.get(id(t))
        if kept is None:
            kept = (t, t.detach().clone())
            self._copies[id(t)] = kept
            self.nbytes += kept[1].numel() * kept[1].element_size()
        return kept[1]

    def add(self, site: _SiteError, q, k, v, mask) -> None:
        statics = site.statics
        key = _state_key(self.to, statics["module_path"], statics["ordinal"])
        if site.template is None or q is None or key not in self.states:
            self.complete = False
            return
        call = dataclasses.replace(site.template, q=self._copy(q), k=self._copy(k), v=self._copy(v),
                                   attn_mask=self._copy(mask))
        self.calls.append(_SiteOperands(site.site, key, call))


@dataclass
class _SiteOperands:
    """One kept call of a site: its name (the error's key), its state's name and the call on real tensors."""

    site: str
    state: str
    call: Any  # AttentionCall

    def replay(self, recorder: _Recorder, kind, options: Mapping[str, Any], states: Mapping[str, nn.Module]) -> None:
        """Record the site's error as the tap's module would: the kind's output (or weights) and the exact one
        on the kept operands."""
        from attnrewrite.kinds.softmax import exact_attention

        call, state = self.call, states[self.state]
        if recorder.transfer_loss == "weights":
            recorder.record(self.site, kind.weights(call, options, state), exact_weights(call))
        else:
            recorder.record(self.site, kind.emit(call, options, state), exact_attention(call))


# --------------------------------------------------------------------------- the warm start

#: How many batches (the first ones of ``data``) the warm start captures the sites' operands from.
WARM_START_BATCHES = 4


@dataclass
class SiteCall:
    """One call of a site as attention transfer saw it: the canonical operands (q already scaled by
    the site's factor; a ``None`` mask when the site has none) and the call's static flags."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    mask: torch.Tensor | None
    scale: float | None
    is_causal: bool
    enable_gqa: bool
    bool_mask: bool
    score_mod: bool
    module_path: str
    ordinal: int
    raw_q: torch.Tensor | None = None  #: q before the site's factor (what a linear kind's feature map sees)

    def scores(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(scale·q·kᵀ + additive mask in float32, keep, counted), each [B, Hq, Tq, Tk]: ``keep`` the
        keys a query attends to, ``counted`` those sigmoid's ``bias="auto"`` counts (an additive
        mask's −inf and lowest entries excluded, the op's rule)."""
        q, k = self.q.float(), self.k.float()
        if self.enable_gqa and k.shape[-3] != q.shape[-3]:
            k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
        scale = self.scale if self.scale is not None else q.shape[-1] ** -0.5
        scores = (q @ k.transpose(-2, -1)) * scale
        keep = torch.ones_like(scores, dtype=torch.bool)
        counted = keep
        if self.mask is not None:
            if self.bool_mask or self.mask.dtype == torch.bool:
                keep = keep & self.mask
                counted = keep
            else:
                scores = scores + self.mask.float()
                lowest = torch.finfo(self.mask.dtype).min
                counted = keep & (self.mask != float("-inf")) & (self.mask != lowest)
        if self.is_causal:
            keep = keep & torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).tril()
            counted = counted & keep
        return scores, keep, counted


def _warm_start_sigmoid(state: nn.Module, calls: Sequence[SiteCall], options: Mapping[str, Any]) -> None:
    """Per-head bias of sigmoid's learned state, in closed form, temperature 1.

    The kind computes sigmoid(t_h·s_ij + b_i + β_h) with b_i = −log n_i (``bias="auto"``, n_i the
    keys query i sees) or the fixed ``bias``; softmax computes exp(s_ij − lse_i), lse_i the row's
    log-sum-exp.  Where the argument is well below 0, sigmoid(x) ≈ exp(x), so with t_h = 1 the two
    agree for β_h = −b_i − lse_i.  One β per head: the mean of −b_i − lse_i over the captured rows of
    that head (rows that see no key left out).
    """
    heads = state.bias.shape[0]
    total = torch.zeros(heads, dtype=torch.float64)
    count = torch.zeros(heads, dtype=torch.float64)
    for call in calls:
        scores, keep, counted = call.scores()
        lse = scores.masked_fill(~keep, float("-inf")).logsumexp(dim=-1)  # [B, H, T]
        if options.get("bias", "auto") == "auto":
            b = -counted.sum(dim=-1).clamp(min=1).float().log()
        else:
            b = torch.full_like(lse, float(options["bias"]))
        valid = keep.any(dim=-1) & torch.isfinite(lse)
        target = torch.where(valid, -b - lse, torch.zeros_like(lse)).double()
        total += target.sum(dim=(0, 2)).cpu()
        count += valid.sum(dim=(0, 2)).double().cpu()
    if not bool((count > 0).all()):
        return  # a head that saw no key in the captured calls: nothing to fit it on
    state.log_temperature.zero_()
    state.bias.copy_((total / count).to(state.bias))


#: The scales the hedgehog warm start tries for each head's feature map (W = c·I).
HEDGEHOG_SCALES = (0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5)


def _warm_start_linear(state: nn.Module, calls: Sequence[SiteCall], options: Mapping[str, Any]) -> None:
    """Hedgehog feature maps W = c_h·W0 (both q's and k's map; W0 their initial weight: the identity,
    with seeded unit directions beyond the head dim when ``features`` asks for more), c_h per key/value
    head picked from :data:`HEDGEHOG_SCALES` as the one whose linear attention output is closest
    (squared error) to the exact softmax output on the captured calls.  W0 suits no particular scale
    of q and k; this picks the sharpness that fits the site.  Other feature maps have nothing to fit.

    With the key gate (``key_gate``: keys' features times exp(k·u_h)) each head also picks u_h from
    {0, s·q̄_h} jointly with c_h: q̄_h the mean of the head's (group's) captured queries, s the site's scale.
    Softmax weighs key j for query i by exp(s·q_i·k_j) = exp(s·q̄·k_j)·exp(s·(q_i − q̄)·k_j): the first factor
    is one per key, what the gate is for (the keys every query attends to, BERT's [CLS]/[SEP]), so the
    feature maps are left the part that varies with the query.  u = 0 (no gate) stays a candidate, so the
    start is never worse on the captured calls than without this."""
    from attnrewrite.kernels.linear.stateful_maps import HedgehogFeatureMap

    q_map, k_map = getattr(state, "q_map", None), getattr(state, "k_map", None)
    if not (isinstance(q_map, HedgehogFeatureMap) and isinstance(k_map, HedgehogFeatureMap)):
        return
    heads_q, heads_kv = q_map.weight.shape[0], k_map.weight.shape[0]
    if heads_q % heads_kv:
        return
    groups = heads_q // heads_kv
    q_init, k_init = q_map.weight.detach().float().clone(), k_map.weight.detach().float().clone()  # [H, D, F]
    gated = k_map.gate is not None
    gates = [torch.zeros(heads_kv, k_init.shape[1])]  # u per key/value head [Hkv, D]: 0, then s·q̄ with the gate
    if gated:
        total = torch.zeros(heads_q, k_init.shape[1], dtype=torch.float64)
        count = 0
        for call in calls:
            q = call.q.float()
            scale = call.scale if call.scale is not None else q.shape[-1] ** -0.5
            total += (scale * q).sum(dim=(0, 2)).double().cpu()
            count += q.shape[0] * q.shape[2]
        gates.append((total / max(count, 1)).view(heads_kv, groups, -1).mean(1).float())
    errors = torch.zeros(len(gates), len(HEDGEHOG_SCALES), heads_kv, dtype=torch.float64)

    def features(x: torch.Tensor, init: torch.Tensor, c: float) -> torch.Tensor:
        z = c * torch.einsum("bhtd,hde->bhte", x, init.to(x.device))
        return torch.softmax(torch.cat([z, -z], dim=-1), dim=-1)

    for call in calls:
        q = (call.raw_q if call.raw_q is not None else call.q).float()
        if options.get("use_scale"):
            q = q * (call.scale if call.scale is not None else q.shape[-1] ** -0.5)
        k, v = call.k.float(), call.v.float()
        if call.enable_gqa and k.shape[-3] != q.shape[-3]:
            k, v = (t.repeat_interleave(q.shape[-3] // t.shape[-3], dim=-3) for t in (k, v))
        k_init_q = k_init.repeat_interleave(q.shape[-3] // k_init.shape[0], dim=0)  # per query head
        scores, keep, counted = call.scores()
        exact = torch.nan_to_num(scores.masked_fill(~keep, float("-inf")).softmax(-1)) @ v
        for g, u in enumerate(gates):
            # the gate sees the keys as the kind's map does: per key/value head (k before any repeat)
            factor = torch.einsum("bhtd,hd->bht", call.k.float(), u.to(k.device))
            factor = factor.clamp(-k_map.GATE_LIMIT, k_map.GATE_LIMIT).exp()
            factor = factor.repeat_interleave(q.shape[-3] // factor.shape[-2], dim=-2)[..., None, :]  # [B, Hq, 1, Tk]
            for i, c in enumerate(HEDGEHOG_SCALES):
                w = (features(q, q_init, c) @ features(k, k_init_q, c).transpose(-2, -1)) * factor * counted
                out = (w @ v) / (w.sum(-1, keepdim=True) + options.get("eps", 1e-6))
                per_head = (out - exact).square().mean(dim=(0, 2, 3)).double().cpu()  # [Hq]
                errors[g, i] += per_head.view(heads_kv, groups).sum(-1)
    flat = errors.flatten(0, 1).argmin(0)  # [Hkv]: the best (gate, scale) pair per head
    chosen, best = flat // len(HEDGEHOG_SCALES), torch.tensor(HEDGEHOG_SCALES, dtype=torch.float64)[flat % len(HEDGEHOG_SCALES)]
    k_map.weight.copy_((best[:, None, None] * k_init.double()).to(k_map.weight))
    q_map.weight.copy_((best.repeat_interleave(groups)[:, None, None] * q_init.double()).to(q_map.weight))
    if gated:
        k_map.gate.copy_(torch.stack([gates[int(g)][h] for h, g in enumerate(chosen)]).to(k_map.gate))


#: Kinds whose states have a warm start: ``fit(state, calls, kind_options)``, in place, no gradients.
WARM_STARTS = {"sigmoid": _warm_start_sigmoid, "linear": _warm_start_linear}


def weights_cross_entropy(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """−Σ_j p_ij log(w_ij / Σ_j w_ij), averaged over the rows: ``teacher`` p the exact softmax weights,
    ``student`` w the kind's (not necessarily summing to 1 over the keys); rows without a key count 0."""
    p = teacher.detach().float().nan_to_num(0.0)
    w = student.float().clamp_min(0.0)
    w = w / w.sum(-1, keepdim=True).clamp_min(1e-12)
    return -(p * w.clamp_min(1e-12).log()).sum(-1).mean()


def site_errors(model: nn.Module, to: str, batch: Any, transfer_loss: str = "output",
                **kind_options: Any) -> dict[str, float]:
    """Each rewritten site's mean squared error between the kind's output and the exact softmax
    output, on ``batch`` (the site's real q, k, v, as attention transfer sees them); with
    ``transfer_loss="weights"`` the cross-entropy of the exact weights to the kind's
    (:func:`weights_cross_entropy`).  ``model`` must be converted for ``to`` when the kind has states."""
    recorder = _Recorder(transfer_loss)
    backend = functools.partial(attnrewrite_backend, _tap=recorder.tap,
                                options={"to": to, "compiler": "eager", **kind_options})
    args, kwargs = _split(batch, "batch")
    torch._dynamo.reset()
    try:
        recorder.start()
        with torch.no_grad():
            torch.compile(model, backend=backend)(*args, **kwargs)
        return {name: torch.stack(e).mean().item() for name, e in recorder.stop().items()}
    finally:
        torch._dynamo.reset()


# --------------------------------------------------------------------------- low-rank adapters


class LowRankAdapter(nn.Module):
    """``base(x) + x·downᵀ·upᵀ`` for an ``nn.Linear`` base; ``up`` starts at zero, so the adapter
    starts as the base layer.  ``down`` [rank, in], ``up`` [out, rank]."""

    def __init__(self, base: nn.Linear, rank: int, generator: torch.Generator):
        super().__init__()
        self.base = base
        w = base.weight
        down = torch.randn(rank, base.in_features, generator=generator) / math.sqrt(base.in_features)
        self.down = nn.Parameter(down.to(device=w.device, dtype=w.dtype))
        self.up = nn.Parameter(torch.zeros(base.out_features, rank, device=w.device, dtype=w.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + F.linear(F.linear(x, self.down), self.up)

    def merged(self) -> nn.Linear:
        """The base layer with the adapter added into its weight."""
        with torch.no_grad():
            self.base.weight += self.up @ self.down
        return self.base


def add_adapters(model: nn.Module, owners: Sequence[str], rank: int, seed: int) -> dict[str, LowRankAdapter]:
    """Wrap every ``nn.Linear`` inside the modules ``owners`` (the modules that own attention sites)
    in a :class:`LowRankAdapter`, in place; return the adapters by qualified name.  Each adapter's
    initialisation is seeded from ``seed`` and its name."""
    adapters: dict[str, LowRankAdapter] = {}
    for owner_path in dict.fromkeys(owners):
        owner = model.get_submodule(owner_path) if owner_path else model
        for name, module in list(owner.named_modules()):
            if not isinstance(module, nn.Linear) or state_registry.is_state_name(name):
                continue
            full = f"{owner_path}.{name}" if owner_path else name
            if full in adapters:
                continue
            generator = torch.Generator().manual_seed(seed ^ zlib.crc32(full.encode()))
            parent, _, attr = full.rpartition(".")
            adapter = LowRankAdapter(module, rank, generator)
            setattr(model.get_submodule(parent) if parent else model, attr, adapter)
            adapters[full] = adapter
    if not adapters:
        raise DistillError(f"no nn.Linear inside the modules that own the attention sites ({', '.join(owners)}): "
                           f"finetune has no attention projections to adapt")
    return adapters


def merge_adapters(model: nn.Module) -> None:
    """Replace every :class:`LowRankAdapter` in ``model`` by its base layer with the adapter merged in."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LowRankAdapter):
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, module.merged())


# --------------------------------------------------------------------------- outputs and losses


def output_tensor(out: Any) -> tuple[torch.Tensor, bool]:
    """The tensor a model's output is compared by, and whether it is logits: the ``logits`` field
    of a mapping (HF outputs), else its first tensor (``last_hidden_state``); a tuple's first tensor."""
    if isinstance(out, torch.Tensor):
        return out, False
    if isinstance(out, Mapping):
        if isinstance(out.get("logits"), torch.Tensor):
            return out["logits"], True
        values = list(out.values())
    elif isinstance(out, (tuple, list)):
        values = list(out)
    else:
        raise DistillError(f"the model returns a {type(out).__name__}: finetune needs a tensor, a tuple or a "
                           f"mapping of tensors to compare")
    for value in values:
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return value, False
    raise DistillError(f"the model's output ({type(out).__name__}) holds no floating-point tensor to compare")


def output_loss(student_out: Any, teacher_out: Any, loss: str = "auto",
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """KL(teacher ‖ student) over the last dimension for logits, mean squared error otherwise.  With
    an ``attention_mask`` of the output's [batch, tokens] shape (HF's: nonzero = a real token), only
    the real tokens count."""
    student, is_logits = output_tensor(student_out)
    teacher, _ = output_tensor(teacher_out)
    if student.shape != teacher.shape:
        raise DistillError(f"the rewritten model's output has shape {tuple(student.shape)}, the original's "
                           f"{tuple(teacher.shape)}")
    keep = None
    if (isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2 and student.dim() >= 3
            and tuple(attention_mask.shape) == tuple(student.shape[:2])):
        keep = attention_mask.to(device=student.device) != 0
    if keep is not None and not bool(keep.all()):
        student, teacher = student[keep], teacher[keep]  # [tokens, ...]: the real tokens only
    if loss == "kl" or loss == "auto" and is_logits:
        s = F.log_softmax(student.float().flatten(0, -2), dim=-1)
        t = F.log_softmax(teacher.float().flatten(0, -2), dim=-1)
        return F.kl_div(s, t, log_target=True, reduction="batchmean")
    return F.mse_loss(student.float(), teacher.float())


def pooled_cosine_loss(student: torch.Tensor, teacher: torch.Tensor,
                       attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """1 − cosine of the mean over tokens of ``student`` and ``teacher`` ([batch, tokens, width]),
    averaged over the batch: the loss of mean-pooled sentence embeddings.  With an ``attention_mask``
    of the [batch, tokens] shape only real tokens are averaged."""
    if student.shape != teacher.shape or student.dim() != 3:
        raise DistillError(f"match='pooled' needs outputs of shape [batch, tokens, width], one shape for both; got "
                           f"{tuple(student.shape)} and {tuple(teacher.shape)}")
    weight = torch.ones(student.shape[:2], device=student.device)
    if (isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2
            and tuple(attention_mask.shape) == tuple(student.shape[:2])):
        weight = (attention_mask.to(device=student.device) != 0).float()
    weight = (weight / weight.sum(-1, keepdim=True).clamp(min=1.0)).unsqueeze(-1)
    pooled_s = (student.float() * weight).sum(1)
    pooled_t = (teacher.detach().float() * weight).sum(1)
    return (1.0 - F.cosine_similarity(pooled_s, pooled_t, dim=-1)).mean()


def hidden_states(out: Any) -> tuple[torch.Tensor, ...]:
    """The ``hidden_states`` a model returned (transformers' ``output_hidden_states=True``): a tuple of
    tensors, one per layer (and the embeddings)."""
    states = out.get("hidden_states") if isinstance(out, Mapping) else getattr(out, "hidden_states", None)
    if not isinstance(states, (tuple, list)) or not states or not all(isinstance(t, torch.Tensor) for t in states):
        raise DistillError(f"match='hidden_states' needs the model to return its hidden states when called with "
                           f"output_hidden_states=True (as transformers models do); its {type(out).__name__} output "
                           f"holds {type(states).__name__} there")
    return tuple(states)


def hidden_state_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor],
                      attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The mean over layers of each hidden state's squared error divided by the teacher's mean square of
    that state (so a layer with a large residual stream weighs no more than one with a small one).  Each
    state is [batch, tokens, ...]; with an ``attention_mask`` of that [batch, tokens] shape only real
    tokens count."""
    if len(student) != len(teacher):
        raise DistillError(f"the rewritten model returns {len(student)} hidden states, the original {len(teacher)}")
    losses = []
    for layer, (s, t) in enumerate(zip(student, teacher)):
        if s.shape != t.shape:
            raise DistillError(f"hidden state {layer} has shape {tuple(s.shape)} in the rewritten model, "
                               f"{tuple(t.shape)} in the original")
        if (isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2 and s.dim() >= 3
                and tuple(attention_mask.shape) == tuple(s.shape[:2])):
            keep = attention_mask.to(device=s.device) != 0
            s, t = s[keep], t[keep]
        t = t.detach().float()
        losses.append((s.float() - t).square().mean() / t.square().mean().clamp(min=1e-12))
    return torch.stack(losses).mean()


def _check_hidden_states(teacher: nn.Module, batch: Any) -> None:
    args, kwargs = _split(batch, "batch 0")
    try:
        with torch.no_grad():
            out = teacher(*args, **kwargs, output_hidden_states=True)
    except TypeError as exc:
        raise DistillError(f"match='hidden_states' calls the model with output_hidden_states=True, which "
                           f"{type(teacher).__name__} does not take ({exc}); use match='output'") from exc
    hidden_states(out)


# --------------------------------------------------------------------------- data, checkpoints


def _per_stage(value: Any, name: str, stage: str, kind: type, minimum: Any) -> Any:
    if isinstance(value, Mapping):
        unknown = set(value) - {"transfer", "finetune"}
        if unknown:
            raise ValueError(f"{name} per stage takes the keys 'transfer' and 'finetune'; got {sorted(unknown)}")
        value = value.get(stage)
    if value is None:
        if minimum is None:
            return None
        raise ValueError(f"{name} for stage {stage!r} is missing")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise TypeError(f"{name} must be {'an int' if kind is int else 'a number'} (or a dict per stage); "
                        f"got {value!r}")
    if (minimum is not None and value < minimum) or (minimum is None and not value > 0) or not math.isfinite(value):
        raise ValueError(f"{name} must be {'>= ' + str(minimum) if minimum is not None else '> 0'}; got {value!r}")
    return kind(value)


def _kind_options(kind_options: Mapping[str, Any] | None, options: Mapping[str, Any]) -> dict[str, Any]:
    """The kind's options: ``kind_options`` (a dict) and the keywords ``options``; a name in both is refused."""
    if kind_options is None:
        return dict(options)
    if not isinstance(kind_options, Mapping):
        raise TypeError(f"kind_options must be a dict of the kind's options; got {type(kind_options).__name__}")
    twice = sorted(set(kind_options) & set(options))
    if twice:
        raise TypeError(f"the kind's option(s) {', '.join(twice)} given both in kind_options and as keywords; "
                        "give each once")
    return {**kind_options, **options}


def _distill_seed(to: str, seed: int | None, distill_seed: int | None) -> int:
    """distill's own seed from ``seed`` / ``distill_seed`` (default 0), refusing ``seed=`` where the kind ``to``
    has a ``seed`` option of its own (which of the two it means cannot be told)."""
    if seed is not None and distill_seed is not None:
        raise TypeError("distill() takes its seed as seed= or distill_seed=, not both")
    if seed is not None and to != "softmax" and "seed" in kind_registry.get(to).options:
        raise TypeError(f"distill(to={to!r}, seed={seed!r}) is ambiguous: the {to} kind has a 'seed' option of its "
                        f"own; pass distill_seed={seed!r} for distill's seed (adapters, states) and "
                        f"kind_options={{'seed': ...}} for the kind's")
    value = distill_seed if distill_seed is not None else 0 if seed is None else seed
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"distill's seed must be an int; got {type(value).__name__}")
    return value


def _batches(data: Iterable[Any]) -> Sequence[Any]:
    """``data`` as something indexable: a sequence as it is, a re-iterable collection or a one-shot
    iterator read into a list."""
    if isinstance(data, (torch.Tensor, Mapping, str, bytes)) or not isinstance(data, Iterable):
        raise TypeError(f"data must be an iterable of batches (tuples, dicts or tensors); got {type(data).__name__}")
    batches = data if isinstance(data, Sequence) else list(data)
    if len(batches) == 0:
        raise DistillError("data holds no batch")
    return batches


def _split(batch: Any, what: str) -> tuple[tuple, dict]:
    """A batch as (args, kwargs)."""
    if isinstance(batch, Mapping):
        return (), dict(batch)
    if isinstance(batch, (tuple, list)):
        return tuple(batch), {}
    if isinstance(batch, torch.Tensor):
        return (batch,), {}
    raise TypeError(f"{what} must be a tuple of positional arguments, a dict of keyword arguments or a tensor; "
                    f"got {type(batch).__name__}")


def _run_teacher(teacher: nn.Module, args: tuple, kwargs: dict, index: int) -> Any:
    try:
        return teacher(*args, **kwargs)
    except Exception as exc:
        raise DistillError(f"batch {index} does not fit the model: {type(exc).__name__}: {exc}") from exc


def _check_fits(model: nn.Module, batches: Sequence[Any], index: int) -> None:
    args, kwargs = _split(batches[index], f"batch {index}")
    with torch.no_grad():
        _run_teacher(model, args, kwargs, index)


def _load_checkpoint(path: str | os.PathLike, identity: dict[str, Any]) -> dict[str, Any] | None:
    if not os.path.exists(path):
        return None
    record = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(record, dict) or record.get("format") != CHECKPOINT_FORMAT:
        raise DistillError(f"{os.fspath(path)} is not a checkpoint of attnrewrite.distill")
    differs = {k: (record.get(k), v) for k, v in identity.items() if record.get(k) != v}
    if differs:
        said = ", ".join(f"{k}: {a!r} there, {b!r} here" for k, (a, b) in differs.items())
        raise DistillError(f"{os.fspath(path)} was written by another distillation ({said}); remove it or pass "
                           f"another save_to")
    log.info("attnrewrite.distill: resuming %s from step %d", record["phase"], record["step"])
    return record


def _restore(record: dict[str, Any], params: dict[str, nn.Parameter], optimizer) -> int:
    tensors = record["tensors"]
    missing = [n for n in params if n not in tensors]
    if missing:
        raise DistillError(f"the checkpoint has no values for {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[name])
    if optimizer is not None and record.get("optimizer") is not None:
        optimizer.load_state_dict(record["optimizer"])
    return int(record["step"])
