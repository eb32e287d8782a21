"""SoftCPT -- Soft Context Sharing for Prompt Tuning (K. Ding et al.; Neurocomputing 2024,
"Prompt Tuning with Soft Context Sharing for Vision-Language Models", arXiv 2208.13474),
variant NATA (the paper's default and best).

Several few-shot tasks are tuned jointly. A task-shared meta network makes each task's CoOp
context from the task's *name*: the task prompt ``[T]_1 ... [T]_m {task name}.`` (m learnable
vectors shared by all tasks) goes through the frozen text tower to a task feature ``t_k``, and a
linear map turns it into that task's class-prompt context::

    ctx_k = reshape(t_k @ proj, (M, W))         proj ∈ R^{D × (M·W)}, no bias
    prompt of class c of task k: [SOS] ctx_k [CLASS_c] . [EOS]

Logits are CLIP's cosine logits over task k's classes; the loss of a step is the cross-entropy
of every sample summed over tasks, divided by the batch size (Eq. 8). Here ``training_loss``
returns the *mean* cross-entropy of one task's batch; the loop weights it by the batch's share
of the global batch (``orchestrator/loop.py`` ``train_epoch``), which is the same sum.

Matches ``kding1225/softcpt trainers/mtcoop.py`` (``TaskPromptLearner``, ``PromptGen``,
``PromptLearner``, ``CustomCLIP``) with the NATA
settings of its README (``CLASS_N_CTX 0, CLASS_CSC False, TASK_N_CTX 4, TASK_CSC False,
N_CTX 16, CSC False, PG_TYPE lin``) and ``configs/trainers/MTCoOp/vit_b16_ep50.yaml``:

* ``TaskPromptLearner``: one generic task context of ``task_n_ctx`` vectors, N(0, 0.02²)
  (``TASK_CTX_INIT ""``), or the token embeddings of ``task_ctx_init``; the prompt text
  ``"<X X X X | init words> <task name>."`` with ``"_"`` → ``" "`` in the task name, tokenised
  once, its SOS and everything after the context kept fixed; task token at the end.
* ``PromptGen`` (``"lin"``): ``proj`` of shape ``(D, n_ctx · W)``, N(0, 0.02²), applied to the
  **un-normalised** task features (``D`` = the joint embedding size, the width of
  ``text_projection``); drawn after the task context, as the reference builds them.
* ``PromptLearner`` per task: CoOp's ``"X ... X <class name>."`` prompts, class token at the
  end, the generated context spliced in after SOS; ``TextEncoder``: features at the EOS token.
* ``CustomCLIP.forward``: the task prompts of *all* tasks are encoded at every forward pass, then
  the class prompts; only ``task_ctx`` and ``proj`` are trained (4,196,352 scalars on ViT-B/16).

Task prompts and class prompts are both CoOp's prompt plumbing
(:class:`~vlprompt.methods.prompts.PromptEmbeddings`): a context spliced after SOS of fixed tokens.

Deliberate changes:

* fp32 task context, generator, generated context and logits (the reference keeps CLIP and
  its parameters in fp16, ``PREC "fp16"``); the backbone may still run in fp16/bf16.
* task names. The reference reads each CoOp dataset's name from a ``task_name.txt`` in its
  folder (not published) and Fashion-20's from ``task_info.csv``. Here the name comes from
  ``task_names`` (task key → name) when given, else from the task key: the part after the last
  ``"/"``, ``"_"`` → ``" "``. For Fashion-20 (keys ``"fashion20/<task name with underscores>"``)
  that is exactly the reference's name; for the CoOp datasets it is the vlprompt dataset name
  (``"oxford pets"``, ``"caltech101"``), which need not equal the unpublished ``task_name.txt``
  -- set ``method.task_names`` to use other names. ``"_"`` → ``" "`` applies to given names too,
  as in the reference. Keys of ``task_names`` that are not tasks of the built method are ignored
  (a transfer target is built with the same options and other tasks).
* only the class prompts of the batch's task are encoded (the reference encodes every class of
  every task at every step and keeps one block per task: the same logits for that task).
* the text tower runs on prompts truncated at their longest EOS and in chunks (exact; causal);
  with several chunks, training re-computes each in backward instead of keeping it (same
  gradients; ``backbone.text_checkpoint``).
* a task or class prompt that does not fit the context length is an error naming it, where the
  reference's tokenizer would raise on the whole batch (tasks) or silently cut (classes).
* word init counts tokens, not words (equal when each word is one token).
* evaluation caches each task's text features while ``task_ctx`` and ``proj`` are unchanged
  (exact; the reference re-encodes everything per test batch).
* only NATA: the class-aware/-specific variants (``CSC True``, ``ClassPromptLearner``, class
  subsampling ``CLS_SAMPLE_RATE``), task-specific task context (NATS) and the ``linmean``/
  ``lincls`` generators are not implemented; ``task_n_ctx=0`` (no task context) neither.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from vlprompt.methods.base import Batch
from vlprompt.methods.clip import Backbone
from vlprompt.methods.common import (
    TaskClasses,
    clean_classname,
    cosine_logits,
    cross_entropy,
    hold_backbone,
    image_features,
    init_context,
    text_features_while_unchanged,
)
from vlprompt.methods.options import SoftCPTConfig
from vlprompt.methods.prompts import PromptEmbeddings, class_prompts, sentence_prompts


def task_name(task: str, task_names: Mapping[str, str]) -> str:
    """The name that goes into ``task``'s prompt: ``task_names[task]`` or the key's last part,
    ``"_"`` → ``" "`` either way (the reference's ``TaskPromptLearner``)."""
    return clean_classname(task_names.get(task, task.rsplit("/", 1)[-1])).strip()


def task_prompts(
    backbone: Backbone, names: Sequence[str], prompt_prefix: str, n_ctx: int
) -> PromptEmbeddings:
    """Tokenise ``"<prompt_prefix> <task name>."`` per task and keep the embeddings around its
    ``n_ctx`` context positions (SOS; name, ".", EOS, padding)."""

    def too_long(_: int, name: str, name_len: int, limit: int) -> str:
        return (
            f"softcpt: task name {name!r} with {n_ctx} task-context tokens needs {n_ctx + name_len + 3} "
            f"positions but {backbone.name} has {limit}; shorten it with method.task_names or lower "
            "task_n_ctx"
        )

    return sentence_prompts(backbone, names, prompt_prefix, n_ctx, too_long)


class SoftCPT(nn.Module):
    """The shared task context ``task_ctx`` and the generator ``proj``; the fixed token embeddings of
    the task prompts and of the class prompts are :attr:`task_prompts` and :attr:`prompts`."""

    def __init__(
        self,
        task_prompts: PromptEmbeddings,
        task_ctx: Tensor,
        proj: Tensor,
        prompts: PromptEmbeddings,
        task_names: Mapping[str, str],
    ) -> None:
        super().__init__()
        hold_backbone(self, prompts.backbone)
        self.tasks = tuple(task_names)  # task keys, in the order of the task prompts' rows
        self.task_names = tuple(task_names.values())  # natural-language name of each task, same order
        self.task_ctx = nn.Parameter(task_ctx)  # (task_n_ctx, W), shared by all tasks
        self.proj = nn.Parameter(proj)  # (D, n_ctx * W): PromptGen "lin"
        self.task_prompts = task_prompts  # (T rows) buffers only, none persistent
        self.prompts = prompts  # (C rows) buffers only, none persistent
        self._eval_cache: dict[str, tuple[tuple[int, ...], Tensor]] = {}

    def task_features(self) -> Tensor:
        """Task features ``t_k`` ``(T, D)`` of every task (not normalised), from the task prompts."""
        return self.task_prompts.text_features(self.task_ctx)

    def contexts(self) -> Tensor:
        """Generated class-prompt contexts ``(T, n_ctx, W)``: ``ctx_k = reshape(t_k @ proj)``."""
        generated = self.task_features().float() @ self.proj
        return generated.reshape(len(self.tasks), self.prompts.n_ctx, -1)

    def text_features(self, task: str) -> Tensor:
        """Classifier weights ``(n_cls, D)`` of ``task`` (not normalised)."""
        self.prompts.rows(task)  # an unknown task is a ValueError naming the known ones, before any work
        return self.prompts.text_features(self.contexts()[self.tasks.index(task)], task)

    def training_loss(self, batch: Batch) -> Tensor:
        """Mean cross-entropy over the batch's task's classes (the loop makes Eq. 8's sum)."""
        logits = cosine_logits(
            image_features(self.backbone, batch), self.text_features(batch.task), self.backbone.logit_scale
        )
        return cross_entropy(logits, batch.labels)

    @torch.no_grad()
    def predict(self, batch: Batch) -> Tensor:
        learned = (self.task_ctx, self.proj)  # the text features change only when these do
        text = text_features_while_unchanged(self._eval_cache, learned, batch.task, self.text_features)
        return cosine_logits(image_features(self.backbone, batch), text, self.backbone.logit_scale)

    def learned_state(self) -> dict[str, Tensor]:
        """``task_ctx`` and ``proj``: nothing task- or class-specific, so it loads into a
        SoftCPT built for any tasks (new task names give new contexts)."""
        return {"task_ctx": self.task_ctx.detach().clone(), "proj": self.proj.detach().clone()}


def build(backbone: Backbone, tasks: Mapping[str, Sequence[str]], cfg: SoftCPTConfig) -> SoftCPT:
    """Name the tasks, initialise the task context then the generator, tokenise all prompts."""
    classes = TaskClasses.of(tasks)
    names = {task: task_name(task, cfg.task_names) for task in classes.spans}
    for task, name in names.items():
        if not name:
            raise ValueError(f"softcpt: task {task!r} has an empty name; set method.task_names[{task!r}]")
    task_ctx, task_prefix = init_context(backbone, cfg.task_n_ctx, cfg.task_ctx_init)
    task_n_ctx = int(task_ctx.shape[0])
    task_fixed = task_prompts(backbone, list(names.values()), task_prefix, task_n_ctx)
    proj = torch.empty(backbone.embed_dim, cfg.n_ctx * backbone.text_width).normal_(0.0, 0.02)
    prompts = class_prompts(backbone, classes, " ".join(["X"] * cfg.n_ctx), cfg.n_ctx, "softcpt")
    return SoftCPT(task_fixed, task_ctx, proj.to(backbone.device), prompts, names)
