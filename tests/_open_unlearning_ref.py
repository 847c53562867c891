"""open-unlearning's trainer losses and trainer setup, transcribed (not imported: no copy of open-unlearning is
installable at test time) from github.com/locuslab/open-unlearning at commit
d3d7cf9e6b3c125d16687d4232680d8d83548f1a:

* losses: ``src/trainer/utils.py`` (compute_kl_divergence, compute_batch_nll, compute_dpo_loss,
  compute_undial_loss, compute_wga_loss, compute_satimp_loss) and ``src/trainer/unlearn/*.py`` (grad_ascent,
  grad_diff, npo, simnpo, dpo, wga, satimp, undial, ceu, pdu, rmu): every model call is ``model(**inputs)`` with
  the labels, and every loss reads ``outputs.loss`` or ``outputs.logits`` as theirs does;
* method_args defaults: ``configs/trainer/<handler>.yaml``;
* trainer setup: ``src/trainer/__init__.py`` (TRAINER_REGISTRY, load_trainer_args, load_trainer),
  ``src/trainer/base.py`` (FinetuneTrainer.evaluate with evaluators), ``src/trainer/unlearn/base.py``
  (UnlearnTrainer.prediction_step, its non-SageMaker branch), ``configs/trainer/finetune.yaml`` (default
  TrainingArguments), ``src/evals/metrics/utils.py`` (evaluate_probability, what TOFU/MUSE metrics call).
"""
from __future__ import annotations

import os
import re

import torch
import torch.nn.functional as F
import transformers
from transformers.trainer_pt_utils import nested_detach
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

IGNORE = -100

# configs/trainer/<handler>.yaml method_args
YAML = {"GradAscent": {}, "GradDiff": dict(gamma=1.0, alpha=1.0, retain_loss_type="NLL"),
        "NPO": dict(beta=0.1, alpha=1.0, gamma=1.0, retain_loss_type="NLL"),
        "DPO": dict(beta=0.1, alpha=1.0, gamma=1.0, retain_loss_type="NLL"),
        "SimNPO": dict(delta=0.0, beta=4.5, alpha=1.0, gamma=0.125, retain_loss_type="NLL"),
        "WGA": dict(beta=1.0, alpha=1.0, gamma=1.0, retain_loss_type="NLL"),
        "SatImp": dict(beta1=5.0, beta2=1.0, alpha=1.0, gamma=0.1, retain_loss_type="NLL"),
        "UNDIAL": dict(gamma=1.0, alpha=0.0, beta=10.0, retain_loss_type="NLL"),
        "CEU": dict(ignore_first_n_answer_tokens=1),
        "PDU": dict(retain_loss_eps=None, primal_dual=True, dual_step_size=1.0, dual_update_upon="step",
                    dual_warmup_epochs=5, gamma=1.0, alpha=1.0, loss_names=["forget_loss", "retain_loss"],
                    retain_loss_type="NLL"),
        "RMU": dict(gamma=1.0, steering_coeff=2, retain_loss_type="EMBED_DIFF", alpha=1,
                    module_regex=r"model\.layers\.7", trainable_params_regex=[".*"])}

# configs/trainer/finetune.yaml args, CPU-adapted: bf16/bf16_full_eval off, optim adamw_torch (paged_adamw_32bit
# needs bitsandbytes on CUDA), report_to none, output_dir a temporary folder.
FINETUNE_ARGS = dict(per_device_train_batch_size=8, per_device_eval_batch_size=16, gradient_accumulation_steps=4,
                     learning_rate=1e-5, logging_steps=5, ddp_find_unused_parameters=None,
                     gradient_checkpointing=False, save_strategy="no", save_only_model=True, weight_decay=0.0,
                     do_train=True, do_eval=True, eval_on_start=True, eval_strategy="epoch", num_train_epochs=10,
                     seed=0, remove_unused_columns=False)  # configs/unlearn.yaml sets remove_unused_columns False


# --- src/trainer/utils.py ------------------------------------------------------------------------------------
def compute_kl_divergence(model, target_model, inputs):
    with torch.no_grad():
        ref_outputs = target_model(**inputs)
    ref_probs = F.log_softmax(ref_outputs.logits, dim=-1).view(-1, ref_outputs.logits.shape[-1])
    outputs = model(**inputs)
    current = F.log_softmax(outputs.logits, dim=-1).view(-1, outputs.logits.shape[-1])
    return F.kl_div(current, ref_probs, reduction="batchmean", log_target=True), outputs


def compute_batch_nll(model, inputs):
    outputs = model(**inputs)
    logits, labels = outputs.logits[..., :-1, :], inputs["labels"][..., 1:]
    loss = F.cross_entropy(logits.transpose(-1, -2), labels, ignore_index=IGNORE, reduction="none").sum(-1)
    return loss, outputs


def compute_dpo_loss(model, ref_model, win_inputs=None, lose_inputs=None, beta=1.0):
    win_log_ratio, lose_log_ratio = 0.0, 0.0
    if win_inputs is not None:
        win_loss, _ = compute_batch_nll(model, win_inputs)
        with torch.no_grad():
            win_ref_loss, _ = compute_batch_nll(ref_model, win_inputs)
        win_log_ratio = -(win_loss - win_ref_loss)
    if lose_inputs is not None:
        lose_loss, _ = compute_batch_nll(model, lose_inputs)
        with torch.no_grad():
            lose_ref_loss, _ = compute_batch_nll(ref_model, lose_inputs)
        lose_log_ratio = -(lose_loss - lose_ref_loss)
    return -2 / beta * F.logsigmoid(beta * (win_log_ratio - lose_log_ratio)).mean()


def compute_undial_loss(model, ref_model, inputs, beta):
    logits, labels = model(**inputs).logits[..., :-1, :], inputs["labels"][..., 1:]
    with torch.no_grad():
        teacher = ref_model(**inputs).logits[..., :-1, :]
    mask = torch.zeros_like(teacher)
    mask[torch.arange(mask.shape[0]).view(-1, 1, 1), torch.arange(mask.shape[1]).view(1, -1, 1),
         labels.unsqueeze(-1)] = 1.0
    soft = F.softmax(teacher - mask * beta, dim=-1)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), soft.view(-1, soft.size(-1)), reduction="none").mean()


def _weighted(model, inputs, b1, b2):
    logits, labels = model(**inputs).logits[..., :-1, :], inputs["labels"][..., 1:]
    ce = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE,
                         reduction="none")
    p = (-ce).exp().detach()
    return -((p ** b1) * (1 - p) ** b2 * ce)[labels.reshape(-1) != IGNORE].mean()


# --- src/trainer/unlearn/ceu.py -------------------------------------------------------------------------------
def compute_batch_ceu(model, inputs, ignore_first_n_answer_tokens=1):
    logits, labels = model(**inputs).logits, inputs["labels"]
    valid = labels != IGNORE
    update = (valid.cumsum(dim=-1) <= ignore_first_n_answer_tokens) & valid
    shifted = labels.masked_fill(update, IGNORE)[..., 1:]
    logits = logits[..., :-1, :]
    mask = shifted != IGNORE
    valid_logits, valid_labels = logits[mask], shifted[mask]
    target = valid_logits.detach().clone().scatter_(-1, valid_labels.unsqueeze(-1), float("-inf"))
    return F.cross_entropy(valid_logits, F.softmax(target, dim=-1))


# --- src/trainer/unlearn/*.py compute_loss --------------------------------------------------------------------
def _three(batch):
    return {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}


class TheirLoss:
    """One of their trainers' ``compute_loss`` (with its state: PDU's preferences, RMU's control vector)."""

    def __init__(self, handler, ref_model=None, **overrides):
        self.handler, self.ref = handler, ref_model
        self.args = {**YAML[handler], **overrides}
        self.preferences = [self.args.get("gamma"), self.args.get("alpha")]
        self.can_update = self.args.get("dual_warmup_epochs", 0) == 0
        self.control_vec = None

    def retain_loss(self, model, retain):
        if self.args.get("retain_loss_type") == "KL":
            return compute_kl_divergence(model, self.ref, retain)[0]
        if self.args.get("retain_loss_type") == "EMBED_DIFF":
            act = self._cache(model, retain, True)
            with torch.no_grad():
                ref_act = self._cache(self.ref, retain, False)
            return self._activation_loss(act, ref_act, retain["labels"] != IGNORE)
        return model(**retain).loss

    # RMU (src/trainer/unlearn/rmu.py)
    def _cache(self, model, inputs, grad):
        module = [m for n, m in model.named_modules() if re.fullmatch(self.args["module_regex"], n)][0]
        cache = []
        handle = module.register_forward_hook(lambda m, i, o: cache.append(o[0] if isinstance(o, tuple) else o))
        with torch.set_grad_enabled(grad):
            model(**inputs)
        handle.remove()
        return cache[0]

    @staticmethod
    def _activation_loss(a1, a2, mask):
        sq = F.mse_loss(a1, a2, reduction="none")
        total = (sq * mask.unsqueeze(-1).expand_as(sq)).mean(dim=2).sum(dim=1)
        return (total / mask.sum(dim=-1, keepdim=True)).mean()

    def __call__(self, model, inputs):
        h, a = self.handler, self.args
        forget = inputs["forget"]
        if h == "GradAscent":
            return -model(**_three(forget)).loss
        if h == "CEU":
            return compute_batch_ceu(model, forget, a["ignore_first_n_answer_tokens"])
        retain = _three(inputs["retain"])
        if h == "RMU":
            act = self._cache(model, _three(forget), True)
            if self.control_vec is None:
                u = torch.rand(1, 1, act.shape[-1])
                self.control_vec = u / torch.norm(u) * a["steering_coeff"]
            control = self.control_vec.to(dtype=act.dtype).expand_as(act)
            f = self._activation_loss(act, control, forget["labels"] != IGNORE)
            return a["gamma"] * f + a["alpha"] * self.retain_loss(model, retain)
        if h == "PDU":
            logits = model(**_three(forget)).logits
            logits = logits.reshape(-1, logits.size(-1))
            f = (logits.max(dim=-1)[0] - logits.mean(dim=-1)) ** 2
            mask = (forget["labels"] != IGNORE).reshape(-1)
            f = (f * mask).sum() / mask.sum()
            r = self.retain_loss(model, retain) - a["retain_loss_eps"]
            loss = (torch.tensor(self.preferences) * torch.hstack([f, r])).sum()
            if a["primal_dual"] and self.can_update and a["dual_update_upon"] == "step":
                self.preferences[1] = max(0, self.preferences[1] + a["dual_step_size"] * r.item())
            return loss
        if h == "GradDiff":
            f = -model(**_three(forget)).loss
        elif h == "NPO":
            f = compute_dpo_loss(model, self.ref, None, forget, a["beta"])
        elif h == "DPO":
            f = compute_dpo_loss(model, self.ref, forget["alternate"], forget["original"], a["beta"])
        elif h == "SimNPO":
            nll, _ = compute_batch_nll(model, forget)
            x = nll / (forget["labels"] != IGNORE).sum(-1) - a["delta"]
            f = -F.logsigmoid(a["beta"] * x).mean() * 2 / a["beta"]
        elif h == "WGA":
            f = _weighted(model, _three(forget), a["beta"], 0.0)
        elif h == "SatImp":
            f = _weighted(model, _three(forget), a["beta1"], a["beta2"])
        elif h == "UNDIAL":
            f = compute_undial_loss(model, self.ref, forget, a["beta"])
        else:
            raise ValueError(h)
        return a["gamma"] * f + a["alpha"] * self.retain_loss(model, retain)


# --- src/evals/metrics/utils.py -------------------------------------------------------------------------------
def evaluate_probability(model, batch):
    with torch.no_grad():
        output = model(**batch)
    logits, labels = output.logits[..., :-1, :], batch["labels"][..., 1:]
    losses = F.cross_entropy(logits.transpose(-1, -2), labels, ignore_index=IGNORE, reduction="none").sum(-1)
    avg = losses / (batch["labels"] != IGNORE).sum(-1)
    return [{"prob": p, "avg_loss": a} for p, a in zip(torch.exp(-avg).tolist(), avg.tolist())]


# --- src/trainer/base.py, src/trainer/unlearn/base.py ---------------------------------------------------------
class FinetuneTrainer(transformers.Trainer):
    def __init__(self, evaluators=None, template_args=None, *args, **kwargs):
        self.evaluators = evaluators
        self.template_args = template_args
        super().__init__(*args, **kwargs)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval", trial=None):
        if self.evaluators:
            if self.accelerator.is_local_main_process:
                eval_metrics = {}
                if self.accelerator.num_processes == 1:
                    run_dir = self._get_output_dir(trial=trial)
                    output_dir = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}", "evals")
                    os.makedirs(output_dir, exist_ok=True)
                    for _, evaluator in self.evaluators.items():
                        eval_metrics.update(evaluator.evaluate(output_dir=output_dir, template_args=self.template_args,
                                                               model=self.model, tokenizer=None))
                    self.log(eval_metrics)
                return eval_metrics
        if eval_dataset is None:
            return {}
        return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)


class UnlearnTrainer(FinetuneTrainer):
    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        has_labels = len(self.label_names) > 0 and all(inputs.get(k) is not None for k in self.label_names)
        inputs = self._prepare_inputs(inputs)
        labels = nested_detach(tuple(inputs.get(n) for n in self.label_names)) if has_labels else None
        with torch.no_grad():
            with self.compute_loss_context_manager():
                loss, outputs = super().compute_loss(model, inputs, return_outputs=True)
            loss = loss.mean().detach()
        if prediction_loss_only:
            return (loss, None, None)
        logits = nested_detach(tuple(v for k, v in outputs.items() if k not in (ignore_keys or []) + ["loss"]))
        return (loss, logits[0] if len(logits) == 1 else logits, labels)


# --- src/trainer/__init__.py ----------------------------------------------------------------------------------
def make_registry():
    """Their TRAINER_REGISTRY: Trainer, FinetuneTrainer, and one class per unlearning handler on UnlearnTrainer
    (GradDiff subclasses in their code; only the base matters to the adapter)."""
    registry = {"Trainer": transformers.Trainer, "FinetuneTrainer": FinetuneTrainer}
    grad_diff = type("GradDiff", (UnlearnTrainer,), {})
    for name in YAML:
        registry[name] = grad_diff if name == "GradDiff" else type(name, (grad_diff if name not in (
            "GradAscent", "CEU") else UnlearnTrainer,), {})
    return registry


def load_trainer(registry, trainer_cfg, model, train_dataset=None, eval_dataset=None, tokenizer=None,
                 data_collator=None, evaluators=None, template_args=None):
    trainer_args = transformers.TrainingArguments(**dict(trainer_cfg["args"]))
    cls = registry.get(trainer_cfg["handler"])
    return cls(model=model, train_dataset=train_dataset, eval_dataset=eval_dataset, tokenizer=tokenizer,
               data_collator=data_collator, args=trainer_args, evaluators=evaluators, template_args=template_args,
               **trainer_cfg.get("method_args", {})), trainer_args
