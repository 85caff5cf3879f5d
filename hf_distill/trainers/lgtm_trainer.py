"""`LGTMTrainer` (Ren et al., ACL 2023): the teacher's update is weighted by each sample's distillation
influence (https://hf-distill.readthedocs.io/algorithms/, "LGTM").

One optimisation step:
1. lookahead θs' = one step of the student's optimizer on its loss at the current teacher (a functional
   step on a list of tensors: no copy of the student, its optimizer state untouched);
2. v = ∇θs' CE on a quiz batch;
3. per-sample influence w_i = ∇θs ℓ_i · v, by a central difference at θs ± εv (``finite_difference``) or
   exactly by one forward-mode product (``exact``); the teacher steps on ``L_aux − λ · mean_i w_i``
   (``influence_form="meta_gradient"``, the reference), one teacher forward and one teacher backward serving
   both terms, or on L_aux with each sample's distillation term weighted by the detached, normalised w
   (``influence_form="sample_weights"``, the paper's description);
4. the student's real step on its loss against the updated teacher (done by the base trainer); with
   ``lgtm_student_targets="pre_update"`` the real step is the lookahead's own gradient instead (the teacher
   before its update taught it), which saves one teacher forward and one student backward per step.

Under gradient accumulation (``updated`` targets) the step's micro-batches are one batch to steps 1–3: the
lookahead sums their gradients, and every row of the step gets its influence.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.func import functional_call, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import record_function

from ..data.batch import DistillationBatch, dataset_columns
from ..data.label_checks import find_label_column
from ..distributed import (
    all_reduce_mean,
    is_sharded,
    mean_into_shards,
    whole,
    zeros_for_missing,
)
from ..losses.influence import (
    adamw_lookahead,
    clip_coefficient,
    exact_logit_influence,
    fd_epsilon,
    finite_difference_influence,
    global_norm,
    influence_sample_weights,
    perturbed,
    ratio_influence_scale,
    sgd_lookahead,
)
from ..losses.objectives import kl_divergence, labelled_cross_entropy
from ..teacher.loading import SEQUENCE_CLASSIFICATION, is_fsdp2
from ..teacher.optimizer import trainable_parameters
from .distillation_trainer import StudentForward, TeacherTargets
from .lgtm_config import LGTMTrainingArguments
from .lgtm_records import InfluenceRecordsMixin, rows_without_teacher_prob
from .quiz_trainer import QuizDistillTrainer


class LGTMTrainer(InfluenceRecordsMixin, QuizDistillTrainer):
    """LGTM: the teacher learns from the student's quiz loss, weighting each sample by its influence.

    ``LGTMTrainer(model=student, teacher_model=teacher, args=LGTMTrainingArguments(...), train_dataset=...,
    eval_dataset=..., quiz_dataset=None)``. After every step ``trainer.latest_influence`` holds the batch's
    per-sample weights with their dataset row ids (``idx``), and the training logs hold their summary.
    Callbacks that read it (`InfluenceLoggerCallback`) take ``trainer=``; those given in ``callbacks=[...]``
    without one are bound by `bind_callbacks`. The teacher you pass is trained in place: pass a copy
    (``copy.deepcopy(teacher)``) to keep the original.
    """

    method_name = "lgtm"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self._student_task != SEQUENCE_CLASSIFICATION or self._is_regression():
            raise ValueError(
                "LGTMTrainer supports single-label sequence classification (the paper's GLUE setting); for "
                "regression or token-level tasks use OnlineDistillTrainer or DistillationTrainer."
            )
        columns = dataset_columns(self.train_dataset)
        if columns and find_label_column(columns, self.label_names) is None:
            raise ValueError(
                "LGTMTrainer needs labels in train_dataset (looked for a 'label', 'labels' or 'label_ids' column): "
                "the student's lookahead and the teacher's auxiliary loss include their cross-entropy, and the quiz "
                "is carved from these rows. Add a 'label' column (or use OnlineDistillTrainer with alpha=1.0 and "
                "teacher_alpha=1.0 to distil without labels)."
            )
        if self.args.lgtm_student_targets == "pre_update":
            self._refuse_gradient_accumulation(
                "lgtm_student_targets='pre_update' steps the teacher from the student's gradient right after the "
                "backward of the micro-batch whose teacher forward it reuses",
                "or lgtm_student_targets='updated', which supports accumulation",
            )
        if self.args.lgtm_student_targets == "pre_update" and is_fsdp2(self.accelerator):
            raise ValueError(
                "lgtm_student_targets='pre_update' reads the student's gradient after its backward, which FSDP2 "
                "leaves sharded; use lgtm_student_targets='updated' (the default) under FSDP2."
            )
        if self.args.lgtm_student_targets == "pre_update" and self.args.fp16:
            raise ValueError(
                "lgtm_student_targets='pre_update' reads the student's gradient after the backward, which fp16 "
                "loss scaling leaves scaled; use bf16=True, full precision, or lgtm_student_targets='updated'."
            )
        self.bind_callbacks()

    @classmethod
    def _default_args_class(cls) -> type[LGTMTrainingArguments]:
        return LGTMTrainingArguments

    def create_scheduler(
        self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None
    ) -> Any:
        # The student's optimizer exists from here on: refuse one the lookahead cannot replay before step 1.
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        student_optimizer = getattr(self.optimizer, "optimizer", self.optimizer)
        if self.args.lookahead == "optimizer":
            if not isinstance(student_optimizer, torch.optim.AdamW):
                raise ValueError(
                    f"lookahead='optimizer' replays torch.optim.AdamW, but the student's optimizer is "
                    f"{type(student_optimizer).__name__}; use optim='adamw_torch' or lookahead='sgd'."
                )
            if any(group.get("amsgrad") for group in student_optimizer.param_groups):
                raise ValueError("lookahead='optimizer' does not replay AMSGrad; use lookahead='sgd'.")
        return scheduler

    # ----- the step ---------------------------------------------------------------------------------------------

    @property
    def teacher_steps_before_student_forward(self) -> bool:
        # Faithful ("updated"): before the student's real forward, so no student graph is alive during the
        # influence passes. pre_update: the teacher forward comes after the student's, the teacher step after
        # its backward (where the student's gradient exists).
        return self.args.lgtm_student_targets == "updated"

    def teacher_step(
        self, model: nn.Module, batch: DistillationBatch, student: StudentForward | None
    ) -> TeacherTargets | None:
        if student is None:  # faithful: the lookahead runs its own student forward
            self._store_influence(self.lgtm_teacher_update(model, batch))
            return None
        # pre_update: the student learns from this teacher forward's (detached) soft labels; the teacher steps
        # after the student's backward, from the gradient that backward leaves.
        teacher_logits = self._teacher_logits_with_graph(batch)
        student_logits = student.logits.detach()
        batch.after_backward.append(
            lambda: self._teacher_step_after_backward(model, batch, student_logits, teacher_logits)
        )
        return TeacherTargets(teacher_logits.detach())

    def _teacher_step_after_backward(
        self,
        model: nn.Module,
        batch: DistillationBatch,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
    ) -> None:
        params = list(trainable_parameters(self.accelerator.unwrap_model(model)).values())
        # Already averaged across ranks by the backward (DDP's reducer), as the optimizer will see them.
        grads = zeros_for_missing([p.grad for p in params], params)
        record = self.lgtm_teacher_update(model, batch, student_logits, teacher_logits, grads)
        self._store_influence(record, teacher_logits, batch.labels)

    def teacher_targets(
        self, model: nn.Module, batch: DistillationBatch, student: StudentForward
    ) -> TeacherTargets:
        targets = super().teacher_targets(model, batch, student)
        record = self.latest_influence
        if (
            self.args.lgtm_student_targets == "updated"
            and record is not None
            and rows_without_teacher_prob(record)
            and batch.labels is not None
        ):  # the record's teacher column: the soft labels the student's real step learns from, one micro-batch
            # at a time under gradient accumulation
            self._store_influence(record, targets.logits, batch.labels)
        return targets

    def _teacher_logits_with_graph(
        self, batch: DistillationBatch, teacher: nn.Module | None = None
    ) -> torch.Tensor:
        """The one teacher forward of the step, in training mode and with its graph: L_aux and both
        influence terms differentiate through it. ``teacher`` defaults to the live one."""
        teacher = teacher or self.teacher_models[0]
        teacher.train()
        with record_function("lgtm.teacher_forward"):
            logits = teacher(**batch.teacher_inputs(self._teacher_arg_names[0])).logits
        self.nonfinite.watch("teacher's logits", logits, "teacher")
        return logits

    def lgtm_teacher_update(
        self,
        model: nn.Module,
        inputs: dict[str, Any] | DistillationBatch,
        student_logits: torch.Tensor | None = None,
        teacher_logits: torch.Tensor | None = None,
        student_grads: list[torch.Tensor] | None = None,
    ) -> dict[str, Any]:
        """Steps 1–3 of the LGTM step and the teacher's optimizer step; returns the step's `influence_record`.

        Faithful (the default call): the lookahead runs its own student forwards, one micro-batch at a time
        (each graph freed by its gradient), over every micro-batch of the step (``batch.step_batches``): the
        step's g micro-batches of b rows are one batch of g·b rows to the lookahead, the influence and the
        teacher's loss. pre_update passes the step's detached ``student_logits`` with ``student_grads``, the
        gradient of the student's loss at the current teacher (averaged across ranks), and
        ``teacher_logits``, the teacher's forward with its graph (run here when None).
        """
        batch = DistillationBatch.from_collated(inputs)
        micro_batches = self.step_micro_batches(batch) if student_grads is None else [batch]
        student = self.accelerator.unwrap_model(model)
        # Under FSDP2 every pass runs on the gathered whole weights of both models (`whole_weights`).
        whole, sharded_student_params = None, None
        if is_sharded(student):
            whole = self.whole_weights(student)
            # The shards (which the optimizer holds): `whole_weights` has put them back in place.
            sharded_student_params = list(trainable_parameters(student).values())
            names, params = zip(*whole.student_values.items(), strict=True)
            student, functional_student = whole.student, whole.student_skeleton
        else:
            names, params = zip(*trainable_parameters(student).items(), strict=True)
            functional_student = student
        # The teacher's forward of each micro-batch, with its graph until the teacher's backward.
        teacher_chunks = (
            [self._teacher_logits_with_graph(b, whole and whole.teacher) for b in micro_batches]
            if teacher_logits is None
            else [teacher_logits]
        )
        teacher_logits = teacher_chunks[0] if len(teacher_chunks) == 1 else torch.cat(teacher_chunks)
        rows = _joined_rows(micro_batches)

        # 1. Lookahead: the student's gradient at the current teacher.
        with record_function("lgtm.lookahead"):
            if student_grads is None:
                student_logits, student_grads = self._lookahead_gradient(
                    student, params, micro_batches, teacher_chunks
                )
            elif student_logits is None:
                raise ValueError(
                    "lgtm_teacher_update got student_grads without student_logits: pass the (detached) logits "
                    "of the forward those gradients were taken at, or neither to run the lookahead's own forward."
                )
            lookahead_params = self._lookahead(params, student_grads, sharded_student_params)
            del student_grads  # in the faithful step, a parameter-sized set no later pass needs

        # 2. v: the quiz gradient at θs'. Influence passes run without dropout so θs' and θs± see one network.
        with record_function("lgtm.quiz_gradient_and_influence"):
            student.eval()
            try:
                quiz = DistillationBatch.from_collated(self.quiz_batch())
                quiz_loss, direction = self.quiz_gradient(
                    functional_student,
                    names,
                    lookahead_params,
                    quiz.features,
                    lambda outputs: labelled_cross_entropy(outputs.logits, quiz.labels),
                )
                del lookahead_params  # θs' is done with once v exists
                # 3. Per-sample influence; the meta-gradient form keeps the graph to the teacher's logits.
                weights_form = self.args.influence_form == "sample_weights"
                weights = torch.cat(
                    [
                        self._influence_weights(
                            functional_student,
                            names,
                            params,
                            b.features,
                            t.detach() if weights_form else t,
                            direction,
                        )
                        for b, t in zip(micro_batches, teacher_chunks, strict=True)
                    ]
                )
                self.nonfinite.watch("influence weights", weights, "student")
            finally:
                student.train()

        # 4. The teacher's gradient, one backward through the one teacher forward: L_aux − λ · mean_i w_i, or
        # L_aux with each sample's distillation term weighted by ŵ.
        with record_function("lgtm.teacher_backward_and_step"):
            teacher_params = None if whole is None else list(whole.teacher_values.values())
            if weights_form:
                sample_weights = influence_sample_weights(weights, self.args.influence_weight_beta)
                self._teacher_backward(
                    teacher_logits, student_logits, rows.labels, None, sample_weights, teacher_params
                )
                self._record_sample_weights(sample_weights)
                scale = None
            else:
                scale = self._teacher_backward(
                    teacher_logits, student_logits, rows.labels, weights.mean(), teacher_params=teacher_params
                )
            if whole is not None:  # each rank keeps its shard of the whole gradients' mean over ranks
                mean_into_shards(
                    [p.grad for p in teacher_params],
                    list(trainable_parameters(self.teacher_models[0]).values()),
                )
            self.teacher_optimizer_step()
        self._log_influence(weights, quiz_loss, scale)
        return self.influence_record(weights, rows, student_logits)

    def _influence_scale(self) -> float:
        """λ: ``influence_scale``, or the teacher's current learning rate (the reference's choice)."""
        if self.args.influence_scale is not None:
            return self.args.influence_scale
        return self.teacher_lr_scheduler.get_last_lr()[0]

    # ----- pieces -----------------------------------------------------------------------------------------------

    def _lookahead_gradient(
        self,
        student: nn.Module,
        params: tuple[torch.Tensor, ...],
        micro_batches: list[DistillationBatch],
        teacher_logits: list[torch.Tensor],
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The student's (detached) logits and its loss's gradient at the current teacher, averaged over ranks.

        Over the step's micro-batches, one forward and backward at a time, each loss weighted as Trainer
        weights it in the student's real step. The unwrapped student: DDP's reducer is not involved, the
        gradient is averaged here.
        """
        weight = self.micro_batch_loss_weight(None, len(micro_batches))
        logits, total = [], None
        for batch, teacher_chunk in zip(micro_batches, teacher_logits, strict=True):
            student_logits = student(**batch.features).logits
            loss = self._student_objective(student_logits, teacher_chunk.detach(), batch.labels)
            grads = zeros_for_missing(torch.autograd.grad(loss * weight, params, allow_unused=True), params)
            total = grads if total is None else [a + b for a, b in zip(total, grads, strict=True)]
            logits.append(student_logits.detach())
        joined = logits[0] if len(logits) == 1 else torch.cat(logits)
        return joined, all_reduce_mean(total)

    def _influence_weights(
        self,
        student: nn.Module,
        names: tuple[str, ...],
        params: tuple[torch.Tensor, ...],
        features: dict[str, Any],
        teacher_logits: torch.Tensor,
        direction: list[torch.Tensor],
    ) -> torch.Tensor:
        """Per-sample ``w_i = ∇θs ℓ_i · v``, by a central difference or exactly, with the graph to the teacher."""
        if self.args.influence_mode == "finite_difference":
            epsilon = fd_epsilon(direction, self.args.fd_radius)
            with torch.no_grad():
                logits_plus = _functional_logits(
                    student, names, perturbed(params, direction, epsilon), features
                )
                logits_minus = _functional_logits(
                    student, names, perturbed(params, direction, -epsilon), features
                )
            return finite_difference_influence(
                self._influence_per_sample(logits_plus, teacher_logits),
                self._influence_per_sample(logits_minus, teacher_logits),
                epsilon,
            )
        detached = tuple(p.detach() for p in params)

        def logits_at(*values: torch.Tensor) -> torch.Tensor:
            return _functional_logits(student, names, values, features)

        # The fused SDPA kernels support no forward-mode AD: the math backend, for this pass only.
        with sdpa_kernel(SDPBackend.MATH):
            logits_here, tangent = jvp(logits_at, detached, tuple(direction))
        return exact_logit_influence(self._influence_per_sample, logits_here, teacher_logits, tangent)

    def _teacher_backward(
        self,
        teacher_logits: torch.Tensor,
        student_logits: torch.Tensor,
        labels: torch.Tensor,
        influence: torch.Tensor | None,
        sample_weights: torch.Tensor | None = None,
        teacher_params: list[torch.Tensor] | None = None,
    ) -> float | None:
        """The teacher's gradient of ``L_aux − λ · influence`` in ``.grad`` of ``teacher_params`` (default: the
        live teacher's trainable parameters), one backward through its forward; returns λ.
        ``influence=None`` (sample_weights form): L_aux alone, its distillation term weighted."""
        aux_loss = self._teacher_aux_loss(teacher_logits, student_logits.detach(), labels, sample_weights)
        self.nonfinite.watch("teacher's loss", aux_loss, "teacher")
        if influence is None:
            aux_loss.backward()
            return None
        ratio = self.args.influence_grad_ratio
        if ratio is None and not self._is_logging_step():
            scale = self._influence_scale()
            (aux_loss - scale * influence).backward()
            return scale
        # Separate gradients: the ratio rule needs both norms, and on logging steps they tell users whether the
        # influence term matters at this λ (an extra backward).
        if teacher_params is None:
            teacher_params = list(trainable_parameters(self.teacher_models[0]).values())
        aux_grads = torch.autograd.grad(aux_loss, teacher_params, retain_graph=True, allow_unused=True)
        influence_grads = torch.autograd.grad(-influence, teacher_params, allow_unused=True)
        aux_norm = global_norm([g for g in aux_grads if g is not None])
        influence_norm = global_norm([g for g in influence_grads if g is not None])
        if ratio is None:
            scale = self._influence_scale()
        else:
            scale = ratio_influence_scale(float(aux_norm), float(influence_norm), ratio)
        self._record("teacher_grad_norm_aux", aux_norm)
        self._record("teacher_grad_norm_influence", scale * influence_norm)
        for p, a, b in zip(teacher_params, aux_grads, influence_grads, strict=True):
            if a is not None or b is not None:
                p.grad = (a if a is not None else 0) + (scale * b if b is not None else 0)
        return scale

    def _student_objective(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        """The student's training loss (as `compute_loss`), from logits."""
        distill, _ = self.distillation_term(student_logits, teacher_logits, {"labels": labels})
        task = labelled_cross_entropy(student_logits, labels, self.args.label_smoothing_factor)
        return self.student_loss(distill, task)

    def _teacher_aux_loss(
        self,
        teacher_logits: torch.Tensor,
        student_logits: torch.Tensor,
        labels: torch.Tensor,
        sample_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The online-distillation teacher loss α_t · KL(p_s ‖ p_t) + (1 − α_t) · CE (https://hf-distill.readthedocs.io/algorithms/); with
        ``sample_weights``, the KL is the weighted mean ``mean_i ŵ_i · KL_i`` (the sample_weights form)."""
        args = self.args
        ce = labelled_cross_entropy(teacher_logits, labels)
        if sample_weights is not None:
            per_sample = kl_divergence(
                teacher_logits,
                student_logits.detach(),
                args.temperature,
                args.scale_by_temperature_squared,
                reduction="none",
            )
            weighted = (sample_weights.to(per_sample.dtype) * per_sample).mean()
            self._record("teacher_kl", per_sample.detach().mean())
            self._record("teacher_task_loss", ce.detach())
            return args.teacher_alpha * weighted + (1.0 - args.teacher_alpha) * ce
        return self.online_teacher_objective(teacher_logits, student_logits, ce)

    def _influence_per_sample(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor
    ) -> torch.Tensor:
        """ℓ_i whose student gradient, dotted with v, is sample i's influence."""
        args = self.args
        if args.influence_loss == "teacher_kl":
            # The reference's teacher-side loss: the student's outputs are the targets.
            return args.teacher_alpha * kl_divergence(
                teacher_logits,
                student_logits,
                args.temperature,
                args.scale_by_temperature_squared,
                reduction="none",
            )
        return args.alpha * self.objective(student_logits, teacher_logits, reduction="none")

    def _lookahead(
        self,
        params: tuple[torch.Tensor, ...],
        grads: list[torch.Tensor],
        optimized: list[torch.Tensor] | None = None,
    ) -> list[torch.Tensor]:
        """θs' after one student step, without touching the student or its optimizer. ``optimized``: the
        parameters the optimizer holds for ``params`` when those are their gathered whole values (FSDP2)."""
        # The clipping factor, applied one parameter at a time: no clipped copy of the whole gradient.
        coefficient = clip_coefficient(grads, self.args.max_grad_norm)
        optimizer = getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate wraps it
        group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        updated = []
        for p, g, held in zip(params, grads, optimized or params, strict=True):
            group = group_of[id(held)]
            if coefficient is not None:
                g = g * coefficient
            if self.args.lookahead == "sgd":
                updated += sgd_lookahead([p], [g], group["lr"])
                continue
            updated += adamw_lookahead(
                [p],
                [g],
                [{k: whole(v) for k, v in optimizer.state.get(held, {}).items()}],
                group["lr"],
                group["betas"],
                group["eps"],
                group["weight_decay"],
            )
        return updated


def _functional_logits(
    student: nn.Module, names: tuple[str, ...], values: Any, features: dict[str, Any]
) -> torch.Tensor:
    return functional_call(student, dict(zip(names, values, strict=True)), kwargs=features).logits


def _joined_rows(micro_batches: list[DistillationBatch]) -> DistillationBatch:
    """The labels and row ids of the step's micro-batches as one batch (the first micro-batch when alone)."""
    if len(micro_batches) == 1:
        return micro_batches[0]
    row_ids = [b.row_ids for b in micro_batches]
    return DistillationBatch(
        {"labels": torch.cat([b.labels for b in micro_batches])},
        row_ids=None if any(r is None for r in row_ids) else torch.cat(row_ids),
    )
